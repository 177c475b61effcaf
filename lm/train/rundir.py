"""Guarding a run directory: one process at a time, never overwriting a run by accident.

- `RunLock`: an exclusive `flock` on RUN_DIR/.lock held for the whole run by process 0. The
  kernel releases it when the process ends, however it ends, so a killed run leaves no
  stale lock; a second `lm train` on the same directory is refused, naming the holder.
- `check_continuable`: a run directory that already holds a run (checkpoints or metrics)
  is continued only with a config that its checkpoints fit. A change of the model, LoRA,
  stage or data is refused, listing the keys and values that differ, with what to do
  (`--fresh`, or another `--run-dir`); settings that leave the state's shapes and the
  data order alone (learning rate, steps, logging, evaluation, mesh) continue, and say so.
- `fresh_start`: `--fresh` moves the old run aside, checks the new config, data and
  tokenizer (`prepare`), and only then deletes the old run; if the check fails, the old
  run is put back untouched.
- `write_json`: strict JSON (NaN and infinities as null), written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from typing import Any, Callable

from lm.config import Config, ConfigError, from_dict, to_dict
from lm.train import interrupt


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked; the message says what to do."""


# Config keys that may change when a run continues: they leave the state's shapes and the
# data order alone. Everything else under these sections must match the checkpoints.
_FREE_SECTIONS = ("optim.", "trainer.", "mesh.")
_FREE_KEYS = {"name", "data.prefetch", "data.num_workers", "data.strict"}
_ORIGIN_KEYS = {"trainer.init_from", "trainer.init_step"}  # a run's origin is recorded in its checkpoints
_STATE_KEYS = {"optim.name"}  # the optimiser's state differs (Muon's momenta against AdamW's moments)


class RunLock:
    """An exclusive lock on a run directory (a no-op where `enabled` is false)."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, ".lock")
        self.enabled = enabled
        self._f = None

    def __enter__(self):
        if not self.enabled:
            return self

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish or stop it, "
                              "or use another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()  # closing the file releases the lock
            self._f = None


def holds_run(run_dir: str) -> bool:
    """Whether `run_dir` holds (part of) a run: checkpoints or logged metrics."""
    ckpt = os.path.join(run_dir, "checkpoints")
    has_ckpt = os.path.isdir(ckpt) and any(not n.startswith(".") for n in os.listdir(ckpt))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return has_ckpt or (os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k == "sources" and isinstance(v, list):  # named items: data.sources.<name>.<field>
            for item in v:
                out.update(_flat({kk: vv for kk, vv in item.items() if kk != "name"},
                                 f"{prefix}{k}.{item.get('name')}."))
            out[f"{prefix}{k}"] = sorted(item.get("name") for item in v)
        elif isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(changes the checkpoints cannot take, changes they can), as "key: old -> new"."""
    a, b = _flat(json.loads(json.dumps(to_dict(old)))), _flat(json.loads(json.dumps(to_dict(new))))
    blocking, free = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key in _ORIGIN_KEYS:
            continue
        change = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        free_key = key in _FREE_KEYS or (key.startswith(_FREE_SECTIONS) and key not in _STATE_KEYS)
        (free if free_key else blocking).append(change)
    return blocking, free


def saved_config(run_dir: str) -> Config | None:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return from_dict(json.load(f))
    except (ValueError, TypeError) as e:
        raise RunDirError(f"{path} is not a readable run config ({e}); use --fresh to start over or another "
                          "--run-dir") from None


def check_continuable(cfg: Config, run_dir: str, log: Callable = print) -> None:
    """Refuse to continue a run whose checkpoints do not fit `cfg` (see the module docstring)."""
    if not holds_run(run_dir):
        return
    old = saved_config(run_dir)
    if old is None:
        raise RunDirError(f"{run_dir} holds checkpoints or metrics but no config.json, so it cannot be checked "
                          "against this config; use --fresh to replace it or another --run-dir")
    blocking, free = config_changes(old, cfg)
    if blocking:
        shown = "; ".join(blocking[:6]) + (f"; and {len(blocking) - 6} more" if len(blocking) > 6 else "")
        raise RunDirError(f"{run_dir} holds a run of another configuration ({shown}); its checkpoints cannot "
                          "continue with this one: use --fresh to start over (deleting that run) or another --run-dir")
    if free:
        log(f"continuing {run_dir} with changed settings: " + "; ".join(free))


def fresh_start(run_dir: str, prepare: Callable[[], Any]) -> Any:
    """`--fresh`: run `prepare()` (which checks the config, data and tokenizer) with the old
    run moved aside; delete the old run only if it succeeds, else restore it untouched."""
    if not os.path.isdir(run_dir) or not any(n != ".lock" for n in os.listdir(run_dir)):
        return prepare()

    aside = os.path.join(run_dir, f".replaced-{os.getpid()}")
    moved = [n for n in os.listdir(run_dir) if n not in (".lock", os.path.basename(aside))]

    def put_back():
        for n in os.listdir(run_dir):  # what prepare() wrote: gone
            target = os.path.join(run_dir, n)
            if n in (".lock", os.path.basename(aside)) or n in moved and not os.path.exists(os.path.join(aside, n)):
                continue
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
        for n in moved:
            if os.path.exists(os.path.join(aside, n)):
                os.replace(os.path.join(aside, n), os.path.join(run_dir, n))
        shutil.rmtree(aside, ignore_errors=True)

    # A signal during the moves waits for them; one that must end the process while
    # prepare() is stuck (see lm/train/interrupt.py) puts the old run back first.
    try:
        with interrupt.deferred():
            os.makedirs(aside, exist_ok=True)
            for n in moved:
                os.replace(os.path.join(run_dir, n), os.path.join(aside, n))
        with interrupt.on_forced_exit(put_back):
            out = prepare()
    except BaseException:
        with interrupt.deferred():
            put_back()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return out


def _strict(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """Strict JSON (NaN/Inf as null), written atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_strict(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def merge_json(path: str, new: dict) -> dict:
    """`new` over the JSON object at `path` (kept where `new` has no value), written back."""
    old = {}
    if os.path.exists(path):
        with contextlib.suppress(ValueError, OSError):
            with open(path) as f:
                old = json.load(f)
    merged = {**old, **{k: v for k, v in new.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}}
    write_json(path, merged)
    return merged
