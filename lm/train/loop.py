"""The one host loop every stage runs: data in, compiled steps, hooks, metrics out.

A stage (`lm/stages/*.py`) hands the loop a `Setup`: the engine (objective, optimiser,
shardings), its data, where the parameters start, and extra hooks. The loop owns what
every stage needs and must get right once: resuming the run exactly (state, data
iterator, metrics), starting from another run's parameters (`trainer.init_from`),
preemption (SIGTERM/SIGINT in any phase: see `lm/train/interrupt.py`), NaN/Inf steps, the
progress bar, metrics in JSON Lines and TensorBoard, periodic evaluation and checkpoints.

The step is asynchronous: the host fetches metrics (and so waits for the device) only on
logging steps, so the next batch is prepared while the device computes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from data_pipeline.jsonl import write_jsonl
from data_pipeline.pipeline import DataSource, global_batch
from lm.config import Config, ConfigError, to_dict
from lm.model.transformer import flops_per_token, param_count
from lm.train import interrupt, perf, warmup
from lm.train.checkpoint import Checkpointer
from lm.train.engine import Engine
from lm.train.logger import MetricsLogger, plot_loss, read_metrics
from lm.train.rundir import RunDirError, merge_json


@dataclasses.dataclass
class Hook:
    """`fn(ctx, metrics)` after every `every` steps and after the last one (`at_end`), on
    the host, with that step's metrics fetched from the device; it may add entries to
    `metrics` (they are logged). Hooks run in order: evaluation, the stage's own, then
    the checkpoint (which records the held-out loss evaluation put in `metrics`)."""

    fn: Callable[["Context", dict], None]
    every: int = 0
    at_end: bool = True
    name: str = ""

    def due(self, ctx: "Context") -> bool:
        return bool((self.every and ctx.step % self.every == 0) or (self.at_end and ctx.last))


@dataclasses.dataclass
class Setup:
    """What a stage gives the loop."""

    engine: Engine
    data: DataSource
    meta: dict  # stored with every checkpoint (tokenizer hash, where the run started from, ...)
    init_params: Callable[[], Any] | None = None  # full model parameters to start from (None: random)
    hooks: list[Hook] = dataclasses.field(default_factory=list)
    finish: Callable[["Context", dict], None] | None = None  # after the last step: report, samples
    # more figures of each evaluation, from the model's parameters (e.g. downstream tasks)
    evaluators: list[Callable[[Any], dict]] = dataclasses.field(default_factory=list)
    scores_heldout: bool = False  # the stage scores held-out data itself (RL: pass@1), not from data.heldout


@dataclasses.dataclass
class Context:
    """The run as hooks see it."""

    cfg: Config
    run_dir: str
    engine: Engine
    data: DataSource
    state: Any
    frozen: dict
    log: Callable
    main: bool
    step: int = 0  # steps done
    last: bool = False  # the step just done is the run's last
    preempted: str | None = None  # the signal received, if any
    evaluate: Callable | None = None  # evaluate() -> {"eval_loss": ..., ...} of the current parameters

    @property
    def model_params(self):
        return self.engine.model_params(self.state.params, self.frozen)


def evaluate(engine: Engine, eval_fn, params, frozen: dict, heldout: dict[str, list[dict]],
             nbytes: dict[str, int] | None = None) -> dict[str, float]:
    """Held-out metrics per source and overall. For next-token objectives: nats/token
    ("eval_loss") and, when the text's bytes are known, bits per byte ("eval_bpb")."""
    nbytes = nbytes or {}
    out, totals = {}, {}
    total_bytes = 0
    for name, batches in heldout.items():
        sums: dict[str, float] = {}
        for b in batches:
            r = jax.device_get(eval_fn(params, global_batch(b, engine.batch_sharding), frozen))
            for k, v in r.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        w = max(sums.get("weight", 0.0), 1.0)
        if len(heldout) > 1:
            out.update({f"eval_{k}/{name}": v / w for k, v in sums.items() if k != "weight"})
            if nbytes.get(name):
                out[f"eval_bpb/{name}"] = sums["loss"] / np.log(2) / nbytes[name]
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
        total_bytes += nbytes.get(name, 0)
    w = max(totals.get("weight", 0.0), 1.0)
    out.update({f"eval_{k}": v / w for k, v in totals.items() if k != "weight"})
    out.setdefault("eval_loss", float("nan"))
    if total_bytes and len(nbytes) == len(heldout) and "loss" in totals:
        out["eval_bpb"] = totals["loss"] / np.log(2) / total_bytes
    return out


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric lines logged after `step` (they are recomputed after a resume)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    write_jsonl(path, [r for r in read_metrics(run_dir) if r.get("step", 0) <= step])


