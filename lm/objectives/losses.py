"""Cross-entropy over the vocabulary, optionally computed in chunks of the sequence.

`chunked_cross_entropy` never holds the full (B*T, V) float32 logits: it computes them
chunk by chunk in the forward pass and again in the backward pass (a custom VJP), which
bounds memory for large vocabularies and keeps each chunk in cache on CPUs. Its value
and gradients equal the plain computation (tested).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float):
    """Mean float32 cross-entropy over masked tokens, plus z_loss * mean(logsumexp^2).

    Returns (total loss, mean cross-entropy, number of tokens).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / n
    loss = ce + z_loss * ((lse**2) * mask).sum() / n if z_loss else ce
    return loss, ce, n


def _to_chunks(x, batch: int, chunks: int):
    """(B*T, ...) -> (C, B, T/C, ...): chunk along time so each chunk keeps the batch sharding."""
    t = x.shape[0] // batch
    x = x.reshape(batch, chunks, t // chunks, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x):
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:])


def _chunk_logits(h, w, cap: float = 0.0):
    """(logits, d logits / d raw logits) of a chunk: soft-capped to cap * tanh(z / cap) when cap > 0."""
    z = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    if not cap:
        return z, None
    t = jnp.tanh(z / cap)
    return cap * t, 1.0 - t * t


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _sums(h, w, targets, mask, z_loss, batch, chunks, cap):
    return _sums_fwd(h, w, targets, mask, z_loss, batch, chunks, cap)[0]


def _sums_fwd(h, w, targets, mask, z_loss, batch, chunks, cap):
    def body(carry, xs):
        hc, tc, mc = xs
        logits, _ = _chunk_logits(hc, w, cap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        ce, z = carry
        return (ce + (nll * mc).sum(), z + (lse * lse * mc).sum()), lse

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    xs = (_to_chunks(h, batch, chunks), _to_chunks(targets, batch, chunks), _to_chunks(mask, batch, chunks))
    (ce, z), lse = jax.lax.scan(body, init, xs)
    return (ce + z_loss * z, ce), (h, w, targets, mask, lse)


def _sums_bwd(z_loss, batch, chunks, cap, res, g):
    h, w, targets, mask, lse = res
    g_total, g_ce = g

    def body(dw, xs):
        hc, tc, mc, lc = xs
        logits, slope = _chunk_logits(hc, w, cap)
        p = jnp.exp(logits - lc[..., None])
        onehot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        # d/dlogits of mask * ((g_total + g_ce) * nll + g_total * z_loss * lse^2)
        coef = (mc * (g_total + g_ce))[..., None]
        dlogits = coef * (p - onehot)
        if z_loss:
            dlogits = dlogits + (mc * g_total * 2 * z_loss * lc)[..., None] * p
        if slope is not None:  # through cap * tanh(z / cap)
            dlogits = dlogits * slope
        dlogits = dlogits.astype(hc.dtype)
        dh = jnp.einsum("btv,dv->btd", dlogits, w)
        dw = dw + jnp.einsum("btd,btv->dv", hc, dlogits, preferred_element_type=jnp.float32)
        return dw, dh

    xs = (_to_chunks(h, batch, chunks), _to_chunks(targets, batch, chunks), _to_chunks(mask, batch, chunks), lse)
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return _from_chunks(dh).astype(h.dtype), dw.astype(w.dtype), None, None


_sums.defvjp(_sums_fwd, _sums_bwd)


def chunked_cross_entropy(h, w, targets, mask, z_loss: float, batch: int, chunks: int, softcap: float = 0.0):
    """Like `cross_entropy(h @ w, ...)` for h (B*T, D), w (D, V), targets/mask (B*T,); with
    `softcap` > 0, of the logits softcap * tanh(h @ w / softcap)."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    total, ce = _sums(h, w, targets, mask, float(z_loss), batch, chunks, float(softcap))
    return total / n, ce / n, n
