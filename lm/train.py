"""The pretraining host loop: data in, compiled steps, metrics, evaluation, samples.

All numerics live in `lm.train_step`; this file only moves batches in and numbers out.
The step is asynchronous: the host fetches metrics (and so waits for the device) only
on logging steps, so the next batch is prepared while the device computes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np

from lm import checkpoint, perf
from lm.checkpoint import Checkpointer
from lm.config import Config, to_dict
from lm.logger import MetricsLogger, plot_loss, read_metrics
from lm.model import flops_per_token, param_count
from lm.sharding import make_mesh
from lm.train_step import Trainer, make_trainer

SAMPLE_PROMPTS = ("def ", "import os\n\n", "The ", "class ")


def evaluate(trainer: Trainer, eval_fn, params, heldout: dict[str, list[dict]],
             nbytes: dict[str, int] | None = None) -> dict[str, float]:
    """Held-out cross-entropy per source and overall: nats/token ("eval_loss") and, when
    the text's bytes are known, bits per byte ("eval_bpb", tokenizer-independent)."""
    from data_pipeline.pipeline import global_batch

    nbytes = nbytes or {}
    out, total, count, total_bytes = {}, 0.0, 0.0, 0
    for name, batches in heldout.items():
        s, c = 0.0, 0.0
        for b in batches:
            r = jax.device_get(eval_fn(params, global_batch(b, trainer.batch_sharding)))
            s, c = s + float(r["loss_sum"]), c + float(r["tokens"])
        if len(heldout) > 1:
            out[f"eval_loss/{name}"] = s / max(c, 1.0)
            if nbytes.get(name):
                out[f"eval_bpb/{name}"] = s / math.log(2) / nbytes[name]
        total, count = total + s, count + c
        total_bytes += nbytes.get(name, 0)
    out["eval_loss"] = total / max(count, 1.0)
    if total_bytes and len(nbytes) == len(heldout):
        out["eval_bpb"] = total / math.log(2) / total_bytes
    return out


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric lines logged after `step` (they are recomputed after a resume)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def train(cfg: Config, run_dir: str, log: Callable = print, progress: bool = True,
          resume: bool = True) -> dict:
    """Pretrain `cfg` into `run_dir`; returns a summary dict (also saved as summary.json).

    If `run_dir` holds checkpoints and `resume` is true, training continues from the
    newest readable one, with the same data order; otherwise it starts fresh (and old
    checkpoints and metrics are removed).
    """
    from data_pipeline.pipeline import RunData, global_batch, unigram_entropy

    cfg.validate()
    t_cfg = cfg.trainer
    main = jax.process_index() == 0
    os.makedirs(run_dir, exist_ok=True)
    if not resume and main:
        checkpoint.remove(run_dir)
        for name in ("metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    if main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)

    mesh = make_mesh(cfg.mesh)
    trainer = make_trainer(cfg, mesh)
    n_params = param_count(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_src = perf.peak_flops_per_device(t_cfg.peak_flops_per_device)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    log(f"{cfg.name}: {n_params / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOP/token, "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); peak {peak / 1e9:.0f} GFLOP/s/device ({peak_src})")

    data = RunData(cfg, run_dir, log)
    ckpt = Checkpointer(run_dir, keep=t_cfg.checkpoint_keep, log=log)
    meta = {"config": to_dict(cfg), "tokenizer_sha256": None, "vocab_size": cfg.model.vocab_size}
    if data.tokenizer is not None:
        meta["tokenizer_sha256"] = checkpoint.file_sha256(data.tokenizer.path)

    start = 0
    restored = ckpt.restore_latest(trainer.abstract_state()) if resume and ckpt.steps() else None
    if restored is not None:
        state, data_state, saved_meta, start = restored
        if saved_meta.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
            raise ValueError(f"the checkpoint at step {start} was trained with another tokenizer than "
                             f"{run_dir}/tokenizer.model (vocabulary {saved_meta.get('vocab_size')}); "
                             "restore the run's tokenizer, or start afresh with --fresh")
        if data_state:
            data.set_state(data_state)
        if main:
            _truncate_metrics(run_dir, start)
        log(f"resumed from the checkpoint of step {start} in {ckpt.dir}")
    else:
        state = trainer.init_state(t_cfg.seed)
        if main:  # a killed earlier attempt may have logged steps that left no checkpoint
            _truncate_metrics(run_dir, 0)
    step_fn = trainer.compile_train_step()
    eval_fn = trainer.compile_eval_step()
    logger = MetricsLogger(run_dir, enabled=main)

    def data_state_now():
        try:
            return data.get_state()
        except Exception:  # noqa: BLE001 -- a source without resumable state: save the rest
            return None

    def save(step_done: int, metrics: dict | None = None) -> None:
        ckpt.save(step_done, state, data_state_now(), meta, metrics)

    steps = t_cfg.steps
    source_tokens = np.zeros(len(data.names))  # realised training tokens per source
    reported_bad, loss_ema, stopped, last_save_time = 0, None, None, time.time()
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_last, steps_since, wait_since = None, 0, 0.0
    loss_sum = None  # device-side sum of the losses since the last log line
    compile_s = 0.0
    last_metrics: dict = {}
    eval_loss = float("nan")
    last_evals: dict = {}
    if start >= steps:
        log(f"the run is already complete ({start} of {steps} steps); evaluating it")
        last_evals = evaluate(trainer, eval_fn, state.params, data.heldout, data.heldout_bytes)
        eval_loss = last_evals["eval_loss"]
    with _Preemption() as preempt:
        try:
            for step in range(start, steps):
                t0 = time.perf_counter()
                local = data.next_train()
                batch = global_batch(local, trainer.batch_sharding)
                wait = time.perf_counter() - t0
                np.add.at(source_tokens, local["source_id"], (local["segment_ids"] > 0).sum(axis=1))
                state, metrics = step_fn(state, batch)
                # Sum the loss on the device (no sync) so each log line is the interval's mean.
                loss_sum = metrics["loss"] if loss_sum is None or steps_since == 0 else loss_sum + metrics["loss"]
                if bar is not None:
                    bar.update(1)
                first = step == start
                if first:  # the first step compiles; throughput is timed from its end
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t0
                    log(f"compiled the train step in {compile_s:.1f}s")
                    t_last = time.perf_counter()
                else:
                    wait_since += wait
                    steps_since += 1
                last = step == steps - 1
                do_eval = last or (t_cfg.eval_every and (step + 1) % t_cfg.eval_every == 0)
                do_save = (t_cfg.checkpoint_every and (step + 1) % t_cfg.checkpoint_every == 0) or (
                    t_cfg.checkpoint_minutes and time.time() - last_save_time > 60 * t_cfg.checkpoint_minutes)
                if first or (step + 1) % t_cfg.log_every == 0 or last or do_eval or do_save or preempt.signal:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    m["loss"] = float(loss_sum) / max(steps_since, 1)  # mean over the interval
                    now = time.perf_counter()
                    if steps_since:  # step 1 has no throughput: it includes compilation
                        step_time = (now - t_last) / steps_since
                        tps = tokens_per_step / step_time
                        m.update(step_time_s=step_time, tokens_per_s=tps,
                                 mfu=fpt * tps / (peak * jax.device_count()),
                                 data_wait_fraction=wait_since / (now - t_last))
                    if len(data.names) > 1:  # this process's realised share of tokens per source
                        m.update({f"share/{n}": v for n, v in zip(data.names, source_tokens / source_tokens.sum())})
                    if data.stats.total():
                        m["bad_records"] = data.stats.total()
                        if data.stats.total() > reported_bad:
                            log(data.stats.report())
                            reported_bad = data.stats.total()
                    bad_streak, skipped = int(state.bad_streak), int(state.skipped)
                    if skipped:
                        m["skipped_steps"] = skipped
                    if np.isfinite(m["loss"]):
                        if loss_ema is not None and m["loss"] > loss_ema + max(0.5, 0.25 * loss_ema):
                            log(f"loss spike at step {step + 1}: {m['loss']:.3f} (recent mean {loss_ema:.3f})")
                        loss_ema = m["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * m["loss"]
                    if bad_streak >= t_cfg.max_bad_steps:
                        logger.log(step + 1, m)
                        stopped = (f"{bad_streak} consecutive steps had a NaN/Inf loss or gradient (each was "
                                   f"skipped); stopping at step {step + 1}. The last good checkpoint is kept: "
                                   f"{ckpt.steps()}; lower optim.lr or raise optim.clip_norm and resume")
                        break
                    if do_eval:
                        evals = evaluate(trainer, eval_fn, state.params, data.heldout, data.heldout_bytes)
                        m.update(evals)
                        eval_loss = evals["eval_loss"]
                        last_evals = evals
                    logger.log(step + 1, m)
                    last_metrics = {**last_metrics, **m}
                    if bar is not None and "tokens_per_s" in m:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:,.0f}",
                                        mfu=f"{m['mfu']:.1%}")
                    if (do_save or last or preempt.signal) and bad_streak == 0:
                        save(step + 1, {"eval_loss": eval_loss} if do_eval else None)
                        last_save_time = time.time()
                    t_last, steps_since, wait_since = time.perf_counter(), 0, 0.0
                    if preempt.signal and not last:
                        ckpt.wait()
                        stopped = (f"received {preempt.signal}: saved the checkpoint of step {step + 1} in "
                                   f"{ckpt.dir}; run the same command again to resume")
                        break
        finally:
            if bar is not None:
                bar.close()
            logger.close()
            ckpt.close()

    summary = {"steps": int(state.step), "params": n_params, "stopped": stopped,
               "final_train_loss": last_metrics.get("loss", float("nan")), "heldout_loss": eval_loss,
               "heldout": last_evals, "tokens_per_s": last_metrics.get("tokens_per_s"),
               "mfu": last_metrics.get("mfu"), "compile_s": compile_s, "bad_records": data.stats.total(),
               "skipped_steps": int(state.skipped), "resumed_from": start or None}
    if stopped:
        log(stopped)
        return summary
    entropy = unigram_entropy([b for bs in data.heldout.values() for b in bs])
    summary["heldout_unigram_entropy"] = entropy
    if len(data.names) > 1:
        summary["token_share"] = dict(zip(data.names, (source_tokens / source_tokens.sum()).tolist()))
        summary["weights"] = dict(zip(data.names, (np.asarray(data.weights) / sum(data.weights)).tolist()))
    log(f"held-out loss {eval_loss:.3f} nats/token vs unigram entropy {entropy:.3f} "
        f"of the held-out tokens ({np.exp(eval_loss):.1f} vs {np.exp(entropy):.1f} perplexity)"
        + (f"; {last_evals['eval_bpb']:.3f} bits/byte" if "eval_bpb" in last_evals else ""))
    for k, v in sorted(last_evals.items()):
        if "/" in k:
            log(f"  {k} = {v:.4f}")
    if main:
        png = plot_loss(run_dir)
        if png:
            log(f"loss curve: {png}")
    if data.tokenizer is not None and t_cfg.num_samples > 0:
        summary["samples"] = print_samples(trainer, state.params, data.tokenizer, cfg, log)
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def print_samples(trainer: Trainer, params, tokenizer, cfg: Config, log: Callable) -> list[str]:
    from lm.sampling import generate

    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(cfg.trainer.num_samples)]
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    host_params = jax.device_get(params)  # small models: sample on one device
    outs = generate(trainer.graphdef, host_params, ids, cfg.trainer.sample_tokens, cfg.model.max_seq_len,
                    temperature=cfg.trainer.sample_temperature, eos_id=tokenizer.eos_id,
                    seed=cfg.trainer.seed, top_k=50)
    texts = []
    for p, o in zip(prompts, outs):
        text = p + tokenizer.decode(o)
        texts.append(text)
        log("-" * 30 + " sample " + "-" * 30 + "\n" + text)
    return texts