_READ_NOW = object()  # (a data state to read when saving)


class _Checkpoints(Hook):
    """Save every `trainer.checkpoint_every` steps and/or `checkpoint_minutes`, after the last
    step and on preemption; never a state whose last step was skipped as non-finite."""

    def __init__(self, ckpt: Checkpointer, cfg: Config, data, meta: dict):
        super().__init__(self.save, cfg.trainer.checkpoint_every, True, "checkpoint")
        self.ckpt, self.data, self.meta = ckpt, data, meta
        self.minutes = cfg.trainer.checkpoint_minutes
        self.last_time = time.time()
        self.saved_step: int | None = None  # the newest step whose save started

    def due(self, ctx) -> bool:
        late = self.minutes and time.time() - self.last_time > 60 * self.minutes
        return super().due(ctx) or bool(late) or ctx.preempted is not None

    def save(self, ctx, m: dict, data_state: Any = _READ_NOW) -> None:
        """Save the state of step `ctx.step`, with the data position after its batch (read
        now unless given: a data wait interrupted after it may have moved the iterator)."""
        if int(ctx.state.bad_streak) == 0:
            if data_state is _READ_NOW:
                data_state = _data_state(self.data)
            if self.ckpt.save(ctx.step, ctx.state, data_state, self.meta,
                              {"eval_loss": m["eval_loss"]} if "eval_loss" in m else None):
                self.saved_step = ctx.step
            self.last_time = time.time()


def _data_state(data) -> dict | None:
    try:
        return copy.deepcopy(data.get_state())
    except Exception:  # noqa: BLE001 -- a source without resumable state: save the rest
        return None


class _Meter:
    """Interval means and throughput: the loss is summed on the device (no sync), and the
    host reads it, with the step time, only when metrics are logged."""

    def __init__(self, peak: float, remeasure: Callable[[], float] | None = None):
        self.peak = peak
        self.remeasure = remeasure  # a measured peak (a CPU's) can be measured again, once
        self.loss_sum, self.steps, self.wait, self.t_last, self.compile_s = None, 0, 0.0, None, 0.0
        self.tokens, self.flops, self.paused = 0, 0.0, 0.0

    def add(self, metrics: dict, wait: float, first: bool, tokens: int, flops: float, compile_s: float = 0.0) -> None:
        """One step of `tokens` tokens and `flops` model FLOPs; `compile_s`: seconds of it
        spent compiling a program for a new shape (a warm-up's), left out of its time."""
        self.loss_sum = metrics["loss"] if self.loss_sum is None or self.steps == 0 else self.loss_sum + metrics["loss"]
        if first:  # throughput is timed from the end of the first step (its buffers are new)
            jax.block_until_ready(metrics)
            self.t_last = time.perf_counter()
        else:
            self.wait += wait
            self.steps += 1
            self.tokens += tokens
            self.flops += flops
            self.paused += compile_s

    def read(self, metrics: dict) -> dict:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m["loss"] = float(self.loss_sum) / max(self.steps, 1)  # mean over the interval
        now = time.perf_counter()
        if self.steps:  # step 1 has no throughput: it includes compilation
            elapsed = now - self.t_last - self.paused
            m.update(step_time_s=elapsed / self.steps, tokens_per_s=self.tokens / elapsed,
                     data_wait_fraction=self.wait / elapsed)
            mfu = self.mfu(self.flops / elapsed)
            if mfu is not None:
                m["mfu"] = mfu
        return m

    def mfu(self, flops_per_s: float) -> float | None:
        """Model FLOPs utilisation; None where it would exceed 1 (a peak measured while the
        machine was busy is too low: it is measured again once, and if the achieved rate
        still beats it, no utilisation is claimed)."""
        mfu = flops_per_s / (self.peak * jax.device_count())
        if mfu > 1 and self.remeasure is not None:
            self.peak, self.remeasure = max(self.peak, self.remeasure()), None
            mfu = flops_per_s / (self.peak * jax.device_count())
        return mfu if mfu <= 1 else None

    def restart(self) -> None:
        self.t_last, self.steps, self.wait = time.perf_counter(), 0, 0.0
        self.tokens, self.flops, self.paused = 0, 0.0, 0.0


