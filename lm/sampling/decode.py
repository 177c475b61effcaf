"""The decode engine: prefill and one-token steps over a preallocated key/value cache.

What makes it fast on a CPU, where a 5M-parameter model's step is bound by overhead and
memory traffic rather than arithmetic:

- the cache is one (B*K, S, H) key and one value array *per layer*, carried through the
  decode loop (or donated to the step call) and written in place: a step writes each
  row's new key/value at that row's position and copies nothing else (rows and heads
  share the first axis: a batch of one must not be a degenerate dimension, around which
  XLA duplicated the update and copied the cache);
- the weights are laid out once (`prepare`): per layer (a layer scan would slice the
  stacked weights, a copy of each per step, and write the cache through its outputs),
  with the q/k/v and the gate/up projections fused into one matrix each;
- attention reads only the first `span` slots of the cache, a static bucket at least as
  long as the longest sequence in the batch (`spans`): a program is compiled per bucket;
- greedy rows skip sampling altogether (`pick`): no sort of the vocabulary, no random bits.

The math is the model's (lm/model/transformer.py: `rms_norm`, `rope_tables`, `apply_rope`,
`dot_product_attention` for the prefill), on these weights; the tests hold cached
decoding to the full forward pass. Prefill runs a prompt's tokens through causal
attention among themselves and returns their keys/values for slots 0..T-1; a step
attends from position p to slots 0..p. A row's slots past its position hold stale values
(padding, an earlier request's tokens) that are masked and overwritten before they are read.

Dimension alphabet as in lm/model/transformer.py: B batch (rows or server slots), T new tokens, S
cache length, K key/value heads, G = N // K, H head size, D width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.model.transformer import (
    apply_rope,
    dot_product_attention,
    layer_windows,
    rms_norm,
    rope_tables,
    softcap,
    window_mask,
)
from lm.sampling import int8_cpu

SPAN_BUCKET = 64  # attention spans are multiples of this (a compiled program per span)


# ---------------------------------------------------------------------------------------
# Sampling from logits: per-row temperature, top-p and key


def filter_logits(logits: jax.Array, top_k: int, top_p) -> jax.Array:
    """Mask (to -inf) all but the top-k tokens and the smallest set with mass >= top_p
    (top_p a scalar, or (B, 1) for one per row)."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # top_k >= V: all of them
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    # top_p = 1 keeps every token exactly (rounding in the cumulative sum must not drop any)
    return jnp.where((logits < threshold) & (top_p < 1.0), -jnp.inf, logits)


def token_logps(logits, tokens, temperature):
    """log p(token) under softmax(logits / temperature) (the raw logits when greedy), unfiltered:
    the quantity an RL trainer recomputes for importance ratios. `temperature` is a scalar or
    broadcasts against the logits ((B, 1) for one per row)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    return jnp.take_along_axis(scaled, tokens[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(scaled, axis=-1)


def pick(logits, keys, temperature, top_p, top_k: int = 0):
    """Next tokens (B,) and their log-probabilities (B,) from logits (B, V), each row with its
    own PRNG key (B, 2), temperature (B,) (0: greedy) and top-p (B,). Batches that are all
    greedy never sort or draw; top-p filtering runs only if some row asks for it."""
    greedy = argmax(logits)
    t = temperature[:, None]

    def sample(_):
        def filtered(_):
            return filter_logits(logits, top_k, top_p[:, None])

        kept = jax.lax.cond(jnp.any(top_p < 1.0) | (top_k > 0), filtered, lambda _: logits, None)
        draw = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, kept / jnp.maximum(t, 1e-6))
        return jnp.where(temperature > 0, draw, greedy).astype(jnp.int32)

    nxt = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    return nxt, token_logps(logits, nxt, t)


def seed_keys(seeds, steps):
    """Each row's key at its step from int32 `seeds` (B,): `step_keys` of their bases."""
    return step_keys(jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 0))(seeds), steps)


def step_keys(bases, steps):
    """Each row's key at its step: fold_in(base, step), with base = fold_in(PRNGKey(seed), 0)
    (`request_base`), the key of row 0 of `lm.sampling.generate(seed=...)` and of
    `lm.sampling.stream`: a request's draws depend on its seed and step only, never on the
    batch it shares."""
    return jax.vmap(jax.random.fold_in)(bases, steps)


