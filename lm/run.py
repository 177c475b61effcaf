"""Open a trained run: its config, its newest checkpoint's parameters and its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax

from lm.config import Config, MeshConfig, from_dict


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    trainer: Any  # lm.train_step.Trainer on the current devices
    params: Any  # nnx.State of parameters
    step: int
    tokenizer: Any  # data_pipeline.tokenizer.Tokenizer, or None

    @property
    def graphdef(self):
        return self.trainer.graphdef

    def model(self):
        return self.trainer.model(self.params)


def load_run(run_dir: str, single_device: bool = True, log: Callable = print) -> LoadedRun:
    """Restore the newest readable checkpoint of `run_dir` (onto one device by default)."""
    from data_pipeline.tokenizer import Tokenizer
    from lm.checkpoint import Checkpointer
    from lm.sharding import make_mesh
    from lm.train_step import make_trainer

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); train one with `lm train`")
    with open(path) as f:
        cfg = from_dict(json.load(f))
    devices = jax.devices()[:1] if single_device else jax.devices()
    if single_device:
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices))
    ckpt = Checkpointer(run_dir, log=log)
    try:
        restored = ckpt.restore_latest(trainer.abstract_state())
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{run_dir} has no readable checkpoint")
    state, _, _, step = restored
    tok_path = os.path.join(run_dir, "tokenizer.model")
    tokenizer = Tokenizer(tok_path) if os.path.exists(tok_path) else None
    return LoadedRun(cfg=cfg, trainer=trainer, params=state.params, step=step, tokenizer=tokenizer)
