"""LoRA (low-rank adapters) as a pure transformation of the parameters.

The model is never changed. Adapters are separate arrays; `merge` returns the base
parameters with, for each target weight W (input size I, output size O per layer),

    W' = W + (alpha / r) * reshape(A @ B, W.shape),   A (L, I, r), B (L, r, O).

Training differentiates the loss of the merged model with respect to the adapters only,
so gradients and optimiser moments exist for the adapters alone; the base is a constant.

Initialisation: B = 0 (the adapted model equals the base exactly at step 0) and A is
kaiming-uniform as in the LoRA paper's reference code and PEFT: U(-1/sqrt(I), 1/sqrt(I)).

Layout: every weight is flattened as (L, input dims..., output dims...) -> (L, I, O) in
row-major order, which is the same flattening the model uses in its matmuls
(e.g. wq (L, D, N, H) is used as (D, N*H), wo (L, N, H, D) as (N*H, D)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from lm.config import LORA_TARGETS, ConfigError, LoraConfig
from lm.model.sharding import logical_to_spec

# Target name -> path of the stacked weight in the Transformer's parameters.
TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("blocks", "attn", "wq"),  # (L, D, N, H)
    "k": ("blocks", "attn", "wk"),  # (L, D, K, H)
    "v": ("blocks", "attn", "wv"),  # (L, D, K, H)
    "o": ("blocks", "attn", "wo"),  # (L, N, H, D)
    "gate": ("blocks", "mlp", "w_gate"),  # (L, D, F)
    "up": ("blocks", "mlp", "w_up"),  # (L, D, F)
    "down": ("blocks", "mlp", "w_down"),  # (L, F, D)
}
assert tuple(TARGETS) == LORA_TARGETS  # the names `lora.targets` accepts (lm/config.py)

# How many dimensions after the layer axis are the weight's input; the rest are output.
_INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

# Logical axis names (lm/model/sharding.py RULES) of each target's input and output, used for
# the adapters' sharding. A flattened (N*H) is named like its leading (heads) dimension:
# row-major flattening keeps whole heads together, so the split matches the weight's.
_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
    "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
}


def check(cfg: LoraConfig) -> None:
    """Raise ConfigError (one line: the key and the fix) for an unusable LoRA config."""
    cfg.validate()


def _names(path) -> tuple:
    """Dict keys of a pytree path; drops the `.value` of nnx.Variable leaves in a State."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _weights(params) -> dict[str, object]:
    """Target name -> its leaf (array or ShapeDtypeStruct) in an nnx.State or pure dict."""
    by_path = {_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    return {name: by_path[path] for name, path in TARGETS.items() if path in by_path}


def _in_out(name: str, shape) -> tuple[int, int, int]:
    """(L, I, O) of a stacked target weight."""
    k = 1 + _INPUT_DIMS[name]
    return shape[0], math.prod(shape[1:k]), math.prod(shape[k:])


def init_adapters(base_params, cfg: LoraConfig, seed: int) -> dict:
    """{"q": {"a": (L, I, r), "b": (L, r, O)}, ...} in float32; {} when cfg.rank == 0.

    Only shapes are read from `base_params`, so an abstract State (ShapeDtypeStructs)
    works, under jax.eval_shape or not. Each target's key is folded from the seed by its
    position in TARGETS, so changing lora.targets does not change the other adapters.
    """
    check(cfg)
    if cfg.rank == 0:
        return {}
    weights, r = _weights(base_params), cfg.rank
    missing = [t for t in cfg.targets if t not in weights]
    if missing:
        raise ConfigError(f"lora.targets {missing} not found in the model's parameters")
    adapters = {}
    for name in cfg.targets:
        layers, i, o = _in_out(name, weights[name].shape)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), list(TARGETS).index(name))
        bound = 1.0 / math.sqrt(i)  # kaiming_uniform(a=sqrt(5)) on fan_in = I
        adapters[name] = {
            "a": jax.random.uniform(key, (layers, i, r), jnp.float32, -bound, bound),
            "b": jnp.zeros((layers, r, o), jnp.float32),
        }
    return adapters


def merge(base_params, adapters: dict, cfg: LoraConfig):
    """The base parameters with W + (alpha / r) * A @ B on every adapted weight.

    Same structure and type as `base_params` (nnx.State in, nnx.State out with the
    variables' metadata; pure dict in, pure dict out); every other leaf is returned as is.
    Pure: safe under jit and grad. The update is computed in float32 and the sum is cast
    back to W's dtype.
    """
    if not adapters:
        return base_params
    scale = cfg.alpha / cfg.rank
    by_path = {TARGETS[name]: ab for name, ab in adapters.items()}

    def one(path, w):
        ab = by_path.get(_names(path))
        if ab is None:
            return w
        a, b = ab["a"], ab["b"]
        if a.shape[-1] != cfg.rank:
            raise ValueError(f"adapter rank {a.shape[-1]} != lora.rank={cfg.rank}")
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, base_params)


def adapter_axes(adapters: dict) -> dict:
    """Logical axes per adapter array: a (layers, <W's input>, None), b (layers, None, <W's output>).

    The rank axis is replicated. Leaves are tuples, so map over them with
    `is_leaf=lambda x: isinstance(x, tuple)` (or use `adapter_shardings`).
    """
    return {name: {"a": ("layers", _AXES[name][0], None), "b": ("layers", None, _AXES[name][1])}
            for name in adapters}


def adapter_shardings(adapters: dict, mesh) -> dict:
    """NamedShardings for the adapters (abstract or concrete) on `mesh`, from adapter_axes."""

    axes = adapter_axes(adapters)
    return {name: {k: NamedSharding(mesh, logical_to_spec(axes[name][k], ab[k].shape, mesh))
                   for k in ("a", "b")} for name, ab in adapters.items()}


def count(adapters: dict) -> int:
    """Number of adapter parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
