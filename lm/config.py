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
import os
import types
import typing
from typing import Any, Literal

from data_pipeline.config import DataConfig, SourceConfig  # noqa: F401  (data configs live with the data)
from data_pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad experiment configuration or override; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape. Dimension names follow lm/model/transformer.py's alphabet."""

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
    # Speedrun levers (off by default; README "Levers"): logits squashed to cap * tanh(z / cap)
    # (Gemma 2, modded-nanogpt; 0 = off), and the attention output and MLP down projections
    # initialised to zero, so each block starts as the identity (modded-nanogpt)
    logit_softcap: float = 0.0
    zero_init_out: bool = False
    # The MLP: "swiglu" down(silu(x W_gate) * x W_up) (LLaMA), or "relu2" down(relu(x W_up)^2), no
    # gate (Primer; modded-nanogpt): two matrices instead of three, so d_ff can grow by 3/2 at equal size
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    # U-net skips (modded-nanogpt): the outputs of the first L//2 layers are added, each times a
    # learned scalar (starting at 1), to the inputs of the last L//2 layers in reverse order
    # (layer L-1-i receives layer i's output)
    unet_skips: bool = False
    # Value embeddings (modded-nanogpt): every layer has its own (V, K*H) table whose row for the
    # input token is added to that layer's values (a lookup: no FLOPs, L*V*K*H more parameters)
    value_embeds: bool = False
    # Sliding-window attention in some layers (Gemma 2, modded-nanogpt): with window > 0, a token
    # of a local layer attends to itself and the window-1 tokens before it; every
    # window_global_every-th layer (layers k-1, 2k-1, ...) attends to the whole prefix (0: none)
    window: int = 0
    window_global_every: int = 2
    # Multi-token prediction (training only; DeepSeek-V3, Gloeckle et al. 2024): besides the next
    # token, the final hidden state also predicts the tokens 2..1+mtp_tokens ahead, each through
    # its own (D, D) projection and RMS norm into the shared output head; the loss adds
    # mtp_weight x their mean cross-entropy. Inference and export use the next-token head only.
    mtp_tokens: int = 0
    mtp_weight: float = 0.3
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # "bfloat16" on accelerators
    scan_layers: bool = True  # lax.scan over layers: compile time independent of depth
    # Rematerialisation of each block in the backward pass:
    # "none" keeps all activations, "full" recomputes the block,
    # "dots" saves matmul outputs only, "dots_no_batch" saves weight matmuls only.
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Training attention (lm/model/attention.py): "xla" our einsum attention over a (B, T, S) mask;
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
        if self.mlp not in ("swiglu", "relu2"):
            raise ConfigError(f"model.mlp={self.mlp!r} is not 'swiglu' or 'relu2'")
        if self.mtp_tokens < 0 or not self.mtp_weight >= 0:
            raise ConfigError(f"model.mtp_tokens={self.mtp_tokens} and model.mtp_weight={self.mtp_weight} must not be "
                              "negative (mtp_tokens=0 turns multi-token prediction off)")
        if self.unet_skips and self.n_layers < 2:
            raise ConfigError(f"model.unet_skips=true needs at least 2 layers (model.n_layers={self.n_layers})")
        if self.window < 0 or self.window_global_every < 0:
            raise ConfigError(f"model.window={self.window} and model.window_global_every={self.window_global_every} "
                              "must not be negative (window=0 turns sliding windows off)")
        if self.window and self.attention not in ("xla", "jax_dpa"):
            raise ConfigError(f"model.window={self.window} needs model.attention 'xla' or 'jax_dpa' (the fused "
                              f"kernels take no window), not {self.attention!r}")
        if not self.logit_softcap >= 0:
            raise ConfigError(f"model.logit_softcap={self.logit_softcap} must be >= 0 (0 turns soft-capping off)")
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
    # "adamw"; or "muon": Muon on the attention/MLP kernels, AdamW on the rest (lm/train/optim.py)
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
    # Levers (README "Levers"): the polynomial that orthogonalises each update, "newton_schulz"
    # (Keller Jordan's quintic, the same coefficients 5 times) or "polar_express" (a minimax
    # quintic per iteration, Amsel et al. 2025); and NorMuon (Li et al. 2025): each output
    # neuron's row of the orthogonal update divided by its running RMS (decay muon_beta2),
    # then the whole update scaled back to its norm before that division
    muon_ns: Literal["newton_schulz", "polar_express"] = "newton_schulz"
    muon_normalize: bool = False
    muon_beta2: float = 0.95


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the matrices of a block (lm/model/lora.py)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the frozen base (rank 0: off, every parameter is trained)."""

    rank: int = 0  # r
    alpha: float = 16.0  # the update is (alpha / r) * A @ B
    dropout: float = 0.0
    # matrices that get adapters, among q, k, v, o, gate, up, down
    targets: tuple[str, ...] = LORA_TARGETS

    def validate(self) -> None:
        """Raise ConfigError (one line: the key and the fix) for an unusable LoRA config."""
        valid = ", ".join(LORA_TARGETS)
        if self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank} must be >= 0 (0 turns LoRA off); set e.g. lora.rank=8")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets has unknown {unknown}; valid targets are {valid}")
        if self.rank > 0 and not self.targets:
            raise ConfigError(f"lora.targets is empty with lora.rank={self.rank}; "
                              f"name some of {valid}, or set lora.rank=0 to turn LoRA off")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha/rank); "
                              "set e.g. lora.alpha=16")
        if self.dropout != 0:
            raise ConfigError("lora.dropout>0 is not supported yet: adapters are merged into the "
                              "weights inside the step; set lora.dropout=0")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Reward models and DPO-family training on preference pairs (lm/objectives/preference.py)."""

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
    """Reinforcement learning from rewards: GRPO and PPO (lm/objectives/policy.py, lm/stages/grpo.py, lm/stages/ppo.py)."""

    task: str = "arith"  # prompts and answers: "arith" (synthetic additions), "calc" (4-digit sums, 3x2-digit
    # products: for a model with a calculator), "gsm8k" (../shared/data/gsm8k)
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
    tools: str = ""  # tools the policy may call in its rollouts ("calculator", "module:function", comma-separated)
    max_tool_calls: int = 2  # rounds of tool calls per sample (generation goes on after each round's results)
    tool_result_tokens: int = 32  # a tool's result is cut to this many tokens in the sequence
    sft_without_tools: float = 0.25  # SFT on a task with rl.tools: this share of its records answers without tools
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
    # Warm-ups (lm/train/warmup.py; 0: off): the first *_steps steps cut each row into pieces
    # of seq_warmup_start, 2x, ... tokens / train on the first batch_warmup_start, 2x, ... rows
    seq_warmup_steps: int = 0
    seq_warmup_start: int = 64
    batch_warmup_steps: int = 0
    batch_warmup_start: int = 1
    loss_chunks: int = 1  # >1: logits and loss computed in this many chunks of the sequence
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 16  # held-out batches per source in each evaluation (at least 1)
    num_samples: int = 3  # samples printed at the end
    sample_tokens: int = 96
    sample_temperature: float = 0.8
    peak_flops_per_device: float | None = None  # override the table / CPU measurement
    checkpoint_every: int = 0  # save every N steps (0: only at the end and on preemption)
    checkpoint_minutes: float = 0.0  # and/or every M minutes of training (0: off)
    checkpoint_keep: int = 3  # keep the last K checkpoints (plus the best by held-out loss)
    max_bad_steps: int = 5  # stop after this many consecutive NaN/Inf steps (each one is skipped)
    # Downstream tasks scored at each evaluation and logged as task/<name>/<metric> (lm-
    # evaluation-harness conventions, lm/eval/evaluate.py), e.g. ("hellaswag",): the first
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
                    "kl_horizon", "tool_result_tokens"):
            if getattr(self.rl, key) <= 0:
                raise ConfigError(f"rl.{key}={getattr(self.rl, key)} must be positive")
        if self.rl.temperature <= 0 or self.rl.clip_eps <= 0 or self.rl.beta < 0:
            raise ConfigError("rl.temperature and rl.clip_eps must be positive and rl.beta not negative")
        if not 0 <= self.rl.sft_without_tools <= 1:
            raise ConfigError(f"rl.sft_without_tools={self.rl.sft_without_tools} must be in [0, 1]")
        for key in ("vf_coef", "value_clip", "kl_target", "clip_eps_high", "max_tool_calls"):
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
        self._check_ranges()
        for key in ("steps", "log_every", "microbatches", "loss_chunks", "max_bad_steps"):
            if getattr(self.trainer, key) <= 0:
                raise ConfigError(f"trainer.{key}={getattr(self.trainer, key)} must be positive")
        for key in ("eval_every", "checkpoint_every", "num_samples", "sample_tokens", "eval_task_items"):
            if getattr(self.trainer, key) < 0:
                raise ConfigError(f"trainer.{key}={getattr(self.trainer, key)} must not be negative (0: off)")
        for key in ("data", "fsdp", "tensor"):
            v = getattr(self.mesh, key)
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{key}={v} must be positive, or -1 for the devices the other axes leave")
        if self.optim.name not in ("adamw", "muon"):
            raise ConfigError(f"unknown optimiser optim.name={self.optim.name!r}; choose 'adamw' or 'muon'")
        if self.optim.muon_ns not in ("newton_schulz", "polar_express"):
            raise ConfigError(f"optim.muon_ns={self.optim.muon_ns!r} is not 'newton_schulz' or 'polar_express'")
        if self.optim.name != "muon" and (self.optim.muon_ns != "newton_schulz" or self.optim.muon_normalize):
            raise ConfigError(f"optim.muon_ns and optim.muon_normalize are Muon's levers; optim.name="
                              f"{self.optim.name!r} does not use them: set optim.name=muon or leave them at their "
                              "defaults")
        if self.model.mtp_tokens >= self.data.seq_len:
            raise ConfigError(f"model.mtp_tokens={self.model.mtp_tokens} must be less than data.seq_len="
                              f"{self.data.seq_len} (each predicts a token further ahead in the row)")
        self._check_warmups()
        if self.data.batch_size % self.trainer.microbatches:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be divisible by "
                f"trainer.microbatches={self.trainer.microbatches}"
            )
        if self.lora.rank:
            self.lora.validate()
            if not self.trainer.init_from:
                raise ConfigError("lora.rank>0 trains adapters on a frozen base: set trainer.init_from to a run "
                                  "directory or a Hugging Face folder")
        return self

    def _check_warmups(self) -> None:
        """Batch-size and sequence-length warm-ups (lm/train/warmup.py) that mean something."""
        t, d = self.trainer, self.data
        for key, steps, start, full, what in (
                ("seq", t.seq_warmup_steps, t.seq_warmup_start, d.seq_len, "data.seq_len"),
                ("batch", t.batch_warmup_steps, t.batch_warmup_start, d.batch_size, "data.batch_size")):
            if steps < 0:
                raise ConfigError(f"trainer.{key}_warmup_steps={steps} must not be negative (0: off)")
            if not steps:
                continue
            if steps > t.steps:
                raise ConfigError(f"trainer.{key}_warmup_steps={steps} exceeds trainer.steps={t.steps}")
            ratio = full // start if start > 0 else 0
            if start <= 0 or start >= full or full % start or ratio & (ratio - 1):
                raise ConfigError(
                    f"trainer.{key}_warmup_start={start} must be {what}={full} divided by a power of two "
                    f"(2, 4, ...): the warm-up doubles it up to {what}")
        if t.seq_warmup_steps and self.model.mtp_tokens >= t.seq_warmup_start:
            raise ConfigError(f"model.mtp_tokens={self.model.mtp_tokens} must be less than trainer.seq_warmup_start="
                              f"{t.seq_warmup_start} (each extra token is predicted within the warm-up's pieces)")

    def _check_ranges(self) -> None:
        """Numbers outside the range where they mean something: one line naming the key, the
        value and the range (written as `not (allowed)`, so that NaN is refused too)."""
        o, d, t = self.optim, self.data, self.trainer
        checks = [
            ("optim.lr", o.lr, o.lr >= 0, "must not be negative"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "must not be negative"),
            ("optim.clip_norm", o.clip_norm, o.clip_norm >= 0, "must not be negative (0: no clipping)"),
            ("optim.eps", o.eps, o.eps > 0, "must be positive, e.g. 1e-8 (Adam divides by sqrt(v) + eps)"),
            ("optim.b1", o.b1, 0 <= o.b1 < 1, "must be in [0, 1), e.g. 0.9"),
            ("optim.b2", o.b2, 0 <= o.b2 < 1, "must be in [0, 1), e.g. 0.95"),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1,
             "must be in [0, 1] (the final learning rate as a fraction of optim.lr)"),
            ("optim.decay_fraction", o.decay_fraction, 0 <= o.decay_fraction <= 1,
             "must be in [0, 1] (the share of the steps spent decaying)"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must not be negative"),
            ("optim.z_loss", o.z_loss, o.z_loss >= 0, "must not be negative (0: off)"),
            ("optim.muon_lr", o.muon_lr, o.muon_lr >= 0, "must not be negative"),
            ("optim.muon_momentum", o.muon_momentum, 0 <= o.muon_momentum < 1, "must be in [0, 1), e.g. 0.95"),
            ("optim.muon_weight_decay", o.muon_weight_decay, o.muon_weight_decay >= 0, "must not be negative"),
            ("optim.muon_beta2", o.muon_beta2, 0 <= o.muon_beta2 < 1, "must be in [0, 1), e.g. 0.95"),
            ("data.heldout_fraction", d.heldout_fraction, 0 <= d.heldout_fraction < 1,
             "must be in [0, 1) (the share of documents kept out of training)"),
            ("data.prefetch", d.prefetch, d.prefetch >= 0, "must not be negative (0: no read-ahead thread)"),
            ("data.num_workers", d.num_workers, d.num_workers >= 0,
             "must not be negative (0: read in the main process)"),
            ("data.num_shards", d.num_shards, d.num_shards >= 0, "must not be negative (0: one per process)"),
            ("data.shuffle_rows", d.shuffle_rows, d.shuffle_rows >= 0, "must not be negative (0: no shuffle)"),
            ("data.chunk_tokens", d.chunk_tokens, d.chunk_tokens >= -1,
             "must be positive, 0 (never cut documents) or -1 (data.seq_len)"),
            ("data.tokenizer_sample_mb", d.tokenizer_sample_mb, d.tokenizer_sample_mb > 0, "must be positive"),
            ("trainer.eval_batches", t.eval_batches, t.eval_batches > 0,
             "must be positive (the held-out loss is the mean over this many batches; "
             "trainer.eval_every=0 evaluates only at the end)"),
            ("trainer.checkpoint_keep", t.checkpoint_keep, t.checkpoint_keep >= 1,
             "must be at least 1 (the last K checkpoints are kept)"),
            ("trainer.checkpoint_minutes", t.checkpoint_minutes, t.checkpoint_minutes >= 0,
             "must not be negative (0: off)"),
            ("trainer.sample_temperature", t.sample_temperature, t.sample_temperature >= 0,
             "must not be negative (0: greedy)"),
            ("trainer.init_step", t.init_step, t.init_step is None or t.init_step >= 0,
             "must not be negative (or None: the newest checkpoint)"),
            ("trainer.peak_flops_per_device", t.peak_flops_per_device,
             t.peak_flops_per_device is None or t.peak_flops_per_device > 0,
             "must be positive (or None: the table or a measurement)"),
        ]
        for src in d.sources:
            key = f"data.sources.{src.name}"
            checks += [
                (f"{key}.heldout_fraction", src.heldout_fraction, 0 <= src.heldout_fraction < 1,
                 "must be in [0, 1) (the share of the source's documents kept out of training)"),
                (f"{key}.weight", src.weight, src.weight > 0,
                 "must be positive (the source's share of training tokens; to leave it out, remove it from "
                 "data.sources)"),
            ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}={value} {allowed}")

    def check_inputs(self) -> None:
        """Files the config names that must exist before a run starts (not part of `validate`,
        which also checks the configs of finished runs, whose inputs may have moved since)."""
        tok = self.data.tokenizer
        if tok is not None and (not os.path.exists(tok) or os.path.isdir(tok)):
            what = "is a directory" if os.path.isdir(tok) else "does not exist"
            raise ConfigError(f"data.tokenizer={tok!r} {what}: give the path of a SentencePiece .model file "
                              "(`lm tokenizer train` makes one), or data.tokenizer=None to train one with the run")


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


