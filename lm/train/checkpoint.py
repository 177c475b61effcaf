"""Orbax checkpoints of a run: save asynchronously, keep the last K and the best, restore
the newest readable one onto any mesh.

A checkpoint (RUN_DIR/checkpoints/<step>/) holds the train state (parameters, optimiser
state, step, skip counters), the data iterator state of every data shard, and metadata:
the resolved config and the SHA-256 and vocabulary size of the run's tokenizer. Orbax
writes into a temporary folder and renames it when complete, so a checkpoint is either
complete or ignored. A checkpoint that fails to restore (truncated or corrupted files)
is reported and the previous one is tried. A failed save (a full disk) is reported and
training goes on; earlier checkpoints are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from data_pipeline.errors import NotFound
from data_pipeline.tokenizer import file_sha256
from lm.config import ConfigError


def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, on every process."""
    if jax.process_count() == 1:
        return [obj]

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(n, np.uint8)
    padded[: raw.size] = raw
    out = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(out).reshape(-1, n)]


def merge_data_states(states: list[dict | None]) -> dict | None:
    """Merge per-process data states ({"num_shards", "shards": {...}}) into one."""
    states = [s for s in states if s]
    if not states:
        return None
    if "shards" not in states[0]:  # a data state of one piece (e.g. RL rollouts): process 0's
        return states[0]
    merged = {**states[0], "shards": {}}
    for s in states:
        merged["shards"].update(s["shards"])
    return merged


class _QuietOrbax(logging.Filter):
    """Orbax logs each failure of a background save several times over, with tracebacks, from
    each of its threads; the Checkpointer reports every failed save itself, once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET = _QuietOrbax()


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3, log: Callable = print):
        self.dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.log = log
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=max(1, keep)),
            # the best held-out loss (BestN keeps the highest metric, so it is negated)
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["eval_loss"], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        # The step's folder is created before save() returns, so that an unwritable directory
        # fails there, at once: created in the background, its failure left Orbax's other
        # threads waiting minutes for it (after the run had ended) and printing tracebacks.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        logging.getLogger("absl").addFilter(_QUIET)  # (a set: added once)
        self.manager = ocp.CheckpointManager(self.dir, options=options)
        self.failed_saves = 0
        self._pending = None  # the step whose save is being written in the background

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict,
             metrics: dict | None = None) -> bool:
        """Start an asynchronous save; returns False (and reports) if it could not start."""
        data_state = merge_data_states(_gather_json(data_state))
        sums, finite = fingerprint(state)
        if not finite:  # a poisoned state is never saved as a checkpoint
            self.failed_saves += 1
            self.log(f"WARNING: not saving the checkpoint of step {step}: the state holds NaN or Inf values")
            return False
        meta = {**meta, "checksums": sums}
        if jax.devices()[0].platform == "cpu":
            # On CPU Orbax's "device to host" copy can alias the arrays, and the next train
            # step donates (overwrites) them while the save is still being written: copy.
            state = jax.tree.map(lambda x: x.copy(), state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(meta))
        self.wait()  # a failure of the previous (background) save is reported for its own step
        try:
            ok = bool(self.manager.save(step, args=args, metrics=metrics, force=True))
            self._pending = step
            return ok
        except Exception as e:  # noqa: BLE001 -- a failed save must not kill the run
            self.failed_saves += 1
            self.log(f"WARNING: saving the checkpoint of step {step} failed ({_short(e)}); "
                     f"training goes on, earlier checkpoints are intact: {self.steps()}")
            self._clean_partial()
            return False

    def wait(self) -> None:
        """Wait for the background save; a failure is reported once, naming its step."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self.failed_saves += 1
            self.log(f"WARNING: writing the checkpoint of step {self._pending} failed ({_short(e)}); "
                     f"checkpoints on disk: {self.steps()}")
            self._clean_partial()
        self._pending = None

    def _clean_partial(self) -> None:
        """Remove the temporary folders of failed saves (they would keep a full disk full)."""
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
            if "orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict | None, dict, int] | None:
        """(state, data state, meta, step) of the newest readable checkpoint, or None.

        `abstract_state` carries the target shardings: the arrays are laid out for the
        current mesh, whatever mesh saved them.
        """
        unreadable = []
        found = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                verify(r["state"], r["meta"], step)
                found = r["state"], (r["data"] or None), r["meta"], step
                break
            except Exception as e:  # noqa: BLE001 -- truncated, corrupted, or from another model
                self.log(f"WARNING: checkpoint {os.path.join(self.dir, str(step))} cannot be restored "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); trying an earlier one")
                unreadable.append(step)
        if found is not None and unreadable:
            # Keep the unreadable ones for inspection, out of the way of the saves that redo their steps.
            self.set_aside(unreadable, "unreadable")
        return found

    def set_aside(self, steps: list[int], why: str) -> list[int]:
        """Move the checkpoints of `steps` to checkpoints/.<why>-<step>-<time> (kept, not deleted)."""
        for step in steps:
            aside = os.path.join(self.dir, f".{why}-{step}-{int(time.time())}")
            os.replace(os.path.join(self.dir, str(step)), aside)
            self.log(f"moved the {why} checkpoint of step {step} to {aside}")
        if steps:
            self.manager.reload()
        return list(steps)

    def close(self) -> None:
        self.wait()
        self.manager.close()
        if self.failed_saves:  # threads of a failed save may have outlived its first error
            self._clean_partial()


