"""Fused attention (lm/attention.py) against the reference attention, on CPU.

The Pallas kernels run in interpret mode here: the same kernel code, blocks and masks
as on the accelerator, executed by XLA on the CPU. Documents cross the kernels' block
boundaries (forward blocks of 128 queries/keys, backward blocks of 64).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.synthetic import packed_segment_ids
from lm.config import ConfigError, ModelConfig
from lm.model import attention, attention_cpu
from lm.model import transformer as M

B, T, N, K, H = 2, 256, 4, 2, 64


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, 100:230], seg[0, 230:] = 2, 0  # a document across the block boundary at 128, then padding
    seg[1] = packed_segment_ids(1, T, 30, seed=seed)[0]  # many short documents
    return q, k, v, jnp.asarray(seg)


def _skip_without_the_cpu_kernel(impl):
    if impl == "cpu_flash" and not attention_cpu.available():
        pytest.skip("no C++ compiler: no CPU attention kernel")


def reference(q, k, v, seg):
    return M.dot_product_attention(q, k, v, M.attention_mask(seg, B, T), 0)


@pytest.mark.parametrize("impl", ["pallas", "pallas_skip", "pallas_skip/small_blocks", "pallas_skip/mha", "splash",
                                  "cpu_flash"])
def test_fused_kernel_equals_reference_forward_and_gradients(impl):
    _skip_without_the_cpu_kernel(impl)
    q, k, v, seg = inputs()
    if impl == "pallas_skip/mha":  # one key/value head per query head
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)
    if impl == "pallas_skip/small_blocks":  # forward blocks 64 x 32, backward 32 x 64: documents cross many
        fused = lambda q, k, v: attention.pallas_skip(q, k, v, seg, interpret=True, block_q=64, block_k=32,
                                                      bwd_q=32, bwd_kv=64)
    else:
        fused = lambda q, k, v: attention.fused_attention(q, k, v, seg, impl.split("/")[0])
    np.testing.assert_allclose(fused(q, k, v), reference(q, k, v, seg), atol=2e-5)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) * w), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(reference(*a, seg) * w), (0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=5e-5)


def test_pallas_skip_without_segment_ids_is_causal_attention():
    q, k, v, _ = inputs()
    ones = jnp.ones((B, T), jnp.int32)
    out = attention.pallas_skip(q, k, v, None, interpret=True, block_q=64, block_k=64)
    np.testing.assert_allclose(out, reference(q, k, v, ones), atol=2e-5)


def test_pallas_skip_with_a_group_size_not_a_power_of_two():
    q, k, v, seg = inputs()
    q, k, v, seg = q[:1, :128, :3], k[:1, :128, :1], v[:1, :128, :1], seg[:1, :128]  # 3 query heads per kv head
    ref = lambda q, k, v: M.dot_product_attention(q, k, v, M.attention_mask(seg, 1, 128), 0)
    fused = lambda q, k, v: attention.pallas_skip(q, k, v, seg, interpret=True, block_q=32, block_k=32,
                                                  bwd_q=32, bwd_kv=32)
    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=2e-5)
    g = jax.grad(lambda *a: jnp.sum(fused(*a) ** 2), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), (0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-4)


def test_pallas_skip_visits_only_blocks_of_the_query_documents():
    seg = np.zeros((1, T), np.int32)
    seg[0, :100], seg[0, 100:230] = 1, 2  # then padding (id 0) from 230
    start, end = attention.doc_bounds(seg)
    np.testing.assert_array_equal(start[0, [0, 99, 100, 229, 230, 255]], [0, 0, 100, 100, 230, 230])
    np.testing.assert_array_equal(end[0, [0, 99, 100, 229, 230, 255]], [99, 99, 229, 229, 255, 255])
    js, je = attention.doc_bounds(jnp.asarray(seg))  # the kernel's (traced) version agrees
    np.testing.assert_array_equal(js, start)
    np.testing.assert_array_equal(je, end)
    fwd, dkv = attention.visited_blocks(seg, block_q=64, block_k=32)
    # Forward/dQ, key blocks of 32 per query block of 64; the causal triangle alone is [2, 4, 6, 8].
    # Query block 2 (128..191) starts in document 2 (from 100): key blocks 3..5, not 0..5.
    np.testing.assert_array_equal(fwd, [[2, 4, 3, 5]])
    # dK/dV, query blocks of 64 per key block of 32; the causal triangle alone is [4, 4, 3, 3, 2, 2, 1, 1].
    # Key block 0 (0..31) lies in document 1, which ends at 99: query blocks 0..1, not 0..3.
    np.testing.assert_array_equal(dkv, [[2, 2, 1, 3, 2, 2, 1, 1]])
    # Packed rows of `base` (4096 tokens, documents of mean 512, blocks of 128 / 64): well under the triangle.
    fwd, dkv = attention.visited_blocks(packed_segment_ids(8, 4096, 512, seed=1), 128, 128)
    assert fwd.sum() < 0.3 * 8 * sum(range(1, 33))
    assert dkv.sum() < 0.3 * 8 * sum(range(1, 33))


def test_fused_kernel_sees_document_boundaries():
    # Changing keys of document 1 must not move outputs of document 2 (and vice versa).
    q, k, v, seg = inputs()
    out = attention.fused_attention(q, k, v, seg, "pallas")
    k2 = k.at[0, :100].add(3.0)  # row 0, document 1 only
    out2 = attention.fused_attention(q, k2, v, seg, "pallas")
    np.testing.assert_array_equal(out[0, 100:], out2[0, 100:])
    assert not np.allclose(out[0, :100], out2[0, :100])


@pytest.mark.parametrize("impl", ["pallas", "pallas_skip", "flash"])
def test_model_with_fused_attention_equals_reference_model(impl):
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=T,
                      attention_block=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (B, T)), jnp.int32)
    seg = inputs()[3]
    run = nnx.jit(lambda m: m(tokens, segment_ids=seg))
    ref = run(M.Transformer(cfg, nnx.Rngs(0)))
    fused = run(M.Transformer(dataclasses.replace(cfg, attention=impl), nnx.Rngs(0)))
    np.testing.assert_allclose(fused, ref, atol=1e-4)


def test_resolve_and_config_errors():
    assert attention.resolve("flash", "gpu") == attention.GPU_FLASH
    assert attention.resolve("pallas_skip", "gpu") == "pallas_skip"
    dataclasses.replace(ModelConfig(), attention="pallas_skip").validate()
    assert attention.resolve("flash", "tpu") == "splash"
    assert attention.resolve("flash", "cpu") == ("cpu_flash" if attention_cpu.available() else "xla")
    assert attention.resolve("flash", "cpu", dtype=jnp.bfloat16) == "xla"  # the CPU kernel is float32 only
    assert attention.resolve("xla", "gpu") == "xla"
    base = ModelConfig(compute_dtype="bfloat16", document_mask=False)
    dataclasses.replace(base, attention="cudnn").validate()
    with pytest.raises(ConfigError, match="document_mask"):
        dataclasses.replace(base, attention="cudnn", document_mask=True).validate()
    with pytest.raises(ConfigError, match="bfloat16"):
        dataclasses.replace(base, attention="cudnn", compute_dtype="float32").validate()


def test_without_document_mask_rows_attend_across_documents():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, 16)), jnp.int32)
    seg = jnp.asarray([[1] * 8 + [2] * 8])
    run = nnx.jit(lambda m, s: m(tokens, segment_ids=s))
    masked = run(M.Transformer(cfg, nnx.Rngs(0)), seg)
    causal_only = run(M.Transformer(cfg, nnx.Rngs(0)), jnp.ones_like(seg))
    open_ = run(M.Transformer(dataclasses.replace(cfg, document_mask=False), nnx.Rngs(0)), seg)
    np.testing.assert_allclose(open_, causal_only, atol=1e-6)
    np.testing.assert_allclose(masked[0, :8], causal_only[0, :8], atol=1e-6)
    assert not np.allclose(masked[0, 8:], causal_only[0, 8:])


@pytest.mark.parametrize("impl", ["pallas", "pallas_skip", "cpu_flash"])
def test_fused_kernel_runs_per_shard_under_a_mesh(impl):
    _skip_without_the_cpu_kernel(impl)
    from lm.config import MeshConfig
    from lm.model.sharding import make_mesh, use_mesh

    q, k, v, seg = inputs()
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    with use_mesh(mesh):  # batch over data, heads (4 query, 2 key/value) over tensor
        out = jax.jit(lambda *a: attention.fused_attention(*a, impl))(q, k, v, seg)
    np.testing.assert_allclose(out, reference(q, k, v, seg), atol=2e-5)


def test_attention_micro_benchmark_runs():  # the GPU script's `attn/*` cases, on tiny shapes
    from lm.tools import bench_accel

    r = bench_accel.attention_time("pallas_skip", b=1, t=128, n=2, k=1, h=32, mean_doc=32, repeats=1)
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
