"""`lm bench serve`: what the server's engine gives one client and many (lm/serve/batching.py).

Decoding only (no HTTP, no tokenizer): the reference model of `lm bench decode`
(experiments/bench_reference.py), and `small` (110M, float32 compute, weights beyond the
CPU's cache: a step is bound by reading them, as serving a real model is), with random
weights, requests submitted straight to a `Batcher`.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
from flax import nnx

from lm import experiment
from lm.model.sizes import size
from lm.model.transformer import Transformer
from lm.sampling import decode
from lm.serve.batching import Batcher, Request


def main_serve(new: int = 128, rounds: int = 7, model: str = "reference") -> dict:
    """The server's engine (lm/serve/batching.py) on the reference model (or `small`): new
    tokens/s of one client on a 1-slot and on an 8-slot batcher, and of 8 concurrent clients
    on the 8-slot one (32-token prompts, `new` tokens each, greedy; median of `rounds`, the
    cases interleaved; no HTTP)."""
    if model == "reference":
        cfg = experiment.load("bench_reference").model
    else:
        cfg = dataclasses.replace(size(model), compute_dtype="float32")
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    weights = decode.prepare(graphdef, params)
    batchers = {slots: Batcher(weights, lambda prompt, ids: "", slots=slots, max_len=256,
                               log=lambda *_: None).start() for slots in (1, 8)}
    cases = [(1, 1), (8, 1), (8, 8)]  # (slots, clients)
    times: dict = {c: [] for c in cases}
    try:
        for r in range(rounds + 1):  # interleaved, so a drift of the machine hits all alike; the first warms up
            for slots, clients in cases:
                done = [threading.Event() for _ in range(clients)]
                t = time.perf_counter()
                for i in range(clients):
                    batchers[slots].submit(Request(list(range(4 + i, 36 + i)), new, stream=False),
                                           lambda ev, e=done[i]: ev.finish and e.set())
                for e in done:
                    e.wait()
                if r:
                    times[(slots, clients)].append(time.perf_counter() - t)
    finally:
        for b in batchers.values():
            b.close()
    rates = {(slots, clients): clients * new / float(np.median(times[(slots, clients)]))
             for slots, clients in cases}
    one = rates[(1, 1)]
    tag = "" if model == "reference" else f"_{model}"
    print(f"serve[{model}; 1-slot engine, 1 client]: {one:,.1f} tokens/s; [8 slots, 1 client]: {rates[(8, 1)]:,.1f} "
          f"({rates[(8, 1)] / one:.2f}x); [8 slots, 8 clients]: {rates[(8, 8)]:,.1f} ({rates[(8, 8)] / one:.2f}x)")
    print(f"serve{tag}_lone_client_8_slots_over_1_slot={rates[(8, 1)] / one:.2f} "
          f"serve{tag}_8_clients_over_1_slot={rates[(8, 8)] / one:.2f}")
    return rates


def main_prefix(shared: int = 192, rounds: int = 11) -> dict:
    """Time to the first token of a request whose first `shared` tokens (a system prompt) an
    earlier request had, on 8-slot batchers without and with the prefix cache (the reference
    model, random weights; median of `rounds`, interleaved; no HTTP)."""
    cfg = experiment.load("bench_reference").model
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    weights = decode.prepare(graphdef, params)
    system = list(range(4, 4 + shared))
    batchers = {mb: Batcher(weights, lambda prompt, ids: "", slots=8, max_len=256, log=lambda *_: None,
                            prefix_cache_mb=mb).start() for mb in (0, 64)}
    times: dict = {mb: [] for mb in batchers}
    try:
        for r in range(rounds + 1):
            for mb, batcher in batchers.items():
                done = threading.Event()
                t = time.perf_counter()
                batcher.submit(Request(system + [200 + r, 7, 9], 1, stream=False), lambda ev: ev.finish and done.set())
                done.wait()
                if r:
                    times[mb].append(time.perf_counter() - t)
    finally:
        for b in batchers.values():
            b.close()
    ms = {mb: 1000 * float(np.median(t)) for mb, t in times.items()}
    print(f"serve[first token after a shared {shared}-token prompt]: {ms[0]:.1f} ms without the prefix cache, "
          f"{ms[64]:.1f} ms with it ({ms[0] / ms[64]:.2f}x)")
    print(f"serve_prefix_cache_first_token_speedup={ms[0] / ms[64]:.2f}")
    return ms
