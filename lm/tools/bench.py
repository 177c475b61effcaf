"""Benchmarks (`make bench`): training throughput and MFU, the data pipeline, decoding.

Each figure is printed beside the reference it is measured against in the same run: on
CPU the machine's measured float32 matmul peak. Machine-readable lines:
`train_tokens_per_s=N mfu=M` for the fixed reference configuration
(experiments/bench_reference.py), and `data_tokens_per_s=N`: tokens/s the input
pipeline of the default run delivers (tokenizing on the fly, no worker processes), which
must stay far above what training consumes; `decode_tokens_per_s_b1/_b8=N` and, with
torch and transformers installed, `decode_ratio_vs_transformers_b1/_b8=R` against
`transformers.generate` on the same model exported, measured alternately in the same run;
`decode_b8_over_b1_bound=R`: the most batch 8 could give over batch 1 with the step's
weight products as fast as they run alone (`weight_products_ms`); `decode_small_b1/_b8_*`: the
same on `small` (110M, weights beyond the CPU's cache), float32 and int8, against transformers
in float32 and in torch's dynamic int8, and speculative decoding with its own int8 weights as
the draft (`main_decode_large`). `lm bench curate` (not part
of "all"): `lm data curate` on a planted corpus, `curate_docs_per_s=N curate_mb_per_s=M`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import cache
from data_pipeline import curate as C
from data_pipeline import curate_planted as P
from data_pipeline.pipeline import text_data
from data_pipeline.synthetic import packed_segment_ids, synthetic_batches
from lm import experiment
from lm.config import Config, MeshConfig
from lm.interop.hf import export_llama
from lm.model.sharding import make_mesh
from lm.model.sizes import size
from lm.model.transformer import Transformer, flops_per_token, param_count
from lm.sampling import decode, int8_cpu, speculative
from lm.sampling.sampler import generate
from lm.tools import peer_torch
from lm.train import perf
from lm.train.engine import make_trainer


def bench_batches(cfg: Config, n: int = 4, mean_doc: int = 0) -> list[dict]:
    """`n` synthetic host batches; with `mean_doc` > 0 the rows are packed with documents
    of about that many tokens (segment ids), as real pretraining batches are."""
    d = cfg.data
    out = []
    for i, b in zip(range(n), synthetic_batches(cfg.model.vocab_size, d.seq_len, d.batch_size, seed=0)):
        if mean_doc:
            b["segment_ids"] = packed_segment_ids(d.batch_size, d.seq_len, mean_doc, seed=i)
        out.append(b)
    return out


def bench_train(cfg: Config, steps: int = 20, warmup: int = 3, repeats: int = 3, mean_doc: int = 0) -> dict:
    """Median step time of the compiled train step on synthetic batches (one device)."""
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, _ = trainer.init_state(0)
    step = trainer.compile_train_step()
    d = cfg.data
    batches = [{k: jax.device_put(b[k], trainer.batch_sharding[k]) for k in trainer.batch_sharding}
               for b in bench_batches(cfg, 4, mean_doc)]
    for i in range(warmup):
        state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(steps):
            state, m = step(state, batches[i % 4])
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / steps)
    step_time = float(np.median(times))
    tokens = d.batch_size * d.seq_len
    flops = flops_per_token(cfg.model, d.seq_len) * tokens / step_time
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_time_s": step_time, "tokens_per_s": tokens / step_time, "flops_per_s": flops,
            "params": param_count(cfg.model), "peak_bytes": stats.get("peak_bytes_in_use"),
            "loss": float(m["loss"])}


def bench_data(cfg: Config, run_dir: str, batches: int = 300, log=print) -> dict:
    """Tokens/s the data pipeline delivers (rows of the global batch, no training)."""
    data = text_data(cfg.data, run_dir, vocab_size=cfg.model.vocab_size, eval_batches=cfg.trainer.eval_batches,
                   log=lambda *_: None, process_index=0, process_count=1)
    for _ in range(5):  # warm up: open files, fill the prefetch buffer
        data.next_train()
    t = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        b = data.next_train()
        tokens += int((b["segment_ids"] > 0).sum())
    return {"tokens_per_s": tokens / (time.perf_counter() - t)}


def main_data(train_tokens_per_s: float | None = None) -> float:

    base = experiment.load("pretrain_tiny")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for workers in (0, 1):
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, num_workers=workers))
            r = bench_data(cfg, tmp)
            results[("stream", workers)] = r["tokens_per_s"]
            print(f"data[tokenize on the fly, {workers} worker(s)]: {r['tokens_per_s']:,.0f} tokens/s")
        cache_dir = os.path.join(tmp, "cache")
        t = time.perf_counter()
        cache.build(base.data, base.model.vocab_size, tmp, cache_dir, progress=False)
        print(f"data[pre-tokenise the corpus once]: {time.perf_counter() - t:.1f}s")
        for workers in (0, 1):
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, num_workers=workers, cache_dir=cache_dir))
            r = bench_data(cfg, tmp)
            results[("cache", workers)] = r["tokens_per_s"]
            print(f"data[from the cache, {workers} worker(s)]: {r['tokens_per_s']:,.0f} tokens/s")
    headline = results[("stream", 0)]  # what a default run uses
    if train_tokens_per_s:
        print(f"data/training ratio: {headline / train_tokens_per_s:.1f}x on the fly, "
              f"{results[('cache', 0)] / train_tokens_per_s:.1f}x from the cache "
              f"(training consumes {train_tokens_per_s:,.0f} tokens/s)")
    print(f"data_tokens_per_s={headline:.0f}")
    return headline


def main_decode(rounds: int = 5) -> dict:
    """New tokens/s of the decode engine at batch 1 and 8 (32-token prompts, 128 new, greedy,
    prefill included), and, when torch and transformers import, of `transformers.generate`
    (eager, greedy) on the same model exported, in its own process (lm.tools.peer_torch.Peer),
    measured alternately in this run.

    Each figure is the median of `rounds` runs, ours and the peer's interleaved, so a drift
    of the machine's speed (other processes on a shared CPU) hits both alike. The peer runs
    with torch's default threads and with one thread (on a CPU shared with other work its
    threads can stall at every barrier); the ratio is against the faster of the two."""

    cfg = experiment.load("bench_reference").model
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    weights = decode.prepare(graphdef, params)
    with tempfile.TemporaryDirectory() as hf_dir:
        peer = _decode_peer(cfg, params, hf_dir)  # in its own process
        try:
            ours, theirs = _decode_rounds(graphdef, params, weights, peer, rounds)
        finally:
            if peer is not None:
                peer.close()
    return _decode_report(weights, ours, theirs)


def main_decode_large(name: str = "small", rounds: int = 3, new: int = 128, prompt: int = 32) -> dict:
    """New tokens/s at batch 1 and 8 on a model whose float32 weights outgrow the CPU's cache
    (`small`, 110M, random weights, float32 compute), where a decode step is bound by reading
    its weights: ours in float32 and in int8 (`--quantize int8`, the native kernel on a CPU),
    transformers `generate` (eager) in float32 and with torch's dynamic int8 quantisation, in
    its own process with its default threads and with one (the faster counts). Medians of
    `rounds`, all four interleaved; 32-token prompts, `new` greedy tokens, prefill included."""
    cfg = dataclasses.replace(size(name), compute_dtype="float32")
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    ours = {"float32": decode.prepare(graphdef, params)}
    ours["int8"] = decode.quantize(ours["float32"])
    sizes = {k: sum(a.nbytes for a in jax.tree.leaves(w)) / 2**20 for k, w in ours.items()}
    print(f"decode[{name}]: {param_count(cfg) / 1e6:.0f}M parameters, weights {sizes['float32']:.0f} MiB in float32, "
          f"{sizes['int8']:.0f} MiB in int8 (native int8 kernel: {'yes' if int8_cpu.available() else 'no'})")
    peer = None
    with tempfile.TemporaryDirectory() as hf_dir:
        if _torch_available("large-model decode"):
            export_llama(cfg, params, hf_dir)
            peer = peer_torch.Peer()
            for kind in ("float32", "int8"):
                peer.default_threads = peer.call("load_decoder", hf_dir=hf_dir, name=kind,
                                                 int8=kind == "int8")["default_threads"]
    try:
        rates = {}
        for b in (1, 8):
            prompts = [[(7 * i + j) % (cfg.vocab_size - 1) + 1 for j in range(prompt)] for i in range(b)]
            runs = {k: (lambda w=w: generate(graphdef, params, prompts, new, prompt + new, temperature=0.0, weights=w))
                    for k, w in ours.items()}
            out = {k: run() for k, run in runs.items()}  # compile
            print(f"decode[{name}, batch {b}]: int8 greedy tokens equal to float32's for the first "
                  f"{_agreement(out['int8'], out['float32'])} of {new} (random weights: near-ties part them)")
            modes = {} if peer is None else {(k, t): None for k in ("float32", "int8")
                                             for t in (peer.default_threads, 1)}
            times = {**{k: [] for k in runs}, **{m: [] for m in modes}}
            for _ in range(rounds):
                for k, run in runs.items():
                    t = time.perf_counter()
                    run()
                    times[k].append(time.perf_counter() - t)
                for kind, threads in modes:
                    times[(kind, threads)].append(peer.call("generate", name=kind, prompts=prompts, new=new,
                                                            threads=threads)["seconds"])
            rate = {k: b * new / float(np.median(v)) for k, v in times.items()}
            line = (f"decode[{name}, batch {b}]: ours float32 {rate['float32']:,.1f} new tokens/s, int8 "
                    f"{rate['int8']:,.1f} ({rate['int8'] / rate['float32']:.2f}x float32)")
            keys = {f"decode_{name}_b{b}_float32": rate["float32"], f"decode_{name}_b{b}_int8": rate["int8"],
                    f"decode_{name}_b{b}_int8_over_float32": rate["int8"] / rate["float32"]}
            if peer is not None:
                for kind in ("float32", "int8"):
                    best = max((m for m in modes if m[0] == kind), key=rate.get)
                    keys[f"decode_{name}_b{b}_{kind}_ratio_vs_transformers"] = rate[kind] / rate[best]
                    line += (f"; transformers eager {kind}: {rate[best]:,.1f} ({best[1]} thread"
                             f"{'s' if best[1] > 1 else ''}), ratio {rate[kind] / rate[best]:.2f}x")
            print(line)
            print(" ".join(f"{k}={v:.2f}" for k, v in keys.items()))
            rates.update(keys)
        rates.update(_speculative_rounds(name, graphdef, params, ours, cfg, rounds, new, prompt))
        return rates
    finally:
        if peer is not None:
            peer.close()


def _speculative_rounds(name, graphdef, params, ours: dict, cfg, rounds: int, new: int, prompt: int) -> dict:
    """Batch 1, greedy: speculative decoding with the model's own int8 weights as the draft
    (`--draft int8`, k=4) against the float32 model alone, interleaved; the acceptance rate
    (random weights have more near-ties than a trained model, so it is lower than a trained
    model's)."""
    ids = [(7 * j) % (cfg.vocab_size - 1) + 1 for j in range(prompt)]
    alone = lambda: generate(graphdef, params, [ids], new, prompt + new, temperature=0.0, weights=ours["float32"])  # noqa: E731
    spec = lambda: speculative.generate(ours["float32"], ours["int8"], ids, new, prompt + new, k=4)  # noqa: E731
    alone(), spec()  # compile
    times = {"alone": [], "speculative": []}
    for _ in range(rounds):
        for kind, run in (("alone", alone), ("speculative", spec)):
            t = time.perf_counter()
            out = run()
            times[kind].append(time.perf_counter() - t)
            if kind == "speculative":
                result = out
    rate = {k: new / float(np.median(v)) for k, v in times.items()}
    accepted = result.accepted / max(1, result.drafted)
    print(f"decode[{name}, batch 1, speculative, draft: its own int8 weights, k=4]: {rate['speculative']:,.1f} new "
          f"tokens/s against {rate['alone']:,.1f} alone ({rate['speculative'] / rate['alone']:.2f}x), "
          f"{accepted:.0%} of drafted tokens accepted")
    return {f"decode_{name}_b1_speculative_int8_draft_speedup": rate["speculative"] / rate["alone"],
            f"decode_{name}_b1_speculative_int8_draft_accepted": accepted}


def _decode_rounds(graphdef, params, weights, peer, rounds: int):
    new = 128
    ours, theirs = {}, {}
    for b in (1, 8):
        prompts = [list(range(4 + i, 36 + i)) for i in range(b)]
        run = lambda: generate(graphdef, params, prompts, new, 256, temperature=0.0, weights=weights)  # noqa: E731
        out = run()  # compile
        assert all(len(o) == new for o in out)
        modes = {} if peer is None else {f"{peer.default_threads} threads": None, "1 thread": 1}
        times = {"ours": [], **{m: [] for m in modes}}
        if peer is not None:
            agree = _agreement(peer.call("generate", prompts=prompts, new=new)["tokens"], out)
            print(f"decode[batch {b}]: greedy tokens equal to transformers' for the first {agree} of {new} "
                  "(a random model's near-ties part them later)")
        for _ in range(rounds):
            t = time.perf_counter()
            run()
            times["ours"].append(time.perf_counter() - t)
            for mode, threads in modes.items():  # timed in the peer's process, around its generate
                times[mode].append(peer.call("generate", prompts=prompts, new=new, threads=threads)["seconds"])
        rate = {k: b * new / float(np.median(v)) for k, v in times.items()}
        ours[b] = rate.pop("ours")
        line = f"decode[batch {b}]: {ours[b]:,.0f} new tokens/s ({b / ours[b] * 1e3:.2f} ms per step)"
        if rate:
            best = max(rate, key=rate.get)
            theirs[b] = rate[best]
            line += ("; transformers generate (eager): " + ", ".join(f"{v:,.0f} ({k})" for k, v in rate.items())
                     + f"; ratio {ours[b] / theirs[b]:.2f}x")
        print(line)
    return ours, theirs


def _decode_report(weights, ours: dict, theirs: dict) -> dict:
    floor = {b: weight_products_ms(weights, b) for b in (1, 8)}
    bound = 8 * (1e3 / ours[1]) / floor[8]
    print(f"decode[weight products alone, no attention/norms/cache]: {floor[1]:.2f} ms per step at batch 1, "
          f"{floor[8]:.2f} at batch 8 ({floor[8] / floor[1]:.1f}x): batch 8 can give at most {bound:.1f}x "
          "batch 1's tokens/s with these matrix products")
    print(f"decode_tokens_per_s_b1={ours[1]:.0f} decode_tokens_per_s_b8={ours[8]:.0f} "
          f"decode_b8_over_b1={ours[8] / ours[1]:.2f} decode_b8_over_b1_bound={bound:.2f}")
    if theirs:
        print(f"decode_ratio_vs_transformers_b1={ours[1] / theirs[1]:.2f} "
              f"decode_ratio_vs_transformers_b8={ours[8] / theirs[8]:.2f}")
    return {"ours": ours, "peer": theirs}


def weight_products_ms(w, batch: int, steps: int = 100, rounds: int = 5) -> float:
    """Milliseconds per decode step spent in its weight products alone, on `batch` rows: per
    layer q/k/v, output, gate/up and down, then the output head, chained as in a step but
    without attention, norms or cache (one compiled loop of `steps`; median of `rounds`).
    No decode step of that batch can take less with XLA's matrix products on this machine,
    so 8 x (batch-1 step) / (this at batch 8) bounds what batch 8 gains over batch 1."""
    cfg = w.cfg
    nh, f = cfg.n_heads * cfg.head_size, cfg.d_ff
    mm = decode._mm  # float or int8 matrices
    x0 = jnp.full((batch, cfg.d_model), 0.1, jnp.dtype(cfg.compute_dtype))

    @jax.jit
    def loop(w, x0):
        def body(_, x):
            for layer in w.layers:
                x = x + mm(mm(x, layer["wqkv"])[:, :nh], layer["wo"])
                y = mm(x, layer["w_gate_up"])
                x = x + mm(y[:, :f] * y[:, f:], layer["w_down"])
            return x0 + mm(x, w.out)[:, : x.shape[1]] * 1e-3  # bounded values: no denormals
        return jax.lax.fori_loop(0, steps, body, x0)

    jax.block_until_ready(loop(w, x0))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(loop(w, x0))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / steps * 1e3


def _agreement(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens from the start on which every row of a and b agree."""
    n = 0
    while all(n < len(x) and n < len(y) and x[n] == y[n] for x, y in zip(a, b)):
        n += 1
    return n


def _torch_available(what: str) -> bool:
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        return True
    print(f"peer: torch/transformers not installed (pip install torch transformers); no {what} ratio printed")
    return False


def _decode_peer(cfg, params, hf_dir: str):
    """`transformers.generate` on the reference model exported to `hf_dir`, in a child process
    (lm.tools.peer_torch.Peer; None without torch/transformers)."""
    if not _torch_available("decode"):
        return None
    export_llama(cfg, params, hf_dir)
    peer = peer_torch.Peer()
    peer.default_threads = peer.call("load_decoder", hf_dir=hf_dir)["default_threads"]
    return peer


def main(which: str = "all") -> int:
    ref = main_train() if which in ("all", "train") else None
    if which in ("all", "data"):
        main_data(ref)
    if which in ("all", "decode"):
        main_decode()
        main_decode_large()
    if which == "curate":  # not in "all": it needs the curate extra and takes a minute or two
        main_curate()
    return 0


def main_curate(uniques: int = 10_000, workers: int = 2) -> dict:
    """`lm data curate` on a planted corpus (data_pipeline/curate_planted.py): `uniques` documents
    of 150-450 words, 10% exact and 20% near copies of them, and evaluation items quoted in prose
    (real ones from ../shared/data when present, else made-up task-file items); every step on,
    `workers` worker processes. Prints the report's table (seconds and documents/s per step), the
    whole curation's documents/s and MB/s, and what was removed of each planted kind."""
    with tempfile.TemporaryDirectory() as tmp:
        items, tasks, files = P.evaluation_items(tmp)
        t = time.perf_counter()
        truth = P.plant(os.path.join(tmp, "in"), uniques=uniques, exact=uniques // 10, near=uniques // 5,
                        eval_items=items, shards=4 * workers)
        print(f"curate: planted {uniques:,} unique documents, {uniques // 10:,} exact and {uniques // 5:,} near "
              f"copies, {len(items)} quoted evaluation items in {time.perf_counter() - t:.1f}s")
        cfg = C.CurateConfig(inputs=(C.CurateInput("web", "jsonl", (os.path.join(tmp, "in", "*.jsonl"),)),),
                             output_dir=os.path.join(tmp, "out"), decontaminate_tasks=tasks,
                             decontaminate_files=files, mask_pii=True,
                             tasks=2 * workers, workers=workers)
        report = C.curate(cfg, log=print)
        kept = {r["id"]: r["text"] for f in report["written"]["shards"]
                for r in map(json.loads, open(f, encoding="utf-8"))}
        s = P.score(truth, kept)
    t = report["throughput"]
    print(f"curate: exact copies removed {s['exact_removed']}/{s['exact']}, near copies {s['near_removed']}/"
          f"{s['near']} (by words changed: {s['near_recall_by_words_changed']}; Jaccard min/median "
          f"{s['near_jaccard_min_median']}), unique documents lost {s['uniques_lost']}/{s['uniques']}, "
          f"evaluation items caught {s['eval_caught']}/{s['eval_planted']} ({s['eval_cut_not_removed']} of them "
          f"by quality rules that cut their lines; missed: {s['eval_missed']})")
    print(f"curate_docs_per_s={t['docs_per_s']} curate_mb_per_s={t['mb_per_s']} (wall {t['wall_seconds']}s, "
          f"{workers} workers, {os.cpu_count()} CPUs)")
    return {"score": s, "throughput": t}


def main_train() -> float:
    dev = jax.devices()[0]
    peak, src = perf.peak_flops_per_device()
    if dev.platform == "cpu":
        peak = perf.measured_matmul_peak()  # the whole host: benchmarks use one device
    print(f"device: {dev.device_kind} ({dev.platform}); peak {peak / 1e9:.1f} GFLOP/s ({src})")
    results = {}
    for name, spec in (("tiny", "pretrain_tiny"), ("reference", "bench_reference")):
        cfg = experiment.load(spec)
        r = bench_train(cfg)
        r["mfu"] = r["flops_per_s"] / peak
        results[name] = r
        print(f"train[{name}]: {r['params'] / 1e6:.2f}M params, batch {cfg.data.batch_size}x{cfg.data.seq_len}, "
              f"step {r['step_time_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s = {r['mfu']:.1%} of the {peak / 1e9:.1f} GFLOP/s peak")
    ref = results["reference"]
    print(f"train_tokens_per_s={ref['tokens_per_s']:.0f} mfu={ref['mfu']:.4f}")
    if dev.platform == "cpu":
        train_peer(experiment.load("bench_reference"), ref["tokens_per_s"])
    return ref["tokens_per_s"]


def train_peer(cfg: Config, ours: float) -> None:
    """The PyTorch peer (Hugging Face LLaMA of the same shape, float32, AdamW) at its best, in
    its own process: eager and torch.compile, each with the multi-tensor and the fused AdamW,
    and without gradient checkpointing (our reference recomputes each layer, which is faster
    for us on a CPU; for the peer it costs about a fifth of its speed, measured 2026-12-06,
    and at this size memory does not call for it), on the reference configuration, measured
    in this run; then ours again, so that a drift of the machine's speed during the run
    shows. The ratio is against the peer's fastest."""
    if not _torch_available("training"):
        return
    d = cfg.data
    rates = {}
    peer = peer_torch.Peer()
    try:
        for mode, compiled in (("eager", False), ("torch.compile", True)):
            for fused in (False, True):
                name = f"{mode}, {'fused' if fused else 'foreach'} AdamW"
                try:
                    r = peer.call("train", model=dataclasses.asdict(cfg.model), batch=d.batch_size, seq_len=d.seq_len,
                                  options={"compile": compiled, "grad_ckpt": False, "steps": 20, "repeats": 3,
                                           "fused": fused})
                except RuntimeError as e:  # e.g. no C++ compiler for torch.compile
                    print(f"peer[{name}]: failed ({e})")
                    continue
                rates[name] = r["tokens_per_s"]
                print(f"peer[{name}]: Hugging Face LLaMA, same shape and batch, own process: "
                      f"{r['tokens_per_s']:,.0f} tokens/s")
    finally:
        peer.close()
    again = bench_train(cfg)["tokens_per_s"]
    ours = (ours + again) / 2  # mean of the two measurements around the peer
    print(f"train[reference] again: {again:,.0f} tokens/s")
    for mode in ("eager", "torch.compile"):
        best = max((r for name, r in rates.items() if name.startswith(mode + ",")), default=None)
        if best:
            print(f"train_ratio_vs_{mode.replace('.', '_')}={ours / best:.2f}")
    if rates:
        best = max(rates, key=rates.get)
        print(f"train_ratio_vs_best_peer={ours / rates[best]:.2f} (the peer's best: {best})")
