"""Native CPU kernels: C++ files built on first use and registered as XLA FFI targets.

A kernel's source sits beside the Python module that uses it (`lm/model/attention_cpu.cc`,
`lm/sampling/int8_cpu.cc`). `load(source, symbols)` compiles it with the machine's C++
compiler against the installed jaxlib's XLA FFI headers (a few seconds, once per machine;
the library is kept under `LM_CACHE`, default `~/.cache/lm`, keyed by the source, jaxlib, the
compiler and the CPU), loads it and registers each handler symbol as a CPU target. Callers
decide what to do when that fails (every caller falls back to XLA's operations, said once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
_LOADED: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("LM_CACHE") or Path.home() / ".cache" / "lm") / "kernels"


def cpu_id() -> str:
    """What `-march=native` compiles for: the machine, and the CPU's model and features
    (x86's "model name" and "flags", ARM's "CPU implementer", "CPU part" and "Features")."""
    keys = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        found = "".join(sorted({ln for ln in lines if ln.startswith(keys)}))
    except OSError:
        found = ""
    return f"{platform.machine()} {platform.processor()} {found}"


def build(source: Path, cpu: str | None = None) -> Path:
    """The shared library of `source` for this jaxlib and CPU, compiled if missing."""
    include = Path(jaxlib.__file__).parent / "include"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++; or set CXX)")
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"jaxlib {jaxlib.__version__} has no XLA FFI headers under {include}")
    key = hashlib.sha256("\0".join([source.read_text(), jaxlib.__version__, compiler, *FLAGS,
                                    cpu if cpu is not None else cpu_id()]).encode())
    out = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, moved in whole
        part = Path(tmp) / out.name
        done = subprocess.run([compiler, *FLAGS, f"-I{include}", str(source), "-o", str(part)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-400:]}")
        os.replace(part, out)
    return out


def load(source: Path, targets: dict[str, str]) -> None:
    """Builds `source` (if needed), loads it and registers {FFI target name: handler symbol}
    on the CPU platform. Raises on any failure (the build is checked on every call: the cache
    or the compiler may have changed); a library already loaded is not loaded again."""
    with _LOCK:
        path = str(build(source))
        if path in _LOADED:
            return
        library = ctypes.cdll.LoadLibrary(path)  # held for good
        for target, symbol in targets.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _LOADED[path] = library
