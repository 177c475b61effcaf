"""Device mesh, the one table of logical-axis rules, and the helpers that apply it.

Parameters name their logical axes where they are created (`nnx.Param(..., axes=(...))`)
and activations pass through `shard(x, "act_btd")`. The table `RULES` maps each logical
name to mesh axes; it is the whole sharding policy. A logical dimension whose size does
not divide by its mesh axes is replicated instead (e.g. 4 KV heads on tensor=8).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP is data parallel
# with sharded weights); weights are split over fsdp along the model width and over
# tensor along heads / MLP width / vocabulary (Megatron-style).
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "vocab_rows": "fsdp",  # rows of a per-layer table indexed by token (value embeddings), split like the width
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "seq": None,
    "layers": None,
    "norm": None,
}

# Named activation layouts (dimension alphabet of lm/model/transformer.py).
ACTIVATIONS: dict[str, tuple[str | None, ...]] = {
    "act_bt": ("batch", "seq"),
    "act_btd": ("batch", "seq", None),  # residual stream: replicated over width
    "act_nd": ("batch", None),  # residual stream flattened to (B*T, D)
    "act_nf": ("batch", "mlp"),  # MLP hidden, flattened
    "act_btnh": ("batch", "seq", "heads", None),
    "act_btkh": ("batch", "seq", "kv_heads", None),
    "act_btv": ("batch", "seq", "vocab"),
    "act_nv": ("batch", "vocab"),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one axis may be -1 ("the rest")."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got mesh={cfg}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"{n} devices cannot be split as mesh={cfg}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices; "
            "set one axis to -1 to take the rest"
        )
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> P:
    """PartitionSpec for logical axis `names`, replicating any dimension that does not divide."""
    spec, used = [], set()
    for i, name in enumerate(names):
        axes = RULES.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or (shape is not None and shape[i] % size):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _variable_axes(v: nnx.Variable) -> tuple[str | None, ...]:
    axes = tuple(v.get_metadata().get("axes", ()))
    ndim = len(v.get_value().shape)
    if len(axes) + 1 == ndim:  # stacked by the layer scan: leading layer axis
        axes = ("layers",) + axes
    if len(axes) != ndim:
        axes = (None,) * ndim
    return axes


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an nnx.State (abstract or concrete), from each variable's axes."""

    def one(v):
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(_variable_axes(v), v.get_value().shape, mesh)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh))


# The mesh that `shard` constrains activations to; set by `use_mesh` around tracing.
_ACTIVE = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    prev = getattr(_ACTIVE, "mesh", None)
    _ACTIVE.mesh = mesh
    try:
        yield mesh
    finally:
        _ACTIVE.mesh = prev


def active_mesh() -> Mesh | None:
    """The mesh set by `use_mesh` (None outside one)."""
    return getattr(_ACTIVE, "mesh", None)


def shard(x: jax.Array, layout: str) -> jax.Array:
    """Constrain activation `x` to a named layout (see ACTIVATIONS); no-op without a mesh."""
    mesh = getattr(_ACTIVE, "mesh", None)
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(ACTIVATIONS[layout], x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------
# Rows of a batch across processes


def put_rows(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as a global array laid out by `sharding`
    (each process places only the pieces its devices hold)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def to_host(a: jax.Array) -> np.ndarray:
    """A global array's whole value, on every process (a gather across processes when it
    spans several)."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def process_rows(sharding: NamedSharding, rows: int) -> slice:
    """This process's rows of a batch of `rows` rows laid out by `sharding` (the rows of its
    devices, one contiguous block: the mesh puts each process's devices together)."""
    if jax.process_count() == 1:
        return slice(0, rows)
    spans = sorted({sl[0].indices(rows)[:2] for sl in sharding.addressable_devices_indices_map((rows, 1)).values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"this process's rows of the batch are not one block ({spans}): the mesh must put each "
                         "process's devices together (lm.model.sharding.make_mesh over jax.devices() does)")
    return slice(spans[0][0], spans[-1][1])


def all_processes_agree(flag: bool) -> bool:
    """True on every process if `flag` is true on every process (a decision all must share)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)]))).all())
