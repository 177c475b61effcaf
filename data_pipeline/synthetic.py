"""Synthetic batches for tests and benchmarks (numpy only: no tokenizer, no grain)."""

from __future__ import annotations

from typing import Iterator

import numpy as np


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
            "source_id": np.zeros((batch_size,), np.int32),
        }


def packed_segment_ids(batch_size: int, seq_len: int, mean_doc: int, seed: int = 0) -> np.ndarray:
    """Segment ids (B, T) of rows packed with documents of random lengths (mean `mean_doc`),
    numbered from 1 in each row, as the packer writes them."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch_size, seq_len), np.int32)
    for row in seg:
        pos, doc = 0, 1
        while pos < seq_len:
            n = int(rng.integers(1, 2 * mean_doc))
            row[pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
    return seg
