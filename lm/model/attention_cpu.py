"""Training attention on a CPU as a native kernel: causal, within packed documents, float32.

What `model.attention="flash"` runs on a CPU (lm/model/attention.py): `attention_cpu.cc`, built
on first use with the machine's C++ compiler (lm/model/native.py) and registered as two XLA FFI
targets, the forward pass (output and log-sum-exp) and the backward pass (dq, dk, dv), tied
together with `jax.custom_vjp`. The kernel computes what `dot_product_attention` computes over
the document mask (`attention_mask`), in fewer passes over memory (see the .cc file).

Where it cannot run (no compiler, said once; `LM_ATTENTION_KERNEL=0`) "flash" on a CPU is
XLA's attention ("xla"), as before the kernel existed.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lm.model import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_cpu.cc")
FORWARD, BACKWARD = "lm_attention_forward", "lm_attention_backward"
SAVED = "cpu_attention"  # the checkpoint name of the forward pass's outputs
_LOCK = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (built on the first call; False, said once,
    when it cannot be, or with `LM_ATTENTION_KERNEL=0`)."""
    with _LOCK:
        if os.environ.get("LM_ATTENTION_KERNEL", "1") == "0":
            return False
        try:
            native.load(SOURCE, {FORWARD: "LmAttentionForward", BACKWARD: "LmAttentionBackward"})
        except Exception as e:  # noqa: BLE001 -- any failure: XLA's attention, said once
            log.warning("attention=flash uses XLA's attention on this CPU (slower): the native kernel is "
                        "unavailable: %s", f"{type(e).__name__}: {e}")
            return False
        return True


def _forward(q, k, v, start):
    b, t, n, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(q, k, v, start)


@jax.custom_vjp
def _attention(q, k, v, start):
    return _forward(q, k, v, start)[0]


def _attention_fwd(q, k, v, start):
    o, lse = _forward(q, k, v, start)
    # named, so that a rematerialisation policy can keep them (transformer._REMAT_POLICIES)
    o, lse = checkpoint_name(o, SAVED), checkpoint_name(lse, SAVED)
    return o, (q, k, v, start, lse)


def _attention_bwd(res, do):
    q, k, v, start, lse = res
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
              jax.ShapeDtypeStruct(v.shape, jnp.float32))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")(
        q, k, v, start, lse, do.astype(jnp.float32))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, start):
    """Causal attention within documents. q (B, T, N, H), k and v (B, T, K, H), start (B, T)
    int32: the first position of each token's document (`attention.doc_bounds`) -> (B, T, N, H).
    Computed in float32."""
    if not available():
        raise RuntimeError("the CPU attention kernel is unavailable (see the warning above); use model.attention=xla")
    start = jax.lax.stop_gradient(start.astype(jnp.int32))
    return _attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), start).astype(q.dtype)
