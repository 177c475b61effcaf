"""The decode engine's int8 product on a CPU, as a small native kernel.

XLA's CPU backend converts an int8 matrix to floats before a product instead of inside it,
so int8 weights read more memory than float32 ones and decode no faster. `int8_cpu.cc`
reads each int8 weight once and converts it in registers: at batch 1 a step reads a
quarter of float32's bytes. It is built on first use with the machine's C++ compiler
against the installed jaxlib's XLA FFI headers (about 2 s, once per machine; the library
is kept under `LM_CACHE`, default `~/.cache/lm`; lm/model/native.py) and registered as an XLA FFI target.

`matmul(x, q, scale)` takes it for float32 rows on a CPU, up to `ROWS` of them (decode
steps and speculative checks; longer prefills keep XLA's product, which wins there), and
XLA's product everywhere else: on accelerators, for other dtypes, without a compiler
(said once), or with `LM_INT8_KERNEL=0`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from lm.model import native

log = logging.getLogger(__name__)

ROWS = 64  # the most rows the kernel takes (more: XLA's product)
TARGET = "lm_int8_matmul"
SOURCE = Path(__file__).with_name("int8_cpu.cc")
_LOCK = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (built on the first call; False, said
    once, when it cannot be, or with `LM_INT8_KERNEL=0`). Decided once per process: a
    function traced before a change of `LM_INT8_KERNEL` keeps its choice."""
    with _LOCK:  # one build, one warning, whatever thread asks first
        if os.environ.get("LM_INT8_KERNEL", "1") == "0":
            return False
        try:
            native.load(SOURCE, {TARGET: "LmInt8Matmul"})
        except Exception as e:  # noqa: BLE001 -- any failure: XLA's product, said once
            log.warning("int8 weights use XLA's product on this CPU (slower): the native kernel is unavailable: %s",
                        f"{type(e).__name__}: {e}")
            return False
        return True


def used_here() -> bool:
    """Whether products on this process's default backend go through the kernel: a CPU, and
    the kernel built (nothing is built on an accelerator's host)."""
    return jax.default_backend() == "cpu" and available()


def _kernel(x, q, scale):
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (q.shape[1],), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, q, scale.astype(jnp.float32))


def xla_matmul(x, q, scale, out_dtype=None):
    """(x @ q) * scale by XLA: q converted to x's dtype, the product in `out_dtype` (x's)."""
    y = jnp.dot(x, q.astype(x.dtype), preferred_element_type=out_dtype or x.dtype)
    return y * scale.astype(y.dtype)


def matmul(x, q, scale, out_dtype=None):
    """(x @ q) * scale for x (..., K), an int8 q (K, N) and per-column scales (N,): the
    native kernel where it applies (float32 x and result, at most `ROWS` rows, a CPU),
    else XLA's product."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    rows = math.prod(x.shape[:-1])
    if (x.dtype != jnp.float32 or out_dtype != jnp.float32 or q.dtype != jnp.int8 or rows > ROWS or rows == 0
            or x.shape[-1] == 0 or not used_here()):
        return xla_matmul(x, q, scale, out_dtype)
    return jax.lax.platform_dependent(x, q, scale, cpu=_kernel,
                                      default=lambda x, q, s: xla_matmul(x, q, s, out_dtype))