def seed_key(seed: int):
    """The PRNG key of a seed of any 64 bits (`lm sample --seed`, a request's "seed"):
    PRNGKey of its low 32 bits, folded with its high 32 bits when they are not zero (without
    jax_enable_x64, PRNGKey alone keeps only the low 32 bits: seeds 1 and 2**32 + 1 drew alike)."""
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    high = (seed >> 32) & 0xFFFFFFFF
    return jax.random.fold_in(key, high) if high else key


def request_base(seed: int):
    """A request's base key (uint32 (2,), on the host) from any seed `lm sample --seed` takes:
    fold_in(seed_key(seed), 0), so a seeded request draws what the sampler draws."""
    return np.asarray(jax.random.fold_in(seed_key(seed), 0))


# ---------------------------------------------------------------------------------------
# Weights and cache


@struct.dataclass
class Weights:
    """A model's parameters laid out for decoding, in the compute dtype: one dict of arrays
    per layer (a layer scan would slice the stacked weights: a copy per step), the query,
    key and value projections side by side in one (D, (N + 2K) H) matrix, gate and up in
    one (D, 2F): fewer, larger matrix products."""

    embed: jax.Array  # (V, D)
    out: jax.Array  # (D, V) output projection (the embedding transposed, if tied)
    final_norm: jax.Array  # (D,)
    layers: list  # L dicts: attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down (+ q_norm, k_norm)
    cfg: object = struct.field(pytree_node=False)  # lm.config.ModelConfig (one device's share, if split)
    mesh: object = struct.field(pytree_node=False, default=None)  # the devices it lies on (None: one device)
    tp: object = struct.field(pytree_node=False, default="tensor")  # the mesh axis heads are split over (or None)
    fsdp: object = struct.field(pytree_node=False, default=None)  # the axis the layers' width is split over (or None)


