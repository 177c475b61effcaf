"""`lm plan EXPERIMENT --devices N`: the train step's memory and FLOPs, ahead of time.

The step is compiled for N devices without running it (`jax.jit(...).lower(...).compile()`
on N fake CPU devices; no accelerator needed) and XLA's own accounting is read back:

- state bytes per device (parameters, optimiser moments), from the shardings of the
  state: what FSDP and tensor parallelism leave on each device;
- temporaries per device (activations kept for the backward pass, gradients, workspace):
  `memory_analysis().temp_size_in_bytes` of the compiled step;
- step FLOPs per device, analytic (6N + attention, PaLM) beside XLA's `cost_analysis()`
  (which also counts rematerialised recomputation and the optimiser);

and the total is set against the device memory (`--hbm`, 80 GiB by default: an H100).
The CPU backend lays out and fuses differently from a GPU or TPU backend, so temporaries
are an estimate (within tens of percent), while state bytes are exact.

Attention is compiled as the accelerator would run it: a fused (flash) kernel never holds
the (B, T, T) scores, so `flash`/`pallas`/`splash` are planned with the Pallas kernel
(in interpret mode, which keeps the kernel's blocking), not with the CPU's fallback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm import experiment as exp
from lm.model import attention
from lm.model.sharding import make_mesh
from lm.model.transformer import Transformer, flops_per_token, param_count
from lm.sampling import decode
from lm.tools.bench import bench_batches
from lm.train.engine import make_engine

GiB = 2**30


def _bytes(abstract_tree) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def plan(cfg, devices: int | None = None, hbm_gib: float = 80.0, log=print) -> dict:
    """Compile the train step of `cfg` for `devices` devices (default: all) and account for it."""

    devs = jax.devices()[:devices] if devices else jax.devices()
    if devices and len(devs) < devices:
        raise ValueError(f"asked for {devices} devices, JAX sees {len(devs)}")
    model = cfg.model
    if attention.resolve(model.attention) in ("xla", "cpu_flash") and model.attention in attention.FUSED:
        model = dataclasses.replace(model, attention="pallas")  # as on the accelerator: see the module doc
    cfg = dataclasses.replace(cfg, model=model)
    mesh = make_mesh(cfg.mesh, devs)
    cfg, notes = fit_batch(cfg, mesh.shape["data"] * mesh.shape["fsdp"])
    for note in notes:
        log(f"plan: {note}")
    engine = make_engine(cfg, mesh)
    state = engine.abstract_state()
    for note in sharding_notes(cfg, mesh, state.params):
        notes.append(note)
        log(f"plan: {note}")
    host = bench_batches(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=1)), 1)[0]
    b = cfg.data.batch_size
    batch = {k: jax.ShapeDtypeStruct((b,) + np.asarray(host[k]).shape[1:], np.asarray(host[k]).dtype, sharding=sh)
             for k, sh in engine.batch_sharding.items()}
    t0 = time.perf_counter()
    compiled = engine.compile_train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops_xla = xla_flops(cfg, mesh, state, batch)
    params_b, opt_b = _bytes(state.params), _bytes(state.opt_state)
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    batch_b = _bytes(batch)
    out_b = int(getattr(mem, "output_size_in_bytes", 0)) - int(getattr(mem, "alias_size_in_bytes", 0))
    total = params_b + opt_b + batch_b + temp_b + max(out_b, 0)
    n = len(devs)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    analytic = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / n
    r = {"devices": n, "mesh": dict(mesh.shape), "params": param_count(cfg.model),
         "param_bytes": params_b, "opt_bytes": opt_b, "batch_bytes": batch_b, "temp_bytes": temp_b,
         "total_bytes": total, "hbm_bytes": int(hbm_gib * GiB), "fits": total <= hbm_gib * GiB,
         "flops_analytic": analytic, "flops_xla": flops_xla / n,
         "compile_s": compile_s, "remat": cfg.model.remat, "microbatches": cfg.trainer.microbatches,
         "attention": cfg.model.attention}
    r["advice"] = advice(r, cfg)
    r["notes"] = notes
    return r


def fit_batch(cfg, ways: int):
    """The experiment's batch over `ways` data-parallel devices: fewer micro-batches if
    the micro-batch does not divide, or one row per device if the batch is too small."""
    b, m = cfg.data.batch_size, cfg.trainer.microbatches
    for mm in range(m, 0, -1):
        if b % mm == 0 and (b // mm) % ways == 0:
            if mm == m:
                return cfg, []
            return (dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, microbatches=mm)),
                    [f"trainer.microbatches={mm} (not {m}) so that each micro-batch divides over {ways} devices"])
    b2 = -(-b // ways) * ways
    why = (f"the batch of {b} rows is smaller than the {ways} data-parallel devices" if b < ways else
           f"the batch of {b} rows does not divide over {ways} data-parallel devices, so training would refuse "
           f"it: planned with the next multiple; a batch size that is a multiple of {ways}, or a device count "
           f"that divides {b}, runs as planned")
    return (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=b2),
                                trainer=dataclasses.replace(cfg.trainer, microbatches=1)),
            [f"data.batch_size={b2}, trainer.microbatches=1 ({why})"])


def sharding_notes(cfg, mesh, params) -> list[str]:
    """What the parameter-sharding axes (fsdp, tensor) actually split: a dimension that does
    not divide by its axis is replicated, so an axis of 3 devices may shard nothing."""
    notes = []
    leaves = jax.tree.leaves(params)
    full = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    for axis in ("fsdp", "tensor"):
        n = mesh.shape[axis]
        if n <= 1 or not full:
            continue
        split = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves
                    if x.sharding is not None and any(axis == a or (isinstance(a, tuple) and axis in a)
                                                      for a in x.sharding.spec))
        m = cfg.model
        dims = f"d_model={m.d_model}, d_ff={m.d_ff}, vocab_size={m.vocab_size}, n_heads={m.n_heads}"
        if split == 0:
            notes.append(f"mesh.{axis}={n} shards none of the parameters (no dimension of theirs divides by {n}: "
                         f"{dims}): every device holds them whole; use an axis size that divides them")
        elif split < 0.9 * full:
            notes.append(f"mesh.{axis}={n} shards {split / full:.0%} of the parameter bytes; the rest (dimensions "
                         f"that do not divide by {n}: {dims}) is replicated on every device")
    return notes


def xla_flops(cfg, mesh, state, batch) -> float:
    """XLA's FLOP count of the whole step (all devices). XLA counts a loop's body once, so
    it is taken from the step with layers unrolled, one micro-batch (times the count) and
    the einsum attention (the Pallas kernel is a loop too); lowered, not compiled."""

    m = cfg.trainer.microbatches
    model = dataclasses.replace(cfg.model, scan_layers=False, attention="xla", attention_block=0)
    one = dataclasses.replace(cfg, model=model, trainer=dataclasses.replace(cfg.trainer, microbatches=1),
                              data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // m))
    engine = make_engine(one, mesh)
    micro = {k: jax.ShapeDtypeStruct((v.shape[0] // m,) + v.shape[1:], v.dtype, sharding=v.sharding)
             for k, v in batch.items()}
    cost = engine.compile_train_step().lower(engine.abstract_state(), micro).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan"))) * m


def advice(r: dict, cfg) -> list[str]:
    """What to try when the step does not fit (temporaries scale with the micro-batch)."""
    if r["fits"]:
        return []
    state = r["param_bytes"] + r["opt_bytes"]
    out = []
    if state > r["hbm_bytes"]:
        out.append(f"parameters and optimiser state alone need {state / GiB:.1f} GiB per device: shard them over "
                   f"more devices (mesh.fsdp=-1, more devices) or add mesh.tensor")
        return out
    room = r["hbm_bytes"] - state - r["batch_bytes"]
    if cfg.model.remat != "full":
        out.append("model.remat=full (recompute each layer in the backward pass: ~1/3 more compute, "
                   "far fewer saved activations)")
    per_micro = cfg.data.batch_size // cfg.trainer.microbatches
    m = cfg.trainer.microbatches
    while room > 0 and r["temp_bytes"] * cfg.trainer.microbatches / m > room and per_micro // 2 >= 1:
        m, per_micro = m * 2, per_micro // 2
    if m != cfg.trainer.microbatches:
        out.append(f"trainer.microbatches={m} (temporaries scale with the micro-batch: ~"
                   f"{r['temp_bytes'] * cfg.trainer.microbatches / m / GiB:.1f} GiB)")
    return out


def report(r: dict) -> str:
    g = lambda x: f"{x / GiB:,.2f} GiB"
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"plan: {r['params'] / 1e9:.2f}B parameters on {r['devices']} devices (mesh {mesh}), "
        f"remat={r['remat']}, microbatches={r['microbatches']}, attention={r['attention']} "
        f"(compiled in {r['compile_s']:.0f}s)",
        "per device:",
        f"  parameters        {g(r['param_bytes'])}",
        f"  optimiser state   {g(r['opt_bytes'])}",
        f"  batch             {g(r['batch_bytes'])}",
        f"  temporaries       {g(r['temp_bytes'])}  (activations, gradients, workspace: XLA's estimate)",
        f"  total             {g(r['total_bytes'])}  of {g(r['hbm_bytes'])}: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"  step FLOPs        {r['flops_analytic']:.3e} analytic (6N + attention, PaLM), {r['flops_xla']:.3e} XLA's "
        "count (with recomputation, the loss and the optimiser)",
    ]
    lines += [f"try: {a}" for a in r["advice"]]
    return "\n".join(lines)


def main(experiment: str, overrides: list[str], devices: int, hbm_gib: float) -> int:
    """The CLI: re-run in a process with `devices` fake CPU devices if this one has other devices."""
    if "jax" in sys.modules or os.environ.get("LM_PLAN_CHILD"):
        cfg = exp.load(experiment, overrides)
        print(report(plan(cfg, devices, hbm_gib)))
        return 0
    env = dict(os.environ, LM_PLAN_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip())
    cmd = [sys.executable, "-m", "lm", "plan", experiment, "--devices", str(devices), "--hbm", str(hbm_gib)]
    for o in overrides or []:
        cmd += ["--set", o]
    return subprocess.call(cmd, env=env)


# ---------------------------------------------------------------------------------------
# Serving: the decode engine's memory per device (`lm plan --serve`)


def serve_plan(model, devices: int = 1, slots: int = 8, max_len: int | None = None, hbm_gib: float = 80.0) -> dict:
    """Bytes per device of what `lm serve --tensor DEVICES --slots SLOTS --max-len MAX_LEN`
    holds: the decode weights (lm/sampling/decode.py's layout, in the compute dtype, split as
    `decode.split` splits them), the key/value cache (split by key/value heads) and the
    logits buffer. From the shapes alone (`jax.eval_shape`): nothing is allocated."""
    max_len = max_len or model.max_seq_len
    if not 2 <= max_len <= model.max_seq_len:
        raise ValueError(f"--max-len {max_len} must be in [2, {model.max_seq_len}] (the model's context), as lm serve's")
    if devices > 1:
        decode.check_split(model, devices)
    abstract = nnx.eval_shape(lambda: Transformer(model, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    w = jax.eval_shape(lambda p: decode._layout(model, p), params)
    leaves = jax.tree.leaves(w)
    spec_leaves = jax.tree.leaves(decode.specs(w), is_leaf=lambda x: isinstance(x, P))
    total = per_device = 0
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        size = math.prod(leaf.shape) * leaf.dtype.itemsize
        total += size
        per_device += size // devices if decode.TP in tuple(spec) else size
    itemsize = np.dtype(model.compute_dtype).itemsize
    cache = 2 * model.n_layers * slots * (model.n_kv_heads // devices) * max_len * model.head_size * itemsize
    logits = slots * model.vocab_size * 4
    out = {"devices": devices, "slots": slots, "max_len": max_len, "params": param_count(model),
           "dtype": model.compute_dtype, "weight_bytes": per_device, "weight_bytes_all": total, "cache_bytes": cache,
           "logits_bytes": logits, "total_bytes": per_device + cache + logits, "hbm_bytes": int(hbm_gib * GiB)}
    out["fits"] = out["total_bytes"] <= out["hbm_bytes"]
    return out


def serve_report(r: dict) -> str:
    g = lambda x: f"{x / GiB:,.2f} GiB"  # noqa: E731
    per_token = r["cache_bytes"] / (r["slots"] * r["max_len"])
    return "\n".join([
        f"serve plan: {r['params'] / 1e9:.2f}B parameters on {r['devices']} device(s) (lm serve --tensor "
        f"{r['devices']} --slots {r['slots']} --max-len {r['max_len']}), {r['dtype']}",
        "per device:",
        f"  weights           {g(r['weight_bytes'])}  (of {g(r['weight_bytes_all'])} in all: attention and MLP split, "
        "embeddings and norms whole)",
        f"  key/value cache   {g(r['cache_bytes'])}  ({r['slots']} slots x {r['max_len']} tokens, "
        f"{per_token / 2**10:,.1f} KiB per token)",
        f"  logits            {g(r['logits_bytes'])}",
        f"  total             {g(r['total_bytes'])}  of {g(r['hbm_bytes'])}: " + ("fits" if r["fits"] else "DOES NOT FIT")
        + " (plus the runtime's workspace; while loading, the run's parameters too)",
    ])
