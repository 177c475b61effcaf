"""Fused (flash) attention for training: causal, within packed documents, no (B, T, S) mask.

`model.attention` picks the implementation of the training forward pass:

| name     | what runs                                                        | where        |
|----------|------------------------------------------------------------------|--------------|
| "xla"    | our einsum attention over a (B, T, S) mask, causal blocks skipped | anywhere     |
| "jax_dpa"| `jax.nn.dot_product_attention` with that mask                     | anywhere     |
| "cudnn"  | cuDNN flash attention (`jax.nn.dot_product_attention`); causal over whole rows, so only with `model.document_mask=false` | NVIDIA GPUs, 16-bit |
| "pallas" | the Pallas (Triton) flash kernel of JAX, with segment ids         | GPUs; CPU in interpret mode (tests) |
| "splash" | splash attention (Pallas, Mosaic TPU), with segment ids           | TPUs; CPU in interpret mode (tests) |
| "flash"  | the platform's fused kernel with document masking: pallas on GPU, splash on TPU, xla on CPU | |

The Pallas and splash kernels take the segment ids (B, T) of packed documents: a query
attends to keys at or before it in the same run of equal ids. A row's padding (id 0) is a run like
any other, exactly as in the reference mask (`lm.model.attention_mask`).

Under a mesh with more than one device the kernels run per shard (`jax.shard_map`):
batch over (data, fsdp), heads over tensor, as the activation rules say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import sharding

FUSED = ("cudnn", "pallas", "splash", "flash")
# Block size of the Pallas kernel's backward pass. On an H100, `base` at 4096 context:
# 64 gave 40.0% MFU against 33.0% with JAX's default of 32 (lm bench accel, 2026-11-26).
PALLAS_BWD_BLOCK = 64
# Kernel settings for tuning runs: LM_PALLAS="block_q=128,block_k=128,bwd_q=64,bwd_kv=64,num_warps=8,num_stages=2"
# (any subset; unset keys keep the defaults above and JAX's).
PALLAS_ENV = "LM_PALLAS"


def _pallas_settings(t: int) -> dict:
    import os

    s = {"block_q": min(128, t), "block_k": min(128, t), "bwd_q": min(PALLAS_BWD_BLOCK, t),
         "bwd_kv": min(PALLAS_BWD_BLOCK, t), "num_warps": None, "num_stages": 2}
    for item in filter(None, os.environ.get(PALLAS_ENV, "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in s:
            raise ValueError(f"{PALLAS_ENV}: unknown setting {key!r}; known: {', '.join(s)}")
        s[key.strip()] = min(int(value), t) if key.strip().startswith(("block", "bwd")) else int(value)
    return s


def resolve(name: str, platform: str | None = None) -> str:
    """The implementation `name` stands for on `platform` (default: the default backend)."""
    if name != "flash":
        return name
    platform = platform or jax.default_backend()
    return {"gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "splash"}.get(platform, "xla")


def _repeat_kv(q, k, v):
    g = q.shape[2] // k.shape[2]
    if g == 1:
        return k, v
    return jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # head n uses kv head n // g


def _cudnn(q, k, v, segment_ids):
    if segment_ids is not None:
        # jax.nn.dot_product_attention takes one sequence per row (and cuDNN's ragged layout,
        # which JAX keeps private, gave wrong results on an H100 here): no packed documents.
        raise ValueError("model.attention=cudnn cannot mask packed documents: set model.document_mask=false "
                         "(attend across documents, as GPT-2 does) or use attention=pallas / flash")
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation="cudnn")


def _pallas(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    t = q.shape[1]
    s = _pallas_settings(t)
    block = max(s["block_q"], s["block_k"])
    if t % block:
        raise ValueError(f"the pallas attention kernel needs a sequence length divisible by {block}, got {t}")
    sizes = pallas_gpu.BlockSizes(block_q=s["block_q"], block_k=s["block_k"], block_q_dkv=s["bwd_q"],
                                  block_kv_dkv=s["bwd_kv"], block_q_dq=s["bwd_q"], block_kv_dq=s["bwd_kv"])
    k, v = _repeat_kv(q, k, v)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return pallas_gpu.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True,
                          block_sizes=sizes, num_warps=s["num_warps"], num_stages=s["num_stages"],
                          interpret=interpret)


def _splash(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q.shape
    block = min(512, t)
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    k, v = _repeat_kv(q, k, v)
    seg = (jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    to_nth = lambda x: x.transpose(0, 2, 1, 3)  # (B, N, T, H)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, splash.SegmentIds(q=s1, kv=s1)))(
        to_nth(q), to_nth(k), to_nth(v), seg)
    return to_nth(out)


def fused_attention(q, k, v, segment_ids, impl: str):
    """Causal attention within documents. q (B,T,N,H), k/v (B,T,K,H), segment_ids (B,T) or None.

    `impl` is one of "cudnn", "pallas", "splash" (after `resolve`). On CPU the Pallas
    kernels run in interpret mode, which is for tests only (slow).
    """
    interpret = jax.default_backend() == "cpu"
    fn = {"cudnn": _cudnn,
          "pallas": functools.partial(_pallas, interpret=interpret),
          "splash": functools.partial(_splash, interpret=interpret)}[impl]
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    # Per shard: batch over (data, fsdp), heads over tensor (replicated if they do not divide).
    qs = sharding.logical_to_spec(sharding.ACTIVATIONS["act_btnh"], q.shape, mesh)
    ks = sharding.logical_to_spec(sharding.ACTIVATIONS["act_btkh"], k.shape, mesh)
    if qs[2] != ks[2]:  # GQA heads that split differently: keep heads whole on every shard
        qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
    ss = P(qs[0], None)
    if segment_ids is None:
        return jax.shard_map(lambda a, b_, c: fn(a, b_, c, None), mesh=mesh, in_specs=(qs, ks, ks),
                             out_specs=qs, check_vma=False)(q, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, ss), out_specs=qs, check_vma=False)(q, k, v, segment_ids)