@partial(jax.jit, static_argnums=0)
def _layout(cfg, params) -> Weights:
    cdt = jnp.dtype(cfg.compute_dtype)
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    b = params["blocks"]
    layers = []
    for i in range(cfg.n_layers):
        at = lambda x: x[i].astype(cdt)  # noqa: E731
        layer = {"attn_norm": at(b["attn_norm"]["scale"]), "mlp_norm": at(b["mlp_norm"]["scale"]),
                 "wqkv": jnp.concatenate([at(b["attn"]["wq"]).reshape(d, n * h), at(b["attn"]["wk"]).reshape(d, k * h),
                                          at(b["attn"]["wv"]).reshape(d, k * h)], axis=1),
                 "wo": at(b["attn"]["wo"]).reshape(n * h, d),
                 # (D, 2F) [gate | up]; (D, F) up alone for model.mlp="relu2"
                 "w_gate_up": (jnp.concatenate([at(b["mlp"]["w_gate"]), at(b["mlp"]["w_up"])], axis=1)
                               if cfg.mlp == "swiglu" else at(b["mlp"]["w_up"])),
                 "w_down": at(b["mlp"]["w_down"])}
        if cfg.qk_norm:
            layer["q_norm"] = at(b["attn"]["q_norm"]["scale"])
            layer["k_norm"] = at(b["attn"]["k_norm"]["scale"])
        if cfg.value_embeds:  # (V, K*H): the value columns' order
            layer["ve"] = at(b["attn"]["ve"]).reshape(cfg.vocab_size, k * h)
        if cfg.unet_skips and i >= cfg.n_layers - cfg.n_layers // 2:  # the weight of the skip this layer adds
            layer["unet_skip"] = params["unet_skip"][i - (cfg.n_layers - cfg.n_layers // 2)].astype(cdt)
        layers.append(layer)
    out = params["embed"].T if cfg.tie_embeddings else params["head"]
    return Weights(embed=params["embed"].astype(cdt), out=out.astype(cdt), final_norm=params["final_norm"]["scale"],
                   layers=layers, cfg=cfg)


def prepare(graphdef, params, tensor: int = 1, devices=None, int8: bool = False, mesh=None) -> Weights:
    """Decode weights from a model's (graphdef, params) (the params of `nnx.split(model)` or
    `nnx.split(model, nnx.Param)`; sharded or not): one copy of the weights.

    With `tensor` > 1 the weights are split over that many devices (`devices`, default the
    first ones), Megatron-style: each device holds the query heads, key/value heads and
    MLP columns of its share (and the matching rows of the output projections; the
    embeddings and norms whole), and the functions below run on each device as on a model
    of N/T heads, K/T key/value heads and F/T MLP width, adding the devices' partial
    outputs after each attention and MLP block. The cache is split by key/value heads.

    With `int8` the matrices are held in int8 with per-column scales (`quantize`).

    With a training `mesh` (axes data, fsdp, tensor) the weights are laid out on it by the
    run's rules (`on_mesh`): for decoding rows split over the mesh (RL rollouts)."""
    if int8 and (tensor > 1 or mesh is not None):
        raise ValueError("int8 weights split over several devices are not supported yet: use one or the other")
    model = nnx.merge(graphdef, params)
    state = nnx.state(model, nnx.Param)
    if mesh is not None:
        return on_mesh(model.cfg, nnx.to_pure_dict(state), mesh)
    w = _layout(model.cfg, nnx.to_pure_dict(state))
    if int8:
        int8_cpu.used_here()  # the CPU kernel built (or its absence said) now, not in the middle of an answer
        return quantize(w)
    return w if tensor == 1 else split(w, tensor, devices)


TP = "tensor"  # the mesh axis of a split decode engine


def _shares(w: Weights, tensor: int) -> list[dict]:
    """The layers of `w` with each of `tensor` devices' share of the fused matrices side by
    side, so that a device's block of columns is its own layout: (D, (N + 2K) H) -> per device
    [q_t | k_t | v_t], (D, 2F) -> per device [gate_t | up_t]. (wo (N H, D) and w_down (F, D)
    keep their order: a device's rows are its heads, its MLP columns.)"""
    cfg = w.cfg
    n, k, h, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.d_ff
    nt, kt, ft = n // tensor, k // tensor, f // tensor

    def qkv_share(m):
        q, kk, v = m[:, : n * h], m[:, n * h: (n + k) * h], m[:, (n + k) * h:]
        return jnp.concatenate([jnp.concatenate([q[:, t * nt * h: (t + 1) * nt * h], kk[:, t * kt * h: (t + 1) * kt * h],
                                                 v[:, t * kt * h: (t + 1) * kt * h]], axis=1)
                                for t in range(tensor)], axis=1)

    def gate_up_share(m):
        if cfg.mlp == "relu2":  # (D, F): the devices' columns are already side by side
            return m
        g, u = m[:, :f], m[:, f:]
        return jnp.concatenate([jnp.concatenate([g[:, t * ft: (t + 1) * ft], u[:, t * ft: (t + 1) * ft]], axis=1)
                                for t in range(tensor)], axis=1)

    return [{**layer, "wqkv": qkv_share(layer["wqkv"]), "w_gate_up": gate_up_share(layer["w_gate_up"])}
            for layer in w.layers]


def _local_cfg(cfg, tensor: int):
    """The model one device of `tensor` computes: N/T heads, K/T key/value heads, F/T MLP width."""
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // tensor, n_kv_heads=cfg.n_kv_heads // tensor,
                               d_ff=cfg.d_ff // tensor, head_dim=cfg.head_size)


def split(w: Weights, tensor: int, devices=None) -> Weights:
    """`w` split over `tensor` devices (see `prepare`): each device's share of the fused
    matrices side by side, so that a device's block of columns (rows) is its own layout."""
    check_split(w.cfg, tensor)
    devices = list(devices if devices is not None else jax.devices()[:tensor])
    if len(devices) < tensor:
        raise ValueError(f"{tensor} tensor-parallel devices asked for, {len(devices)} available")
    mesh = Mesh(np.asarray(devices[:tensor]), (TP,))
    on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    split_w = Weights(embed=w.embed, out=w.out, final_norm=w.final_norm, layers=w.layers,
                      cfg=_local_cfg(w.cfg, tensor), mesh=mesh)
    placement = jax.tree.map(on, specs(split_w))
    # one program, its outputs laid out as they will be used: no device holds more than its
    # share of the large matrices (besides what it already held)
    layers = jax.jit(lambda w: _shares(w, tensor), out_shardings=placement.layers)(w)
    small = jax.device_put((w.embed, w.out, w.final_norm), on(P()))
    return Weights(embed=small[0], out=small[1], final_norm=small[2], layers=layers, cfg=split_w.cfg, mesh=mesh)


FSDP = "fsdp"  # the training mesh's axis that splits the model width (lm/model/sharding.py RULES["embed"])


def mesh_split(cfg, mesh: Mesh) -> tuple[str | None, str | None]:
    """How `on_mesh` splits a model over a training mesh: (the axis its heads and MLP width
    are split over, the axis its layers' width is split over), each None when that axis has
    one device or does not divide what it would split (the training rules replicate such a
    dimension too: the decode then splits rows over that axis instead)."""
    shape = dict(mesh.shape)
    tensor, fsdp = shape.get(TP, 1), shape.get(FSDP, 1)
    tp = TP if tensor > 1 and not (cfg.n_heads % tensor or cfg.n_kv_heads % tensor or cfg.d_ff % tensor) else None
    fs = FSDP if fsdp > 1 and cfg.d_model % fsdp == 0 else None
    return tp, fs


def row_axes(w: Weights) -> tuple[str, ...]:
    """The mesh axes a batch's rows are split over when decoding with `w` laid out on a
    training mesh (`on_mesh`): every axis but the one its heads are split over."""
    return tuple(a for a in w.mesh.axis_names if a != w.tp)


def on_mesh(cfg, params: dict, mesh: Mesh) -> Weights:
    """Decode weights laid out on a training mesh (axes data, fsdp, tensor) by the run's rules,
    from its parameters as they lie (sharded or not), in one program whose outputs are laid out
    as they will be used: over `tensor` the query/key-value heads and the MLP width are split
    (Megatron-style, as `split`: each device computes its heads, the shares are added after
    each block); over `fsdp` every layer's matrices are split along the model width, as the
    parameters are, and each is gathered whole only while its layer runs (`_layer`); the
    embeddings, the output projection and the norms are whole on every device, as in `split`.
    Rows of a batch are split over the other axes (`row_axes`)."""
    tp, fs = mesh_split(cfg, mesh)
    w = _lay_on_mesh(cfg, mesh, params)
    local = _local_cfg(cfg, mesh.shape[TP]) if tp else cfg
    return Weights(embed=w.embed, out=w.out, final_norm=w.final_norm, layers=w.layers, cfg=local, mesh=mesh, tp=tp,
                   fsdp=fs)


@partial(jax.jit, static_argnums=(0, 1))
def _lay_on_mesh(cfg, mesh: Mesh, params) -> Weights:
    """`on_mesh`'s program (compiled once per model and mesh: RL lays the weights out anew for
    every rollout): the layout, each device's share of the fused matrices side by side when
    the heads are split, every output constrained to its place."""
    tp, fs = mesh_split(cfg, mesh)
    tensor = mesh.shape[TP] if tp else 1
    w = _layout(cfg, params)
    if tp:
        w = w.replace(layers=_shares(w, tensor))
    placed = specs(Weights(embed=w.embed, out=w.out, final_norm=w.final_norm, layers=w.layers, cfg=cfg, mesh=mesh,
                           tp=tp, fsdp=fs))
    put = lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))  # noqa: E731
    return w.replace(embed=put(w.embed, placed.embed), out=put(w.out, placed.out),
                     final_norm=put(w.final_norm, placed.final_norm),
                     layers=[{n: put(a, layer_spec[n]) for n, a in layer.items()}
                             for layer, layer_spec in zip(w.layers, placed.layers)])


