"""Peak FLOP/s per device kind, and a measured float32 matmul peak for CPUs.

Model-FLOPs utilisation (MFU) = model FLOPs per second / (devices x peak per device).
The table holds dense bfloat16 peaks from vendor data sheets; users can override it with
`--set trainer.peak_flops_per_device=...`. A CPU has no data-sheet number that XLA can
reach, so its peak is measured: the best float32 matmul rate over a few square sizes.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of `device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """Best FLOP/s of a jit-compiled square matmul on the default device."""
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        mm = jax.jit(lambda x, y: x @ y)
        mm(a, a).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            mm(a, a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if override:
        return float(override), "config"
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # The matmul peak uses all the host's cores; with N fake devices each gets 1/N.
        return measured_matmul_peak() / jax.local_device_count(), "measured float32 matmul"
    for key, value in PEAK_FLOPS.items():
        if key.lower() in dev.device_kind.lower():
            return value, f"table ({dev.device_kind})"
    return float("nan"), f"unknown device {dev.device_kind!r}: set trainer.peak_flops_per_device"


def remeasured_peak() -> float:
    """`peak_flops_per_device`'s measured peak, measured again (the machine may have been busy)."""
    measured_matmul_peak.cache_clear()
    return peak_flops_per_device()[0]
