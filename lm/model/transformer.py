"""A decoder-only transformer in Flax NNX (LLaMA family).

Architecture choices:
- token embedding; no learned positions: rotary position embeddings (RoPE, "rotate half"
  convention as in Hugging Face LLaMA, theta configurable) on queries and keys;
- pre-norm RMSNorm before attention and MLP, and a final RMSNorm;
- grouped-query attention: N query heads share K key/value heads (K divides N);
  optional RMSNorm on queries and keys (qk-norm);
- causal masking, plus document masking from segment ids so packed sequences never
  attend across documents;
- SwiGLU MLP: down(silu(gate(x)) * up(x)); no biases anywhere;
- optional tied input/output embeddings;
- speedrun levers, each off by default (README "Levers"): ReLU^2 MLP, zero-initialised
  output projections, logit soft-capping, U-net skips between the first and last layers,
  value embeddings (a per-layer table of the input token added to the values), sliding-
  window attention in some layers,
  extra heads for multi-token prediction (training only);
- layers stacked on a leading axis and run with `lax.scan` (compile time does not grow
  with depth) or unrolled; a configurable rematerialisation policy per layer;
- float32 parameters, compute in `compute_dtype` (bfloat16 on accelerators), softmax,
  norms and logits in float32.

Every `__call__` is pure: modules hold parameters, nothing is mutated in a forward pass.
Around the matmuls the residual stream is kept 2-D, (B*T, D): on CPU this is markedly
faster than 3-D einsums, and it changes nothing on accelerators.

Dimension alphabet: B batch, T query length, S key length, D model width, F MLP width,
N query heads, K key/value heads, G = N // K, H head size, L layers, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model import attention, attention_cpu
from lm.model.sharding import shard

# ---------------------------------------------------------------------------------------
# Pure helpers (tested against hand-computed values)


def rope_tables(positions: jax.Array, head_size: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables of shape (B, T, 1, H/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (x[i], x[i + H/2]) of x (B, T, heads, H) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def attention_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean (B, T, S) mask: causal, and within the same segment (document) only."""
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, length, length))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same_doc


def layer_windows(cfg: ModelConfig) -> tuple[int, ...]:
    """Each layer's sliding window (`model.window`): 0 for a layer that attends to the whole
    causal prefix, else how many tokens (itself included) a token attends to."""
    every = cfg.window_global_every
    return tuple(0 if not cfg.window or (every and (i + 1) % every == 0) else cfg.window
                 for i in range(cfg.n_layers))


def window_mask(mask: jax.Array, window) -> jax.Array:
    """A (B, T, S) mask (queries and keys from the same positions) limited to keys fewer
    than `window` positions back (a traced or static int; 0: no limit)."""
    t, s = mask.shape[-2:]
    back = jnp.arange(t)[:, None] - jnp.arange(s)[None, :]
    return mask & ((back < window) | (window == 0))[None]


def dot_product_attention(q, k, v, mask, block: int = 0):
    """Grouped-query attention. q (B,T,N,H), k/v (B,S,K,H), mask (B,T,S) -> (B,T,N,H).

    Heads are moved in front of time, (B, K, G, T, H), so every product is a plain batched
    matmul (on CPU that alone makes the backward pass 2.5x faster than a BTNH einsum).
    With `block` > 0 the queries are processed in blocks of that many rows, and block i
    only looks at keys [0, (i+1)*block): the causal upper triangle is never computed.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    q = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    k = k.transpose(0, 2, 1, 3)  # (B, K, S, H)
    v = v.transpose(0, 2, 1, 3)
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    block = t if block <= 0 or block >= t or t != s or t % block else block
    outs = []
    for start in range(0, t, block):
        stop = start + block
        keys = stop if t == s else s  # causal: nothing past the block's last query
        scores = jnp.einsum("BKGTH,BKSH->BKGTS", q[:, :, :, start:stop], k[:, :, :keys],
                            preferred_element_type=jnp.float32)
        m = mask[:, None, None, start:stop, :keys]
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", probs, v[:, :, :keys]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------
# Modules


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap): logits squashed into (-cap, cap); the identity when cap is 0."""
    return cap * jnp.tanh(logits / cap) if cap else logits


