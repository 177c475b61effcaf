"""Optimisers and learning-rate schedules (Optax).

`optim.name` picks the optimiser:

- "adamw": AdamW on every parameter; weight decay on matrices only (`decay_mask`).
- "muon": Muon (`optax.contrib.scale_by_muon`: Nesterov momentum, then each matrix's
  update orthogonalised by Newton-Schulz iterations) on the attention and MLP kernels,
  AdamW (as above) on the embeddings, norms and output head, as the speedrun recipes do.
  The kernels are stacked over layers, (L, D, N, H) for `wq`: each layer's matrix is
  orthogonalised on its own (the layer axis is a batch axis), with the heads folded into
  one side: wq/wk/wv as (D, N*H), wo as (N*H, D), the MLP as (D, F) and (F, D). The
  orthogonal update is scaled by sqrt(max(1, fan_out / fan_in)) (Keller Jordan's width
  scaling), then by the Muon learning rate `muon_lr`, which follows the same schedule
  shape as `lr` (warmup, cosine/WSD/constant). Weight decay on the Muon matrices is
  decoupled and scaled by the scheduled Muon learning rate:
  p <- p - muon_lr(t) * (update + muon_weight_decay * p).

Two Muon levers (README "Levers"), off by default:

- `muon_ns="polar_express"`: the orthogonalising polynomial of each of the 5 iterations is
  the odd quintic p(x) = a x + b x^3 + c x^5 closest to 1 (in the max norm) on the interval
  the singular values lie in after the previous iterations, starting from [1e-3, 1] (the
  Polar Express principle, Amsel et al. 2025). `POLAR_EXPRESS` holds them;
  `polar_express_coefficients` derives them again (a linear programme, scipy) and a test
  checks the two agree. Newton-Schulz repeats one quintic tuned for a steep slope at 0.
- `muon_normalize=True` (NorMuon, Li et al. 2025): after orthogonalisation, each output
  neuron's slice of the update (its row of W^T) is divided by the square root of a running
  mean of its squared entries (decay `muon_beta2`, bias-corrected), and the whole matrix
  is then scaled back to its norm before that division, so `muon_lr` keeps its meaning.

The optimiser state is a plain pytree whose moments mirror the parameters, so the engine
shards it like the parameters (FSDP included: the Newton-Schulz matmuls of a sharded
matrix are partitioned by XLA like any other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from scipy.optimize import linprog

from lm.config import ConfigError, OptimConfig

OPTIMIZERS = ("adamw", "muon")
# Keller Jordan's Newton-Schulz quintic (optax's default), applied 5 times.
NEWTON_SCHULZ = (3.4445, -4.775, 2.0315)
# One minimax quintic per iteration for singular values starting in [1e-3, 1]; after them the
# singular values lie in [0.887, 1.113] (polar_express_coefficients(5) recomputes these).
POLAR_EXPRESS = (
    (8.470329, -25.108079, 18.629279),
    (4.182835, -3.108702, 0.580607),
    (3.961857, -2.954063, 0.562976),
    (3.286586, -2.46472, 0.507358),
    (2.27375, -1.64466, 0.416191),
)
# The kernels Muon trains (names of the model's stacked block parameters, lm/model/transformer.py).
MUON_KERNELS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup, then cosine decay, warmup-stable-decay (WSD), or a constant, to `peak`
    (default `cfg.lr`)."""
    peak = cfg.lr if peak is None else peak
    warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
    floor = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=floor)
    if cfg.schedule == "wsd":
        decay = max(1, int(round(total_steps * cfg.decay_fraction)))
        stable = max(0, total_steps - warmup - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)),
             optax.constant_schedule(peak),
             optax.linear_schedule(peak, floor, decay)],
            boundaries=[warmup, warmup + stable])
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
            boundaries=[warmup])
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path if not isinstance(p, jax.tree_util.GetAttrKey))


def decay_mask(params: nnx.State, cfg: OptimConfig):
    """True for weights that get weight decay: matrices, but not norms or embeddings."""

    def one(path, v):
        name = _name(path)
        is_embedding = "embed" in name or name.startswith("head") or name.split("/")[-1] == "ve"  # (value embeddings)
        is_norm = v.ndim <= 1 or (v.ndim == 2 and "norm" in name)
        if is_norm:
            return False
        return cfg.decay_norms_and_embeddings or not is_embedding

    return jax.tree_util.tree_map_with_path(one, params)


def muon_dims(params: nnx.State):
    """Per parameter: how Muon sees it as matrices (`MuonDimensionNumbers`: the axes folded
    into the input and output sides; the others, the layer axis, are batch axes), or
    None for the parameters AdamW trains (embeddings, norms, head)."""

    def one(path, v):
        name = _name(path)
        if not name.startswith("blocks/") or name.split("/")[-1] not in MUON_KERNELS or v.ndim < 3:
            return None
        if name.endswith("/wo"):  # (L, N, H, D): heads in, width out
            return MuonDimensionNumbers(reduction_axis=tuple(range(1, v.ndim - 1)), output_axis=v.ndim - 1)
        return MuonDimensionNumbers(reduction_axis=1, output_axis=tuple(range(2, v.ndim)))  # (L, D, ...)

    return jax.tree_util.tree_map_with_path(one, params)


def _is_dims(x) -> bool:
    return x is None or isinstance(x, (MuonDimensionNumbers, optax.MaskedNode))


