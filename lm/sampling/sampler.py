"""Sampling: `generate` (a batch, one compiled program), `rollout` (RL), `stream` (token
by token), all on the decode engine of lm/sampling/decode.py.

`generate` runs prefill and the decode loop as one jit-compiled program (`lax.while_loop`s
over new tokens, stopping early once every sequence has hit a stop token): no Python per
token. The loop is split in segments by attention span (lm/sampling/decode.py `spans`): the cache
grows from one bucket to the next between segments, and early steps never read the empty
end of it. `stream` yields tokens as they come (one compiled step per token, the cache
donated). Prompts of different lengths are batched: each sequence decodes from its own
length, and each token's key/value sits in the cache slot of its absolute position.

Decoding options: greedy (temperature 0), temperature, top-k, top-p (nucleus), stop
tokens, maximum new tokens, seed. Row r of a batch draws with
fold_in(fold_in(key, r), step): a seeded sample is the same whatever batch it is in.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.sampling import decode
from lm.sampling.decode import filter_logits, token_logps  # noqa: F401  (the sampling API: lm.rl uses token_logps)


@partial(jax.jit, static_argnums=1, static_argnames="out_shardings")
def _bases(key, rows: int, out_shardings=None):
    """Row r's key: fold_in(key, r) (a row draws the same whatever batch or device it is on)."""
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))
    return keys if out_shardings is None else jax.lax.with_sharding_constraint(keys, out_shardings)


def _fold(bases, i):
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(bases)


def _repeat_rows(a, samples: int, heads: int):
    """(P*K, T, H) -> (P*G*K, T, H): each prompt's K head rows repeated as a block, G times."""
    _, t, h = a.shape
    a = a.reshape(-1, 1, heads, t, h)
    return jnp.broadcast_to(a, (a.shape[0], samples, heads, t, h)).reshape(-1, t, h)


def _grow(cache, length: int):
    pad = lambda a: jnp.pad(a, ((0, 0), (0, length - a.shape[1]), (0, 0)))  # noqa: E731
    return [{n: pad(c[n]) for n in ("k", "v")} for c in cache]


def _decode_rows(w, tokens, lengths, bases, temperature, top_p, stop_ids, *, max_new: int, top_k: int,
                 samples: int = 1):
    """Prefill P prompts once, `samples` rows each, then decode; row r draws with the key
    `bases[r]` (P*samples keys); see `generate`."""
    p, width = tokens.shape
    last, kvs = decode.prefill(w, tokens, lengths)
    if samples > 1:  # P prompts x G samples: rows p*G .. p*G+G-1 share prompt p's prefill
        last = jnp.repeat(last, samples, axis=0)
        kvs = [{n: _repeat_rows(kv[n], samples, w.cfg.n_kv_heads) for n in ("k", "v")} for kv in kvs]
        lengths = jnp.repeat(lengths, samples)
    b = p * samples
    temperature = jnp.broadcast_to(temperature, (b,))
    top_p = jnp.broadcast_to(top_p, (b,))
    out = jnp.zeros((b, max_new), jnp.int32)
    logps = jnp.zeros((b, max_new), jnp.float32)
    done = jnp.zeros((b,), jnp.bool_)
    count = jnp.zeros((b,), jnp.int32)  # new tokens per sequence, stop token included
    # `going`: some row is not done. With weights split over fsdp (`decode.on_mesh`) each step
    # gathers them across devices that decode other rows: such devices stop together, when
    # all their rows are done (a device that left the loop alone would hang the others).
    carry = (jnp.int32(0), last, kvs, out, logps, done, count, jnp.bool_(True))
    # Step i writes slot lengths + i <= width - 1 + i and reads slots 0..that: a span of
    # width + i slots. Each segment runs the steps one span covers.
    start = 0
    for span in decode.spans(width + max_new):
        stop = min(max_new, span - width + 1)
        if stop <= start:
            continue
        i, last, cache, out, logps, done, count, going = carry
        carry = (i, last, _grow(cache, span), out, logps, done, count, going)

        def cond(carry, stop=stop):
            i, *_, going = carry
            return (i < stop) & going

        def body(carry, span=span):
            i, last, cache, out, logps, done, count, _ = carry
            nxt, lp = decode.pick(last, _fold(bases, i), temperature, top_p, top_k)
            out = out.at[:, i].set(jnp.where(done, 0, nxt))
            logps = logps.at[:, i].set(jnp.where(done, 0.0, lp))
            count = count + (~done).astype(jnp.int32)
            done = done | jnp.isin(nxt, stop_ids)
            logits, cache = decode.step(w, nxt, lengths + i, cache, span)
            return i + 1, logits, cache, out, logps, done, count, ~decode.all_done(w, done)

        carry = jax.lax.while_loop(cond, body, carry)
        start = stop
    _, _, _, out, logps, _, count, _ = carry
    return out, count, logps