def _param(rngs: nnx.Rngs, shape, std: float, dtype, axes) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=std)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = 0.0 if cfg.zero_init_out else cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2 residual scaling
        self.cfg = cfg
        self.wq = _param(rngs, (d, n, h), cfg.init_std, pdt, ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, (d, k, h), cfg.init_std, pdt, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, (d, k, h), cfg.init_std, pdt, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, (n, h, d), out_std, pdt, ("heads", "head_dim", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.norm_eps, pdt)
            self.k_norm = RMSNorm(h, cfg.norm_eps, pdt)
        if cfg.value_embeds:  # (V, K, H): split over the tensor axis by key/value heads, as wv is
            self.ve = _param(rngs, (cfg.vocab_size, k, h), cfg.init_std, pdt, ("vocab_rows", "kv_heads", "head_dim"))

    def __call__(self, x, cos, sin, mask, batch: int, tokens=None):
        """x (B*T, D) -> (B*T, D). `mask` is (B, T, S), or for the fused kernels
        (`model.attention`, lm/model/attention.py) the segment ids (B, T) or None."""
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        t = x.shape[0] // batch
        q = (x @ self.wq[...].astype(cdt).reshape(d, n * h)).reshape(batch, t, n, h)
        kk = (x @ self.wk[...].astype(cdt).reshape(d, k * h)).reshape(batch, t, k, h)
        v = (x @ self.wv[...].astype(cdt).reshape(d, k * h)).reshape(batch, t, k, h)
        if cfg.value_embeds:  # the input tokens' value embeddings (B*T,) -> (B, T, K, H)
            v = v + jnp.take(self.ve[...], tokens.reshape(-1), axis=0).astype(cdt).reshape(batch, t, k, h)
        q, kk, v = shard(q, "act_btnh"), shard(kk, "act_btkh"), shard(v, "act_btkh")
        if cfg.qk_norm:
            q, kk = self.q_norm(q), self.k_norm(kk)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        impl = attention.resolve(cfg.attention, dtype=cdt)
        if impl in attention.FUSED:  # `mask` holds the segment ids (B, T), or None
            out = attention.fused_attention(q, kk, v, mask, impl)
        elif impl == "jax_dpa":
            out = jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None])
        else:
            out = dot_product_attention(q, kk, v, mask, cfg.attention_block)
        out = shard(out, "act_btnh").reshape(batch * t, n * h)
        return out @ self.wo[...].astype(cdt).reshape(n * h, d)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        if cfg.mlp == "swiglu":
            self.w_gate = _param(rngs, (d, f), cfg.init_std, pdt, ("embed", "mlp"))
        self.w_up = _param(rngs, (d, f), cfg.init_std, pdt, ("embed", "mlp"))
        out_std = 0.0 if cfg.zero_init_out else cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.w_down = _param(rngs, (f, d), out_std, pdt, ("mlp", "embed"))

    def __call__(self, x):
        """x (B*T, D) -> (B*T, D)."""
        cdt = jnp.dtype(self.cfg.compute_dtype)
        up = x @ self.w_up[...].astype(cdt)
        if self.cfg.mlp == "relu2":
            hidden = shard(jnp.square(jax.nn.relu(up)), "act_nf")
        else:
            hidden = shard(jax.nn.silu(x @ self.w_gate[...].astype(cdt)) * up, "act_nf")
        return hidden @ self.w_down[...].astype(cdt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask, batch: int, tokens=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, batch, tokens)
        return shard(x + self.mlp(self.mlp_norm(x)), "act_nd")