def _type_name(tp: Any, json: bool = False) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if json:  # the names of JSON values
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            return " or ".join(_type_name(arm, json=True) for arm in typing.get_args(tp))
        if typing.get_origin(tp) is tuple:
            arm = typing.get_args(tp)[0]
            return "a list of " + ({str: "strings", int: "integers", float: "numbers"}.get(arm) or _type_name(arm))
        names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
                 type(None): "null"}
        if tp in names:
            return names[tp]
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, raw: Any, tp: Any, where: str | None = None) -> Any:
    """Convert `raw` (a string from the command line, or a Python value) to type `tp`.

    With `where` (the name of a JSON file), `raw` is a value parsed from that file: it is
    taken as it is, so "2" is a string, not a number, and lists stand for tuples."""
    value = raw
    if isinstance(raw, str) and where is None:
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
            if where is not None:
                return isinstance(v, str), v
            # A string field takes the text as written ("--set data.tokenizer=a.model").
            return True, text if isinstance(text, str) else str(v)
        if origin is tuple:  # tuple[str, ...]: a list/tuple literal, or one comma-separated string
            arm = typing.get_args(t)[0]
            if where is not None and not isinstance(v, (list, tuple)):
                return False, v
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
        if where is not None:
            raise ConfigError(f"{where}: {key}={raw!r}: expected {_type_name(tp, json=True)}, got {_json_type(raw)}")
        raise ConfigError(f"--set {key}={raw!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return converted


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _did_you_mean(key: str, valid: list[str]) -> str:
    """"; did you mean 'optim.lr'?" for a mistyped `key` (else ""): the nearest valid key, else one
    with the same last component (e.g. "lr" -> "optim.lr")."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        close = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return `cfg` with dotted-key overrides applied; raises ConfigError on a bad key or type."""
    return set_keys(cfg, overrides).validate()


def set_keys(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """`apply_overrides` without the final `Config.validate`."""
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
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, valid)} (valid keys: lm info --keys)")
        cfg = _replace_path(cfg, key.split("."), raw, key)
    return cfg


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


