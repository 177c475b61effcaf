"""The server engine's prefix cache (lm/serve/batching.py PrefixCache): prompts that begin like
a saved one start from its keys/values, with the same output as a full prefill."""

import threading

import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sampling import decode
from lm.sampling.sampler import generate
from lm.serve.batching import PREFIX_BLOCK, Batcher, PrefixCache, Request

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
                  init_std=0.2)
SYSTEM = list(range(3, 43))  # a shared 40-token beginning: two whole blocks reusable
PROMPTS = [SYSTEM + [50 + i, 60 + i, 70 + i][: 1 + i % 3] for i in range(6)] + [SYSTEM[:20] + [9, 9], [5] * 17]


def _answers(batcher, requests, together=False):
    got, done = {}, threading.Semaphore(0)

    def submit(i, r):
        batcher.submit(r, lambda ev, i=i: ev.finish and (got.__setitem__(i, ev.tokens), done.release()))

    for i, r in enumerate(requests):
        submit(i, r)
        if not together:
            assert done.acquire(timeout=120)
    if together:
        for _ in requests:
            assert done.acquire(timeout=120)
    return [got[i] for i in range(len(requests))]


@pytest.mark.parametrize("tensor", [1, pytest.param(2, marks=pytest.mark.slow)])  # (split decoding: test_scale_out)
def test_outputs_with_the_prefix_cache_equal_full_prefills(tensor):
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
    w = decode.prepare(graphdef, params, tensor=tensor)
    greedy = [Request(p, 12, stream=False) for p in PROMPTS]
    sampled = [Request(p, 12, temperature=0.9, top_p=0.9, seed=i, stream=False) for i, p in enumerate(PROMPTS)]
    results = {}
    for mb in (0, 8):
        batcher = Batcher(w, lambda prompt, ids: "", slots=4, max_len=CFG.max_seq_len, log=lambda *_: None,
                          prefix_cache_mb=mb).start(warm=False)
        try:
            results[mb] = (_answers(batcher, greedy), _answers(batcher, sampled, together=True))
            stats = batcher.status()
        finally:
            batcher.close()
        if mb:
            # one by one: prompts 1-5 reuse prompt 0's two blocks, and prompt 6 nothing (its
            # 20 shared tokens are one block, but prompt 0... is saved: it shares 1 block)
            assert stats["prefix_hits"] >= 5 and stats["prefix_tokens"] >= 5 * 2 * PREFIX_BLOCK
        else:
            assert stats["prefix_hits"] == 0
    assert results[8] == results[0]
    assert results[0][0] == generate(graphdef, params, PROMPTS, 12, CFG.max_seq_len, temperature=0.0)


def test_the_cache_keeps_the_longest_shared_blocks_and_evicts_the_least_recently_used():
    cache = PrefixCache(capacity=2)
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 240))
    assert not cache.wants([1] * PREFIX_BLOCK)  # nothing past one block to share
    cache.add(a, "rows a")
    assert not cache.wants(a[:30])  # held already (a saved prompt begins with it)
    assert cache.lookup(a + [7]) == (32, "rows a")  # whole blocks only
    assert cache.lookup(a) == (32, "rows a")  # at least one token left to run (39 -> 32)
    assert cache.lookup(a[:20] + [0] * 10) == (16, "rows a")
    assert cache.lookup(b) == (0, None)
    cache.add(a + [1, 2, 3], "rows a+")  # extends a: replaces it
    assert list(cache.entries) == [tuple(a + [1, 2, 3])]
    cache.add(b, "rows b")
    cache.lookup(a + [1, 2, 3, 4])  # a+ used last
    cache.add(c, "rows c")  # evicts b, the least recently used
    assert [k[0] for k in cache.entries] == [0, 200]
    assert PrefixCache(capacity=0).wants(a) is False


def test_the_memory_bound_sets_the_number_of_saved_prompts():
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
    w = decode.prepare(graphdef, params)
    row = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.max_seq_len * CFG.head_size * 4  # bytes of one prompt's rows
    batcher = Batcher(w, lambda prompt, ids: "", slots=2, max_len=CFG.max_seq_len, log=lambda *_: None,
                      prefix_cache_mb=3 * row / 2**20)
    assert batcher.prefixes.capacity == 3
    batcher.start(warm=False)
    try:
        _answers(batcher, [Request([i] + list(range(3, 40)), 2, stream=False) for i in range(5)])
        assert len(batcher.prefixes.entries) == 3
        assert all(np.asarray(r[0]["k"]).shape == (CFG.n_kv_heads, CFG.max_seq_len, CFG.head_size)
                   for r in batcher.prefixes.entries.values())
    finally:
        batcher.close()
