"""Continuous batching: requests share one compiled decode step, joining and leaving between steps.

`Batcher` owns a fixed number of slots over one preallocated cache (lm/sampling/decode.py: rows of
`slots` sequences of up to `max_len` tokens) and a background thread that loops:

1. admit waiting requests into free slots: each prompt is prefilled into its slot (one
   compiled program per prompt-length bucket), its last logits kept for the first draw;
2. run one step for all slots at once, or for the first slot alone when it is the only busy
   one (a new request takes the lowest free slot, so a lone client pays for one slot, not
   all of them; one compiled program per attention span and slot count): every active
   slot draws its next token with its own temperature, top-p and seed, writes its
   key/value and gets the logits of the next position; idle slots compute garbage that no
   one reads;
3. hand each request its token (text decoded incrementally), and free the slot on a stop
   token, `max_tokens`, a stop string, or cancellation (the client went away).

So throughput grows with concurrency: every active slot advances in each step.
A request's draws use fold_in(fold_in(PRNGKey(seed), 0), step), as `lm.sampling.stream`
does (the base key made on the host, from any 64-bit seed): a seeded request samples what
`lm sample --seed` samples, whatever else is running.

Events reach the submitter through its `emit` callback, called on the batcher's thread
(the server forwards them to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm.sampling import decode

PREFILL_MIN = 16  # prompts are padded to a power of two at least this long


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # end the answer (not part of its text)
    stop_text: tuple[str, ...] = ()  # end the answer before the first occurrence
    stream: bool = True  # an event per token; False: one event at the end (less work per step)


@dataclasses.dataclass
class Event:
    """A piece of an answer: new text and tokens; the last event has `finish` ("stop",
    "length") or `error` set."""

    text: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Handle:
    """A submitted request: `cancel()` frees its slot (or drops it from the queue)."""

    def __init__(self, request: Request, emit: Callable[[Event], None]):
        self.request, self.emit = request, emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class _Slot:
    handle: Handle
    position: int  # tokens in the cache when admitted (the prompt)
    ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the answer's text already emitted
    tokens_sent: int = 0  # tokens already emitted


def _prefill_width(n: int, max_len: int) -> int:
    return min(decode.pow2_width(n, PREFILL_MIN), max_len)


def _prefill_one(w, last, cache, tokens, length, slot):
    logits, kvs = decode.prefill(w, tokens, length)
    cache = decode.write_prefill(w.cfg, cache, kvs, slot)
    return jax.lax.dynamic_update_slice(last, logits, (slot, 0)), cache


_prefill = jax.jit(decode.each_device(_prefill_one, (P(), decode.CACHE, P(), P(), P()), (P(), decode.CACHE)),
                   donate_argnums=(1, 2))


def _step_one(w, last, cache, rows, *, span: int, live: int):
    """One token for each of the first `live` slots (the others are idle: no work for them).
    `rows` holds each slot's position, step, base key, temperature, top-p and whether it is
    active; positions and steps advance on the device, so the host uploads `rows` only when
    a slot changes hands. Returns the tokens and their log-probabilities as one (2, slots)
    array (one transfer), the logits, cache and rows."""
    slots = last.shape[0]
    if live == slots:
        return _step_rows(w, last, cache, rows, span)
    # the whole cache goes in (written in place at the first `live` slots' positions); the
    # small per-slot arrays are cut to those slots and put back
    out, sub_last, cache, sub_rows = _step_rows(w, last[:live], cache, {n: v[:live] for n, v in rows.items()}, span)
    rows = {n: jax.lax.dynamic_update_slice(v, sub_rows[n], (0,) * v.ndim) for n, v in rows.items()}
    last = jax.lax.dynamic_update_slice(last, sub_last, (0, 0))
    return jnp.pad(out, ((0, 0), (0, slots - live))), last, cache, rows


def _step_rows(w, last, cache, rows, span: int):
    active = rows["active"]
    nxt, logps = decode.pick(last, decode.step_keys(rows["key"], rows["step"]), rows["temperature"], rows["top_p"])
    nxt = jnp.where(active > 0, nxt, 0)
    logits, cache = decode.step(w, nxt, rows["position"] * active, cache, span)
    rows = {**rows, "position": rows["position"] + active, "step": rows["step"] + active}
    return jnp.stack([nxt.astype(jnp.float32), logps]), logits, cache, rows


def _save_rows(w, cache, slot):
    """A copy of slot `slot`'s keys/values (per layer (K, S, H)): a prompt's, to reuse."""
    kh = w.cfg.n_kv_heads
    return [{n: jax.lax.dynamic_slice(c[n], (slot * kh, 0, 0), (kh, *c[n].shape[1:])) for n in ("k", "v")}
            for c in cache]


_save = jax.jit(decode.each_device(_save_rows, (decode.CACHE, P()), decode.CACHE))


def _prefill_after(w, last, cache, saved, tokens, n_new, start, slot):
    """Slot `slot` from a saved prompt's rows whose first `start` positions this prompt shares:
    the rows copied in, then the prompt's other tokens (`tokens` (1, T), the first `n_new` of
    them real) run from position `start` (`decode.extend`); its last logits into `last`."""
    kh = w.cfg.n_kv_heads
    logits, rows = decode.extend(w, tokens, start[None], saved, saved[0]["k"].shape[1])
    cache = [{n: jax.lax.dynamic_update_slice(c[n], r[n], (slot * kh, 0, 0)) for n in ("k", "v")}
             for c, r in zip(cache, rows)]
    return jax.lax.dynamic_update_slice(last, logits[0, n_new - 1][None], (slot, 0)), cache


_prefill_saved = jax.jit(decode.each_device(_prefill_after, (P(), decode.CACHE, decode.CACHE, P(), P(), P(), P()),
                                            (P(), decode.CACHE)), donate_argnums=(1, 2))

PREFIX_BLOCK = 16  # a prompt reuses a saved prefix in whole blocks of this many tokens


class PrefixCache:
    """Saved prompts' keys/values (one slot's rows each), most recently used last, at most
    `capacity` of them (the least recently used is evicted). A new prompt that shares its
    first tokens with a saved one (a system prompt, few-shot examples) starts from those
    rows: the shared tokens, in whole blocks of PREFIX_BLOCK, are not prefilled again."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def lookup(self, prompt: list[int]) -> tuple[int, list | None]:
        """(tokens reusable, the saved rows holding them): the longest shared prefix, whole
        blocks only, leaving at least one token to run (its logits start the answer)."""
        best, rows, best_key = 0, None, None
        for key, saved in self.entries.items():
            n = min(len(key), len(prompt) - 1)
            same = next((i for i in range(n) if key[i] != prompt[i]), n)
            same -= same % PREFIX_BLOCK
            if same > best:
                best, rows, best_key = same, saved, key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, rows

    def wants(self, prompt: list[int]) -> bool:
        """Whether saving this prompt adds anything: a block to share, not held already."""
        if self.capacity < 1 or len(prompt) <= PREFIX_BLOCK:
            return False
        key = tuple(prompt)
        return not any(k[: len(key)] == key for k in self.entries)

    def add(self, prompt: list[int], rows: list) -> None:
        key = tuple(prompt)
        for k in [k for k in self.entries if key[: len(k)] == k]:  # saved prompts this one extends
            del self.entries[k]
        self.entries[key] = rows
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


