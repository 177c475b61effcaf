import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import transformer as M
from lm.model.sizes import SIZES

SMALL = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=16, attention_block=0)


def build(cfg, seed=0):
    return M.Transformer(cfg, nnx.Rngs(seed))


def tokens(b=2, t=16, v=97, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, v, (b, t)), jnp.int32)


# -- deterministic helpers against hand-computed values ------------------------------------

def test_rope_hand_computed():
    # head size 4, theta 100 -> inverse frequencies [1, 0.1]
    cos, sin = M.rope_tables(jnp.array([[0, 1, 2]]), 4, 100.0)
    assert cos.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(cos[0, :, 0], [[1, 1], [0.5403023, 0.9950042], [-0.4161468, 0.9800666]], rtol=1e-6)
    np.testing.assert_allclose(sin[0, :, 0], [[0, 0], [0.8414710, 0.0998334], [0.9092974, 0.1986693]], rtol=1e-6)
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    c, s = M.rope_tables(jnp.array([[1]]), 4, 100.0)
    # pairs (x0, x2) = (1, 3) rotated by 1 rad, (x1, x3) = (2, 4) by 0.1 rad
    expected = [1 * 0.5403023 - 3 * 0.8414710, 2 * 0.9950042 - 4 * 0.0998334,
                3 * 0.5403023 + 1 * 0.8414710, 4 * 0.9950042 + 2 * 0.0998334]
    np.testing.assert_allclose(M.apply_rope(x, c, s)[0, 0, 0], expected, rtol=1e-6)
    # position 0 is the identity
    c0, s0 = M.rope_tables(jnp.array([[0]]), 4, 100.0)
    np.testing.assert_allclose(M.apply_rope(x, c0, s0), x)


def test_causal_and_document_mask_hand_computed():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(M.attention_mask(seg, 1, 5)[0], expected)
    np.testing.assert_array_equal(M.attention_mask(None, 1, 3)[0], np.tril(np.ones((3, 3), bool)))


def naive_attention(q, k, v, mask):
    """Loop-per-head reference with numpy; q (B,T,N,H), k/v (B,S,K,H), mask (B,T,S)."""
    q, k, v, mask = map(np.asarray, (q, k, v, mask))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            s = q[bi, :, ni] @ k[bi, :, ni // g].T / math.sqrt(h)
            s = np.where(mask[bi], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, ni] = p @ v[bi, :, ni // g]
    return out


@pytest.mark.parametrize("n,k,block", [(4, 4, 0), (4, 2, 0), (4, 1, 4), (6, 2, 8), (4, 2, 16)])
def test_attention_matches_naive_reference(n, k, block):
    rng = np.random.default_rng(1)
    b, t, h = 2, 16, 8
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(b, t, n, h), (b, t, k, h), (b, t, k, h)])
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 6 + [3] * 3], b, 0))
    mask = M.attention_mask(seg, b, t)
    out = M.dot_product_attention(q, kk, v, mask, block)
    np.testing.assert_allclose(out, naive_attention(q, kk, v, mask), atol=1e-5)
    dpa = jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None])
    np.testing.assert_allclose(out, dpa, atol=1e-5)


# -- model-level invariants -----------------------------------------------------------------

def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = SMALL
    mha_cfg = dataclasses.replace(SMALL, n_kv_heads=SMALL.n_heads)
    gqa = build(gqa_cfg)
    g = SMALL.n_heads // SMALL.n_kv_heads
    params = nnx.state(gqa, nnx.Param).to_pure_dict()
    attn = params["blocks"]["attn"]
    for name in ("wk", "wv"):  # (L, D, K, H): query head i uses KV head i // g
        attn[name] = jnp.repeat(attn[name], g, axis=2)
    mha = build(mha_cfg)
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mha, state)
    x = tokens()
    np.testing.assert_allclose(gqa(x), mha(x), atol=1e-5)


def test_scan_over_layers_equals_unrolled_loop():
    scanned = build(SMALL)
    unrolled = build(dataclasses.replace(SMALL, scan_layers=False))
    nnx.update(unrolled, nnx.state(scanned, nnx.Param))
    x = tokens()
    np.testing.assert_allclose(scanned(x), unrolled(x), atol=1e-5)


