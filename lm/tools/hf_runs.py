"""Run directories <-> Hugging Face folders: `lm export-hf` and `lm import-hf`.

The Llama format itself (tensors, config, tokenizer files) is `lm.interop.hf`; this module
adds what a run directory holds: its newest checkpoint, its config and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
from flax import nnx

from lm import stages
from lm.config import Config, ConfigError, DataConfig, MeshConfig, to_dict
from lm.interop.hf import export_llama, import_llama
from lm.model.sharding import make_mesh
from lm.stages import STAGES
from lm.train import checkpoint
from lm.train.engine import make_trainer
from lm.train.run import load_run
from lm.train.rundir import holds_run


def export_run(run_dir: str, out_dir: str, log=print, force: bool = False) -> str:
    """`lm export-hf`: the newest checkpoint of a run, as a Hugging Face LLaMA folder.

    A non-empty `out_dir` is refused unless `force`; with `force` only the files the export
    writes are replaced (other files there are left alone)."""

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir} is a file; give a folder to export into")

    if os.path.isdir(out_dir) and holds_run(out_dir):  # even with --force: it would overwrite config.json
        raise ConfigError(f"{out_dir} holds a training run (config.json, checkpoints/): export into a folder "
                          "of its own")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ConfigError(f"{out_dir} is not empty ({', '.join(sorted(os.listdir(out_dir))[:4])}...); export into "
                          "a new folder, or add --force to replace the files an export writes there")
    run = load_run(run_dir, log=log)
    tok = run.tokenizer.path if run.tokenizer is not None else None
    chat = run.cfg.stage in STAGES and stages.get(run.cfg.stage).chat
    export_llama(run.cfg.model, jax.device_get(run.params), out_dir, tok, chat_template=chat)
    log(f"exported step {run.step} of {run_dir} to {out_dir} (config.json, model.safetensors"
        + (", tokenizer files)" if tok else ")"))
    return out_dir


def import_run(hf_dir: str, run_dir: str, log=print, force: bool = False) -> str:
    """`lm import-hf`: a Hugging Face LLaMA folder as a run (config.json, tokenizer, step-0
    checkpoint) that `lm train RUN_DIR/config.json --run-dir RUN_DIR` continues training.

    A `run_dir` that already holds a run is refused unless `force`, which replaces that
    run (its checkpoints and metrics) with the import."""


    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is a file; give a folder for the run")
    if (holds_run(run_dir) or os.path.exists(os.path.join(run_dir, "config.json"))) and not force:
        raise ConfigError(f"{run_dir} already holds a run; import into a new folder, or add --force to replace it")
    mcfg, params = import_llama(hf_dir)
    if force:
        checkpoint.remove(run_dir)
        for name in ("metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    tok_src = os.path.join(hf_dir, "tokenizer.model")
    tok = os.path.join(run_dir, "tokenizer.model")
    if os.path.exists(tok_src):
        shutil.copyfile(tok_src, tok)
    # a folder exported with a chat template holds a chat model: the run is an SFT run, which
    # `lm chat`, `lm sample --chat` and `lm serve` talk to with the template
    chat = _has_chat_template(hf_dir)
    cfg = Config(name=os.path.basename(os.path.abspath(run_dir)), stage="sft" if chat else "pretrain", model=mcfg,
                 mesh=MeshConfig(),  # all devices on the data axis: any machine evaluates or trains it
                 data=DataConfig(seq_len=min(mcfg.max_seq_len, 256), tokenizer=tok if os.path.exists(tok) else None))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, _ = trainer.init_state(0)  # fresh optimiser state; parameters replaced below
    new_params = jax.tree.map(lambda x: x, state.params)
    nnx.replace_by_pure_dict(new_params, params)
    state = dataclasses.replace(state, params=jax.device_put(new_params, trainer.state_sharding.params))
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2)
    meta = {"config": to_dict(cfg), "vocab_size": mcfg.vocab_size,
            "tokenizer_sha256": checkpoint.file_sha256(tok) if os.path.exists(tok) else None}
    ckpt = checkpoint.Checkpointer(run_dir, log=log)
    ckpt.save(0, state, None, meta)
    ckpt.close()
    log(f"imported {hf_dir} ({'a chat model, ' if chat else ''}{mcfg.n_layers} layers, D={mcfg.d_model}, N={mcfg.n_heads}, K={mcfg.n_kv_heads}, "
        f"V={mcfg.vocab_size}) into {run_dir}; continue with: lm train {run_dir}/config.json --run-dir {run_dir}")
    return run_dir


def _has_chat_template(hf_dir: str) -> bool:
    try:
        with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
