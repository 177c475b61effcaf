"""From documents to global batches, through grain.

One straight road: documents -> (this process's share) -> shuffle per epoch -> read and
tokenize (BOS ... EOS) -> concatenate-and-split into rows of T+1 tokens -> inputs,
targets, segment ids, positions, loss mask -> batch -> prefetch -> global jax.Array.

Every stage is a grain dataset, so the iterator's position is a small state dict
(`iterator.get_state()`) that a checkpoint can store and `set_state` can restore.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from data_pipeline import default_corpus
from data_pipeline.tokenizer import Tokenizer, train_tokenizer


class DataError(ValueError):
    """Bad data configuration or input; the message names the input and the fix."""


# ---------------------------------------------------------------------------------------
# Sources


def corpus_documents(corpus: str, heldout_fraction: float):
    """(train, held-out) documents of a named corpus."""
    if corpus == "default":
        return default_corpus.split(heldout_fraction)
    raise DataError(f"unknown corpus {corpus!r}; available: 'default' (or 'synthetic' for tests)")


def _text(doc) -> str:
    return doc.text() if hasattr(doc, "text") else str(doc)


# ---------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_for_run(docs: Sequence, vocab_size: int, run_dir: str, path: str | None = None,
                      sample_mb: float = 4.0, seed: int = 0, log=print) -> Tokenizer:
    """Load the run's tokenizer, or train one on a sample of `docs` and store it in the run.

    The tokenizer's vocabulary must equal the model's: a mismatch fails here, before
    any training, with both numbers.
    """
    stored = os.path.join(run_dir, "tokenizer.model")
    if path is None and os.path.exists(stored):
        path = stored
    if path is not None:
        tok = Tokenizer(path)
    else:
        t0 = time.time()
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)

        def sample():
            budget = sample_mb * 1e6
            for i in order:
                text = _text(docs[i])
                if text:
                    yield text
                    budget -= len(text)
                    if budget <= 0:
                        return

        tok = train_tokenizer(sample(), vocab_size, os.path.join(run_dir, "tokenizer"))
        log(f"trained a {vocab_size}-piece BPE tokenizer on {sample_mb:g} MB in "
            f"{time.time() - t0:.1f}s -> {tok.path}")
    if tok.vocab_size != vocab_size:
        raise DataError(
            f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
            f"use --set model.vocab_size={tok.vocab_size} or another tokenizer")
    return tok


# ---------------------------------------------------------------------------------------
# Pipeline stages


class Tokenize(grain.transforms.Map):
    """Document -> {"tokens": int32 [BOS, ..., EOS]} (empty documents give no tokens)."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path
        self._tok = None

    def map(self, doc):
        if self._tok is None:  # opened lazily: grain workers build their own
            self._tok = Tokenizer(self.tokenizer_path)
        text = _text(doc)
        ids = self._tok.encode(text, bos=True, eos=True) if text.strip() else []
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def to_example(row: dict) -> dict:
    """A packed row of T+1 tokens -> next-token inputs/targets with document masking."""
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[1:] != 0)  # never predict across documents
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        "loss_mask": same_doc.astype(np.float32),
    }


def packed_dataset(docs: Sequence, tokenizer_path: str, seq_len: int, batch_size: int, *,
                   seed: int, shuffle: bool, repeat: bool, process_index: int = 0,
                   process_count: int = 1, prefetch: int = 0) -> grain.IterDataset:
    """Batches of `batch_size` packed rows for this process (its share of the documents)."""
    if not docs:
        raise DataError("no documents to read: the corpus (or its held-out split) is empty")
    ds = grain.MapDataset.source(list(docs))
    if process_count > 1:
        ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)  # a new shuffle every epoch
    ds = ds.map(Tokenize(tokenizer_path)).to_iter_dataset()
    ds = ds.filter(lambda x: len(x["tokens"]) > 2)
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    ds = ds.map(to_example).batch(batch_size, drop_remainder=True)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def synthetic_batches(vocab_size: int, seq_len: int, batch_size: int, seed: int = 0) -> Iterator[dict]:
    """Random-token batches with a learnable pattern (for tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(4, vocab_size, size=(batch_size, 1))
        step = rng.integers(1, 4, size=(batch_size, 1))
        tokens = (4 + (start + step * np.arange(seq_len + 1)) % (vocab_size - 4)).astype(np.int32)
        yield {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch_size, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
            "loss_mask": np.ones((batch_size, seq_len), np.float32),
        }


def global_batch(local: dict, shardings: dict) -> dict:
    """Assemble this process's rows into global jax.Arrays sharded for training."""
    import jax

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
