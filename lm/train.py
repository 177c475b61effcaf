"""`lm train`: run an experiment's stage (pretrain, sft, ...) on the one engine and loop.

`train(cfg, run_dir)` validates the config, writes it to the run directory, lets the
stage (`lm/stages/<cfg.stage>.py`) build its engine, data and hooks, and hands them to
`lm.loop.run`.
"""

from __future__ import annotations

import os
from typing import Callable

from lm import interrupt
from lm.config import Config
from lm.loop import evaluate, run, write_config  # noqa: F401  (evaluate: re-exported)
from lm.rundir import RunDirError, RunLock, check_continuable, fresh_start
from lm.sharding import make_mesh


def train(cfg: Config, run_dir: str, log: Callable = print, progress: bool = True, resume: bool = True) -> dict:
    """Train `cfg` into `run_dir`; returns a summary dict (also saved as summary.json).

    If `run_dir` holds a run and `resume` is true, training continues from its newest
    readable checkpoint, with the same data order, provided the config still fits those
    checkpoints (else a `RunDirError` says what differs and what to do). With `resume`
    false (`--fresh`) the old run is deleted once the new config, data and tokenizer
    have been checked. One process at a time: the directory is locked while training.
    """
    import jax

    from lm import stages

    cfg.validate()
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    main = jax.process_index() == 0
    with RunLock(run_dir, enabled=main):
        if resume:
            check_continuable(cfg, run_dir, log)  # before anything in the directory changes
        mesh = make_mesh(cfg.mesh)

        def prepare():
            with interrupt.during("preparing the data and tokenizer"):
                return stages.get(cfg.stage).setup(cfg, run_dir, mesh, log)

        setup = fresh_start(run_dir, prepare) if not resume and main else prepare()
        write_config(cfg, run_dir)
        return run(cfg, run_dir, setup, log=log, progress=progress, resume=resume)
