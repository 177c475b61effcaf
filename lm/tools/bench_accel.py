"""Accelerator benchmark (`lm bench accel`): one script for a short lease on a GPU or TPU.

1. the device, and its measured bfloat16 matmul rate (the data-sheet peak is a lead);
2. the fused attention kernels against the reference attention on this device (packed
   documents whose boundaries cross the kernels' blocks; forward and gradients);
3. training throughput, MFU and peak memory of `small` (1024 context) and `base` (4096
   context) in bfloat16 on packed synthetic batches, for several attention kernels and
   remat policies;
4. the PyTorch peer (Hugging Face LLaMA of the same shape, SDPA flash attention,
   bfloat16 autocast, fused AdamW) on the same shapes, when torch sees the device.

MFU follows PaLM (appendix B): 6 x matmul parameters + 12 x L x N x H x T FLOPs per
token (the full T x T attention square, as MaxText and PaLM count), over the device's
dense bfloat16 data-sheet peak. Each case runs in its own process (each framework takes
the device's memory for itself), with a time limit, so that one failure costs one row.
Results go to stdout as a table and, with `--out FILE`, as JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.synthetic import packed_segment_ids
from lm import experiment
from lm.model import attention
from lm.model.transformer import attention_mask, dot_product_attention, flops_per_token, param_count
from lm.tools import peer_torch
from lm.tools.bench import bench_train
from lm.train import perf

# name: (experiment, batch rows, attention, remat or None = the experiment's, mean document)
CASES = {
    "small/pallas": ("pretrain_small", 32, "pallas", None, 256),
    "small/pallas_skip": ("pretrain_small", 32, "pallas_skip", None, 256),
    "small/torch": ("pretrain_small", 32, "torch", None, 0),
    "base/pallas": ("pretrain_base", 8, "pallas", None, 512),
    "base/pallas/dots": ("pretrain_base", 8, "pallas", "dots_no_batch", 512),
    "base/pallas_skip": ("pretrain_base", 8, "pallas_skip", None, 512),
    "base/pallas_skip/dots": ("pretrain_base", 8, "pallas_skip", "dots_no_batch", 512),
    "base/cudnn": ("pretrain_base", 8, "cudnn", None, 512),  # no document masking
    "base/jax_dpa": ("pretrain_base", 8, "jax_dpa", None, 512),
    "base/torch": ("pretrain_base", 8, "torch", None, 0),
}
# One layer's attention of `base` alone (B=8, T=4096, 16 query heads, 8 kv heads, head dim 128,
# bfloat16, documents of mean 512 tokens): forward and forward+backward milliseconds.
ATTN_CASES = {"attn/pallas": "pallas", "attn/pallas_skip": "pallas_skip", "attn/cudnn": "cudnn"}


SMOKE = False  # --smoke: every case on the tiny model (checks this script on a CPU)


def _config(case: str):
    spec, batch, attention, remat, _ = CASES[case]
    cfg = experiment.load("pretrain_tiny" if SMOKE else spec)
    if SMOKE:
        batch = 2
    model = cfg.model
    if attention != "torch":
        model = dataclasses.replace(model, attention=attention, compute_dtype="bfloat16",
                                    document_mask=attention != "cudnn")  # cuDNN: causal over whole rows
    if remat:
        model = dataclasses.replace(model, remat=remat)
    data = dataclasses.replace(cfg.data, batch_size=batch, corpus="synthetic")
    trainer = dataclasses.replace(cfg.trainer, microbatches=1)
    return dataclasses.replace(cfg, model=model, data=data, trainer=trainer)


def run_case(case: str, steps: int, repeats: int) -> dict:

    cfg = _config(case)
    _, _, attention, _, mean_doc = CASES[case]
    batch, mean_doc = cfg.data.batch_size, min(mean_doc, cfg.data.seq_len // 4)
    peak, _ = perf.peak_flops_per_device()
    if attention == "torch":
        import torch  # optional: the PyTorch peer


        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not SMOKE:
            return {"error": "torch sees no GPU"}
        r = peer_torch.train_rate(cfg.model, batch, cfg.data.seq_len, device=device, bf16=device == "cuda",
                                  grad_ckpt=cfg.model.remat != "none", steps=steps, repeats=repeats, warmup=2)
        r["flops_per_s"] = flops_per_token(cfg.model, cfg.data.seq_len) * r["tokens_per_s"]
        r["params"] = param_count(cfg.model)
    else:
        r = bench_train(cfg, steps=steps, warmup=2, repeats=repeats, mean_doc=mean_doc)
    r["mfu"] = r["flops_per_s"] / peak
    r["device"] = jax.devices()[0].device_kind
    r["remat"] = cfg.model.remat
    r["batch"] = f"{batch}x{cfg.data.seq_len}"
    return r


def attention_time(impl: str, b: int = 8, t: int = 4096, n: int = 16, k: int = 8, h: int = 128,
                   mean_doc: int = 512, repeats: int = 20) -> dict:
    """Milliseconds (median of `repeats`) of one layer's fused attention `impl`, forward and
    forward+backward, on bfloat16 inputs with packed documents (cuDNN: causal over whole rows)."""

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    w = jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)
    seg = None if impl == "cudnn" else jnp.asarray(packed_segment_ids(b, t, mean_doc, seed=1))
    fwd = jax.jit(lambda q, kk, v: attention.fused_attention(q, kk, v, seg, impl))
    grad = jax.jit(jax.grad(lambda q, kk, v: jnp.sum(fwd(q, kk, v).astype(jnp.float32) * w), (0, 1, 2)))

    def ms(fn):
        jax.block_until_ready(fn(q, kk, v))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, kk, v))
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3

    return {"fwd_ms": ms(fwd), "fwd_bwd_ms": ms(grad), "shape": f"B{b} T{t} N{n} K{k} H{h} doc{mean_doc}",
            "device": jax.devices()[0].device_kind}


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Measured bfloat16 matmul FLOP/s on random data (median of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def check_attention(b: int = 2, t: int = 1024, n: int = 16, k: int = 8, h: int = 128) -> dict:
    """Relative error of each fused kernel against float32 reference attention, forward and
    gradients, on bfloat16 inputs with packed documents that cross block boundaries."""

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    w = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    seg = jnp.asarray(packed_segment_ids(b, t, 150, seed=1))

    def ref(q, kk, v):
        f32 = lambda x: x.astype(jnp.float32)
        return dot_product_attention(f32(q), f32(kk), f32(v), attention_mask(seg, b, t), 0)

    def loss(fn):
        return lambda q, kk, v: jnp.sum(fn(q, kk, v).astype(jnp.float32) * w)

    r_out = ref(q, kk, v)
    r_grads = jax.grad(loss(ref), (0, 1, 2))(q, kk, v)
    rel = lambda a, r: float(jnp.linalg.norm((a.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r.ravel()))
    out = {}
    for impl in ("pallas", "pallas_skip", "jax_dpa"):
        try:
            if impl == "jax_dpa":
                fn = lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v, mask=attention_mask(seg, b, t)[:, None])
            else:
                fn = lambda q, kk, v, impl=impl: attention.fused_attention(q, kk, v, seg, impl)
            o = jax.jit(fn)(q, kk, v)
            g = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(q, kk, v)
            out[impl] = {"out": rel(o, r_out), "dq": rel(g[0], r_grads[0]), "dk": rel(g[1], r_grads[1]),
                         "dv": rel(g[2], r_grads[2]), "finite": bool(np.isfinite(np.asarray(o, np.float32)).all())}
        except Exception as e:  # noqa: BLE001 -- report and go on
            out[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def _child(args) -> int:
    t = time.perf_counter()
    try:
        if args.case == "env":
            r = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "count": jax.device_count(),
                 "matmul_bf16_flops": matmul_rate(1024 if SMOKE else 8192),
                 "attention": check_attention(*((2, 256, 4, 2, 64) if SMOKE else ()))}
        elif args.case in ATTN_CASES:
            shape = dict(b=2, t=256, n=4, k=2, h=64, mean_doc=64, repeats=2) if SMOKE else {}
            r = attention_time(ATTN_CASES[args.case], **shape)
        else:
            r = run_case(args.case, args.steps, args.repeats)
    except Exception as e:  # noqa: BLE001 -- one line per failed case
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    r["case"], r["wall_s"] = args.case, time.perf_counter() - t
    print("RESULT " + json.dumps(r), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm bench accel", description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*",
                   help=f"cases to run (default: env and all of {', '.join([*CASES, *ATTN_CASES])})")
    p.add_argument("--out", help="append results as JSON lines to this file")
    p.add_argument("--timeout", type=float, default=150, help="seconds per case")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="every case on the tiny model (a check of this script)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    if args.case:
        return _child(args)
    cases = args.cases or ["env", *CASES, *ATTN_CASES]
    rows = []
    for case in cases:
        cmd = [sys.executable, "-m", "lm.tools.bench_accel", "--case", case, "--steps", str(args.steps),
               "--repeats", str(args.repeats)] + ["--smoke"] * args.smoke
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {
                "case": case, "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
        except subprocess.TimeoutExpired:
            r = {"case": case, "error": f"timed out after {args.timeout:.0f}s"}
        r.setdefault("wall_s", time.perf_counter() - t)
        rows.append(r)
        print(_line(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['case']}: FAILED ({r['error']})"
    if r["case"] == "env":
        att = "; ".join(f"{k}: " + (v["error"] if "error" in v else
                                     f"out {v['out']:.1e} dq {v['dq']:.1e} dk {v['dk']:.1e} dv {v['dv']:.1e}")
                        for k, v in r["attention"].items())
        return (f"env: {r['device']} x{r['count']}, jax {r['jax']}, bf16 matmul "
                f"{r['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s; attention rel. error vs f32 reference: {att}")
    if r["case"] in ATTN_CASES:
        return (f"{r['case']}: {r['shape']} on {r['device']}: forward {r['fwd_ms']:.2f} ms, "
                f"forward+backward {r['fwd_bwd_ms']:.2f} ms ({r['wall_s']:.0f}s)")
    mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "n/a"
    return (f"{r['case']}: {r['batch']} remat={r['remat']} {r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {r['mfu']:.1%}, peak memory {mem}, step {r['step_time_s'] * 1e3:.0f} ms ({r['wall_s']:.0f}s)")


def table(rows: list[dict]) -> str:
    """The throughput rows as a Markdown table, with each case's ratio to its torch peer."""
    torch = {r["case"].split("/")[0]: r["tokens_per_s"] for r in rows
             if r["case"].endswith("/torch") and "tokens_per_s" in r}
    lines = ["| case | batch | remat | tokens/s | MFU | peak memory | vs torch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"] == "env" or "tokens_per_s" not in r:
            continue
        peer = torch.get(r["case"].split("/")[0])
        ratio = f"{r['tokens_per_s'] / peer:.2f}x" if peer and not r["case"].endswith("/torch") else ""
        mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else ""
        lines.append(f"| {r['case']} | {r['batch']} | {r['remat']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} "
                     f"| {mem} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
