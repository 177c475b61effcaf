"""Fused (flash) attention for training: causal, within packed documents, no (B, T, S) mask.

`model.attention` picks the implementation of the training forward pass:

| name     | what runs                                                        | where        |
|----------|------------------------------------------------------------------|--------------|
| "xla"    | our einsum attention over a (B, T, S) mask, causal blocks skipped | anywhere     |
| "jax_dpa"| `jax.nn.dot_product_attention` with that mask                     | anywhere     |
| "cudnn"  | cuDNN flash attention (`jax.nn.dot_product_attention`); causal over whole rows, so only with `model.document_mask=false` | NVIDIA GPUs, 16-bit |
| "pallas" | the Pallas (Triton) flash kernel of JAX, with segment ids         | GPUs; CPU in interpret mode (tests) |
| "pallas_skip" | our Pallas (Triton) flash kernel, with segment ids; skips the key/value blocks of earlier documents (and, backward, query blocks of later ones) | GPUs; CPU in interpret mode (tests) |
| "splash" | splash attention (Pallas, Mosaic TPU), with segment ids           | TPUs; CPU in interpret mode (tests) |
| "flash"  | the platform's fused kernel with document masking: pallas_skip on GPU, splash on TPU, cpu_flash on CPU (float32) | |
| "cpu_flash" | (what "flash" resolves to on a CPU; not a config value) our C++ kernel (lm/model/attention_cpu.cc), with segment ids; skips the causal upper triangle and the keys before each block's document | CPUs, float32 (else xla) |

The Pallas and splash kernels take the segment ids (B, T) of packed documents: a query
attends to keys at or before it in the same run of equal ids. A row's padding (id 0) is a run like
any other, exactly as in the reference mask (`lm.model.attention_mask`).

Under a mesh with more than one device the kernels run per shard (`jax.shard_map`):
batch over (data, fsdp), heads over tensor, as the activation rules say.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from lm.model import attention_cpu, sharding

FUSED = ("cudnn", "pallas", "pallas_skip", "splash", "flash", "cpu_flash")
# Block size of the Pallas kernel's backward pass. On an H100, `base` at 4096 context:
# 64 gave 40.0% MFU against 33.0% with JAX's default of 32 (lm bench accel, 2026-11-26).
PALLAS_BWD_BLOCK = 64
# Kernel settings for tuning runs: LM_PALLAS="block_q=128,block_k=128,bwd_q=64,bwd_kv=64,num_warps=8,num_stages=2"
# (any subset; unset keys keep the defaults above and JAX's).
PALLAS_ENV = "LM_PALLAS"
# What "flash" runs on GPUs: "pallas" (JAX's kernel) or "pallas_skip" (ours, skips blocks of other documents).
GPU_FLASH = "pallas_skip"


def _pallas_settings(t: int) -> dict:
    s = {"block_q": min(128, t), "block_k": min(128, t), "bwd_q": min(PALLAS_BWD_BLOCK, t),
         "bwd_kv": min(PALLAS_BWD_BLOCK, t), "num_warps": None, "num_stages": 2}
    for item in filter(None, os.environ.get(PALLAS_ENV, "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in s:
            raise ValueError(f"{PALLAS_ENV}: unknown setting {key!r}; known: {', '.join(s)}")
        s[key.strip()] = min(int(value), t) if key.strip().startswith(("block", "bwd")) else int(value)
    return s


def resolve(name: str, platform: str | None = None, dtype=jnp.float32) -> str:
    """The implementation `name` stands for on `platform` (default: the default backend), for
    activations of `dtype`: "flash" on a CPU is our kernel for float32 where it is built, else xla."""
    if name != "flash":
        return name
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "cpu_flash" if jnp.dtype(dtype) == jnp.float32 and attention_cpu.available() else "xla"
    return {"gpu": GPU_FLASH, "cuda": GPU_FLASH, "rocm": GPU_FLASH, "tpu": "splash"}.get(platform, "xla")


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
    # a platform's kernel: imported on that platform only
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
    # TPU kernels: imported on that platform only
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


# ---------------------------------------------------------------------------------------------
# "pallas_skip": our own Pallas (Triton) flash kernel that skips blocks outside the documents.
#
# Documents are runs of equal segment ids, so query i attends to keys [doc_start[i], i]. The
# forward and dQ kernels visit, for a query block, only the key blocks from the one holding the
# document start of its first query up to the causal diagonal; the dK/dV kernel visits, for a key
# block, only the query blocks from the diagonal up to the one holding the document end of its
# last key. With 512-token documents in 4096-token rows that is ~1/8 of the causal triangle.
# ---------------------------------------------------------------------------------------------

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: rows masked in a block stay NaN-free


def doc_bounds(segment_ids):
    """(doc_start, doc_end) per token, int32 (B, T): first and last position of its document
    (a run of equal ids; padding id 0 is a run like any other). numpy in, numpy out; jnp in, jnp out."""
    xp = np if isinstance(segment_ids, np.ndarray) else jnp
    seg = segment_ids
    b, t = seg.shape
    pos = xp.broadcast_to(xp.arange(t, dtype=np.int32), (b, t))
    change = seg[:, 1:] != seg[:, :-1]
    first = xp.concatenate([xp.ones((b, 1), bool), change], axis=1)
    last = xp.concatenate([change, xp.ones((b, 1), bool)], axis=1)
    start_marks = xp.where(first, pos, 0).astype(np.int32)
    end_marks = xp.where(last, pos, t - 1).astype(np.int32)
    if xp is np:
        start = np.maximum.accumulate(start_marks, axis=1)
        end = np.minimum.accumulate(end_marks[:, ::-1], axis=1)[:, ::-1]
    else:
        start = jax.lax.cummax(start_marks, axis=1)
        end = jax.lax.cummin(end_marks, axis=1, reverse=True)
    return start, end


def kv_block_range(first_query_doc_start, q_block, block_q: int, block_k: int):
    """Key blocks [lo, hi) a query block visits (forward and dQ): from the block holding the
    document start of its first query to the causal diagonal. Works on ints, numpy and traced scalars."""
    return first_query_doc_start // block_k, ((q_block + 1) * block_q + block_k - 1) // block_k


def q_block_range(last_key_doc_end, kv_block, block_q: int, block_k: int):
    """Query blocks [lo, hi) a key block visits (dK/dV): from the causal diagonal to the block
    holding the document end of its last key."""
    return (kv_block * block_k) // block_q, (last_key_doc_end + block_q) // block_q


def visited_blocks(segment_ids, block_q: int, block_k: int):
    """numpy (B, T // block_q) key blocks visited per query block by the forward kernel, and
    (B, T // block_k) query blocks visited per key block by the dK/dV kernel."""
    start, end = doc_bounds(np.asarray(segment_ids))
    t = start.shape[1]
    qb = np.arange(t // block_q)
    lo, hi = kv_block_range(start[:, qb * block_q], qb, block_q, block_k)
    kb = np.arange(t // block_k)
    lo2, hi2 = q_block_range(end[:, kb * block_k + block_k - 1], kb, block_q, block_k)
    return hi - lo, hi2 - lo2


def _skip_fwd_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_q, block_k):
    i = pl.program_id(2)
    q_start = start_ref[...]  # (block_q,) document start of each query
    q = q_ref[...]
    h = q.shape[-1]
    q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    lo, hi = kv_block_range(jnp.min(q_start), i, block_q, block_k)

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = plgpu.dot(q, k, trans_b=True) * scale  # float32 (block_q, block_k)
        k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_start[:, None])
        s = jnp.where(keep, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((block_q, h), jnp.float32)
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc, m, l = jax.lax.fori_loop(lo, hi, body, (acc, m, l))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _skip_dkv_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                     *, scale, block_q, block_k, group):
    # One key/value head and its `group` query heads: q_ref/do_ref (T, group * H), lse/delta (group, T).
    j = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    h = k.shape[-1]
    k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    lo, hi = q_block_range(jnp.max(end_ref[...]), j, block_q, block_k)

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * block_q, block_q)
        q_start = start_ref[sl]
        q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_start[:, None])
        for gi in range(group):
            q = q_ref[sl, pl.ds(gi * h, h)]
            do = do_ref[sl, pl.ds(gi * h, h)]
            lse = lse_ref[gi, sl]
            delta = delta_ref[gi, sl]
            s = jnp.where(keep, plgpu.dot(q, k, trans_b=True) * scale, _MASK_VALUE)
            p = jnp.exp(s - lse[:, None])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, v, trans_b=True)
            ds = p * (dp - delta[:, None]) * scale
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((block_k, h), jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _skip_dq_kernel(start_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_q, block_k):
    i = pl.program_id(2)
    q_start = start_ref[...]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    h = q.shape[-1]
    q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    lo, hi = kv_block_range(jnp.min(q_start), i, block_q, block_k)

    def body(j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = plgpu.dot(q, k, trans_b=True) * scale
        k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_start[:, None])
        s = jnp.where(keep, s, _MASK_VALUE)
        p = jnp.exp(s - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros((block_q, h), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _skip_params(h, num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps or (4 if h <= 64 else 8), num_stages=num_stages)


def _skip_forward(q, k, v, start, cfg):
    block_q, block_k, _, _, num_warps, num_stages, interpret = cfg
    b, t, n, h = q.shape
    g = n // k.shape[2]
    kernel = functools.partial(_skip_fwd_kernel, scale=1.0 / math.sqrt(h), block_q=block_q, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(b, n, t // block_q),
        in_specs=[pl.BlockSpec((None, block_q), lambda bi, ni, i: (bi, i)),
                  pl.BlockSpec((None, block_q, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
                  pl.BlockSpec((None, t, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0)),
                  pl.BlockSpec((None, t, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0))],
        out_specs=[pl.BlockSpec((None, block_q, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
                   pl.BlockSpec((None, None, block_q), lambda bi, ni, i: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_skip_params(h, num_warps, num_stages),
        interpret=interpret,
        name="flash_skip_fwd",
    )(start, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _skip_attention(q, k, v, start, end, cfg):
    return _skip_forward(q, k, v, start, cfg)[0]


def _skip_attention_fwd(q, k, v, start, end, cfg):
    o, lse = _skip_forward(q, k, v, start, cfg)
    return o, (q, k, v, start, end, o, lse)


def _skip_attention_bwd(cfg, res, do):
    _, _, block_q, block_k, num_warps, num_stages, interpret = cfg
    q, k, v, start, end, o, lse = res
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # (B, N, T)
    params = _skip_params(h, num_warps, num_stages)
    row = lambda: pl.BlockSpec((None, t), lambda bi, ni, i: (bi, 0))
    full_kv = lambda: pl.BlockSpec((None, t, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0))
    # dK, dV: one program per key/value head and key block, looping over the head's query heads
    # (Triton blocks need power-of-two sizes: another group size runs on repeated k/v, summed after).
    kr, vr, group = (k, v, g) if g & (g - 1) == 0 else (*_repeat_kv(q, k, v), 1)
    kn = kr.shape[2]
    grouped = lambda x: x.reshape(b, t, kn, group * h)
    stats = lambda x: x.reshape(b, kn, group, t)
    dk, dv = pl.pallas_call(
        functools.partial(_skip_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k, group=group),
        grid=(b, kn, t // block_k),
        in_specs=[row(), pl.BlockSpec((None, block_k), lambda bi, ki, j: (bi, j)),
                  pl.BlockSpec((None, t, None, group * h), lambda bi, ki, j: (bi, 0, ki, 0)),
                  pl.BlockSpec((None, block_k, None, h), lambda bi, ki, j: (bi, j, ki, 0)),
                  pl.BlockSpec((None, block_k, None, h), lambda bi, ki, j: (bi, j, ki, 0)),
                  pl.BlockSpec((None, t, None, group * h), lambda bi, ki, j: (bi, 0, ki, 0)),
                  pl.BlockSpec((None, None, group, t), lambda bi, ki, j: (bi, ki, 0, 0)),
                  pl.BlockSpec((None, None, group, t), lambda bi, ki, j: (bi, ki, 0, 0))],
        out_specs=[pl.BlockSpec((None, block_k, None, h), lambda bi, ki, j: (bi, j, ki, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(kr.shape, kr.dtype)] * 2,
        compiler_params=params, interpret=interpret, name="flash_skip_dkv",
    )(start, end, grouped(q), kr, vr, grouped(do), stats(lse), stats(delta))
    dq = pl.pallas_call(
        functools.partial(_skip_dq_kernel, scale=scale, block_q=block_q, block_k=block_k),
        grid=(b, n, t // block_q),
        in_specs=[pl.BlockSpec((None, block_q), lambda bi, ni, i: (bi, i)),
                  pl.BlockSpec((None, block_q, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
                  full_kv(), full_kv(),
                  pl.BlockSpec((None, block_q, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
                  pl.BlockSpec((None, None, block_q), lambda bi, ni, i: (bi, ni, i)),
                  pl.BlockSpec((None, None, block_q), lambda bi, ni, i: (bi, ni, i))],
        out_specs=pl.BlockSpec((None, block_q, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_skip_dq",
    )(start, q, k, v, do, lse, delta)
    if kn != kh:  # repeated k/v: sum each key/value head's group
        dk = dk.reshape(b, t, kh, g, h).sum(axis=3, dtype=jnp.float32).astype(k.dtype)
        dv = dv.reshape(b, t, kh, g, h).sum(axis=3, dtype=jnp.float32).astype(v.dtype)
    return dq, dk, dv, None, None


_skip_attention.defvjp(_skip_attention_fwd, _skip_attention_bwd)


def pallas_skip(q, k, v, segment_ids, interpret: bool = False, block_q: int | None = None,
                block_k: int | None = None, bwd_q: int | None = None, bwd_kv: int | None = None):
    """Causal attention within documents, skipping blocks outside them. Block sizes default to
    `_pallas_settings` (LM_PALLAS overrides them for tuning runs); tests pass small ones."""
    b, t, n, h = q.shape
    s = _pallas_settings(t)
    cfg = (block_q or s["block_q"], block_k or s["block_k"], bwd_q or s["bwd_q"], bwd_kv or s["bwd_kv"],
           s["num_warps"], s["num_stages"], interpret)
    for size in cfg[:4]:
        if t % size:
            raise ValueError(f"the pallas_skip attention kernel needs a sequence length divisible by {size}, got {t}")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    start, end = doc_bounds(segment_ids.astype(jnp.int32))
    zero = lambda x: jax.lax.stop_gradient(x)
    return _skip_attention(q, k, v, zero(start), zero(end), cfg)


def _cpu_flash(q, k, v, segment_ids):
    b, t = q.shape[:2]
    if segment_ids is None:
        return attention_cpu.attention(q, k, v, jnp.zeros((b, t), jnp.int32))
    return attention_cpu.attention(q, k, v, doc_bounds(jnp.broadcast_to(segment_ids, (b, t)).astype(jnp.int32))[0])


def fused_attention(q, k, v, segment_ids, impl: str):
    """Causal attention within documents. q (B,T,N,H), k/v (B,T,K,H), segment_ids (B,T) or None.

    `impl` is one of "cudnn", "pallas", "pallas_skip", "splash", "cpu_flash" (after `resolve`). On
    CPU the Pallas kernels run in interpret mode, which is for tests only (slow).
    """
    interpret = jax.default_backend() == "cpu"
    fn = {"cpu_flash": _cpu_flash,
          "cudnn": _cudnn,
          "pallas": functools.partial(_pallas, interpret=interpret),
          "pallas_skip": functools.partial(pallas_skip, interpret=interpret),
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
