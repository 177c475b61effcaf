"""Sampling with a key/value cache: prefill the prompts, then decode token by token.

`generate` runs the whole thing as one jit-compiled program (a `lax.while_loop` over new
tokens, stopping early once every sequence has hit a stop token): no Python per token.
`stream` yields tokens as they come, for interactive use (one compiled step per token).
Prompts of different lengths are batched: each sequence decodes from its own length,
and each token's key/value sits in the cache slot of its absolute position.

Decoding options: greedy (temperature 0), temperature, top-k, top-p (nucleus), stop
tokens, maximum new tokens, seed.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits: jax.Array, top_k: int, top_p) -> jax.Array:
    """Mask (to -inf) all but the top-k tokens and the smallest set with mass >= top_p."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    # top_p = 1 keeps every token exactly (rounding in the cumulative sum must not drop any)
    return jnp.where((logits < threshold) & (top_p < 1.0), -jnp.inf, logits)


def _pick(logits, key, temperature, top_k: int, top_p):
    filtered = filter_logits(logits, top_k, top_p)
    sampled = jax.random.categorical(key, filtered / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _prefill(model, tokens, lengths, cache_len):
    b, p = tokens.shape
    cache = model.init_cache(b, cache_len)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = model.decode(tokens, positions, cache)
    return logits[jnp.arange(b), lengths - 1], cache  # logits after each prompt's last token


@partial(jax.jit, static_argnames=("graphdef", "max_new", "top_k", "cache_len"))
def _generate(graphdef, params, tokens, lengths, key, temperature, top_p, stop_ids, *,
              max_new: int, top_k: int, cache_len: int):
    model = nnx.merge(graphdef, params)
    b = tokens.shape[0]
    last, cache = _prefill(model, tokens, lengths, cache_len)
    out = jnp.zeros((b, max_new), jnp.int32)
    logps = jnp.zeros((b, max_new), jnp.float32)
    done = jnp.zeros((b,), jnp.bool_)
    count = jnp.zeros((b,), jnp.int32)  # new tokens per sequence, stop token included

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, last, cache, out, logps, done, count, key = carry
        key, sub = jax.random.split(key)
        nxt = _pick(last, sub, temperature, top_k, top_p)
        out = out.at[:, i].set(jnp.where(done, 0, nxt))
        logps = logps.at[:, i].set(jnp.where(done, 0.0, token_logps(last, nxt, temperature)))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop_ids)
        logits, cache = model.decode(nxt[:, None], (lengths + i)[:, None], cache)
        return i + 1, logits[:, 0], cache, out, logps, done, count, key

    carry = (jnp.int32(0), last, cache, out, logps, done, count, key)
    _, _, _, out, logps, done, count, _ = jax.lax.while_loop(cond, body, carry)
    return out, count, logps


def token_logps(logits, tokens, temperature):
    """log p(token) under softmax(logits / temperature) (the raw logits when greedy), unfiltered:
    the quantity an RL trainer recomputes for importance ratios."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    return jnp.take_along_axis(scaled, tokens[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(scaled, axis=-1)


def _pack(prompts: Sequence[Sequence[int]], max_new: int, max_len: int, bucket: int = 1):
    """Left-aligned, zero-padded prompts (keeping each one's last tokens if too long); the
    width is rounded up to a multiple of `bucket` so varied prompts share compilations."""
    room = max(1, max_len - max_new)
    prompts = [list(p)[-room:] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    width = min(max(room, width), -(-width // bucket) * bucket)
    buf = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    return buf, np.asarray([len(p) for p in prompts], np.int32)


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new: int, max_len: int,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, eos_id: int = -1,
             stop_ids: Sequence[int] = (), seed: int = 0, bucket: int = 1) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens; returns the new tokens of each,
    ending with the stop token (EOS or one of `stop_ids`) if one was produced."""
    tokens, lengths = _pack(prompts, max_new, max_len, bucket)
    stops = jnp.asarray(list(stop_ids) + ([eos_id] if eos_id >= 0 else []) or [-1], jnp.int32)
    out, count, _ = _generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed),
                              jnp.float32(temperature), jnp.float32(top_p), stops, max_new=max_new, top_k=top_k,
                              cache_len=tokens.shape[1] + max_new)
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, : count[i]].tolist() for i in range(len(prompts))]


def rollout(graphdef, params, tokens, lengths, key, *, max_new: int, temperature: float = 1.0,
            stop_ids: Sequence[int] = ()):
    """Sampling for RL, on device arrays from end to end (no host round trip):
    left-aligned prompts `tokens` (B, W) of `lengths` (B,) -> (new tokens (B, max_new),
    counts (B,), log-probabilities (B, max_new) of each sampled token under
    softmax(logits / temperature)). No top-k/top-p: the sampling distribution is the policy's."""
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    return _generate(graphdef, params, tokens, lengths, key, jnp.float32(temperature), jnp.float32(1.0), stops,
                     max_new=max_new, top_k=0, cache_len=tokens.shape[1] + max_new)


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_jit(graphdef, params, tokens, lengths, *, cache_len: int):
    return _prefill(nnx.merge(graphdef, params), tokens, lengths, cache_len)


@partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnames=("cache",))
def _step_jit(graphdef, params, last, cache, positions, key, temperature, top_p, *, top_k: int):
    nxt = _pick(last, key, temperature, top_k, top_p)
    logits, cache = nnx.merge(graphdef, params).decode(nxt[:, None], positions[:, None], cache)
    return nxt, logits[:, 0], cache


def stream(graphdef, params, prompt: Sequence[int], max_new: int, max_len: int, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0) -> Iterator[int]:
    """Yield new tokens of one prompt as they are produced (stops after a stop token)."""
    tokens, lengths = _pack([prompt], max_new, max_len)
    last, cache = _prefill_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                               cache_len=tokens.shape[1] + max_new)
    key = jax.random.PRNGKey(seed)
    for i in range(max_new):
        key, sub = jax.random.split(key)
        nxt, last, cache = _step_jit(graphdef, params, last, cache, jnp.asarray(lengths + i), sub,
                                     jnp.float32(temperature), jnp.float32(top_p), top_k=top_k)
        tok = int(nxt[0])
        yield tok
        if tok in stop_ids:
            return
