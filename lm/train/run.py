"""Open a trained run: its config, its newest checkpoint's parameters and its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax

from data_pipeline.errors import NotFound, UserError
from data_pipeline.tokenizer import Tokenizer
from lm.config import Config, MeshConfig, from_dict
from lm.model import lora
from lm.model.sharding import make_mesh
from lm.sampling import decode
from lm.train.checkpoint import restore_params
from lm.train.engine import make_engine
from lm.train.init import load_base, pinned


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    trainer: Any  # lm.train.engine.Engine on the current devices
    params: Any  # nnx.State of parameters
    step: int
    tokenizer: Any  # data_pipeline.tokenizer.Tokenizer, or None
    run_dir: str | None = None  # where it was loaded from

    @property
    def graphdef(self):
        return self.trainer.graphdef

    def decode_weights(self, log: Callable | None = None, quantize: str | None = None) -> decode.Weights:
        """The decode engine's weights, split over the devices the run was loaded onto with
        `tensor` > 1 (each device its share of the heads and MLP width), in int8 with
        `quantize="int8"`."""
        mesh = self.trainer.mesh
        tensor = mesh.shape["tensor"]
        try:
            w = decode.prepare(self.graphdef, self.params, tensor=tensor, devices=list(mesh.devices.flat),
                               int8=quantize == "int8")
        except ValueError as e:  # heads that do not divide; int8 and a split together
            raise UserError(f"--tensor {tensor}{' --quantize ' + quantize if quantize else ''}: {e}") from None
        if log is not None and quantize:
            log(f"decode weights in {quantize}: {decode.weight_bytes(w)[1] / 2**20:,.1f} MiB (the embedding and "
                "norms as they were)")
        if log is not None and tensor > 1:
            per, total = decode.weight_bytes(w)
            log(f"decode weights split over {tensor} devices: {per / 2**20:,.1f} MiB on each of {total / 2**20:,.1f} "
                "MiB in all (the embeddings and norms whole on each)")
        return w

    def model(self):
        return self.trainer.model(self.params)


def read_config(run_dir: str) -> Config:
    """A run's config (its config.json), without touching a device."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise NotFound(f"{run_dir} is not a run directory (no config.json); train one with `lm train`")
    with open(path) as f:
        return from_dict(json.load(f))


def load_run(run_dir: str, single_device: bool = True, log: Callable = print, step: int | None = None,
             tensor: int = 1, mesh: MeshConfig | None = None) -> LoadedRun:
    """The parameters (only: never the optimiser state) of the newest readable checkpoint of
    `run_dir`, or of `step`, onto one device by default, or split over this process's first
    `tensor` devices by the tensor-parallel rules (for a decode engine split so: no device
    holds the whole model), or laid out by `mesh` over every device of every process. A
    LoRA run's adapters are merged into its base model."""
    cfg = read_config(run_dir)
    devices = jax.local_devices()[:1] if single_device and mesh is None else jax.devices()  # (this process's first)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=mesh)
    elif tensor > 1:
        devices = jax.local_devices()[:tensor]
        if len(devices) < tensor:
            raise UserError(f"{tensor} tensor-parallel devices asked for; this process has {len(devices)}")
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=tensor))
    elif single_device:
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    run_cfg = cfg
    # Sampling and scoring need the full model only: an engine without adapters.
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    engine = make_engine(cfg, make_mesh(cfg.mesh, devices))
    if run_cfg.lora.rank:
        lora_engine = make_engine(dataclasses.replace(run_cfg, mesh=cfg.mesh), engine.mesh)
        adapters, step = restore_params(run_dir, lora_engine.abstract_state().params, step, log)
        base, _ = load_base(pinned(run_cfg, run_dir), engine.abstract_params(), run_dir, log, pin=False)
        params = jax.jit(lambda b, a: lora.merge(b, a, run_cfg.lora))(base, adapters)
    else:
        params, step = restore_params(run_dir, engine.abstract_params(), step, log)
    tok_path = os.path.join(run_dir, "tokenizer.model")
    tokenizer = Tokenizer(tok_path) if os.path.exists(tok_path) else None
    return LoadedRun(cfg=cfg, trainer=engine, params=params, step=step, tokenizer=tokenizer, run_dir=run_dir)
