"""The CPU attention kernel (lm/model/attention_cpu.cc), what model.attention="flash" runs on a
CPU, against XLA's attention over the document mask: forward and gradients over shapes that
take every path of its products (lengths not a multiple of its 64-query blocks or of 16, head
sizes below and above 16, grouped heads, documents and padding), and its fallback without a
compiler. tests/test_attention.py also runs it through the shared fused-kernel tests."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import attention, attention_cpu
from lm.model import transformer as M

needs_kernel = pytest.mark.skipif(not attention_cpu.available(), reason="no C++ compiler: XLA's attention")


def _case(rng, b, t, n, k, h, docs):
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    if docs == "every token":
        seg = np.broadcast_to(np.arange(1, t + 1, dtype=np.int32), (b, t))
    elif docs:
        seg = (np.cumsum(rng.random((b, t)) < 0.06, axis=1) + 1).astype(np.int32)
        seg[:, -5:] = 0  # padding at the end of each row: a run like any other
        seg[:, :3], seg[:, 3] = 1000, 1001  # then a document of one token
    return q, kk, v, jnp.asarray(seg)


def _reference(q, k, v, seg):
    b, t = seg.shape
    return M.dot_product_attention(q, k, v, M.attention_mask(seg, b, t), 0)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 64, 4, 4, 64, False), (2, 100, 4, 2, 16, True), (1, 37, 3, 1, 8, True),
                                   pytest.param((2, 130, 6, 3, 24, True), marks=pytest.mark.slow),
                                   pytest.param((1, 200, 2, 2, 80, False), marks=pytest.mark.slow),
                                   (1, 1, 2, 1, 4, False), (2, 65, 2, 1, 17, "every token")])
def test_kernel_equals_xla_attention_forward_and_gradients(shape):
    b, t, n, k, h, docs = shape
    rng = np.random.default_rng(t)
    q, kk, v, seg = _case(rng, b, t, n, k, h, docs)
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    ours = lambda q, k, v: attention.fused_attention(q, k, v, seg, "cpu_flash")
    ref = lambda q, k, v: _reference(q, k, v, seg)
    np.testing.assert_allclose(jax.jit(ours)(q, kk, v), ref(q, kk, v), atol=2e-6, rtol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    for a, r in zip(jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, kk, v), jax.grad(loss(ref), (0, 1, 2))(q, kk, v)):
        np.testing.assert_allclose(a, r, atol=1e-5 * float(jnp.max(jnp.abs(r))), rtol=1e-4)


@needs_kernel
def test_a_nan_in_a_key_reaches_the_queries_that_see_it_as_in_xla():
    q, k, v, seg = _case(np.random.default_rng(5), 1, 40, 2, 1, 16, False)
    k = k.at[0, 10, 0, 3].set(jnp.nan)
    ours = np.asarray(jax.jit(lambda *a: attention.fused_attention(*a, seg, "cpu_flash"))(q, k, v))
    ref = np.asarray(_reference(q, k, v, seg))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours[0, 10:]).all() and not np.isnan(ours[0, :10]).any()


@needs_kernel
def test_a_document_never_sees_another_and_the_kernel_is_in_the_program():
    rng = np.random.default_rng(3)
    q, k, v, seg = _case(rng, 1, 96, 2, 1, 32, False)
    seg = jnp.asarray(np.repeat([[1, 2]], 48, axis=1), jnp.int32)  # two documents of 48 tokens
    f = jax.jit(lambda q, k, v: attention.fused_attention(q, k, v, seg, "cpu_flash"))
    assert attention_cpu.FORWARD in f.lower(q, k, v).as_text()
    out, moved = f(q, k, v), f(q, k.at[:, :48].add(3.0), v.at[:, :48].add(1.0))
    np.testing.assert_array_equal(out[:, 48:], moved[:, 48:])  # the second document did not move
    assert not np.allclose(out[:, :48], moved[:, :48])


@needs_kernel
@pytest.mark.slow  # about 5 s; test_attention.py's model test with "flash" stays in make test
def test_model_trains_the_same_with_flash_on_a_cpu():
    """One step's loss and gradients of a small model: "flash" (the kernel) against "xla"."""
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=80)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 80)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 20, axis=1), jnp.int32)

    def loss_and_grads(attn):
        model = M.Transformer(dataclasses.replace(cfg, attention=attn), nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, segment_ids=seg)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    (l1, g1), (l2, g2) = loss_and_grads("flash"), loss_and_grads("xla")
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_without_a_compiler_flash_is_xla_attention_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    attention_cpu.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lm.model.attention_cpu"):
            assert attention.resolve("flash", "cpu") == "xla" and attention.resolve("flash", "cpu") == "xla"
        ours = [r.getMessage() for r in caplog.records if r.name == "lm.model.attention_cpu"]
        assert len(ours) == 1 and "no-such-compiler" in ours[0]
        with pytest.raises(RuntimeError, match="attention=xla"):
            attention.fused_attention(*_case(np.random.default_rng(0), 1, 16, 1, 1, 8, False), "cpu_flash")
        monkeypatch.setenv("LM_ATTENTION_KERNEL", "0")  # switched off: no build tried
        monkeypatch.delenv("CXX")
        attention_cpu.available.cache_clear()
        assert attention.resolve("flash", "cpu") == "xla" and not any(tmp_path.rglob("*.so"))
    finally:
        attention_cpu.available.cache_clear()
