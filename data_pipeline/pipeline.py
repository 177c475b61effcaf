"""From documents to global batches, through grain.

One straight road per source: documents -> pieces of about a row each -> (this process's
share) -> shuffle per epoch -> read and tokenize (BOS ... EOS) -> pack into rows of T+1
tokens (concatenate-and-split or first-fit) -> inputs, targets, segment ids, positions,
loss mask. The sources' rows are then mixed by weight (deterministic given the seed),
batched, prefetched in a background thread, and assembled into global jax.Arrays.

Long documents are cut into row-sized pieces *before* the shuffle (`data.chunk_tokens`,
sources.Pieces): a standard-library file can fill hundreds of rows, and shuffled whole it
would fill many consecutive batches by itself (the training loss then swings with the
document at hand). Cut first, every batch is a sample of the whole corpus. A piece is a
segment of its own (attention and targets never cross it); only a document's first
piece starts with BOS and only its last ends with EOS. Each row carries the document of
each of its segments (`doc_ids`), and `Streams.metrics()` reports how many distinct
documents a batch holds and the largest share of its tokens one document supplies.

Every stage is a grain dataset, so the iterator's position is a small dict
(`Streams.get_state()`) that a checkpoint stores; after `set_state` the next batch is
bit-identical to the one an uninterrupted run would have seen. The state is tied to the
number of processes: each process reads documents `process_index::process_count` of
every source, so resuming with another process count restarts the data order (the
checkpoint issue handles that case explicitly).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Protocol, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from data_pipeline.cache import TokenCache
from data_pipeline.config import DataConfig
from data_pipeline.sources import DataError, DocumentSource, Pieces, Record, open_source, source_configs
from data_pipeline.synthetic import synthetic_batches
from data_pipeline.tokenizer import Tokenizer, tokenizer_for_run

__all__ = ["DataError", "DataSource", "Layout", "Streams", "SyntheticData", "batch_diversity", "global_batch",
           "synthetic_batches", "text_data", "unigram_entropy"]


# ---------------------------------------------------------------------------------------
# Bad records: counted per source, reported with their first few locations


class DataStats:
    """Thread-safe counts of distinct bad records per source, with the first few locations."""

    def __init__(self, names: Sequence[str], keep: int = 5):
        self.names = list(names)
        self.keep = keep
        self.bad = {n: 0 for n in names}
        self.examples: dict[str, list[str]] = {n: [] for n in names}
        self.reasons: dict[str, dict[str, int]] = {n: {} for n in names}
        self.long: dict[str, int] = {}
        self._lock = threading.Lock()

    # Picklable for grain's worker processes. Caveat: with data.num_workers > 0 the counts
    # are made in the workers and are not reported by the main process (0 workers, the
    # default, reports them; data.strict turns them into errors either way).
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def record_bad(self, source: str, where: str, error: str) -> None:
        """Count a bad record once, however many times it is read (every epoch reads it)."""
        with self._lock:
            seen = self.__dict__.setdefault("_seen", {}).setdefault(source, set())
            if where in seen:
                return
            seen.add(where)
            self.bad[source] += 1
            reason = error.split(" (")[0]
            self.reasons[source][reason] = self.reasons[source].get(reason, 0) + 1
            if len(self.examples[source]) < self.keep:
                self.examples[source].append(f"{where}: {error}")

    def total(self) -> int:
        return sum(self.bad.values())

    def record_long(self, source: str) -> None:
        """A document long enough to be tokenized in pieces (not an error; counted)."""
        with self._lock:
            self.long[source] = self.long.get(source, 0) + 1

    def counters(self) -> dict[str, dict[str, int]]:
        """Counts logged with the training metrics (besides bad records)."""
        return {"long_documents": dict(self.long)}

    def report(self) -> str:
        lines = []
        for n in self.names:
            if self.bad[n]:
                kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons[n].items()))
                lines.append(f"source {n!r}: {self.bad[n]} bad record(s) skipped ({kinds}); first: "
                             + "; ".join(self.examples[n]))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Stages


# SentencePiece needs hundreds of bytes of memory per character of the string it encodes:
# a document longer than this is encoded in pieces cut at line or space boundaries (each
# piece gets SentencePiece's dummy-prefix space, so a cut may add one token: negligible
# in a document this long, and memory stays bounded).
MAX_PIECE_CHARS = 1 << 18


def split_text(text: str, size: int):
    """Pieces of at most `size` characters, cut after a newline or a space where there is one."""
    start = 0
    while start < len(text):
        stop = min(start + size, len(text))
        if stop < len(text):
            cut = max(text.rfind("\n", start, stop), text.rfind(" ", start, stop))
            stop = cut + 1 if cut > start else stop
        yield text[start:stop]
        start = stop


class Tokenize(grain.transforms.Map):
    """Record -> {"tokens": int32 [BOS, ..., EOS]}; a bad record gives no tokens (and is counted).

    `max_bad_in_row` guards an endless repeat of a source with nothing usable (grain's
    filter would wait for a good record forever): that many bad records in a row raise."""

    def __init__(self, tokenizer_path: str, source: str, stats: DataStats | None, strict: bool,
                 max_bad_in_row: int | None = None):
        self.tokenizer_path, self.source, self.stats, self.strict = tokenizer_path, source, stats, strict
        self.max_bad_in_row, self._bad_in_row = max_bad_in_row, 0
        self._tok = None

    def map(self, record: Record):
        out = self._tokens(record)
        # the document (1-based: 0 pads), a meta feature of the packed rows
        return {"tokens": out, "doc": np.int32(record.doc + 1)}

    def _tokens(self, record: Record) -> np.ndarray:
        if record.tokens is not None:  # pre-tokenised (data_pipeline/cache.py)
            return np.asarray(record.tokens, np.int32)
        if self._tok is None:  # opened lazily: grain workers build their own
            self._tok = Tokenizer(self.tokenizer_path)
        if record.text is None:
            if self.strict:
                raise DataError(f"source {self.source!r}: {record.where}: {record.error} "
                                "(data.strict=true; set it false to skip and count bad records)")
            if self.stats is not None:
                self.stats.record_bad(self.source, record.where, record.error or "bad record")
            self._bad_in_row += 1
            if self.max_bad_in_row is not None and self._bad_in_row > self.max_bad_in_row:
                raise DataError(f"source {self.source!r}: {self._bad_in_row} records in a row were unusable (more "
                                "than an epoch of this shard); fix the source's paths, kind or text_field"
                                + (f": {self.stats.report()}" if self.stats else ""))
            return np.zeros((0,), np.int32)
        self._bad_in_row = 0
        if len(record.text) > MAX_PIECE_CHARS:  # a huge document: encoded piece by piece (bounded memory)
            if self.stats is not None:
                self.stats.record_long(self.source)
            # each piece's ids become int32 at once: a Python list of all of them would take
            # ~50 bytes per token (2.6 GB for a 50 MB line), int32 arrays take 4
            parts = [np.asarray([self._tok.bos_id] if record.bos else [], np.int32)]
            for piece in split_text(record.text, MAX_PIECE_CHARS):
                parts.append(np.asarray(self._tok.encode(piece), np.int32))
            parts.append(np.asarray([self._tok.eos_id] if record.eos else [], np.int32))
            return np.concatenate(parts)
        return np.asarray(self._tok.encode(record.text, bos=record.bos, eos=record.eos), np.int32)


class SplitLong(grain.experimental.FlatMapTransform):
    """Cut documents longer than a row into row-sized pieces (before first-fit packing)."""

    def __init__(self, length: int, max_fan_out: int = 4096):
        self.length = length
        self.max_fan_out = max_fan_out

    def flat_map(self, element):
        t = element["tokens"]
        return [{**element, "tokens": t[i: i + self.length]} for i in range(0, max(len(t), 1), self.length)]


def chars_per_token(docs: DocumentSource, tokenizer: Tokenizer, limit: int = 64, max_chars: int = 20_000) -> float:
    """Characters per token of up to `limit` documents spread over `docs` (the first
    `max_chars` of each): how many characters make a piece of `chunk_tokens` tokens."""
    chars = tokens = 0
    for i in np.unique(np.linspace(0, len(docs) - 1, min(len(docs), limit)).astype(int)):
        text = docs[int(i)].text
        if text:
            chars += len(text[:max_chars])
            tokens += len(tokenizer.encode(text[:max_chars]))
    return chars / tokens if tokens else 4.0


def check_usable(docs: DocumentSource, name: str, limit: int = 64) -> None:
    """Fail now, with the reasons, if none of up to `limit` documents spread over `docs` has text."""
    stats = DataStats([name])
    for i in np.unique(np.linspace(0, len(docs) - 1, min(len(docs), limit)).astype(int)):
        rec = docs[int(i)]
        if rec.tokens is not None and len(rec.tokens) or (rec.text and rec.text.strip()):
            return
        stats.record_bad(name, rec.where, rec.error or "empty document")
    raise DataError(f"source {name!r}: none of the {stats.bad[name]} documents checked (spread over its "
                    f"{len(docs)}) has usable text; check its paths, kind and text_field. {stats.report()}")


def to_example(row: dict, source_id: int = 0) -> dict:
    """A packed row of T+1 tokens -> next-token inputs/targets with document masking.

    `doc_ids[k]` is the document (1-based, 0: none) of segment k + 1, where the row says."""
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[1:] != 0)  # never predict across documents (or pieces)
    out = {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        "loss_mask": same_doc.astype(np.float32),
        "source_id": np.int32(source_id),
    }
    if "doc" in row:
        out["doc_ids"] = np.asarray(row["doc"], np.int32)
    return out


def batch_diversity(batch: dict) -> tuple[int, float]:
    """(distinct documents in the batch, the largest share of its tokens one document supplies),
    counted over the tokens of its rows (a document is (source, doc id))."""
    seg, docs, src = batch["segment_ids"], batch["doc_ids"], batch["source_id"]
    rows = np.arange(len(seg))[:, None]
    doc = np.where(seg > 0, docs[rows, np.maximum(seg - 1, 0)], 0)  # the document of each token
    key = (src.astype(np.int64)[:, None] << 32) | doc.astype(np.int64)
    _, counts = np.unique(key[seg > 0], return_counts=True)
    if not len(counts):
        return 0, 0.0
    return len(counts), float(counts.max() / counts.sum())


def shard_documents(docs: DocumentSource, source: str, unit: str, seed: int, shuffle: bool, repeat: bool,
                    process_index: int, process_count: int) -> grain.MapDataset:
    """The records of one logical data shard (`process_index::process_count`), shuffled
    anew every epoch and repeated, as a grain MapDataset."""
    if len(docs) == 0:
        raise DataError(f"source {source!r} has no {unit} (or its split is empty)")
    ds = grain.MapDataset.source(docs)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"source {source!r} has fewer {unit} than data.num_shards={process_count}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)  # a new shuffle every epoch
    return ds


def packed_rows(docs: DocumentSource, tokenizer_path: str, seq_len: int, *, source: str = "default",
                source_id: int = 0, seed: int = 0, shuffle: bool = True, repeat: bool = True,
                process_index: int = 0, process_count: int = 1, packing: str = "concat",
                stats: DataStats | None = None, strict: bool = False,
                shuffle_rows: int = 0, chunk_tokens: int = 0, chars_per_token: float = 4.0) -> grain.IterDataset:
    """Examples (rows of `seq_len` tokens) of one source, for this process. `chunk_tokens` > 0
    cuts documents into pieces of about that many tokens before the shuffle (sources.Pieces)."""
    docs = Pieces(docs, chunk_tokens, chars_per_token)
    ds = shard_documents(docs, source, "documents", seed, shuffle, repeat, process_index, process_count)
    ds = ds.map(Tokenize(tokenizer_path, source, stats, strict, max_bad_in_row=2 * len(docs) + 64)).to_iter_dataset()
    ds = ds.filter(lambda x: len(x["tokens"]) > 2)
    # "doc" is a meta feature: packed as a list of the row's segments' documents, never split
    length = {"tokens": seq_len + 1, "doc": seq_len + 1}
    if packing == "first_fit":
        ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len + 1))
        ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=16, seed=seed,
                                                        shuffle_bins=shuffle, meta_features=("doc",))
    else:
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=length, meta_features=("doc",))
    if shuffle and shuffle_rows > 1:  # rows of one long document would otherwise come in a run
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_rows, seed=seed)
    return ds.map(lambda row: to_example(row, source_id))


def mixture(streams: Sequence[grain.IterDataset], weights: Sequence[float]) -> grain.IterDataset:
    """Rows drawn from the streams in proportion to `weights` (deterministic)."""
    if len(streams) == 1:
        return streams[0]
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise DataError(f"mixture weights must be non-negative and not all zero, got {list(weights)}")
    return grain.IterDataset.mix(list(streams), [w / total for w in weights])


# ---------------------------------------------------------------------------------------
# A run's data: one core (`Streams`) that every kind of data is built on


class DataSource(Protocol):
    """What the training loop reads (lm/train/loop.py): `Streams` (text, chat and preference
    data), `SyntheticData`, and the stages' own (RL rollouts, DPO's precomputed reference).

    `next_train()` is this process's rows of the next global batch (numpy, with a
    `source_id` per row); `heldout[name]` fixed held-out batches per source and
    `heldout_bytes[name]` the bytes of text behind their predicted tokens (bits per byte);
    `get_state()`/`set_state()` the position of the stream (a small JSON-able dict, stored
    with each checkpoint: after `set_state` the next batch is the one an uninterrupted run
    would have read); `metrics()` figures logged with the training metrics since the last
    call; `attach(ctx)` hands over the loop's context (data drawn from the current model,
    such as rollouts, reads its parameters there; other data ignores it)."""

    names: list[str]
    weights: list[float]
    stats: DataStats
    tokenizer: Tokenizer | None
    heldout: dict[str, list[dict]]
    heldout_bytes: dict[str, int]

    def next_train(self) -> dict: ...

    def get_state(self) -> dict | None: ...

    def set_state(self, state: dict) -> None: ...

    def metrics(self) -> dict: ...

    def attach(self, ctx: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which logical data shards and rows of the global batch this process owns.

    The stream is cut into `S = data.num_shards` logical shards (default: one per process).
    Shard s reads documents `s::S` of every source through its own pipeline and yields B/S
    rows per batch; the global batch is the shards' rows in shard order. A process owns
    shards `p::P`, so the global batches do not depend on the number of processes P (any P
    dividing S gives the same batches, bit for bit), and neither does the saved state."""

    num_shards: int
    shard_ids: tuple[int, ...]
    local_batch: int
    process_index: int
    process_count: int

    @classmethod
    def of(cls, d: DataConfig, process_index: int | None = None, process_count: int | None = None) -> "Layout":
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        shards = d.num_shards or pc
        if shards % pc or d.batch_size % shards:
            raise DataError(f"data.num_shards={shards} must be a multiple of the {pc} processes and divide "
                            f"data.batch_size={d.batch_size}; set --set data.num_shards=N accordingly")
        return cls(shards, tuple(range(pi, shards, pc)), d.batch_size // pc, pi, pc)


# rows(docs, k, shard, num_shards) -> source k's stream of examples from `docs` for one data
# shard; shard None: the held-out rows, in order, once
Rows = Callable[[DocumentSource, int, "int | None", int], grain.IterDataset]


class Streams:
    """Training and held-out batches of one run's sources, for this process: the one road
    every kind of data (text, chat, preference) takes after its own reading of a record.

    It owns what they share: the shard layout (`Layout`), one grain pipeline per shard (the
    sources' rows mixed by weight, batched, prefetched), the fixed held-out batches of each
    source, the iterator state a checkpoint stores, batch diversity, and the bad-record
    statistics (`stats`, filled by the reading stages). What differs between kinds is
    `rows`, the stream of examples of one source, and the sources opened by the builders
    (`text_data` below, `chat_data` in chat_data.py, `preference_data` in preferences.py).
    """

    def __init__(self, data: DataConfig, layout: Layout, *, names: Sequence[str], weights: Sequence[float],
                 opened: Sequence[tuple[DocumentSource, DocumentSource]], rows: Rows, stats: DataStats,
                 tokenizer: Tokenizer, eval_batches: int = 16, log: Callable = print):
        self.data, self.layout, self.tokenizer, self.stats = data, layout, tokenizer, stats
        self.names, self.weights = list(names), list(weights)
        self.vocab_size = tokenizer.vocab_size
        self._diversity: list[tuple[int, float]] = []
        self.datasets, self._iters = {}, {}
        for shard in layout.shard_ids:
            streams = [rows(train, k, shard, layout.num_shards) for k, (train, _) in enumerate(opened)]
            ds = mixture(streams, self.weights).batch(data.batch_size // layout.num_shards, drop_remainder=True)
            if data.num_workers:
                _absl_flags_parsed()  # grain's worker processes read absl flags
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
            if data.prefetch:
                ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch)
            self.datasets[shard] = ds
            self._iters[shard] = iter(ds)
        # Held-out batches: every process reads them whole and keeps its rows.
        self.heldout: dict[str, list[dict]] = {}
        self.heldout_bytes: dict[str, int] = {}
        byte_len = tokenizer.byte_lengths()
        lo = layout.process_index * layout.local_batch
        for k, (name, (_, val)) in enumerate(zip(self.names, opened)):
            if len(val) == 0:
                log(f"source {name!r} has nothing held out; it is not evaluated")
                continue
            batches = [_pad_batch(b, data.batch_size)
                       for b, _ in zip(rows(val, k, None, layout.num_shards).batch(data.batch_size),
                                       range(eval_batches))]
            if batches:
                self.heldout[name] = [{key: v[lo: lo + layout.local_batch] for key, v in b.items()} for b in batches]
                # bytes of text behind the predicted tokens, for bits per byte (global, every process)
                self.heldout_bytes[name] = int(sum((byte_len[b["targets"]] * (b["loss_mask"] > 0)).sum()
                                                   for b in batches))

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def local_batch(self) -> int:
        return self.layout.local_batch

    def next_train(self) -> dict:
        parts = [next(self._iters[s]) for s in sorted(self._iters)]
        batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if "doc_ids" in batch:
            self._diversity.append(batch_diversity(batch))
        return batch

    def metrics(self) -> dict:
        """Batch diversity since the last call (logged with the training metrics): distinct
        documents per batch of this process's rows, and the largest share of a batch's tokens
        that one document supplied (means over the batches)."""
        seen, self._diversity = self._diversity, []
        if not seen:
            return {}
        docs, top = np.asarray(seen, np.float64).T
        return {"batch_docs": float(docs.mean()), "batch_top_doc_share": float(top.mean())}

    def get_state(self) -> dict:
        """{"num_shards": S, "shards": {shard id: grain iterator state}} for this process's shards."""
        return {"num_shards": self.num_shards, "shards": {str(s): it.get_state() for s, it in self._iters.items()}}

    def set_state(self, state: dict) -> None:
        state = _tuples(state)  # JSON turned grain's tuples into lists; grain compares with tuples
        if state.get("num_shards") != self.num_shards:
            raise DataError(f"the saved data state has {state.get('num_shards')} shards but this run has "
                            f"{self.num_shards}; keep data.num_shards as it was when the state was saved")
        for s, it in self._iters.items():
            it.set_state(state["shards"][str(s)])

    def attach(self, ctx: Any) -> None:
        """Text, chat and preference data do not depend on the model."""


class SyntheticData:
    """`data.corpus="synthetic"`: random-token batches with a learnable pattern (tests and
    benchmarks), as a `DataSource`; its state is the count of batches read."""

    def __init__(self, data: DataConfig, layout: Layout, vocab_size: int, eval_batches: int = 16):
        self.data, self.layout, self.vocab_size = data, layout, vocab_size
        self.names, self.weights = ["synthetic"], [1.0]
        self.stats = DataStats(self.names)
        self.tokenizer = None
        self.heldout = {"synthetic": [b for b, _ in zip(self._batches(data.seed + 1), range(eval_batches))]}
        self.heldout_bytes: dict[str, int] = {}
        self._iter, self._consumed = self._batches(data.seed), 0

    def _batches(self, seed: int):
        lo, n = self.layout.process_index * self.layout.local_batch, self.layout.local_batch
        d = self.data
        return ({k: v[lo: lo + n] for k, v in b.items()}
                for b in synthetic_batches(self.vocab_size, d.seq_len, d.batch_size, seed))

    def next_train(self) -> dict:
        self._consumed += 1
        return next(self._iter)

    def metrics(self) -> dict:
        return {}

    def get_state(self) -> dict:
        return {"num_shards": self.layout.num_shards, "shards": {}, "synthetic_batches": self._consumed}

    def set_state(self, state: dict) -> None:  # the stream is regenerated and skipped
        self._iter, self._consumed = self._batches(self.data.seed), 0
        for _ in range(state.get("synthetic_batches", 0)):
            self.next_train()

    def attach(self, ctx: Any) -> None:
        """Synthetic data does not depend on the model."""


def text_data(data: DataConfig, run_dir: str, *, vocab_size: int, eval_batches: int = 16, log: Callable = print,
              process_index: int | None = None, process_count: int | None = None) -> Streams | SyntheticData:
    """Pretraining data: documents of every source, tokenized and packed into rows (or
    synthetic batches). The tokenizer is `data.tokenizer`, the cache's, the one stored in the
    run, or one trained on a sample of the sources (by process 0; the others read it)."""
    d = data
    layout = Layout.of(d, process_index, process_count)
    if d.corpus == "synthetic":
        return SyntheticData(d, layout, vocab_size, eval_batches)
    configs = source_configs(d)
    names, weights = [c.name for c in configs], [c.weight for c in configs]
    if d.cache_dir:  # pre-tokenised: the cache's tokenizer, token ids read by random access
        cached_tok = os.path.join(d.cache_dir, "tokenizer.model")
        if not d.tokenizer and not os.path.exists(cached_tok):
            raise DataError(f"no token cache at {d.cache_dir} (no tokenizer.model there); build it with "
                            "`lm data cache EXPERIMENT --set data.cache_dir=...`")
        tokenizer = tokenizer_for_run([], vocab_size, run_dir, d.tokenizer or cached_tok,
                                      store=layout.process_index == 0)
        opened = []
        for c in configs:
            val_dir = os.path.join(d.cache_dir, c.name, "validation")
            val = TokenCache(val_dir, tokenizer.path) if os.path.exists(val_dir) else []
            opened.append((TokenCache(os.path.join(d.cache_dir, c.name, "train"), tokenizer.path), val))
    else:
        opened = [open_source(c) for c in configs]
    for c, (train, val) in zip(configs, opened):
        if len(train) == 0:
            raise DataError(f"source {c.name!r}: no training documents found ({len(val)} held out); check its "
                            "paths, and heldout_fraction for a very small source")
        check_usable(train, c.name)
    if not d.cache_dir:
        tokenizer = _shared_tokenizer([(t, w) for (t, _), w in zip(opened, weights)], d, vocab_size, run_dir,
                                      layout, log)
    chunk = d.seq_len if d.chunk_tokens < 0 else d.chunk_tokens
    # characters per token of each source, to size its pieces (the cache counts tokens)
    cpt = [chars_per_token(train, tokenizer) if chunk and train.size_unit == "chars" else 4.0 for train, _ in opened]
    stats = DataStats(names)

    def rows(docs, k: int, shard: int | None, num_shards: int):
        c = configs[k]
        if shard is None:  # held out: whole documents, in order
            return packed_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, shuffle=False,
                               repeat=False, packing=d.packing, strict=d.strict)
        return packed_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, seed=d.seed + 1000 * k,
                           stats=stats, shuffle_rows=d.shuffle_rows, process_index=shard, process_count=num_shards,
                           packing=d.packing, strict=d.strict, chunk_tokens=chunk, chars_per_token=cpt[k])

    return Streams(d, layout, names=names, weights=weights, opened=opened, rows=rows, stats=stats,
                   tokenizer=tokenizer, eval_batches=eval_batches, log=log)


