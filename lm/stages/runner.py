"""`lm train`: run an experiment's stage (pretrain, sft, ...) on the one engine and loop;
and what `lm eval --tasks heldout` asks a run's stage.

`train(cfg, run_dir)` validates the config, writes it to the run directory, lets the
stage (`lm/stages/<cfg.stage>.py`) build its engine, data and hooks, and hands them to
`lm.train.loop.run`.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax

from data_pipeline.errors import UserError
from lm import stages
from lm.config import Config
from lm.eval import evaluate as tasks
from lm.model.sharding import make_mesh
from lm.stages.common import check_tasks
from lm.train import interrupt
from lm.train.loop import evaluate, run, write_config
from lm.train.run import LoadedRun
from lm.train.rundir import RunDirError, RunLock, check_continuable, fresh_start


def train(cfg: Config, run_dir: str, log: Callable = print, progress: bool = True, resume: bool = True) -> dict:
    """Train `cfg` into `run_dir`; returns a summary dict (also saved as summary.json), whose
    "headline" is the run's result in a line.

    If `run_dir` holds a run and `resume` is true, training continues from its newest
    readable checkpoint, with the same data order, provided the config still fits those
    checkpoints (else a `RunDirError` says what differs and what to do). With `resume`
    false (`--fresh`) the old run is deleted once the new config, data and tokenizer
    have been checked. One process at a time: the directory is locked while training.
    """
    cfg.validate()
    stage = stages.get(cfg.stage)  # an unknown stage fails here, before any work
    check_tasks(cfg)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    main = jax.process_index() == 0
    with RunLock(run_dir, enabled=main):
        if resume:
            check_continuable(cfg, run_dir, log)  # before anything in the directory changes
        mesh = make_mesh(cfg.mesh)

        def prepare():
            with interrupt.during("preparing the data and tokenizer"):
                return stage.setup(cfg, run_dir, mesh, log)

        setup = fresh_start(run_dir, prepare) if not resume and main else prepare()
        write_config(cfg, run_dir)
        summary = run(cfg, run_dir, setup, log=log, progress=progress, resume=resume)
    if not summary.get("stopped") and "headline" not in summary:
        loss = summary.get("heldout_loss", float("nan"))
        summary["headline"] = f"held-out loss {loss:.3f}" if loss == loss else None  # (NaN: nothing held out)
    return summary


def evaluate_heldout(run: LoadedRun, run_dir: str, log: Callable = print, required: bool = True) -> dict | None:
    """Held-out loss of a run on its stage's held-out data (pretraining text; for SFT runs
    the loss on the assistant tokens of the held-out conversations). Stages measured
    otherwise (reward, DPO, GRPO, PPO): a UserError saying where their measure is, or None
    unless `required`."""
    stage = stages.get(run.cfg.stage)
    if stage.heldout_data is None:
        if not required:
            log(f"(no task 'heldout' for a {run.cfg.stage} run: its measure is its {stage.measure})")
            return None
        raise UserError(f"the task 'heldout' is the next-token loss on held-out text (pretraining) or replies "
                        f"(SFT); {run_dir} is a {run.cfg.stage} run, whose measure is its {stage.measure}; "
                        "the other tasks (hellaswag, arc_easy, ...) apply to every run")
    data = stage.heldout_data(run.cfg, run_dir, run.tokenizer, lambda *_: None)
    out = evaluate(run.trainer, run.trainer.compile_eval_step(), run.params, {}, data.heldout, data.heldout_bytes)
    out["ppl"] = math.exp(out["eval_loss"])
    if stage.heldout_tokens != "all":
        out["tokens"] = stage.heldout_tokens
    return out


def evaluate_run(run_dir: str, task_names, *args, all_tasks: bool = False, **kwargs) -> dict:
    """`lm eval`: `lm.eval.evaluate.evaluate_run`, with the task "heldout" scored on the data
    of the run's stage (`evaluate_heldout`). With `all_tasks` (no task named), "heldout" is
    left out for the stages it does not measure."""
    def heldout(run, run_dir, log):
        return evaluate_heldout(run, run_dir, log, required=not all_tasks)

    return tasks.evaluate_run(run_dir, task_names, *args, heldout=heldout, **kwargs)