def check_split(cfg, tensor: int) -> None:
    """Refuse a split that would cut a head (or the MLP width) across devices."""
    bad = [f"{name}={v}" for name, v in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads),
                                         ("model.d_ff", cfg.d_ff)) if v % tensor]
    if bad:
        raise ValueError(f"{', '.join(bad)} must divide by the {tensor} tensor-parallel devices (each holds "
                         f"whole heads); use a tensor count that divides them")


def specs(w: Weights):
    """The shard_map specs of a split `w` (a pytree of PartitionSpecs like it): the fused q/k/v
    and gate/up matrices split by columns over `w.tp`, the output projections by rows; with
    `w.fsdp`, every one of them split along the model width over that axis too."""
    tp, fs = w.tp, w.fsdp

    def layer_spec(layer):
        return {name: (P(fs, tp) if name in ("wqkv", "w_gate_up") else P(tp, fs) if name in ("wo", "w_down")
                       else P(None, tp) if name == "ve" else P()) for name in layer}

    return Weights(embed=P(), out=P(), final_norm=P(), layers=[layer_spec(x) for x in w.layers], cfg=w.cfg,
                   mesh=w.mesh, tp=tp, fsdp=fs)


WIDTH_AXIS = {"wqkv": 0, "w_gate_up": 0, "wo": 1, "w_down": 1}  # the model-width axis of each layer matrix


