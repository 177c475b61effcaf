"""The native int8 product of the decode engine on a CPU (lm/sampling/int8_cpu.py): what it
computes, when it is used, and XLA's product in its place when it cannot be built."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import native
from lm.model.transformer import Transformer
from lm.sampling import decode, int8_cpu
from lm.sampling.sampler import generate

CFG = ModelConfig(vocab_size=200, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=64,
                  init_std=0.2)

needs_kernel = pytest.mark.skipif(not int8_cpu.used_here(), reason="not a CPU, or no C++ compiler: XLA's product")


def _case(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    s = rng.random(n).astype(np.float32) + 0.5
    return x, q, s


@needs_kernel
def test_the_kernel_computes_x_times_q_times_the_column_scales():
    """Against float64, over shapes that take every path: one row and several (up to the 64
    the kernel takes), columns not a multiple of 16, more than 2048 columns (several column
    ranges), tall matrices (several row slabs whose partial sums are added), a 3-D x; and
    several independent products in one program (which XLA may run at the same time)."""
    rng = np.random.default_rng(0)
    cases = [_case(rng, *s) for s in [(1, 64, 64), (1, 768, 4100), (3, 77, 130), (8, 3072, 96), (9, 130, 33),
                                      (64, 256, 48), (2, 5, 3)]]
    f = jax.jit(lambda cs: [int8_cpu.matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s)) for x, q, s in cs])
    for (x, q, s), y in zip(cases, f(cases)):
        want = (x.astype(np.float64) @ q.astype(np.float64)) * s
        assert np.abs(np.asarray(y) - want).max() <= 2e-6 * np.abs(want).max()
    x, q, s = _case(rng, 6, 48, 40)
    y = jax.jit(int8_cpu.matmul)(jnp.asarray(x).reshape(2, 3, 48), jnp.asarray(q), jnp.asarray(s))
    assert y.shape == (2, 3, 40)
    np.testing.assert_allclose(np.asarray(y).reshape(6, 40), (x @ q.astype(np.float32)) * s, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_the_kernel_runs_for_decode_rows_and_xla_for_long_prefills_and_other_dtypes():
    rng = np.random.default_rng(1)
    _, q, s = _case(rng, 1, 32, 16)
    hlo = lambda x: jax.jit(int8_cpu.matmul).lower(x, q, s).as_text()  # noqa: E731
    assert int8_cpu.TARGET in hlo(jnp.ones((1, 32), jnp.float32))
    assert int8_cpu.TARGET in hlo(jnp.ones((int8_cpu.ROWS, 32), jnp.float32))
    assert int8_cpu.TARGET not in hlo(jnp.ones((int8_cpu.ROWS + 1, 32), jnp.float32))
    assert int8_cpu.TARGET not in hlo(jnp.ones((1, 32), jnp.bfloat16))


def test_int8_greedy_decoding_equals_float_decoding_with_the_dequantised_weights():
    """The int8 engine (the kernel where it is built) against the float engine holding the same
    int8 values times their scales as float32 matrices: the same greedy tokens, and the same
    logits up to float rounding."""
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
    q = decode.prepare(graphdef, params, int8=True)
    step_hlo = jax.jit(decode._mm).lower(jnp.ones((1, CFG.d_model), jnp.float32), q.layers[0]["wqkv"]).as_text()
    assert (int8_cpu.TARGET in step_hlo) == int8_cpu.used_here()  # the kernel, wherever it can run
    plain = lambda m: (m.q.astype(jnp.float32) * m.scale) if isinstance(m, decode.Int8) else m  # noqa: E731
    dq = q.replace(layers=[{n: plain(a) for n, a in layer.items()} for layer in q.layers], out=plain(q.out))
    prompts = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 64, 128, 3]]
    a = generate(graphdef, params, prompts, 24, 40, temperature=0.0, weights=q)
    b = generate(graphdef, params, prompts, 24, 40, temperature=0.0, weights=dq)
    assert a == b and len(set(a[0])) > 3
    rows = jnp.asarray([p + t for p, t in zip(prompts, a)], jnp.int32)
    mask = jnp.ones((2, rows.shape[1] - 1), jnp.float32)
    assert float(decode.next_token_nll(q, rows, mask)) == pytest.approx(float(decode.next_token_nll(dq, rows, mask)),
                                                                        rel=1e-5)


def test_without_a_compiler_xla_computes_the_same_product_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    int8_cpu.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lm.sampling.int8_cpu"):
            assert not int8_cpu.available() and not int8_cpu.available()
        ours = [r.getMessage() for r in caplog.records if r.name == "lm.sampling.int8_cpu"]
        assert len(ours) == 1 and "native kernel is unavailable" in ours[0] and "no-such-compiler" in ours[0]
        x, q, s = _case(np.random.default_rng(2), 2, 24, 20)
        lowered = jax.jit(int8_cpu.matmul).lower(x, q, s).as_text()
        assert int8_cpu.TARGET not in lowered
        np.testing.assert_allclose(np.asarray(jax.jit(int8_cpu.matmul)(x, q, s)), (x @ q.astype(np.float32)) * s,
                                   rtol=1e-5, atol=1e-4)
        monkeypatch.setenv("LM_INT8_KERNEL", "0")  # switched off: no build tried, nothing said
        monkeypatch.delenv("CXX")
        int8_cpu.available.cache_clear()
        assert not int8_cpu.available()
        assert not any(tmp_path.rglob("*.so"))
    finally:
        int8_cpu.available.cache_clear()


@needs_kernel
@pytest.mark.slow  # compiles the kernel twice (about 10 s); CI's slow phase runs it
def test_the_library_is_built_once_per_source_jaxlib_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE", str(tmp_path))
    first = native.build(int8_cpu.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert native.build(int8_cpu.SOURCE) == first and first.stat().st_mtime_ns == stamp  # found, not compiled again
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # nothing half-written left
    monkeypatch.setattr(native, "cpu_id", lambda: "another CPU")  # another machine sharing the cache
    assert native.build(int8_cpu.SOURCE) != first and len(list((tmp_path / "kernels").iterdir())) == 2


@pytest.mark.slow  # about 6 s; the int8 greedy-equality test stays in make test
def test_the_server_engine_with_int8_weights_answers_concurrent_clients_as_generate_does():
    """Four clients at once over the batcher's slots (each step's products over the busy rows
    go through the kernel where it runs) get the greedy tokens `generate` gives with the same
    int8 weights."""
    import threading

    from lm.serve.batching import Batcher, Request

    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(1)), nnx.Param)
    q = decode.prepare(graphdef, params, int8=True)
    prompts = [[3 + i, 7, 11 + 2 * i, 19, 23 + i][: 3 + i % 3] for i in range(4)]
    got, done = {}, threading.Semaphore(0)
    batcher = Batcher(q, lambda prompt, ids: "", slots=4, max_len=CFG.max_seq_len, log=lambda *_: None).start(warm=False)
    try:
        for i, p in enumerate(prompts):
            batcher.submit(Request(p, 10, stream=False),
                           lambda ev, i=i: ev.finish and (got.__setitem__(i, ev.tokens), done.release()))
        for _ in prompts:
            assert done.acquire(timeout=120)
    finally:
        batcher.close()
    want = [generate(graphdef, params, [p], 10, CFG.max_seq_len, temperature=0.0, weights=q)[0] for p in prompts]
    assert [got[i] for i in range(4)] == want


def test_the_int8_weights_of_the_target_draft_for_it():
    """Speculative decoding with the target's own int8 weights as the draft: the target's greedy
    tokens, and the draft agrees with most of them (the same model but for rounding; this
    random model's near-ties part them more often than a trained model's)."""
    from lm.sampling import speculative

    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(2)), nnx.Param)
    target = decode.prepare(graphdef, params)
    prompt = [7, 3, 9, 11, 5, 2]
    ref = generate(graphdef, params, [prompt], 30, CFG.max_seq_len, temperature=0.0)[0]
    r = speculative.generate(target, decode.quantize(target), prompt, 30, CFG.max_seq_len, k=4)
    assert r.tokens == ref and r.accepted >= 0.6 * r.drafted
