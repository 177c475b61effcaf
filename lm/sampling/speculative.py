"""Speculative decoding: a small draft model proposes `k` tokens, the target checks them all in
one forward pass (`decode.extend`), and as many as it agrees with are kept, plus one of its own.

Decoding at batch 1 is bound by reading the weights once per token; the target reads its
weights once per *round* instead, and a round commits between 1 and k+1 tokens. The output
does not depend on the draft:
- greedy: a drafted token is kept while it is the target's argmax; the first that is not is
  replaced by the target's argmax (all kept: the target's next argmax is added). The tokens
  are the target's greedy tokens (`accept`), token for token.
- sampled: drafted token d (drawn from the draft's distribution q) is kept with probability
  min(1, p(d) / q(d)), p the target's distribution (temperature, top-k and top-p applied to
  both alike); at the first rejection a token is drawn from max(p - q, 0), renormalised (all
  kept: one from the target's next p). Each token then follows p exactly (Leviathan et al.
  2023, Chen et al. 2023). The draws differ from `generate`'s (other random numbers), their
  distribution does not.

One sequence at a time (batch 1: where the technique pays), the whole generation one
compiled program. Caches: the target's holds every committed token but the last; the
draft's every one but the last two, which each round feeds it again (positions C-2, C-1 of
C committed tokens): slots past the committed tokens hold rejected proposals, masked until
they are overwritten.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.sampling import decode
from lm.sampling.sampler import _grow, _pack, _stops

BUCKET = 16  # prompts are padded to a power of two at least this long (so that they share programs)


def probs(logits, temperature, top_p, top_k: int):
    """The sampling distribution of logits (..., V): filtered (top-k, top-p) as `decode.pick`
    filters, then softmax(logits / temperature)."""
    kept = decode.filter_logits(logits, top_k, top_p)
    return jax.nn.softmax(kept / jnp.maximum(temperature, 1e-6), axis=-1)


def accept(p, q, drafted, key, greedy: bool):
    """The verification rule. p (k+1, V): the target's distributions after the last committed
    token and after each drafted one (its logits when `greedy`); q (k, V): the draft's
    distributions the drafted tokens (k,) were drawn from. Returns (n, token): the first n
    drafted tokens are kept, then `token`."""
    k = drafted.shape[0]
    if greedy:
        best = decode.argmax(p)  # (k+1,)
        n = jnp.sum(jnp.cumprod(drafted == best[:k]))
        return n, best[n]
    u_key, r_key = jax.random.split(key)
    idx = jnp.arange(k)
    ratio = p[idx, drafted] / jnp.maximum(q[idx, drafted], 1e-30)
    kept = jax.random.uniform(u_key, (k,)) < ratio  # accept with probability min(1, p/q)
    n = jnp.sum(jnp.cumprod(kept))
    q_n = jnp.concatenate([q, jnp.zeros_like(q[:1])])[n]  # all kept: the residual is p itself
    residual = jnp.maximum(p[n] - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[n])  # p == q there: nothing to correct
    token = jax.random.categorical(r_key, jnp.log(residual))
    return n, token.astype(jnp.int32)


class Result(NamedTuple):
    tokens: list  # the new tokens (ending with the stop token if one was produced)
    rounds: int  # target forward passes after the prefill
    drafted: int  # tokens the draft proposed
    accepted: int  # of which the target kept


@partial(jax.jit, static_argnames=("k", "max_new", "top_k", "greedy"))
def _speculate(target, draft, tokens, length, base, temperature, top_p, stop_ids, *, k: int, max_new: int,
               top_k: int, greedy: bool):
    width = tokens.shape[1]
    total = width + max_new + k + 1  # every slot a round can write
    length = length[0]

    def choose(logits, key):  # logits (..., V) -> (token, its distribution)
        if greedy:
            return decode.argmax(logits), logits
        dist = probs(logits, temperature, top_p, top_k)
        return jax.random.categorical(key, jnp.log(dist)).astype(jnp.int32), dist

    last, cache_t = decode.prefill(target, tokens, length[None])
    _, cache_d = decode.prefill(draft, tokens, length[None])
    first, _ = choose(last[0], jax.random.fold_in(base, 0))
    seq = jnp.zeros((total,), jnp.int32).at[:width].set(tokens[0]).at[length].set(first)
    end = length + max_new
    done = jnp.isin(first, stop_ids) | (max_new == 1)
    carry = (length + 1, cache_t, cache_d, seq, done, jnp.int32(0), jnp.int32(0))
    for span in decode.spans(total):
        c, cache_t, cache_d, seq, done, rounds, kept = carry
        carry = (c, _grow(cache_t, span), _grow(cache_d, span), seq, done, rounds, kept)

        def cond(carry, span=span):
            c, _, _, _, done, _, _ = carry
            return ~done & (c + k <= span)  # the round writes slots up to c + k - 1

        def body(carry, span=span):
            c, cache_t, cache_d, seq, done, rounds, kept = carry
            key = jax.random.fold_in(base, rounds + 1)
            pair = jax.lax.dynamic_slice(seq, (c - 2,), (2,))
            logits, cache_d = decode.extend(draft, pair[None], (c - 2)[None], cache_d, span)
            logits = logits[0, 1]
            drafted, qs = [], []
            for i in range(k):
                d, q = choose(logits, jax.random.fold_in(key, i))
                drafted.append(d)
                qs.append(q)
                if i < k - 1:
                    step_logits, cache_d = decode.step(draft, d[None], (c + i)[None], cache_d, span)
                    logits = step_logits[0]
            drafted = jnp.stack(drafted)
            verify = jnp.concatenate([seq[c - 1][None], drafted])[None]  # (1, k+1) at c-1 .. c+k-1
            p_logits, cache_t = decode.extend(target, verify, (c - 1)[None], cache_t, span)
            p = p_logits[0] if greedy else probs(p_logits[0], temperature, top_p, top_k)
            n, token = accept(p, jnp.stack(qs), drafted, jax.random.fold_in(key, k), greedy)
            new = jnp.concatenate([drafted, jnp.zeros((1,), jnp.int32)]).at[n].set(token)  # (k+1,): n+1 are new
            seq = jax.lax.dynamic_update_slice(seq, new, (c,))
            stops = jnp.isin(new, stop_ids) & (jnp.arange(k + 1) <= n)
            count = jnp.where(jnp.any(stops), jnp.argmax(stops) + 1, n + 1)
            count = jnp.minimum(count, end - c)
            done = jnp.any(stops) | (c + count >= end)
            return c + count, cache_t, cache_d, seq, done, rounds + 1, kept + n

        carry = jax.lax.while_loop(cond, body, carry)
    c, _, _, seq, _, rounds, kept = carry
    return jax.lax.dynamic_slice(seq, (length,), (max_new,)), c - length, rounds, kept


def check_pair(target: decode.Weights, draft: decode.Weights) -> None:
    """Refuse a draft that cannot propose the target's tokens."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary has {draft.cfg.vocab_size} tokens, the target's "
                         f"{target.cfg.vocab_size}: a draft needs the target's tokenizer")
    if target.mesh is not None or draft.mesh is not None:
        raise ValueError("speculative decoding runs on one device: drop --tensor")


def generate(target: decode.Weights, draft: decode.Weights, prompt: Sequence[int], max_new: int, max_len: int,
             k: int = 4, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), seed: int = 0) -> Result:
    """Continue one prompt by up to `max_new` tokens with `draft` proposing `k` at a time (see
    the module's docstring); greedy when `temperature` is 0."""
    if k < 1:
        raise ValueError(f"k={k}: the draft proposes at least one token per round")
    check_pair(target, draft)
    tokens, lengths = _pack([prompt], max_new, max_len, bucket=BUCKET, pow2=True)
    out, count, rounds, kept = _speculate(
        target, draft, jnp.asarray(tokens), jnp.asarray(lengths), decode.request_base(seed),
        jnp.float32(temperature), jnp.float32(top_p), _stops(stop_ids), k=k, max_new=max_new, top_k=top_k,
        greedy=temperature == 0)
    count, rounds = int(count), int(rounds)
    return Result(tokens=np.asarray(out)[:count].tolist(), rounds=rounds, drafted=rounds * k, accepted=int(kept))