def _layer(w: Weights, layer: dict, x) -> dict:
    """A layer's weights as its computation reads them: with `w.fsdp`, each matrix gathered
    whole along the model width from the devices of that axis, inside the program, once the
    layer's input `x` is ready (the shares pass through a select on a value of x, always true:
    without it XLA gathers every layer at the start of each step, and holds the whole model
    again; an optimisation barrier is removed before scheduling); at rest each device holds
    its share only. Else as they are."""
    if w.fsdp is None:
        return layer
    bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
    ready = (bits | 1) != 0  # always true, whatever x holds, but XLA cannot know it (a barrier it removes)
    return {name: (jax.lax.all_gather(jnp.where(ready, a, jnp.zeros_like(a)), w.fsdp, axis=WIDTH_AXIS[name],
                                      tiled=True) if name in WIDTH_AXIS else a)
            for name, a in layer.items()}


def all_done(w: Weights, done) -> jax.Array:
    """Whether every row of `done` (B,) is done, on every device `w`'s layers are gathered
    across (`w.fsdp`): those devices decode different rows, and run each step together."""
    every = jnp.all(done)
    return every if w.fsdp is None else jax.lax.pmin(every.astype(jnp.int32), w.fsdp) > 0


def on_devices(fn, w: Weights, args: tuple, arg_specs: tuple, out_specs):
    """Run `fn(w, *args)` on each device of a split `w` (inside a jit): shard_map with the
    weights' specs, `arg_specs` for the rest (P(TP) for a cache: split by key/value heads;
    P() for what every device holds whole)."""
    return jax.shard_map(fn, mesh=w.mesh, in_specs=(specs(w), *arg_specs), out_specs=out_specs,
                         check_vma=False)(w, *args)


CACHE = P(TP)  # a split cache's spec: the (B*K, S, H) rows of each device's key/value heads


def each_device(fn, arg_specs: tuple, out_specs):
    """`fn(w, *args, **static)` as is for one device's weights, and run on every device
    (`on_devices`) for split ones: the engine's entry points are written once."""
    def run(w, *args, **static):
        body = partial(fn, **static) if static else fn
        if w.mesh is None:
            return body(w, *args)
        return on_devices(body, w, args, arg_specs, out_specs)

    return run


def new_cache(w: Weights, batch: int, length: int) -> list[dict]:
    """An empty cache for `w` (`init_cache`; for split weights, every device's share side by
    side on the first axis, each on its device)."""
    if w.mesh is None:
        return init_cache(w.cfg, batch, length)
    t = w.mesh.size
    shape = (t * batch * w.cfg.n_kv_heads, length, w.cfg.head_size)
    zeros = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(w.cfg.compute_dtype)),
                    out_shardings=NamedSharding(w.mesh, CACHE))
    return [{"k": zeros(), "v": zeros()} for _ in range(w.cfg.n_layers)]


def weight_bytes(w: Weights) -> tuple[int, int]:
    """(bytes of the weights on one device, bytes in all): a split engine's share."""
    total = per_device = 0
    for leaf in jax.tree.leaves(w):
        total += leaf.size * leaf.dtype.itemsize
        shard = leaf.sharding.shard_shape(leaf.shape) if w.mesh is not None else leaf.shape
        per_device += math.prod(shard) * leaf.dtype.itemsize
    return per_device, total


@struct.dataclass
class Int8:
    """A (D_in, D_out) matrix as int8 with one float32 scale per output column (symmetric:
    q = round(m / scale), scale = max |m| of the column / 127); products are taken with
    the int8 values converted to the input's dtype, then scaled (`_mm`)."""

    q: jax.Array  # (D_in, D_out) int8
    scale: jax.Array  # (D_out,) float32


QUANTIZED = ("wqkv", "wo", "w_gate_up", "w_down")  # each layer's matrices (and the output projection)


def _int8(m) -> Int8:
    m32 = m.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(m32), axis=0), 1e-12) / 127.0
    return Int8(q=jnp.clip(jnp.round(m32 / scale), -127, 127).astype(jnp.int8), scale=scale)


@jax.jit
def quantize(w: Weights) -> Weights:
    """`w` with every layer's matrices and the output projection in int8 (per-output-channel
    symmetric scales); the embedding (a lookup) and the norms as they were. About a
    quarter of the float32 weights' bytes (half of bfloat16's)."""
    layers = [{n: (_int8(a) if n in QUANTIZED else a) for n, a in layer.items()} for layer in w.layers]
    return w.replace(layers=layers, out=_int8(w.out))


def _mm(x, m):
    """x @ m, for a plain or an int8 matrix (converted in the product, scaled per column after;
    on a CPU by the native kernel, `int8_cpu`)."""
    if isinstance(m, Int8):
        return int8_cpu.matmul(x, m.q, m.scale)
    return x @ m


