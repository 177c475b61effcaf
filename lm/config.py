"""Configuration: frozen dataclasses, and command-line overrides checked against them.

An experiment is a Python module whose `config()` returns a `Config`. Users change one
field from the command line with `--set section.field=value`; the key and the type of
the value are checked against these dataclasses before any work starts, so a typo
fails in a second with the nearest valid key instead of after an hour of training.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from data_pipeline.config import DataConfig, SourceConfig  # noqa: F401  (data configs live with the data)
from data_pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad experiment configuration or override; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape. Dimension names follow lm/model.py's alphabet."""

    vocab_size: int = 4096  # V
    d_model: int = 256  # D
    n_layers: int = 4  # L
    n_heads: int = 4  # N (query heads)
    n_kv_heads: int = 4  # K (key/value heads; must divide N)
    head_dim: int | None = None  # H; None means d_model // n_heads
    d_ff: int = 704  # F (SwiGLU hidden width)
    max_seq_len: int = 256  # context length the model is built for
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # "bfloat16" on accelerators
    scan_layers: bool = True  # lax.scan over layers: compile time independent of depth
    # Rematerialisation of each block in the backward pass:
    # "none" keeps all activations, "full" recomputes the block,
    # "dots" saves matmul outputs only, "dots_no_batch" saves weight matmuls only.
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Training attention (lm/attention.py): "xla" our einsum attention over a (B, T, S) mask;
    # "jax_dpa" jax.nn.dot_product_attention with that mask; fused kernels that take the
    # packed documents' segment ids and never build the mask: "pallas"
    # (Triton flash kernel), "splash" (TPU), "flash" = the platform's fused kernel with
    # document masking; "cudnn" (NVIDIA, causal over whole rows: needs document_mask=False).
    attention: Literal["xla", "jax_dpa", "cudnn", "pallas", "pallas_skip", "splash", "flash"] = "xla"
    attention_block: int = 64  # "xla": query block size; skips the causal upper triangle
    # Packed rows hold several documents; True: a token attends only within its document.
    document_mask: bool = True
    scalar_heads: tuple[str, ...] = ()  # extra (D,) -> scalar heads, e.g. ("reward",) or ("value",)

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model.head_dim={self.head_dim} must be positive (or None: d_model // n_heads)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly"
            )
        if self.attention == "cudnn" and self.compute_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"model.attention=cudnn needs model.compute_dtype bfloat16 or float16, "
                              f"got {self.compute_dtype}; use attention=pallas or flash in float32")
        if self.attention == "cudnn" and self.document_mask:
            raise ConfigError("model.attention=cudnn cannot mask packed documents: set model.document_mask=false "
                              "(attend across documents, as GPT-2 does) or use attention=pallas or flash")
        if self.head_size % 2:
            raise ConfigError(f"head size {self.head_size} must be even for rotary embeddings")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the devices the other axes leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # "adamw"; or "muon": Muon on the attention/MLP kernels, AdamW on the rest (lm/optim.py)
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3  # AdamW's peak learning rate
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    z_loss: float = 0.0  # weight of log(Z)^2 in the loss
    # Muon (optim.name="muon"): peak learning rate of the kernels (same schedule shape as lr),
    # Nesterov momentum, and decoupled weight decay scaled by the scheduled muon_lr
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the frozen base (rank 0: off, every parameter is trained)."""

    rank: int = 0  # r
    alpha: float = 16.0  # the update is (alpha / r) * A @ B
    dropout: float = 0.0
    # matrices that get adapters, among q, k, v, o, gate, up, down
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Reward models and DPO-family training on preference pairs (lm/preference.py)."""

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    beta: float = 0.1  # DPO/IPO/SimPO temperature; the implicit rewards are beta x log-ratios
    label_smoothing: float = 0.0  # DPO/SimPO: the chance a label is flipped (conservative DPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term
    margin: float = 0.0  # reward model: a margin the chosen reward must beat the rejected one by
    # DPO/IPO: the reference's log-probabilities computed "online" in every step (a frozen copy of
    # the weights, or the LoRA base), or "precomputed" once before training over every training and
    # held-out pair and kept in the run directory (reference_logps.npz): no second copy in memory
    reference: Literal["online", "precomputed"] = "online"


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Reinforcement learning from rewards: GRPO and PPO (lm/rl.py, lm/stages/grpo.py, lm/stages/ppo.py)."""

    task: str = "arith"  # prompts and answers: "arith" (synthetic additions), "gsm8k" (../shared/data/gsm8k)
    reward: str = "exact"  # "exact" (the reply is the answer), "number" (its last number), "gsm8k_strict"
    # ("#### N" format), "gsm8k_lenient" (last number), or "module:function" (completion, example) -> float
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0  # sampling temperature (the trainer's log-probabilities use the same)
    max_new: int = 16  # most new tokens per sample
    clip_eps: float = 0.2  # PPO clipping of the importance ratio: [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float = 0.0  # 0: clip_eps (symmetric); DAPO uses a larger upper bound, e.g. 0.28
    beta: float = 0.04  # KL penalty to the reference (the starting model); 0 never builds a reference
    loss_norm: Literal["sequence", "token", "constant"] = "sequence"  # GRPO / DAPO / Dr. GRPO
    scale_rewards: bool = True  # divide group advantages by the group's std (False: Dr. GRPO)
    updates_per_rollout: int = 1  # passes (epochs) over each rollout batch (mu)
    minibatches: int = 1  # a rollout holds data.batch_size x minibatches rows; one optimiser step per minibatch
    eval_prompts: int = 200  # held-out prompts for pass@1 (greedy)
    train_problems: int = 5000  # "arith": training problems generated (2 digits: 8,100 exist)
    digits: int = 2  # "arith": digits of each operand
    # PPO only (lm/stages/ppo.py): a value head "value" on the policy (model.scalar_heads), GAE
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    vf_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # the new value stays within this of the rollout's (0: no clipping)
    kl_in: Literal["reward", "loss"] = "reward"  # KL to the reference as a per-token reward penalty, or in the loss
    kl_target: float = 0.0  # > 0: adapt the penalty coefficient (starting at beta) towards this KL per sequence
    kl_horizon: int = 10000  # rows over which the adaptive coefficient moves by at most 20%
    whiten_rewards: bool = False  # scale the token rewards of a rollout to unit variance before GAE


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    steps: int = 1000
    # Start from another run's parameters (a run directory: its newest checkpoint, or step
    # `init_step`; or a Hugging Face LLaMA folder), with a fresh optimiser and data state.
    # Resuming a run that was started this way resumes the run itself.
    init_from: str | None = None
    init_step: int | None = None
    microbatches: int = 1  # gradient accumulation: the global batch is split this many times
    loss_chunks: int = 1  # >1: logits and loss computed in this many chunks of the sequence
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 16
    num_samples: int = 3  # samples printed at the end
    sample_tokens: int = 96
    sample_temperature: float = 0.8
    peak_flops_per_device: float | None = None  # override the table / CPU measurement
    checkpoint_every: int = 0  # save every N steps (0: only at the end and on preemption)
    checkpoint_minutes: float = 0.0  # and/or every M minutes of training (0: off)
    checkpoint_keep: int = 3  # keep the last K checkpoints (plus the best by held-out loss)
    max_bad_steps: int = 5  # stop after this many consecutive NaN/Inf steps (each one is skipped)
    # Downstream tasks scored at each evaluation and logged as task/<name>/<metric> (lm-
    # evaluation-harness conventions, lm/evaluate.py), e.g. ("hellaswag",): the first
    # `eval_task_items` items of each, read from eval_data_dir (default: LM_DATA or ../shared/data).
    eval_tasks: tuple[str, ...] = ()
    eval_task_items: int = 200
    eval_data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "experiment"
    stage: str = "pretrain"  # the training stage (lm/stages/<stage>.py): pretrain, sft, ...
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    lora: LoraConfig = LoraConfig()
    pref: PreferenceConfig = PreferenceConfig()
    rl: RLConfig = RLConfig()

    def validate(self) -> "Config":
        self.model.validate()
        if self.pref.beta <= 0:
            raise ConfigError(f"pref.beta={self.pref.beta} must be positive")
        for key in ("group_size", "max_new", "updates_per_rollout", "minibatches", "eval_prompts", "digits",
                    "kl_horizon"):
            if getattr(self.rl, key) <= 0:
                raise ConfigError(f"rl.{key}={getattr(self.rl, key)} must be positive")
        if self.rl.temperature <= 0 or self.rl.clip_eps <= 0 or self.rl.beta < 0:
            raise ConfigError("rl.temperature and rl.clip_eps must be positive and rl.beta not negative")
        for key in ("vf_coef", "value_clip", "kl_target", "clip_eps_high"):
            if getattr(self.rl, key) < 0:
                raise ConfigError(f"rl.{key}={getattr(self.rl, key)} must not be negative")
        if not (0 <= self.rl.gamma <= 1 and 0 <= self.rl.lam <= 1):
            raise ConfigError(f"rl.gamma={self.rl.gamma} and rl.lam={self.rl.lam} must be in [0, 1]")
        if not 0 <= self.pref.label_smoothing < 0.5:
            raise ConfigError(f"pref.label_smoothing={self.pref.label_smoothing} must be in [0, 0.5)")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.data.corpus == "sources" and not self.data.sources:
            raise ConfigError("data.corpus='sources' needs data.sources (a tuple of SourceConfig)")
        names = [src.name for src in self.data.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources names must be unique, got {names}")
        for key in ("seq_len", "batch_size"):
            if getattr(self.data, key) <= 0:
                raise ConfigError(f"data.{key}={getattr(self.data, key)} must be positive")
        for key in ("steps", "log_every", "microbatches", "loss_chunks", "max_bad_steps"):
            if getattr(self.trainer, key) <= 0:
                raise ConfigError(f"trainer.{key}={getattr(self.trainer, key)} must be positive")
        if self.trainer.eval_tasks:
            from lm.evaluate import TASK_METRICS

            unknown = [t for t in self.trainer.eval_tasks if t not in TASK_METRICS]
            if unknown:
                raise ConfigError(f"trainer.eval_tasks: unknown task(s) {unknown}; available: "
                                  f"{', '.join(TASK_METRICS)}")
        for key in ("eval_every", "eval_batches", "checkpoint_every", "num_samples", "sample_tokens",
                    "eval_task_items"):
            if getattr(self.trainer, key) < 0:
                raise ConfigError(f"trainer.{key}={getattr(self.trainer, key)} must not be negative (0: off)")
        for key in ("data", "fsdp", "tensor"):
            v = getattr(self.mesh, key)
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{key}={v} must be positive, or -1 for the devices the other axes leave")
        if self.optim.name not in ("adamw", "muon"):
            raise ConfigError(f"unknown optimiser optim.name={self.optim.name!r}; choose 'adamw' or 'muon'")
        if self.optim.lr < 0 or self.optim.warmup_steps < 0 or self.optim.clip_norm < 0:
            raise ConfigError("optim.lr, optim.warmup_steps and optim.clip_norm must not be negative")
        if self.data.batch_size % self.trainer.microbatches:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be divisible by "
                f"trainer.microbatches={self.trainer.microbatches}"
            )
        from lm.stages import STAGES  # noqa: PLC0415 -- the registry imports stage modules lazily

        if self.stage not in STAGES:
            close = difflib.get_close_matches(self.stage, list(STAGES), n=1)
            raise ConfigError(f"unknown stage {self.stage!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (stages: {', '.join(STAGES)})")
        if self.lora.rank:
            from lm.lora import check

            check(self.lora)
            if not self.trainer.init_from:
                raise ConfigError("lora.rank>0 trains adapters on a frozen base: set trainer.init_from to a run "
                                  "directory or a Hugging Face folder")
        return self


# ---------------------------------------------------------------------------------------
# Overrides: "--set optim.lr=3e-4"


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _named_items(value: Any) -> bool:
    """A non-empty tuple of dataclasses with a `name` (e.g. data.sources)."""
    return (isinstance(value, tuple) and bool(value)
            and all(dataclasses.is_dataclass(v) and hasattr(v, "name") for v in value))


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) config dataclass.

    Items of a tuple of named configs are addressed by name: `data.sources.wiki.weight`.
    """
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, prefix + f.name + ".")
        elif _named_items(value):
            for item in value:
                keys += [k for k in all_keys(item, f"{prefix}{f.name}.{item.name}.") if not k.endswith(".name")]
        else:
            keys.append(prefix + f.name)
    return keys


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Convert `raw` (a string from the command line, or a Python value) to type `tp`."""
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            lowered = raw.lower()
            value = {"true": True, "false": False, "none": None, "null": None}.get(lowered, raw)

    def fits(v: Any, t: Any, text: Any = raw) -> tuple[bool, Any]:
        origin = typing.get_origin(t)
        if t is Any:
            return True, v
        if origin is Literal:
            if v not in typing.get_args(t) and isinstance(text, str) and text in typing.get_args(t):
                return True, text  # e.g. model.remat=none: the choice "none", not None
            return (v in typing.get_args(t)), v
        if origin in (typing.Union, types.UnionType):
            for arm in typing.get_args(t):
                ok, cv = fits(v, arm, text)
                if ok:
                    return True, cv
            return False, v
        if t is type(None):
            return v is None, v
        if t is bool:
            return isinstance(v, bool), v
        if t is int:
            return isinstance(v, int) and not isinstance(v, bool), v
        if t is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            return ok, float(v) if ok else v
        if t is str:
            # A string field takes the text as written ("--set data.tokenizer=a.model").
            return True, text if isinstance(text, str) else str(v)
        if origin is tuple:  # tuple[str, ...]: a list/tuple literal, or one comma-separated string
            arm = typing.get_args(t)[0]
            items = v if isinstance(v, (list, tuple)) else (raw.split(",") if isinstance(raw, str) else [v])
            out = []
            for item in items:
                item = item.strip() if isinstance(item, str) else item
                ok, cv = fits(item, arm, item)
                if not ok:
                    return False, v
                out.append(cv)
            return True, tuple(out)
        return isinstance(v, t), v

    ok, converted = fits(value, tp)
    if not ok:
        raise ConfigError(f"--set {key}={raw!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return converted


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return `cfg` with dotted-key overrides applied; raises ConfigError on a bad key or type."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    valid = all_keys(cfg)
    for key, raw in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            if not close:  # try matching on the last component, e.g. "lr" -> "optim.lr"
                last = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]]
                close = last[:1]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint} (valid keys: lm info --keys)")
        cfg = _replace_path(cfg, key.split("."), raw, key)
    return cfg.validate()


def _replace_path(obj: Any, path: list[str], raw: Any, key: str) -> Any:
    name = path[0]
    if _named_items(obj):  # a tuple of named configs: path[0] is an item's name
        return tuple(_replace_path(item, path[1:], raw, key) if item.name == name else item for item in obj)
    if len(path) == 1:
        tp = _field_types(type(obj))[name]
        return dataclasses.replace(obj, **{name: _coerce(key, raw, tp)})
    return dataclasses.replace(obj, **{name: _replace_path(getattr(obj, name), path[1:], raw, key)})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json)."""
    return Config(
        name=d.get("name", "experiment"),
        model=ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("model", {}).items()}),
        mesh=MeshConfig(**d.get("mesh", {})),
        optim=OptimConfig(**d.get("optim", {})),
        data=_data_from_dict(d.get("data", {})),
        trainer=TrainerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("trainer", {}).items()}),
        lora=LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("lora", {}).items()}),
        stage=d.get("stage", "pretrain"),
        pref=PreferenceConfig(**d.get("pref", {})),
        rl=RLConfig(**d.get("rl", {})),
    )


def _data_from_dict(d: dict) -> DataConfig:
    d = dict(d)
    d["sources"] = tuple(SourceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                         for s in d.get("sources", ()))
    return DataConfig(**d)