def from_dict(d: Any, where: str = "config.json") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json, `where`).

    Every key and the type of every value are checked as `--set` checks them: an unknown or
    misspelt key, a section that is not an object or a value of the wrong type is a
    ConfigError naming `where` and the key (with the nearest valid key). Missing keys take
    their defaults. The values' ranges are left to `Config.validate`."""
    return _dataclass_from_dict(Config, d, where, "")


def _dataclass_from_dict(cls: type, d: Any, where: str, prefix: str) -> Any:
    hints = _field_types(cls)
    what = f"{prefix[:-1]!r}" if prefix else "the config"
    if not isinstance(d, dict):
        fields = f"sections {', '.join(hints)}" if cls is Config else f"{cls.__name__} fields: lm info --keys"
        raise ConfigError(f"{where}: {what} must be an object ({fields}), got {_json_type(d)}")
    kwargs = {}
    for name, value in d.items():
        key = prefix + str(name)
        if name not in hints:
            here = [prefix + k for k in hints]
            # a near miss here ("stepz"), else the same name in another section ("lr" -> "optim.lr")
            close = (difflib.get_close_matches(key, here, n=1, cutoff=0.75)
                     or [k for k in all_keys(Config()) if k.split(".")[-1] == name][:1]
                     or difflib.get_close_matches(key, here, n=1, cutoff=0.5))
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section = "section" if not prefix and isinstance(value, dict) else "key"
            raise ConfigError(f"{where}: unknown config {section} {key!r}{hint} (valid keys: lm info --keys)")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _dataclass_from_dict(tp, value, where, key + ".")
        elif cls is DataConfig and name == "sources":
            kwargs[name] = _sources_from_list(value, where, key)
        else:
            kwargs[name] = _coerce(key, value, tp, where=where)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {what} lacks {', '.join(repr(m) for m in missing)}")
    return cls(**kwargs)


def _sources_from_list(items: Any, where: str, key: str) -> tuple:
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: {key!r} must be a list of sources (objects with a name, kind, paths, ...), "
                          f"got {_json_type(items)}")
    out = []
    for k, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        out.append(_dataclass_from_dict(SourceConfig, item, where,
                                        f"{key}.{name}." if isinstance(name, str) else f"{key}[{k}]."))
    return tuple(out)