def _add_shares(w: Weights, y):
    """The devices' partial outputs of a split block, added (nothing to add on one device)."""
    return y if w.mesh is None or w.tp is None else jax.lax.psum(y, w.tp)


def init_cache(cfg, batch: int, length: int) -> list[dict]:
    """An empty cache for `batch` rows of up to `length` tokens: per layer k, v (B*K, S, H),
    row b's key/value head j at b*K + j. (Rows and heads share one axis: a batch of one is
    no degenerate dimension, which would make XLA copy the cache around each update.)"""
    shape = (batch * cfg.n_kv_heads, length, cfg.head_size)
    dtype = jnp.dtype(cfg.compute_dtype)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def pow2_width(n: int, least: int) -> int:
    """The smallest power-of-two multiple of `least` that holds `n` tokens (a prompt's padded
    width: few widths, so few compiled programs)."""
    width = least
    while width < n:
        width *= 2
    return width


def spans(length: int, bucket: int = SPAN_BUCKET) -> list[int]:
    """The attention spans a cache of `length` slots is read with: multiples of `bucket`,
    then the whole cache."""
    return [s for s in range(bucket, length, bucket)] + [length]


def span_for(filled: int, length: int, bucket: int = SPAN_BUCKET) -> int:
    """The shortest span that covers `filled` slots."""
    return min(length, -(-filled // bucket) * bucket)


# ---------------------------------------------------------------------------------------
# The forward pieces: the model's math (lm/model/transformer.py) on these weights


def argmax(logits):
    """jnp.argmax over the last axis (the first maximum) as two plain reductions: XLA's CPU
    emitter runs argmax's (value, index) reduction far slower."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, idx, logits.shape[-1] - 1), axis=-1)


def _in_window(valid, window: int, query_pos, key_pos):
    """`valid` (keys a query may see) limited to keys fewer than `window` positions before the
    query (`model.window`; 0: no limit, `valid` as it is)."""
    return valid & (query_pos - key_pos < window) if window else valid


def _skip_in(w: Weights, i: int, layer: dict, x, saved: list):
    """U-net skips (`model.unet_skips`): layer i's input, with layer L-1-i's output added
    (times its weight) for the last L//2 layers; `saved` collects the first L//2 outputs."""
    if "unet_skip" in layer:
        x = x + layer["unet_skip"] * saved[w.cfg.n_layers - 1 - i]
    return x


def _skip_out(w: Weights, i: int, x, saved: list):
    if w.cfg.unet_skips and i < w.cfg.n_layers // 2:
        saved.append(x)
    return x


def _qkv(cfg, layer, x, positions, tokens):
    """Normed hidden states (B*T, D) of `tokens` at positions (B, T) -> q (B, T, N, H), k, v
    (B, T, K, H)."""
    b, t = positions.shape
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    y = _mm(rms_norm(x, layer["attn_norm"], cfg.norm_eps), layer["wqkv"])
    q = y[:, : n * h].reshape(b, t, n, h)
    kk = y[:, n * h: (n + k) * h].reshape(b, t, k, h)
    v = y[:, (n + k) * h:]
    if "ve" in layer:  # value embeddings: this device's key/value heads' columns of the table
        v = v + jnp.take(layer["ve"], tokens.reshape(-1), axis=0).astype(v.dtype)
    v = v.reshape(b, t, k, h)
    if cfg.qk_norm:
        q, kk = rms_norm(q, layer["q_norm"], cfg.norm_eps), rms_norm(kk, layer["k_norm"], cfg.norm_eps)
    cos, sin = rope_tables(positions, h, cfg.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(kk, cos, sin), v


def _mlp(w: Weights, layer, x):
    cfg = w.cfg
    f = cfg.d_ff
    y = _mm(rms_norm(x, layer["mlp_norm"], cfg.norm_eps), layer["w_gate_up"])
    hidden = jnp.square(jax.nn.relu(y)) if cfg.mlp == "relu2" else jax.nn.silu(y[:, :f]) * y[:, f:]
    return x + _add_shares(w, _mm(hidden, layer["w_down"]))


def _logits(w: Weights, x):
    h = rms_norm(x, w.final_norm, w.cfg.norm_eps)
    if isinstance(w.out, Int8):
        return softcap(int8_cpu.matmul(h, w.out.q, w.out.scale, out_dtype=jnp.float32),
                       w.cfg.logit_softcap)
    return softcap(jnp.dot(h, w.out, preferred_element_type=jnp.float32), w.cfg.logit_softcap)


def prefill(w: Weights, tokens, lengths):
    """Prompts (B, T), left-aligned and zero-padded, of `lengths` (B,), from position 0 ->
    (logits after each prompt's last token (B, V), keys/values per layer (B*K, T, H))."""
    x, kvs = _forward(w, tokens)
    b, t = tokens.shape
    last = x.reshape(b, t, -1)[jnp.arange(b), lengths - 1]  # (B, D)
    return _logits(w, last), kvs


@jax.jit
def next_token_nll(w: Weights, tokens, mask):
    """The mean negative log-likelihood of tokens[:, 1:] given what precedes them, where `mask`
    (B, T-1) is 1 (these weights' held-out loss: float32 against int8, for instance)."""
    chosen, _, _ = _prompt_logprobs(w, tokens)
    return -(chosen * mask).sum() / mask.sum()


def _prompt_logprobs(w: Weights, tokens):
    """Tokens (B, T) -> for positions 1..T-1: each token's log-probability given the tokens
    before it, the most likely token there and its log-probability ((B, T-1) each)."""
    x, _ = _forward(w, tokens[:, :-1])
    logp = jax.nn.log_softmax(_logits(w, x), axis=-1).reshape(*tokens[:, 1:].shape, -1)
    chosen = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return chosen, argmax(logp), jnp.max(logp, axis=-1)


prompt_logprobs = jax.jit(each_device(_prompt_logprobs, (P(),), (P(), P(), P())))


def _forward(w: Weights, tokens):
    """Tokens (B, T) from position 0 -> (hidden states (B*T, D), keys/values per layer)."""
    cfg = w.cfg
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_))[None], (b, t, t))
    x = jnp.take(w.embed, tokens.reshape(-1), axis=0)  # (B*T, D)
    kvs, saved = [], []
    for i, (layer, window) in enumerate(zip(w.layers, layer_windows(cfg))):
        layer = _layer(w, layer, x)
        x = _skip_in(w, i, layer, x, saved)
        q, k, v = _qkv(cfg, layer, x, positions, tokens)
        o = dot_product_attention(q, k, v, window_mask(causal, window) if window else causal)  # (B, T, N, H)
        x = _skip_out(w, i, _mlp(w, layer, x + _add_shares(w, _mm(o.reshape(b * t, -1), layer["wo"]))), saved)
        rows = lambda a: a.transpose(0, 2, 1, 3).reshape(b * cfg.n_kv_heads, t, cfg.head_size)  # noqa: E731
        kvs.append({"k": rows(k), "v": rows(v)})
    return x, kvs