def _short(e: BaseException) -> str:
    """`Type: first line` of an exception (Orbax and TensorStore errors run to many lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def remove(run_dir: str) -> None:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)


# -- checksums: corrupted bytes inside an array are caught on restore ----------------------


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)


@jax.jit
def _fingerprint(leaves):
    """Per array: a position-weighted sum of its bits (mod 2^32), and whether all is finite."""
    sums, finite = [], jnp.bool_(True)
    for x in leaves:
        if x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:
            bits = x.astype(jnp.uint32)
        idx = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else jnp.uint32(0)
        for d in range(1, bits.ndim):
            idx = idx * jnp.uint32(bits.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
        # mixing the position in makes swapped or shifted bytes count, not only changed totals
        sums.append(jnp.sum(bits ^ (idx * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)), dtype=jnp.uint32))
        if jnp.issubdtype(x.dtype, jnp.floating):
            finite = finite & jnp.all(jnp.isfinite(x))
    return sums, finite


def fingerprint(tree) -> tuple[dict[str, int], bool]:
    """({array path: checksum}, every float is finite) of a pytree of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums, finite = jax.device_get(_fingerprint([x for _, x in flat]))
    return {_path(p): int(v) for (p, _), v in zip(flat, sums)}, bool(finite)


def verify(tree, meta: dict, step: int, prefix: str = "") -> None:
    """Raise if an array restored from the checkpoint of `step` differs from what was saved."""
    saved = (meta or {}).get("checksums")
    if not saved:
        return  # a checkpoint from before checksums
    now, _ = fingerprint(tree)
    for path, v in now.items():
        if path in saved and saved[path] != v:
            raise ValueError(f"checksum mismatch in {path}: the checkpoint of step {step} is corrupted")


def check_tokenizer(run_dir: str, meta: dict, step: int) -> None:
    """The run's tokenizer.model must be the one its checkpoint was trained with."""
    saved = (meta or {}).get("tokenizer_sha256")
    path = os.path.join(run_dir, "tokenizer.model")
    if saved and os.path.exists(path) and file_sha256(path) != saved:
        raise ConfigError(f"{path} is not the tokenizer the checkpoint of step {step} was trained with (SHA-256 "
                          f"differs); restore the run's own tokenizer.model")


def restore_params(run_dir: str, abstract_params: Any, step: int | None = None,
                   log: Callable = print) -> tuple[Any, int]:
    """The parameters alone of a run's newest readable checkpoint (or of `step`), laid out
    as `abstract_params` says: the optimiser moments are never read."""
    directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not os.path.isdir(directory):  # (and create nothing there)
        raise NotFound(f"{run_dir} has no checkpoint (no checkpoints/ folder); train it first")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise NotFound(f"{run_dir} has no checkpoint of step {step} (it has {sorted(steps)})")
            steps = [step]
        if not steps:
            raise NotFound(f"{run_dir} has no checkpoint")
        target = {"params": abstract_params}
        for s in steps:
            try:
                r = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                                 partial_restore=True),
                    meta=ocp.args.JsonRestore()))
                check_tokenizer(run_dir, r["meta"], s)
                verify({"params": r["state"]["params"]}, r["meta"], s, prefix="params")
                return r["state"]["params"], s
            except Exception as e:  # noqa: BLE001 -- truncated or corrupted: try an earlier one
                if isinstance(e, ConfigError):
                    raise
                log(f"WARNING: checkpoint {os.path.join(run_dir, 'checkpoints', str(s))} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); trying an earlier one")
        raise NotFound(f"{run_dir} has no readable checkpoint")
    finally:
        manager.close()
