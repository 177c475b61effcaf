"""Simple batched sampling by repeated full forward passes (no KV cache yet).

Good enough to look at a small model's samples at the end of training; the KV-cache
engine comes with the inference issue. The whole generation loop is one jit-compiled
`lax.fori_loop`: no Python per token.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef", "max_new", "top_k"))
def _generate(graphdef, params, tokens, lengths, key, *, max_new: int, temperature, top_k: int, eos_id):
    model = nnx.merge(graphdef, params)
    b, total = tokens.shape
    done = jnp.zeros((b,), jnp.bool_)

    def body(i, carry):
        tokens, lengths, done, key = carry
        logits = model(tokens)  # (B, L, V)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, sub = jax.random.split(key)
        if top_k > 0:
            kth = jax.lax.top_k(last, top_k)[0][:, -1:]
            last = jnp.where(last < kth, -jnp.inf, last)
        sampled = jax.random.categorical(sub, last / jnp.maximum(temperature, 1e-6))
        greedy = jnp.argmax(last, axis=-1)
        nxt = jnp.where(temperature > 0, sampled, greedy).astype(tokens.dtype)
        write = ~done & (lengths < total)
        tokens = tokens.at[jnp.arange(b), jnp.minimum(lengths, total - 1)].set(
            jnp.where(write, nxt, tokens[jnp.arange(b), jnp.minimum(lengths, total - 1)]))
        lengths = lengths + write.astype(lengths.dtype)
        done = done | (write & (nxt == eos_id))
        return tokens, lengths, done, key

    tokens, lengths, _, _ = jax.lax.fori_loop(0, max_new, body, (tokens, lengths, done, key))
    return tokens, lengths


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new: int, max_len: int,
             temperature: float = 0.8, top_k: int = 0, eos_id: int = -1, seed: int = 0) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens; returns only the new tokens."""
    total = min(max_len, max(len(p) for p in prompts) + max_new)
    buf = np.zeros((len(prompts), total), np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-(total - 1):]
        buf[i, : len(p)] = p
        lengths[i] = len(p)
    out, out_len = _generate(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths),
                             jax.random.PRNGKey(seed), max_new=max_new,
                             temperature=jnp.float32(temperature), top_k=top_k, eos_id=eos_id)
    out, out_len = np.asarray(out), np.asarray(out_len)
    return [out[i, lengths[i]: out_len[i]].tolist() for i in range(len(prompts))]