def test_blocked_causal_attention_equals_full():
    full = build(SMALL)
    blocked = build(dataclasses.replace(SMALL, attention_block=4))
    nnx.update(blocked, nnx.state(full, nnx.Param))
    x = tokens()
    np.testing.assert_allclose(full(x), blocked(x), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(remat):
    base = build(SMALL)
    other = build(dataclasses.replace(SMALL, remat=remat))
    g0, p0 = nnx.split(base, nnx.Param)
    g1, _ = nnx.split(other, nnx.Param)
    x = tokens()

    def loss(graphdef, p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    a = jax.grad(lambda p: loss(g0, p))(p0)
    b = jax.grad(lambda p: loss(g1, p))(p0)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, w, atol=1e-6)


def test_causality_and_document_isolation():
    m = build(SMALL)
    x = tokens(1)
    y = x.at[0, 10].set((x[0, 10] + 1) % 97)
    a, b = m(x), m(y)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)  # the past ignores the future
    assert not np.allclose(a[0, 10:], b[0, 10:])
    # with documents [0, 8) and [8, 16), a change in the first never reaches the second
    seg = jnp.asarray([[1] * 8 + [2] * 8])
    pos = jnp.asarray([list(range(8)) * 2])
    z = x.at[0, 3].set((x[0, 3] + 1) % 97)
    np.testing.assert_allclose(m(x, pos, seg)[0, 8:], m(z, pos, seg)[0, 8:], atol=1e-6)
    # a packed second document sees exactly what it would see alone
    alone = m(x[:, 8:])
    np.testing.assert_allclose(m(x, pos, seg)[0, 8:], alone[0], atol=1e-5)


def test_tied_embeddings_project_with_the_embedding_and_qk_norm_runs():
    """Tied: no head of its own, and the logits are the final hidden states times the
    transposed input embedding (with qk-norm on, whose scales are parameters)."""
    cfg = dataclasses.replace(SMALL, tie_embeddings=True, qk_norm=True)
    m = build(cfg)
    assert not hasattr(m, "head") and hasattr(m.blocks.attn, "q_norm")
    x = tokens()
    h = np.asarray(m.hidden(x))  # (B*T, D)
    logits = np.asarray(m(x))
    assert logits.shape == (2, 16, 97)
    np.testing.assert_allclose(logits.reshape(-1, 97), h @ np.asarray(m.embed[...]).T, rtol=1e-5, atol=1e-6)
    assert M.param_count(cfg) == M.expected_param_count(cfg)


def test_bfloat16_compute_keeps_float32_params_and_logits_close_to_float32():
    """bfloat16 compute on the same float32 parameters: float32 logits within bfloat16's
    precision (8 bits of mantissa, a few roundings deep) of the float32 model's, not equal."""
    m32 = build(SMALL)
    m16 = build(dataclasses.replace(SMALL, compute_dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    for a, b in zip(jax.tree.leaves(nnx.state(m32, nnx.Param)), jax.tree.leaves(nnx.state(m16, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    x = tokens()
    out32, out16 = m32(x), m16(x)
    assert out16.dtype == jnp.float32
    out32, out16 = np.asarray(out32), np.asarray(out16)
    err = np.abs(out16 - out32).max()
    assert 0 < err <= 4 * 2.0**-8 * np.abs(out32).max(), (err, np.abs(out32).max())


# Hand-computed from each size's shape (see lm/sizes.py); eval_shape allocates nothing.
EXPECTED_PARAMS = {
    "tiny": 5_048_576,
    "small": 109_529_856,
    "medium": 341_099_520,
    "base": 1_169_254_400,
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_named_size_parameter_count(name):
    assert M.param_count(SIZES[name]) == EXPECTED_PARAMS[name]
    assert M.expected_param_count(SIZES[name]) == EXPECTED_PARAMS[name]


def test_flops_per_token_formula():
    cfg = SIZES["tiny"]
    # untied: 6 x (all params - input embedding - norm scales) + 12 L N H T
    matmul = EXPECTED_PARAMS["tiny"] - 4096 * 256 - (4 * 2 * 256 + 256)
    assert M.flops_per_token(cfg, 256) == 6 * matmul + 12 * 4 * 4 * 64 * 256
