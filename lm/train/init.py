"""Starting points: the parameters of another run or of a Hugging Face folder.

`trainer.init_from` names a run directory (its newest readable checkpoint, or step
`trainer.init_step`) or a Hugging Face LLaMA folder. Only parameters are read — never the
optimiser moments, which are twice the model's size — and laid out for this run's mesh.
The source's model must have this run's shape; parameters this run has and the source
lacks (a new scalar head) keep their fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from data_pipeline.errors import NotFound
from lm.config import Config, ConfigError, from_dict
from lm.interop.hf import import_llama
from lm.model.transformer import Transformer
from lm.train.checkpoint import restore_params


def is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "config.json"))


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(os.path.join(path, "config.json"))


def source_tokenizer(path: str) -> str | None:
    """The tokenizer.model of a run or Hugging Face folder, if it has one."""
    tok = os.path.join(path, "tokenizer.model")
    if os.path.exists(tok):
        return tok
    if is_run_dir(path):  # an older run that named its tokenizer without keeping a copy
        with open(os.path.join(path, "config.json")) as f:
            named = json.load(f).get("data", {}).get("tokenizer")
        if named and os.path.exists(named):
            return named
    return None


def source_model_config(path: str):
    """The ModelConfig of a run directory or Hugging Face folder."""
    if is_run_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            return from_dict(json.load(f)).model
    if is_hf_dir(path):
        return import_llama(path)[0]
    raise ConfigError(f"trainer.init_from={path!r} is neither a run directory (config.json and checkpoints/) "
                      "nor a Hugging Face folder (config.json and model.safetensors); train or export one first")


def load_params(path: str, abstract_params, step: int | None = None, log: Callable = print) -> tuple[Any, int | None]:
    """Parameters of `path` as an nnx.State shaped and laid out like `abstract_params`
    (ShapeDtypeStructs with shardings). Returns (params, source step or None for HF)."""
    if is_run_dir(path):
        src_cfg = source_model_config(path)
        src_abstract = _abstract_for(src_cfg, abstract_params)
        src, src_step = restore_params(path, src_abstract, step, log)
        src = src.to_pure_dict()
    elif is_hf_dir(path):
        _, src = import_llama(path)
        src_step = None
    else:
        source_model_config(path)  # raises the error that says what is wrong
        raise AssertionError
    return _fill(abstract_params, src, path), src_step


def _abstract_for(model_cfg, like):
    """Abstract parameters of `model_cfg`, laid out like `like` where paths match."""
    shapes = nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)
    flat_like = dict(jax.tree_util.tree_flatten_with_path(like)[0])
    repl = jax.tree.leaves(like)[0].sharding
    repl = jax.sharding.NamedSharding(repl.mesh, jax.sharding.PartitionSpec())

    def one(path, x):
        ref = flat_like.get(path)
        sh = ref.sharding if ref is not None and ref.shape == x.shape else repl
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _fill(abstract_params, src: dict, path: str):
    """An nnx.State like `abstract_params` holding `src`'s arrays (pure dict); leaves the
    source lacks (extra heads) are initialised as a fresh model would (zeros)."""
    def names(p) -> tuple[str, ...]:  # a tree path as plain names, without nnx's ".value"
        out = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
        return tuple(k for k in out if k != "value")

    flat_src = {names(p): v for p, v in jax.tree_util.tree_flatten_with_path(src)[0]}

    def one(p, x):
        key = names(p)
        v = flat_src.get(key)
        if v is None:
            if key[0] == "scalar_heads":  # a new head: zero, as Transformer initialises it
                return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
            raise ConfigError(f"trainer.init_from={path!r} has no parameter {'/'.join(key)}; "
                              "it is not a model of this architecture")
        if tuple(v.shape) != tuple(x.shape):
            raise ConfigError(f"trainer.init_from={path!r}: {'/'.join(key)} has shape {tuple(v.shape)} but this "
                              f"model needs {tuple(x.shape)}; make the model config match the source's")
        return jax.device_put(np.asarray(v, x.dtype) if not isinstance(v, jax.Array) else v.astype(x.dtype),
                              x.sharding)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def check_model_matches(cfg: Config, path: str) -> None:
    """The run's model must have the source's shape (all but extra heads)."""
    src = source_model_config(path)
    mine = dataclasses.asdict(cfg.model)
    theirs = dataclasses.asdict(src)
    shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "tie_embeddings", "qk_norm", "mlp", "unet_skips", "value_embeds", "window", "window_global_every",
                  "logit_softcap")
    diff = [f"model.{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in shape_keys if mine[k] != theirs[k]]
    if diff:
        raise ConfigError(f"trainer.init_from={path!r} is another model shape ({'; '.join(diff)}); "
                          "take the model config from the source (the sft experiments do)")


PIN_FILE = "init_from.json"  # in a run directory: the base run and step it started from


def base_step(cfg: Config, run_dir: str | None) -> int | None:
    """The step of `trainer.init_from` a run starts from: `trainer.init_step` if set, else
    the step it recorded when it first loaded its base (RUN/init_from.json), so that a base
    run trained further later changes nothing here (a resumed DPO run keeps its reference,
    a LoRA run its base). None: the base's newest checkpoint (not loaded yet, or a Hugging
    Face folder)."""
    if cfg.trainer.init_step is not None or not run_dir:
        return cfg.trainer.init_step
    try:
        with open(os.path.join(run_dir, PIN_FILE)) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{os.path.join(run_dir, PIN_FILE)} (the base step this run started from) is unreadable "
                          f"({type(e).__name__}): set trainer.init_step to the step of {cfg.trainer.init_from} "
                          "it started from") from None
    if not isinstance(rec, dict) or rec.get("path") != os.path.abspath(cfg.trainer.init_from):
        return None  # another base: this run is being started over from it
    return rec.get("step")


def pinned(cfg: Config, run_dir: str) -> Config:
    """`cfg` with trainer.init_from as RUN_DIR/init_from.json recorded it (an absolute path,
    beside the step the run started from), when it has one: reading a finished run must not
    depend on the directory it is read from, nor on the path it is reached by."""
    try:
        with open(os.path.join(run_dir, PIN_FILE)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return cfg
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        return cfg
    # (base_step then reads the recorded step: the pin's path is now init_from's)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, init_from=rec["path"]))


def _pin(cfg: Config, run_dir: str | None, step: int | None) -> None:
    if not run_dir or step is None or cfg.trainer.init_step is not None:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, PIN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"path": os.path.abspath(cfg.trainer.init_from), "step": int(step)}, f)
    os.replace(path + ".tmp", path)


def load_base(cfg: Config, abstract_params, run_dir: str | None, log: Callable = print, pin: bool = True):
    """`trainer.init_from`'s parameters at the run's base step (`base_step`), recording the
    step the first time (if `pin`: training does, reading a run never writes): (params, step)."""
    path, step = cfg.trainer.init_from, base_step(cfg, run_dir)
    try:
        params, got = load_params(path, abstract_params, step, log)
    except NotFound as e:
        if step is None or cfg.trainer.init_step is not None:
            raise
        raise ConfigError(f"{run_dir} started from step {step} of {path}, which is gone from there ({e}); "
                          f"set trainer.init_step to another step of it, or start over (--fresh)") from None
    if pin and step is None and jax.process_index() == 0:
        _pin(cfg, run_dir, got)
    return params, got


def init_params_loader(cfg: Config, engine, log: Callable = print, run_dir: str | None = None) -> Callable | None:
    """A function that loads `trainer.init_from`'s parameters for `engine` (at the step the
    run in `run_dir` started from: `base_step`), or None."""
    path = cfg.trainer.init_from
    if not path:
        return None
    check_model_matches(cfg, path)

    said = []  # the loader runs more than once in some stages (a reference, a before-evaluation): say it once

    def load():
        pinned = base_step(cfg, run_dir) is not None and cfg.trainer.init_step is None
        params, step = load_base(cfg, engine.abstract_params(), run_dir, log)
        if said:
            return params
        said.append(step)
        log(f"parameters from {path}" + (f" (step {step}{', the step this run started from' if pinned else ''})"
                                         if step is not None else "") + "; optimiser and data start fresh")
        if not pinned and is_run_dir(path) and not os.path.exists(os.path.join(path, "summary.json")):
            log(f"WARNING: {path} has not finished training (no summary.json): this run starts from its step "
                f"{step}; finish that run first if you meant its final model")
        return params

    return load