def _shared_tokenizer(sources, d: DataConfig, vocab_size: int, run_dir: str, layout: Layout, log) -> Tokenizer:
    """Process 0 loads or trains the run's tokenizer; the others read what it stored (a
    shared file system)."""
    if layout.process_index == 0:
        tok = tokenizer_for_run(sources, vocab_size, run_dir, d.tokenizer, d.tokenizer_sample_mb, d.seed, log,
                                tool_tokens=d.tool_tokens)
    if layout.process_count > 1:
        multihost_utils.sync_global_devices("tokenizer")
        if layout.process_index:
            tok = tokenizer_for_run(sources, vocab_size, run_dir, d.tokenizer or os.path.join(run_dir, "tokenizer.model"),
                                    store=False)
    return tok


def _tuples(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return tuple(_tuples(v) for v in obj)
    return obj


def _absl_flags_parsed() -> None:
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _pad_batch(b: dict, size: int) -> dict:
    """Pad a short final held-out batch with fully masked rows (every batch has `size` rows)."""
    n = len(b["inputs"])
    if n == size:
        return b
    return {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in b.items()}


def global_batch(local: dict, shardings: dict) -> dict:
    """Assemble this process's rows into global jax.Arrays sharded for training."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
            for k in shardings}


def unigram_entropy(batches: Sequence[dict]) -> float:
    """Entropy (nats/token) of the unigram distribution of the target tokens counted."""
    counts: dict[int, int] = {}
    for b in batches:
        t = np.asarray(b["targets"])[np.asarray(b["loss_mask"]) > 0]
        ids, n = np.unique(t, return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    total = sum(counts.values())
    if not total:
        return float("nan")
    p = np.asarray(list(counts.values()), dtype=np.float64) / total
    return float(-(p * np.log(p)).sum())