def run(cfg: Config, run_dir: str, setup: Setup, log: Callable = print, progress: bool = True,
        resume: bool = True) -> dict:
    """Train `setup` into `run_dir`; returns a summary dict (also saved as summary.json).

    If `run_dir` holds checkpoints and `resume` is true, training continues from the
    newest readable one, with the same data order; otherwise it starts fresh (from
    `setup.init_params` if given).
    """
    t_cfg = cfg.trainer
    engine, data = setup.engine, setup.data
    main = jax.process_index() == 0
    if not setup.scores_heldout and not any(len(b) for b in data.heldout.values()):
        log("WARNING: no held-out data (a held-out fraction of 0, or too few records "
            "for a held-out share): the run reports no held-out figures")
    n_params = param_count(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_src = perf.peak_flops_per_device(t_cfg.peak_flops_per_device)
    log(f"{cfg.name} ({cfg.stage}): {n_params / 1e6:.2f}M parameters"
        + (f" ({_count(engine.abstract_state().params):,} trainable: LoRA rank {cfg.lora.rank})" if engine.lora else "")
        + f", {fpt / 1e6:.1f} MFLOP/token, mesh {dict(engine.mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
        f"peak {peak / 1e9:.0f} GFLOP/s/device ({peak_src})")

    # -- the state: resumed, or new (from init_from's parameters or random) ----------------
    ckpt = Checkpointer(run_dir, keep=t_cfg.checkpoint_keep, log=log)
    meta = dict(setup.meta)
    start = 0
    with interrupt.during("restoring the latest checkpoint"):
        restored = ckpt.restore_latest(engine.abstract_state()) if resume and ckpt.steps() else None
    if restored is not None:
        state, data_state, saved_meta, start = restored
        if saved_meta.get("tokenizer_sha256") != meta.get("tokenizer_sha256"):
            raise ConfigError(f"the checkpoint at step {start} was trained with another tokenizer than "
                              f"{run_dir}/tokenizer.model (vocabulary {saved_meta.get('vocab_size')}); "
                              "restore the run's tokenizer, or start afresh with --fresh")
        meta["init_from"] = saved_meta.get("init_from")  # the run's own origin, not today's config
        frozen = _frozen(engine, setup.init_params) if engine.frozen_names else {}
        if data_state:
            data.set_state(data_state)
        if main:
            _truncate_metrics(run_dir, start)
        log(f"resumed from the checkpoint of step {start} in {ckpt.dir}")
    else:
        if resume and ckpt.steps():
            raise RunDirError(f"no checkpoint of {run_dir} restores (tried steps {ckpt.steps()}; see the warnings "
                              "above); nothing was changed: use --fresh to start over or another --run-dir")
        if resume and os.path.exists(os.path.join(run_dir, "summary.json")):
            raise RunDirError(f"{run_dir} holds a finished run whose checkpoints are gone; nothing was changed: "
                              "use --fresh to start over or another --run-dir")
        params = setup.init_params() if setup.init_params else None
        with interrupt.during("initialising the model"):
            state, frozen = engine.init_state(t_cfg.seed, params)
        if main:  # a killed earlier attempt may have logged steps before its first checkpoint
            _truncate_metrics(run_dir, 0)
    step_fn = engine.compile_train_step()
    eval_fn = engine.compile_eval_step()
    ctx = Context(cfg=cfg, run_dir=run_dir, engine=engine, data=data, state=state, frozen=frozen, log=log,
                  main=main, step=start)
    ctx.evaluate = lambda: evaluate(engine, eval_fn, ctx.state.params, ctx.frozen, data.heldout, data.heldout_bytes)
    data.attach(ctx)  # data made from the current policy (RL rollouts) samples from ctx.state

    # -- hooks: evaluation, the stage's, checkpoints ---------------------------------------
    results = {"evals": {}}


    def evaluation(ctx, m):
        results["evals"] = ctx.evaluate()
        m.update(results["evals"])
        for more in setup.evaluators:  # e.g. downstream tasks, logged beside the held-out loss
            m.update(more(ctx.model_params))

    hooks = [Hook(evaluation, t_cfg.eval_every, True, "evaluation"), *setup.hooks,
             _Checkpoints(ckpt, cfg, data, meta)]
    logger = MetricsLogger(run_dir, enabled=main)
    meter = _Meter(peak, perf.remeasured_peak if peak_src.startswith("measured") else None)
    shapes = warmup.Shapes(cfg)
    shards = getattr(data, "num_shards", None) or jax.process_count()  # data shards (at least one per process)
    if shapes.active:
        _check_warmup(shapes, cfg, engine, shards, log)
    programs: dict[tuple[int, int], Any] = {}  # (rows, row length) -> the compiled step
    fpts = {length: flops_per_token(cfg.model, length) for _, length in shapes.all()}  # (attention's share varies)
    jitted_step = step_fn
    steps = t_cfg.steps
    source_tokens = np.zeros(len(data.names))  # realised training tokens per source
    reported, loss_ema, stopped = 0, None, None
    last_metrics: dict = {}
    bar = None
    if progress and main:
        bar = tqdm(total=steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)
    if start >= steps:
        log(f"the run is already complete ({start} of {steps} steps); evaluating it")
        results["evals"] = ctx.evaluate()

    # -- the loop ----------------------------------------------------------------------------
    # A signal stops the run at once during start-up, compilation and data waits (nothing
    # new to save, or the last step's state, saved below); during a step and its hooks it
    # is noted, and the step finishes and saves first (lm/train/interrupt.py).
    with interrupt.handling() as signals:
        saver = hooks[-1]
        data_state = None
        try:
            for step in range(start, steps):
                t0 = time.perf_counter()
                if step > start:  # where the data stands after the last step's batch (a small dict)
                    data_state = _data_state(data) if saver.saved_step != step else None
                with signals.during("waiting for data"):  # (a signal noted in the last step acts here)
                    local = data.next_train()
                shape = shapes.at(step)
                if shapes.active:  # the warm-ups' rows and pieces (lm/train/warmup.py)
                    local = shapes.cut(local, step, jax.process_count(), shards)
                batch = global_batch({k: local[k] for k in engine.objective.batch_axes}, engine.batch_sharding)
                wait = time.perf_counter() - t0
                if "source_id" in local and "segment_ids" in local:
                    real = (local["segment_ids"] > 0).reshape(len(local["source_id"]), -1)  # rows, or pairs of rows
                    np.add.at(source_tokens, local["source_id"], real.sum(axis=1))
                first, compile_s = step == start, 0.0
                if shape not in programs:  # compile ahead of the first step of each shape
                    what = "the train step" if not shapes.active else \
                        f"the train step for {shapes.describe(shape)}"
                    log(f"compiling {what}")
                    with signals.during("compiling the train step"):
                        if not first:  # (the steps queued before are not compilation time)
                            jax.block_until_ready(state)
                        tc = time.perf_counter()
                        programs[shape] = jitted_step.lower(state, batch, frozen).compile()
                        compile_s = time.perf_counter() - tc
                        meter.compile_s += compile_s
                    log(f"compiled {what} in {compile_s:.1f}s")
                step_fn = programs[shape]
                with signals.finishing():
                    state, metrics = step_fn(state, batch, frozen)
                    ctx.state, ctx.step, ctx.last, ctx.preempted = state, step + 1, step == steps - 1, signals.name
                    tokens = shape[0] * cfg.data.seq_len
                    meter.add(metrics, wait, first, tokens, tokens * fpts[shape[1]], 0.0 if first else compile_s)
                    if bar is not None:
                        bar.update(1)
                    due = [h for h in hooks if h.due(ctx)]
                    if not (first or ctx.step % t_cfg.log_every == 0 or due):
                        continue
                    # A logging step: fetch the metrics (this waits for the device).
                    m = meter.read(metrics)
                    m.update(data.metrics())  # e.g. batch diversity, the rollouts' rewards and lengths
                    if len(data.names) > 1 and source_tokens.sum():  # realised share of tokens per source
                        m.update({f"share/{n}": v for n, v in zip(data.names, source_tokens / source_tokens.sum())})
                    if data.stats.total():
                        m["bad_records"] = data.stats.total()
                        if data.stats.total() >= 2 * reported:  # reported at 1, 2, 4, 8, ... (and at the end)
                            log(data.stats.report())
                            reported = data.stats.total()
                    m.update({f"{k}/{n}": v for k, per in data.stats.counters().items()
                              for n, v in per.items() if v})
                    bad_streak, skipped = int(state.bad_streak), int(state.skipped)
                    if skipped:
                        m["skipped_steps"] = skipped
                    if np.isfinite(m["loss"]):
                        if loss_ema is not None and m["loss"] > loss_ema + max(0.5, 0.25 * loss_ema):
                            log(f"loss spike at step {ctx.step}: {m['loss']:.3f} (recent mean {loss_ema:.3f})")
                        loss_ema = m["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * m["loss"]
                    if bad_streak >= t_cfg.max_bad_steps:
                        logger.log(ctx.step, m)
                        # The state saved just before the first bad step is what made it bad (its
                        # values may be finite yet huge): set such checkpoints aside, so that the
                        # one a resume takes really is good.
                        ckpt.wait()
                        suspect = ckpt.set_aside([s for s in ckpt.steps() if s >= ctx.step - bad_streak], "suspect")
                        stopped = (f"{bad_streak} consecutive steps had a NaN/Inf loss, gradient or updated state "
                                   f"(each was skipped); stopping at step {ctx.step}."
                                   + (f" Checkpoints {suspect} led to them and were set aside." if suspect else "")
                                   + f" The last good checkpoint is kept: {ckpt.steps()}; lower optim.lr or raise "
                                   "optim.clip_norm and resume")
                        break
                    for hook in due:
                        hook.fn(ctx, m)
                    logger.log(ctx.step, m)
                    last_metrics = {**last_metrics, **m}
                    if bar is not None and "tokens_per_s" in m:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:,.0f}",
                                        **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
                    meter.restart()
                    if ctx.preempted and not ctx.last:  # (the signal as the hooks saw it: they saved)
                        ckpt.wait()
                        stopped = (f"received {ctx.preempted}: saved the checkpoint of step {ctx.step} in "
                                   f"{ckpt.dir}; run the same command again to resume")
                        break
        except interrupt.Interrupted as e:
            if e.urgent or ctx.step == start:  # a second Ctrl-C, or no step done: nothing new to save
                raise
            with signals.finishing():
                stopped = _stop_between_steps(e, ctx, saver, data_state, ckpt)
        finally:
            if bar is not None:
                bar.close()
            with signals.finishing():  # (a save still being written is waited for)
                logger.close()
                ckpt.close()

    # -- the summary -------------------------------------------------------------------------
    evals = results["evals"]
    summary = {"stage": cfg.stage, "steps": int(state.step), "params": n_params, "stopped": stopped,
               "final_train_loss": last_metrics.get("loss", float("nan")),
               "heldout_loss": evals.get("eval_loss", float("nan")), "heldout": evals,
               "tokens_per_s": last_metrics.get("tokens_per_s"), "mfu": last_metrics.get("mfu"),
               "compile_s": meter.compile_s, "bad_records": data.stats.total(), "skipped_steps": int(state.skipped),
               "resumed_from": start or None, "init_from": meta.get("init_from")}
    if data.stats.report():
        log(data.stats.report())
    if not stopped and start < steps and not os.path.isdir(os.path.join(ckpt.dir, str(steps))):
        stopped = (f"the final checkpoint (step {steps}) was not saved (see the warnings above): free space or fix "
                   f"{ckpt.dir}, then run the same command again to redo the missing steps")
        summary["stopped"] = stopped
    if stopped:
        log(stopped)
        return summary
    if len(data.names) > 1 and source_tokens.sum():
        summary["token_share"] = dict(zip(data.names, (source_tokens / source_tokens.sum()).tolist()))
        summary["weights"] = dict(zip(data.names, (np.asarray(data.weights) / sum(data.weights)).tolist()))
    with interrupt.during("finishing the run (evaluation, samples, summary; the final checkpoint is saved)"):
        _finish(ctx, setup, summary, run_dir, main, log)
    return summary


def _check_warmup(shapes: "warmup.Shapes", cfg: Config, engine: Engine, shards: int, log: Callable) -> None:
    """The warm-ups cut next-token rows: refused (one line) for stages that train on pairs or
    rollouts, and for shapes that do not split over the processes, devices and micro-batches."""
    if engine.objective.name != "next_token":
        raise ConfigError(f"trainer.seq_warmup_steps and trainer.batch_warmup_steps cut next-token rows; stage "
                          f"{cfg.stage!r} trains on {engine.objective.name} batches: set them to 0")
    spec = engine.batch_sharding["inputs"].spec
    axes = spec[0] if spec and spec[0] is not None else ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    data_parallel = int(np.prod([engine.mesh.shape[a] for a in axes])) if axes else 1
    shapes.check(shards, data_parallel, cfg.trainer.microbatches)
    log("warm-up: " + ", then ".join(shapes.describe(s) for s in shapes.all())
        + f" (rows from steps {[s for s, _ in shapes.rows]}, lengths from steps {[s for s, _ in shapes.lengths]})")


def _finish(ctx: Context, setup: Setup, summary: dict, run_dir: str, main: bool, log: Callable) -> None:
    """After the last step: the stage's report and samples, the loss plot, summary.json."""
    if setup.finish is not None:
        setup.finish(ctx, summary)
    if main:
        try:  # the run is saved: a full disk here costs the plot or the summary, not the run
            png = plot_loss(run_dir)
            if png:
                log(f"loss curve: {png}")
            # A re-run of a finished run only re-evaluates: keep the figures of the run itself.
            merge_json(os.path.join(run_dir, "summary.json"), summary)
        except OSError as e:
            log(f"WARNING: could not write the loss plot or summary.json ({e}); the checkpoints are complete")


def _stop_between_steps(e: "interrupt.Interrupted", ctx: Context, saver: _Checkpoints, data_state,
                        ckpt: Checkpointer) -> str:
    """A signal while waiting for the next batch: save the last step's state if it is not
    saved yet (with the data position after its batch), and say so."""
    ckpt.wait()
    where = f"received {e.name} while {e.phase}"
    if saver.saved_step != ctx.step and int(ctx.state.bad_streak) == 0 and jax.process_count() == 1:
        # (several processes would each stop at their own step: they keep the last periodic save)
        saver.save(ctx, {}, data_state=data_state)
        ckpt.wait()
    if saver.saved_step == ctx.step and ctx.step in ckpt.steps():
        return f"{where}: saved the checkpoint of step {ctx.step} in {ckpt.dir}; run the same command again to resume"
    return (f"{where} after step {ctx.step}, which is not saved: the run resumes from its checkpoints "
            f"{ckpt.steps()}; run the same command again to continue")


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _frozen(engine: Engine, init_params: Callable | None) -> dict:
    """The frozen inputs of a resumed run, rebuilt from where it started."""
    if init_params is None:
        raise ConfigError(f"this run needs the model it started from ({', '.join(engine.frozen_names)}): set "
                          "trainer.init_from to the run or Hugging Face folder it was started from")
    params = jax.device_put(init_params(), engine.param_sharding)
    return {name: params for name in engine.frozen_names}


def write_config(cfg: Config, run_dir: str) -> None:
    """The run's resolved config as RUN_DIR/config.json (left alone when it is unchanged)."""
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "config.json")
        text = json.dumps(to_dict(cfg), indent=2)
        if os.path.exists(path):
            with open(path) as f:
                if f.read() == text:
                    return
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
