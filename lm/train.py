"""`lm train`: run an experiment's stage (pretrain, sft, ...) on the one engine and loop.

`train(cfg, run_dir)` validates the config, writes it to the run directory, lets the
stage (`lm/stages/<cfg.stage>.py`) build its engine, data and hooks, and hands them to
`lm.loop.run`.
"""

from __future__ import annotations

from typing import Callable

from lm.config import Config
from lm.loop import evaluate, remove_run, run, write_config  # noqa: F401  (evaluate: re-exported)
from lm.sharding import make_mesh


def train(cfg: Config, run_dir: str, log: Callable = print, progress: bool = True, resume: bool = True) -> dict:
    """Train `cfg` into `run_dir`; returns a summary dict (also saved as summary.json).

    If `run_dir` holds checkpoints and `resume` is true, training continues from the
    newest readable one, with the same data order; otherwise it starts fresh (and old
    checkpoints and metrics are removed).
    """
    from lm import stages

    cfg.validate()
    if not resume:
        remove_run(run_dir)
    write_config(cfg, run_dir)
    mesh = make_mesh(cfg.mesh)
    setup = stages.get(cfg.stage).setup(cfg, run_dir, mesh, log)
    return run(cfg, run_dir, setup, log=log, progress=progress, resume=resume)