def write_prefill(cfg, cache: list[dict], kvs: list[dict], slot) -> list[dict]:
    """Keys/values (B'*K, T, H) of a prefill into rows slot..slot+B'-1, slots 0..T-1 (in
    place when the cache is donated or loop-carried)."""
    return [{n: jax.lax.dynamic_update_slice(c[n], kv[n].astype(c[n].dtype), (slot * cfg.n_kv_heads, 0, 0))
             for n in ("k", "v")} for c, kv in zip(cache, kvs)]


def step(w: Weights, tokens, positions, cache: list[dict], span: int):
    """One new token per row: tokens (B,) at positions (B,) -> (logits (B, V), cache).

    Each row's key/value is written at its position; attention covers slots
    0..position, read from the first `span` slots (static; every position < span). The
    cache may hold more rows than B (a server's idle slots): the first B are the batch's,
    the rest are left as they are."""
    cfg = w.cfg
    b = tokens.shape[0]
    n, kh, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    g = n // kh
    valid = jnp.arange(span)[None, :] <= positions[:, None]  # (B, S)
    valid = jnp.repeat(valid, kh, axis=0)[:, None, :]  # (B*K, 1, S)
    rows = (jnp.arange(b)[:, None] * kh + jnp.arange(kh)[None]).reshape(-1)  # (B*K,)
    cols = jnp.repeat(positions, kh)
    x = jnp.take(w.embed, tokens, axis=0)  # (B, D)
    new, saved = [], []
    for i, (layer, c, window) in enumerate(zip(w.layers, cache, layer_windows(cfg))):
        layer = _layer(w, layer, x)
        x = _skip_in(w, i, layer, x, saved)
        q, k, v = _qkv(cfg, layer, x, positions[:, None], tokens)  # (B, 1, N|K, H)
        kc, vc = c["k"], c["v"]
        k, v = k.reshape(b * kh, h).astype(kc.dtype), v.reshape(b * kh, h).astype(vc.dtype)
        if b == 1 and kh == kc.shape[0]:  # one row (the whole cache): a dynamic-update-slice
            kc = jax.lax.dynamic_update_slice(kc, k[:, None], (0, positions[0], 0))
            vc = jax.lax.dynamic_update_slice(vc, v[:, None], (0, positions[0], 0))
        else:
            kc = kc.at[rows, cols].set(k, mode="promise_in_bounds")
            vc = vc.at[rows, cols].set(v, mode="promise_in_bounds")
        new.append({"k": kc, "v": vc})
        if span == kc.shape[1] and b * kh == kc.shape[0]:
            ks, vs = kc, vc
        else:  # the first b rows' first span slots (a cache may have rows past the batch: idle slots)
            ks, vs = kc[: b * kh, :span], vc[: b * kh, :span]
        q = q.reshape(b * kh, g, h) * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # (B*K, G, H)
        scores = jnp.einsum("RGH,RSH->RGS", q, ks.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(_in_window(valid, window, cols[:, None, None], jnp.arange(span)), scores,
                           jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        o = jnp.einsum("RGS,RSH->RGH", probs, vs.astype(q.dtype)).reshape(b, n * h)
        x = _skip_out(w, i, _mlp(w, layer, x + _add_shares(w, _mm(o, layer["wo"]))), saved)
    return _logits(w, x), new


def extend(w: Weights, tokens, start, cache: list[dict], span: int):
    """T new tokens per row: tokens (B, T) at positions start..start+T-1 (start (B,)) ->
    (logits after each of them (B, T, V), cache). `step` for several tokens at once (a
    speculative verification): each token attends to the cache's slots before `start` and
    causally to the new tokens before it; their keys/values are written at their positions.
    Every position < span (static)."""
    cfg = w.cfg
    b, t = tokens.shape
    n, kh, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    g = n // kh
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # (B, T)
    valid = jnp.arange(span)[None, None, :] <= positions[:, :, None]  # (B, T, S)
    valid = jnp.repeat(valid, kh, axis=0)[:, None]  # (B*K, 1, T, S)
    rows = jnp.repeat((jnp.arange(b)[:, None] * kh + jnp.arange(kh)[None]).reshape(-1), t)  # (B*K*T,)
    cols = jnp.repeat(positions, kh, axis=0).reshape(-1)  # (B*K*T,) row b's head j at its T positions
    x = jnp.take(w.embed, tokens.reshape(-1), axis=0)  # (B*T, D)
    new, saved = [], []
    for i, (layer, c, window) in enumerate(zip(w.layers, cache, layer_windows(cfg))):
        layer = _layer(w, layer, x)
        x = _skip_in(w, i, layer, x, saved)
        q, k, v = _qkv(cfg, layer, x, positions, tokens)  # (B, T, N|K, H)
        kc, vc = c["k"], c["v"]
        k = k.transpose(0, 2, 1, 3).reshape(b * kh * t, h).astype(kc.dtype)
        v = v.transpose(0, 2, 1, 3).reshape(b * kh * t, h).astype(vc.dtype)
        if b == 1 and kh == kc.shape[0]:
            kc = jax.lax.dynamic_update_slice(kc, k.reshape(kh, t, h), (0, start[0], 0))
            vc = jax.lax.dynamic_update_slice(vc, v.reshape(kh, t, h), (0, start[0], 0))
        else:
            kc = kc.at[rows, cols].set(k, mode="promise_in_bounds")
            vc = vc.at[rows, cols].set(v, mode="promise_in_bounds")
        new.append({"k": kc, "v": vc})
        ks, vs = kc[: b * kh, :span], vc[: b * kh, :span]
        # (B, T, K, G, H) -> (B*K, G, T, H): a key/value head's G query heads at the T positions
        q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kh, g, t, h)
        q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
        scores = jnp.einsum("RGTH,RSH->RGTS", q, ks.astype(q.dtype), preferred_element_type=jnp.float32)
        query_pos = jnp.repeat(positions, kh, axis=0)[:, None, :, None]  # (B*K, 1, T, 1)
        scores = jnp.where(_in_window(valid, window, query_pos, jnp.arange(span)), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        o = jnp.einsum("RGTS,RSH->RGTH", probs, vs.astype(q.dtype))  # (B*K, G, T, H)
        o = o.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b * t, n * h)
        x = _skip_out(w, i, _mlp(w, layer, x + _add_shares(w, _mm(o, layer["wo"]))), saved)
    return _logits(w, x).reshape(b, t, -1), new