def _width_scale(update: jax.Array, dims: MuonDimensionNumbers) -> jax.Array:
    """sqrt(max(1, fan_out / fan_in)): a tall matrix's orthogonal update gets a larger RMS."""
    if isinstance(dims, optax.MaskedNode):  # (a leaf of the AdamW branch)
        return update
    red = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else dims.reduction_axis
    out = (dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis
    fan_in = 1
    for a in red:
        fan_in *= update.shape[a]
    fan_out = 1
    for a in out:
        fan_out *= update.shape[a]
    return update * max(1.0, fan_out / fan_in) ** 0.5


def _scale_by_width(dims) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(_width_scale, updates, dims, is_leaf=_is_dims), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def polar_express_coefficients(steps: int = 5, low: float = 1e-3, grid: int = 4000):
    """The odd quintics p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| over the interval
    [l, u] that the singular values lie in, one per iteration, starting from [low, 1]; each
    maps its interval into [1 - E, 1 + E], the next one's. Solved as a linear programme on
    a dense grid (geometric and linear points). Returns ((a, b, c), ...) and the last
    interval."""
    lo, hi, coeffs = low, 1.0, []
    for _ in range(steps):
        x = np.concatenate([np.geomspace(lo, hi, grid), np.linspace(lo, hi, grid)])
        powers = np.stack([x, x**3, x**5], axis=1)
        ones = np.ones((len(x), 1))
        # variables a, b, c, E: minimise E subject to p(x) - 1 <= E and 1 - p(x) <= E
        res = linprog([0, 0, 0, 1], A_ub=np.block([[powers, -ones], [-powers, -ones]]),
                      b_ub=np.concatenate([np.ones(len(x)), -np.ones(len(x))]),
                      bounds=[(None, None)] * 4, method="highs")
        p = powers @ res.x[:3]
        coeffs.append(tuple(float(c) for c in res.x[:3]))
        lo, hi = float(p.min()), float(p.max())
    return tuple(coeffs), (lo, hi)


def _axes(a) -> tuple[int, ...]:
    return (a,) if isinstance(a, int) else tuple(a)


def _scale_by_neuron(dims, beta2: float, eps: float = 1e-8) -> optax.GradientTransformation:
    """NorMuon's neuron-wise normalisation of orthogonalised updates (module docstring)."""

    def init(params):
        def one(d, p):
            if isinstance(d, optax.MaskedNode):
                return optax.MaskedNode()
            shape = tuple(1 if i in _axes(d.reduction_axis) else n for i, n in enumerate(p.shape))
            return jnp.zeros(shape, jnp.float32)

        return {"count": jnp.zeros([], jnp.int32), "nu": jax.tree.map(one, dims, params, is_leaf=_is_dims)}

    def update(updates, state, params=None):
        del params
        count = state["count"] + 1

        def one(d, u, nu):
            if isinstance(d, optax.MaskedNode):
                return u, nu
            red = _axes(d.reduction_axis)
            matrix = red + _axes(d.output_axis)
            u32 = u.astype(jnp.float32)
            nu = beta2 * nu + (1 - beta2) * jnp.mean(u32 * u32, axis=red, keepdims=True)
            normed = u32 * jax.lax.rsqrt(nu / (1 - beta2 ** count) + eps)
            scale = jnp.sqrt(jnp.sum(u32 * u32, axis=matrix, keepdims=True)
                             / (jnp.sum(normed * normed, axis=matrix, keepdims=True) + eps))
            return (normed * scale).astype(u.dtype), nu

        pairs = jax.tree.map(one, dims, updates, state["nu"], is_leaf=_is_dims)
        is_pair = lambda x: isinstance(x, tuple) and not isinstance(x, optax.MaskedNode)  # noqa: E731
        new_updates = jax.tree.map(lambda pr: pr[0], pairs, is_leaf=is_pair)
        new_nu = jax.tree.map(lambda pr: pr[1], pairs, is_leaf=is_pair)
        return new_updates, {"count": count, "nu": new_nu}

    return optax.GradientTransformation(init, update)


def _adamw(cfg: OptimConfig, params, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(learning_rate=schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask(params, cfg))


def _muon(cfg: OptimConfig, params, total_steps: int) -> optax.GradientTransformation:
    dims = muon_dims(params)
    labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims, is_leaf=_is_dims)
    if "muon" not in jax.tree.leaves(labels):
        raise ConfigError("optim.name=muon found no attention or MLP kernels to train (a LoRA run trains only "
                          "adapters): use optim.name=adamw")
    # optax.partition hands each branch the updates with the other branch's leaves masked
    masked = jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims, is_leaf=_is_dims)
    muon = optax.chain(
        scale_by_muon(ns_coeffs=POLAR_EXPRESS if cfg.muon_ns == "polar_express" else NEWTON_SCHULZ,
                      beta=cfg.muon_momentum, nesterov=True, weight_dimension_numbers=masked),
        *([_scale_by_neuron(masked, cfg.muon_beta2)] if cfg.muon_normalize else []),
        _scale_by_width(masked),
        optax.add_decayed_weights(cfg.muon_weight_decay),
        optax.scale_by_learning_rate(schedule(cfg, total_steps, peak=cfg.muon_lr)),
    )
    return optax.partition({"muon": muon, "adam": _adamw(cfg, params, total_steps)}, labels)


def make_optimizer(cfg: OptimConfig, params: nnx.State, total_steps: int) -> optax.GradientTransformation:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimiser optim.name={cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(_muon(cfg, params, total_steps) if cfg.name == "muon" else _adamw(cfg, params, total_steps))
    return optax.chain(*parts)