_generate = jax.jit(decode.each_device(_decode_rows, (P(),) * 6, (P(),) * 3),
                    static_argnames=("max_new", "top_k", "samples"))


@partial(jax.jit, static_argnames=("max_new", "top_k", "samples"))
def _generate_split(w, tokens, lengths, bases, temperature, top_p, stop_ids, *, max_new: int, top_k: int,
                    samples: int):
    """`_decode_rows` with the prompts (and their rows) split over the devices of the mesh `w`
    lies on (`decode.on_mesh`): over every axis but the one its heads are split over, where
    the devices of a group decode the same rows, each with its heads. Each device reads its
    share of the weights as it lies (`decode.specs`). Prompts stay with their samples."""
    rows = P(decode.row_axes(w))
    body = partial(_decode_rows, max_new=max_new, top_k=top_k, samples=samples)
    return jax.shard_map(body, mesh=w.mesh, in_specs=(decode.specs(w), rows, rows, rows, P(), P(), P()),
                         out_specs=(rows, rows, rows), check_vma=False)(w, tokens, lengths, bases, temperature,
                                                                         top_p, stop_ids)


def _pack(prompts: Sequence[Sequence[int]], max_new: int, max_len: int, bucket: int = 1, pow2: bool = False):
    """Left-aligned, zero-padded prompts (keeping each one's last tokens if too long); the
    width is rounded up to a multiple of `bucket` (`pow2`: to a power of two at least
    `bucket`) so varied prompts share compilations."""
    room = max(1, max_len - max_new)
    prompts = [list(p)[-room:] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    rounded = decode.pow2_width(width, bucket) if pow2 else -(-width // bucket) * bucket
    width = min(max(room, width), rounded)
    buf = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    return buf, np.asarray([len(p) for p in prompts], np.int32)


def _stops(stop_ids: Sequence[int], eos_id: int = -1):
    return jnp.asarray(list(stop_ids) + ([eos_id] if eos_id >= 0 else []) or [-1], jnp.int32)


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new: int, max_len: int,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, eos_id: int = -1,
             stop_ids: Sequence[int] = (), seed: int = 0, bucket: int = 1, weights=None) -> list[list[int]]:
    """Continue each prompt by up to `max_new` tokens; returns the new tokens of each,
    ending with the stop token (EOS or one of `stop_ids`) if one was produced. `weights`
    (lm.sampling.decode.prepare(graphdef, params)) saves preparing them again on repeated calls."""
    tokens, lengths = _pack(prompts, max_new, max_len, bucket)
    w = weights if weights is not None else decode.prepare(graphdef, params)
    out, count, _ = _generate(w, jnp.asarray(tokens), jnp.asarray(lengths), _bases(decode.seed_key(seed), len(tokens)),
                              jnp.float32(temperature), jnp.float32(top_p), _stops(stop_ids, eos_id),
                              max_new=max_new, top_k=top_k)
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, : count[i]].tolist() for i in range(len(prompts))]