_step = jax.jit(decode.each_device(_step_one, (P(), decode.CACHE, P()), (P(), P(), decode.CACHE, P())),
                static_argnames=("span", "live"), donate_argnums=(1, 2, 3))


def _live_buckets(slots: int) -> list[int]:
    """The slot counts a step is compiled for: one (a lone client), and all of them. (Each
    count multiplies the programs compiled at start by the number of attention spans.)"""
    return sorted({1, slots})


class Batcher:
    """Continuous batching over `slots` sequences of up to `max_len` tokens (see the module
    docstring). `decode_text(prompt, ids) -> str` is the text an answer's tokens add after
    its prompt's (lm's Tokenizer.decode_after: the answer's first space kept)."""

    def __init__(self, weights: decode.Weights, decode_text: Callable[[list[int], list[int]], str], slots: int = 8,
                 max_len: int | None = None, log: Callable = print, prefix_cache_mb: float = 0):
        cfg = weights.cfg
        # one device, plain placement: weights committed to a mesh would give the step's
        # outputs a sharding its uploaded inputs lack, and a compilation per combination
        # (every array committed to it, so the first calls compile what later calls run)
        # (split weights: every device of theirs holds the small arrays whole)
        self.device = jax.devices()[0] if weights.mesh is None else NamedSharding(weights.mesh, P())
        if weights.mesh is None:
            weights = jax.device_put(weights, self.device)
        self.w, self.decode_text, self.slots, self.log = weights, decode_text, slots, log
        self.max_len = max_len or cfg.max_seq_len
        self.live_buckets = _live_buckets(slots)  # a step computes only the slots up to the last busy one
        self._fresh_buffers()
        self.active: list[_Slot | None] = [None] * slots
        # each slot's row of the step's inputs: on the host (the truth) and on the device
        self.host = {"position": np.zeros(slots, np.int32), "step": np.zeros(slots, np.int32),
                     "key": np.zeros((slots, 2), np.uint32), "temperature": np.zeros(slots, np.float32),
                     "top_p": np.ones(slots, np.float32), "active": np.zeros(slots, np.int32)}
        self.rows = None  # None: upload self.host before the next step
        self.waiting: collections.deque[Handle] = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.draining: str | None = None  # (`drain`: no more admissions, the reason)
        self.fail_message: str | None = None  # (`fail_running`: end the running requests)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "steps": 0, "tokens": 0,
                      "slot_steps": 0, "prefix_hits": 0, "prefix_tokens": 0}
        # slot_steps: the slots the steps computed (busy or not); prefix_tokens: prompt tokens
        # not prefilled because a saved prompt held them
        itemsize = jnp.dtype(cfg.compute_dtype).itemsize
        row_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * self.max_len * cfg.head_size * itemsize
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20 // row_bytes))
        self.prefix_row_mb = row_bytes / 2**20
        self.thread = threading.Thread(target=self._loop, name="lm-batcher", daemon=True)

    # -- the submitter's side ------------------------------------------------------------

    def start(self, warm: bool = True) -> "Batcher":
        if warm:
            self.warm_up()
        self.thread.start()
        return self

    def warm_up(self) -> None:
        """Compile the step for every attention span and the prefill for every prompt bucket
        before serving (a compilation later would stall every running request)."""
        t = time.perf_counter()
        spans = decode.spans(self.max_len)
        for span in spans:
            for live in self.live_buckets:
                np.asarray(self._launch(span, live)[0])
        widths = sorted({_prefill_width(n, self.max_len) for n in range(1, self.max_len)})
        for width in widths:
            self._admit_one(Handle(Request([0] * width, 0), lambda e: None), 0)
        if self.prefixes.capacity:  # a prompt after a saved prefix of one block, every width after it
            saved = _save(self.w, self.cache, self._put(np.int32(0)))
            for width in sorted({w for w in widths if PREFIX_BLOCK + w <= self.max_len}):
                self._prefill_from(saved, [0] * (PREFIX_BLOCK + width), PREFIX_BLOCK, 0)
            self.prefixes.entries.clear()
        self._free(0, "warm-up")
        self.stats = {k: 0 for k in self.stats}
        self.log(f"compiled the decode step (attention spans {spans}, busy slots {self.live_buckets}) and the "
                 f"prefill (prompt buckets {widths}) in {time.perf_counter() - t:.1f}s")
        if self.prefixes.capacity:
            self.log(f"prefix cache: up to {self.prefixes.capacity} prompts' keys/values "
                     f"({self.prefix_row_mb:,.2f} MiB each)")

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Handle:
        """Queue `request`; events go to `emit` (on the batcher's thread). Prompts must fit:
        len(prompt) + max_tokens <= max_len (the server checks before submitting)."""
        if not request.prompt or request.max_tokens < 1 or len(request.prompt) + request.max_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + max_tokens {request.max_tokens} "
                             f"must be within 1..{self.max_len}")
        handle = Handle(request, emit)
        with self.lock:
            if self.closed or self.draining:
                raise RuntimeError(self.draining or "the server is shutting down")
            self.waiting.append(handle)
            self.stats["requests"] += 1
            self.lock.notify()
        return handle

    def drain(self, message: str) -> None:
        """Stop admitting (a later `submit` raises RuntimeError with `message`), and end every
        queued request with an error event saying `message`; the running ones go on."""
        with self.lock:
            self.draining = message
            handles = list(self.waiting)
            self.waiting.clear()
            self.stats["errors"] += len(handles)
        for h in handles:
            h.emit(Event(error=message))

    def fail_running(self, message: str) -> None:
        """End the running requests with an error event (on the batcher's thread, between steps)."""
        with self.lock:
            self.fail_message = message
            self.lock.notify()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def status(self) -> dict:
        with self.lock:
            return {"slots": self.slots, "active": sum(s is not None for s in self.active),
                    "waiting": len(self.waiting), "max_len": self.max_len, **self.stats}

    # -- the batcher's thread ------------------------------------------------------------

    def _loop(self) -> None:
        pending = None  # the step in flight: (its results on the device, the slots it ran for)
        while True:
            with self.lock:
                while (not self.closed and not self.waiting and pending is None and self.fail_message is None
                       and all(s is None for s in self.active)):
                    self.lock.wait()
                if self.closed:
                    break
                fail, self.fail_message = self.fail_message, None
            if fail is not None:
                pending = None
                self._fail_all(fail)
                continue
            try:
                self._admit()
                # Dispatch the next step before reading the last one's tokens: the host's
                # work (text, events, admissions) overlaps the device's.
                launched = self._launch() if any(s is not None for s in self.active) else None
                if pending is not None:
                    self._collect(*pending)
                pending = launched
            except Exception as e:  # noqa: BLE001 -- a bug must not take the server down
                self.log(f"batcher: step failed, failing the running requests:\n{traceback.format_exc()}")
                pending = None
                self._fail_all(f"internal error in the decode loop: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self.lock:
            handles = [s.handle for s in self.active if s is not None] + list(self.waiting)
            self.waiting.clear()
            self.stats["errors"] += len(handles)
        self.active = [None] * self.slots
        self.host["active"][:] = 0
        self.rows = None
        self._fresh_buffers()  # the cache may have been donated to a call that failed
        for h in handles:
            h.emit(Event(error=message))

    def _fresh_buffers(self) -> None:
        cfg = self.w.cfg
        self.cache = decode.new_cache(self.w, self.slots, self.max_len)
        if self.w.mesh is None:
            self.cache = jax.device_put(self.cache, self.device)
        self.last = jax.device_put(jnp.zeros((self.slots, cfg.vocab_size), jnp.float32), self.device)

    def _admit(self) -> None:
        for i in range(self.slots):
            if self.active[i] is not None:
                continue
            with self.lock:
                handle = None
                while self.waiting and handle is None:
                    handle = self.waiting.popleft()
                    if handle.cancelled.is_set():
                        self.stats["cancelled"] += 1
                        handle = None
            if handle is None:
                return
            self._admit_one(handle, i)

    def _put(self, x):
        return jax.device_put(x, self.device)

    def _admit_one(self, handle: Handle, i: int) -> None:
        """Prefill a request's prompt into slot i (its last logits into row i of `last`):
        after the longest saved prefix it shares, if any; saved in turn for later prompts."""
        r = handle.request
        reused, saved = self.prefixes.lookup(r.prompt) if self.prefixes.capacity else (0, None)
        if not (reused and self._prefill_from(saved, r.prompt, reused, i)):
            width = _prefill_width(len(r.prompt), self.max_len)
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : len(r.prompt)] = r.prompt
            self.last, self.cache = _prefill(self.w, self.last, self.cache, self._put(tokens),
                                             self._put(np.asarray([len(r.prompt)], np.int32)), self._put(np.int32(i)))
        if self.prefixes.wants(r.prompt):
            self.prefixes.add(r.prompt, _save(self.w, self.cache, self._put(np.int32(i))))
        self.active[i] = _Slot(handle, position=len(r.prompt))
        h = self.host
        h["position"][i], h["step"][i], h["key"][i] = len(r.prompt), 0, decode.request_base(r.seed)
        h["temperature"][i], h["top_p"][i], h["active"][i] = r.temperature, r.top_p, 1
        self.rows = None

    def _prefill_from(self, saved: list, prompt: list[int], reused: int, i: int) -> bool:
        """Slot i from `saved` rows holding the first `reused` tokens of `prompt`, the rest
        prefilled after them. False (nothing done) where the padded rest would run past the
        cache's end."""
        rest = len(prompt) - reused
        width = _prefill_width(rest, self.max_len)
        if reused + width > self.max_len:
            return False
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :rest] = prompt[reused:]
        self.last, self.cache = _prefill_saved(self.w, self.last, self.cache, saved, self._put(tokens),
                                               self._put(np.int32(rest)), self._put(np.int32(reused)),
                                               self._put(np.int32(i)))
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens"] += reused
        return True

    def _launch(self, span: int | None = None, live: int | None = None):
        """Dispatch one step for the active slots; returns (its results, the slots it ran for)."""
        if self.rows is None:
            # copies: on a CPU the device array may share the numpy buffer, which the
            # lines below change while the step may still be reading it
            self.rows = jax.device_put({k: v.copy() for k, v in self.host.items()}, self.device)
        h = self.host
        if span is None:  # every active slot writes at its position and reads slots up to it
            span = decode.span_for(int((h["position"] * h["active"]).max()) + 1, self.max_len)
        if live is None:  # the slots up to the last active one (new requests take the lowest free slot)
            used = int(np.flatnonzero(h["active"])[-1]) + 1 if h["active"].any() else 1
            live = next(b for b in self.live_buckets if b >= used)
        out, self.last, self.cache, self.rows = _step(self.w, self.last, self.cache, self.rows, span=span, live=live)
        h["position"] += h["active"]
        h["step"] += h["active"]
        self.stats["steps"] += 1
        self.stats["slot_steps"] += live
        return out, list(self.active)

    def _collect(self, out, slots: list) -> None:
        """Hand a finished step's tokens to the requests it ran for (a slot that has changed
        hands since, or whose request was cancelled, gets nothing)."""
        res = np.asarray(out)
        for i, s in enumerate(slots):
            if s is None or self.active[i] is not s:
                continue
            if s.handle.cancelled.is_set():
                self._free(i, None)
                continue
            self.stats["tokens"] += 1
            self._take(i, s, int(res[0, i]), float(res[1, i]))

    def _take(self, i: int, s: _Slot, token: int, logp: float) -> None:
        r = s.handle.request
        if token in r.stop_ids:
            return self._finish(i, s, "stop", None, extra_tokens=1)
        s.ids.append(token)
        s.logprobs.append(logp)
        if not r.stream and not r.stop_text:  # nothing to look at before the end
            if len(s.ids) >= r.max_tokens:
                self._finish(i, s, "length", None)
            return
        text = self.decode_text(r.prompt, s.ids)
        cut = _find_stop(text, r.stop_text, s.sent)
        if cut is not None:
            return self._finish(i, s, "stop", cut)
        if len(s.ids) >= r.max_tokens:
            return self._finish(i, s, "length", len(text))
        safe = max(s.sent, _safe_length(text, r.stop_text))
        k = len(s.ids) if safe == len(text) else self._tokens_within(s, safe)
        s.handle.emit(Event(text=text[s.sent: safe], tokens=s.ids[s.tokens_sent: k],
                            logprobs=s.logprobs[s.tokens_sent: k]))
        s.sent, s.tokens_sent = safe, k

    def _tokens_within(self, s: _Slot, limit: int) -> int:
        """How many of the slot's tokens have all their text within `limit` characters of
        the answer (a token held back with text that may begin a stop string is not sent)."""
        prompt, k = s.handle.request.prompt, s.tokens_sent
        while k < len(s.ids) and len(self.decode_text(prompt, s.ids[: k + 1])) <= limit:
            k += 1
        return k

    def _tokens_before(self, s: _Slot, end: int) -> int:
        """How many of the slot's tokens begin before character `end` of the answer (the
        tokens of a stop string and after it are not part of the answer)."""
        prompt, k = s.handle.request.prompt, s.tokens_sent
        while k < len(s.ids) and len(self.decode_text(prompt, s.ids[:k])) < end:
            k += 1
        return k

    def _finish(self, i: int, s: _Slot, reason: str, end: int | None, extra_tokens: int = 0) -> None:
        """The last event: the rest of the text up to `end` (None: all), the tokens not yet
        sent that begin before `end` (with their log-probabilities), the usage (every token
        generated, those past a stop string too)."""
        text = self.decode_text(s.handle.request.prompt, s.ids)[:end]
        k = len(s.ids) if end is None or reason != "stop" else self._tokens_before(s, end)
        s.handle.emit(Event(text=text[s.sent:], tokens=s.ids[s.tokens_sent: k], logprobs=s.logprobs[s.tokens_sent: k],
                            finish=reason, prompt_tokens=len(s.handle.request.prompt),
                            completion_tokens=len(s.ids) + extra_tokens))
        self._free(i, reason)

    def _free(self, i: int, reason: str | None) -> None:
        self.active[i] = None
        self.host["active"][i] = 0
        self.rows = None
        with self.lock:
            self.stats["finished" if reason else "cancelled"] += 1


def _find_stop(text: str, stops: tuple[str, ...], since: int) -> int | None:
    """Where the first stop string starts in `text` (looking from a little before `since`), or None."""
    best = None
    for stop in stops:
        j = text.find(stop, max(0, since - len(stop)))
        if j >= 0 and (best is None or j < best):
            best = j
    return best


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent now: not a tail that may be the start of a stop string,
    nor a trailing replacement character (a UTF-8 sequence split across tokens)."""
    n = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, n), 0, -1):
            if text.endswith(stop[:k]):
                n = min(n, len(text) - k)
                break
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    return n