# "dots" policies also keep the CPU attention kernel's outputs (a custom call, not a dot):
# recomputing them would run the kernel's forward pass twice.
_keep_attention = jax.checkpoint_policies.save_only_these_names(attention_cpu.SAVED)
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _keep_attention),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _keep_attention),
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, pdt, ("vocab", "embed"))

        # One Block's parameters per layer, stacked on a leading axis of size L.
        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, pdt, ("embed", "vocab"))
        if cfg.unet_skips:  # one learned weight per skip connection (module docstring)
            self.unet_skip = nnx.Param(jnp.ones((cfg.n_layers // 2,), pdt), axes=("layers",))
        if cfg.mtp_tokens:  # multi-token prediction: a (D, D) projection and a norm per extra token
            self.mtp = _param(rngs, (cfg.mtp_tokens, cfg.d_model, cfg.d_model), cfg.init_std, pdt,
                              ("layers", "embed", None))
            self.mtp_norm = nnx.Param(jnp.ones((cfg.mtp_tokens, cfg.d_model), pdt), axes=("layers", "norm"))
        # Extra scalar heads on the final hidden state (reward, value, ...): a (D,) vector each,
        # zero at initialisation, so adding one changes nothing until it is trained.
        self.scalar_heads = nnx.Dict({name: nnx.Param(jnp.zeros((cfg.d_model,), pdt), axes=("embed",))
                                      for name in cfg.scalar_heads})

    def forward(self, tokens, positions=None, segment_ids=None):
        """The one forward path, for training and scoring (cached decoding, with the
        same math on weights laid out for it, is lm/sampling/decode.py).

        tokens (B, T) int -> final normalised hidden states (B*T, D). Causal attention
        within documents (`segment_ids`); positions default to 0..T-1.
        """
        cfg = self.cfg
        b, t = tokens.shape
        cdt = jnp.dtype(cfg.compute_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_tables(positions, cfg.head_size, cfg.rope_theta)
        if not cfg.document_mask:
            segment_ids = None  # attend across the documents packed in a row (GPT-2 style)
        if attention.resolve(cfg.attention, dtype=cdt) in attention.FUSED:
            mask = segment_ids  # the fused kernels mask by segment ids, without a (B, T, T) mask
        else:
            mask = attention_mask(segment_ids, b, t)  # (B, T, T)

        x = jnp.take(self.embed[...], tokens.reshape(-1), axis=0).astype(cdt)  # (B*T, D)
        x = shard(x, "act_nd")
        graphdef, stacked = nnx.split(self.blocks)
        if cfg.window:  # each layer's window goes through the scan with its weights
            stacked = (stacked, jnp.asarray(layer_windows(cfg), jnp.int32))

        def layer(x, params):
            if cfg.window:
                params, window = params
                return nnx.merge(graphdef, params)(x, cos, sin, window_mask(mask, window), b, tokens), None
            return nnx.merge(graphdef, params)(x, cos, sin, mask, b, tokens), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])

        def layers(x, lo: int, hi: int, skips=None):
            """Layers lo..hi-1 -> (x, each one's output (hi - lo, B*T, D) or None); with
            `skips` (weights (hi - lo,), activations (hi - lo, B*T, D)), each layer's input
            first gets its weighted skip added."""
            if hi == lo:
                return x, None
            part = jax.tree.map(lambda a: a[lo:hi], stacked)

            def body(x, xs):
                params, skip = xs
                if skip is not None:
                    x = x + skip[0].astype(x.dtype) * skip[1]
                x, _ = layer(x, params)
                return x, (x if keep else None)

            keep = cfg.unet_skips and skips is None
            if cfg.scan_layers:
                return jax.lax.scan(body, x, (part, skips))
            outs = []
            for i in range(hi - lo):
                x, out = body(x, jax.tree.map(lambda a: a[i], (part, skips)))
                outs.append(out)
            return x, (jnp.stack(outs) if keep else None)

        if cfg.unet_skips:  # U-net: layer L-1-i adds layer i's output, times a learned weight
            half = cfg.n_layers // 2
            x, saved = layers(x, 0, half)
            x, _ = layers(x, half, cfg.n_layers - half)  # the middle layer of an odd depth
            x, _ = layers(x, cfg.n_layers - half, cfg.n_layers, (self.unet_skip[...], saved[::-1]))
        else:
            x, _ = layers(x, 0, cfg.n_layers)
        return self.final_norm(x)

    def hidden(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens (B, T) int -> final normalised hidden states (B*T, D)."""
        return self.forward(tokens, positions, segment_ids)

    def scalar(self, h: jax.Array, name: str) -> jax.Array:
        """Hidden states (..., D) -> float32 scalars (...) of the extra head `name`
        (`model.scalar_heads`, e.g. a reward or value head)."""
        w = self.scalar_heads[name][...]  # (D,)
        return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def mtp_hidden(self, h: jax.Array, ahead: int) -> jax.Array:
        """Final hidden states (B*T, D) -> the hidden states (B*T, D) whose logits (through the
        shared output head) predict the token `ahead` (2..1+mtp_tokens) positions on."""
        w = self.mtp[...][ahead - 2].astype(h.dtype)
        return rms_norm(h @ w, self.mtp_norm[...][ahead - 2], self.cfg.norm_eps)

    def output_weights(self) -> jax.Array:
        """The (D, V) output projection in the compute dtype (the embedding, if tied)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        return w.astype(jnp.dtype(self.cfg.compute_dtype))

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states (..., D) -> float32 logits (..., V) (soft-capped with model.logit_softcap)."""
        return softcap(jnp.dot(h, self.output_weights(), preferred_element_type=jnp.float32), self.cfg.logit_softcap)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens (B, T) -> float32 logits (B, T, V)."""
        b, t = tokens.shape
        return self.logits(self.hidden(tokens, positions, segment_ids)).reshape(b, t, -1)


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters, from the abstract (eval_shape) model."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def expected_param_count(cfg: ModelConfig) -> int:
    """Parameter count from the formula (checked against eval_shape by the tests)."""
    d, f, n, k, h, v, layers = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads,
                                cfg.head_size, cfg.vocab_size, cfg.n_layers)
    attn = d * n * h + 2 * d * k * h + n * h * d + (2 * h if cfg.qk_norm else 0)
    per_layer = attn + (3 if cfg.mlp == "swiglu" else 2) * d * f + 2 * d
    mtp = cfg.mtp_tokens * (d * d + d)
    unet = layers // 2 if cfg.unet_skips else 0
    value_embeds = layers * v * k * h if cfg.value_embeds else 0
    return v * d * (1 if cfg.tie_embeddings else 2) + layers * per_layer + d + mtp + unet + value_embeds


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (PaLM appendix B).

    The input embedding is a lookup, not a matmul, so it is left out unless tied to the
    output head. Attention scores and values add 12 * L * N * H * T (forward + backward,
    counting the full T x T square, as PaLM and MaxText do). Multi-token prediction adds, per
    extra token, its (D, D) projection and another pass through the output head.
    """
    d, v = cfg.d_model, cfg.vocab_size
    matmul_params = expected_param_count(cfg) - v * d * (0 if cfg.tie_embeddings else 1)
    norms = cfg.n_layers * (2 * d + (2 * cfg.head_size if cfg.qk_norm else 0)) + d + cfg.mtp_tokens * d
    norms += cfg.n_layers // 2 if cfg.unet_skips else 0  # (the skip weights: scalars, not matmul weights)
    norms += cfg.n_layers * v * cfg.n_kv_heads * cfg.head_size if cfg.value_embeds else 0  # (lookups)
    matmul_params -= norms  # norm scales are not matmul weights
    matmul_params += cfg.mtp_tokens * v * d  # the output head again, once per extra token
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
    return 6.0 * matmul_params + attn