def rollout(graphdef, params, tokens, lengths, key, *, max_new: int, temperature: float = 1.0,
            stop_ids: Sequence[int] = (), samples: int = 1, mesh: Mesh | None = None):
    """Sampling for RL, on device arrays from end to end (no host round trip):
    left-aligned prompts `tokens` (P, W) of `lengths` (P,), `samples` rows each ->
    (new tokens (P*samples, max_new), counts (P*samples,), log-probabilities
    (P*samples, max_new) of each sampled token under softmax(logits / temperature)).
    Row p*samples + g is sample g of prompt p; each prompt is prefilled once. No
    top-k/top-p: the sampling distribution is the policy's.

    With a training `mesh` of several devices the weights are laid out on it by the run's rules
    (`decode.on_mesh`: heads and MLP width split over `tensor`, the layers' width over `fsdp`,
    each device reading its share as it lies) and the prompts are split over its devices
    (over every axis but `tensor` when the heads are split over it; P must be a multiple
    of their count; `tokens` and `lengths` may be global arrays sharded as
    `rows_sharding(mesh)`), and so are the outputs: each device decodes its share of the
    rows (with tensor parallelism, its heads of a group's rows). Row r draws with the same key
    either way, so the samples do not depend on the device count."""
    p = tokens.shape[0]
    args = (jnp.float32(temperature), jnp.float32(1.0), _stops(stop_ids))
    if mesh is None or mesh.size == 1:
        w = decode.prepare(graphdef, params)
        return _generate(w, tokens, lengths, _bases(key, p * samples), *args, max_new=max_new, top_k=0,
                         samples=samples)
    w = decode.prepare(graphdef, params, mesh=mesh)
    groups = math.prod(w.mesh.shape[a] for a in decode.row_axes(w))
    if p % groups:
        raise ValueError(f"{p} prompts do not split over {groups} devices" + (
            f" (groups of {w.mesh.shape[w.tp]} tensor-parallel devices)" if w.tp else "") + ": pad them to a multiple")
    bases = _bases(key, p * samples, out_shardings=NamedSharding(mesh, P(decode.row_axes(w))))
    return _generate_split(w, tokens, lengths, bases, *args, max_new=max_new, top_k=0, samples=samples)


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every device of the mesh (a rollout's prompts and samples)."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


_prefill_jit = jax.jit(decode.each_device(decode.prefill, (P(), P()), (P(), decode.CACHE)))


def _step_one(w, last, cache, positions, bases, i, temperature, top_p, *, span: int, top_k: int):
    nxt, _ = decode.pick(last, _fold(bases, i), temperature, top_p, top_k)
    logits, cache = decode.step(w, nxt, positions, cache, span)
    return nxt, logits, cache


_step_jit = jax.jit(decode.each_device(_step_one, (P(), decode.CACHE) + (P(),) * 5, (P(), P(), decode.CACHE)),
                    static_argnames=("span", "top_k"), donate_argnums=(2,))


STREAM_BUCKET = 16  # stream's prompts are padded to a power of two at least this long


def stream(graphdef, params, prompt: Sequence[int], max_new: int, max_len: int, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
           weights=None) -> Iterator[int]:
    """Yield new tokens of one prompt as they are produced (stops after a stop token).

    The prompt is padded to a power of two and the cache holds `max_len` slots whatever
    the prompt: a conversation compiles one prefill per power of two and one step per
    attention span, all of which `warm_up_stream` can compile ahead."""
    tokens, lengths = _pack([prompt], max_new, max_len, bucket=STREAM_BUCKET, pow2=True)
    w = weights if weights is not None else decode.prepare(graphdef, params)
    last, kvs = _prefill_jit(w, jnp.asarray(tokens), jnp.asarray(lengths))
    cache = _grow(kvs, max(max_len, tokens.shape[1] + max_new))
    bases = _bases(decode.seed_key(seed), 1)
    t, p = jnp.full((1,), temperature, jnp.float32), jnp.full((1,), top_p, jnp.float32)
    for i in range(max_new):
        pos = int(lengths[0]) + i
        span = decode.span_for(pos + 1, cache[0]["k"].shape[1])
        nxt, last, cache = _step_jit(w, last, cache, jnp.asarray([pos], jnp.int32), bases, jnp.int32(i), t, p,
                                     span=span, top_k=top_k)
        tok = int(nxt[0])
        yield tok
        if tok in stop_ids:
            return


def warm_up_stream(w, max_len: int, max_new: int, top_k: int = 0, stop=None) -> int:
    """Compile what `stream` runs for a context of `max_len` and `max_new` new tokens (the
    prefill of every prompt width, the step of every attention span) on dummy inputs, so
    that no later turn of a conversation waits for a compilation. Returns the number of
    programs run. `stop` (a threading.Event), once set, ends it between two programs."""
    n = 0
    widths = sorted({_pack([[1] * k], max_new, max_len, STREAM_BUCKET, pow2=True)[0].shape[1]
                     for k in range(1, max_len + 1)})
    for width in widths:
        if stop is not None and stop.is_set():
            return n
        _prefill_jit(w, jnp.zeros((1, width), jnp.int32), jnp.ones((1,), jnp.int32))
        n += 1
    last, kvs = _prefill_jit(w, jnp.zeros((1, widths[0]), jnp.int32), jnp.ones((1,), jnp.int32))
    cache = _grow(kvs, max(max_len, widths[-1] + max_new))
    bases = _bases(decode.seed_key(0), 1)
    one = jnp.ones((1,), jnp.float32)
    for span in decode.spans(cache[0]["k"].shape[1]):
        if stop is not None and stop.is_set():
            break
        _, last, cache = _step_jit(w, last, cache, jnp.zeros((1,), jnp.int32), bases, jnp.int32(0), one, one,
                                   span=span, top_k=top_k)
        n += 1
    jax.block_until_ready(cache)
    return n
