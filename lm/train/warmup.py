"""Batch-size and sequence-length warm-up: the shape of each training step's batch.

Both are levers of the GPT-2 speedruns (README "Levers"), off by default, for the stages
that train on next-token rows (pretrain, SFT):

- `trainer.seq_warmup_steps` = S, `trainer.seq_warmup_start` = t0: during the first S
  steps each row of `data.seq_len` tokens is cut into pieces of t0 tokens, then 2 t0, ...
  (doubling, each length an equal share of the S steps), which train as rows of their own:
  the same tokens per step, shorter contexts (a piece's tokens attend only within it).
- `trainer.batch_warmup_steps` = S, `trainer.batch_warmup_start` = b0: during the first S
  steps only the first b0 rows of each batch train, then 2 b0, ... (doubling, in equal
  shares of the S steps); the other rows of those batches are skipped. Fewer tokens and
  less compute per early step; the data order, and so an exact resume, are unchanged.

The shape is a function of the step alone, so a resumed run takes the same shapes as one
that never stopped. Each shape is one more compiled program (compiled when first met).
"""

from __future__ import annotations

import numpy as np

from lm.config import Config, ConfigError


def stages(steps: int, start: int, full: int) -> list[tuple[int, int]]:
    """[(first step, value), ...]: start, 2 start, ... below `full`, each an equal share of
    `steps` steps, then `full` from step `steps` on."""
    if steps <= 0 or start >= full:
        return [(0, full)]
    values = []
    v = start
    while v < full:
        values.append(v)
        v *= 2
    out = [(round(i * steps / len(values)), v) for i, v in enumerate(values)]
    return out + [(steps, full)]


def value_at(plan: list[tuple[int, int]], step: int) -> int:
    value = plan[0][1]
    for first, v in plan:
        if step >= first:
            value = v
    return value


class Shapes:
    """The (rows, row length) of each step's batch, and the cut that makes it."""

    def __init__(self, cfg: Config):
        t, d = cfg.trainer, cfg.data
        self.full = (d.batch_size, d.seq_len)
        self.rows = stages(t.batch_warmup_steps, t.batch_warmup_start, d.batch_size)
        self.lengths = stages(t.seq_warmup_steps, t.seq_warmup_start, d.seq_len)

    @property
    def active(self) -> bool:
        return len(self.rows) > 1 or len(self.lengths) > 1

    def at(self, step: int) -> tuple[int, int]:
        """(rows of the batch that train, length of the pieces they are cut into) at `step`."""
        return value_at(self.rows, step), value_at(self.lengths, step)

    def describe(self, shape: tuple[int, int]) -> str:
        rows, length = shape
        return f"{rows} rows" + (f" cut into pieces of {length} tokens" if length < self.full[1] else "")

    def all(self) -> list[tuple[int, int]]:
        """The distinct shapes, in the order the steps meet them."""
        firsts = sorted({s for s, _ in self.rows} | {s for s, _ in self.lengths})
        return list(dict.fromkeys(self.at(s) for s in firsts))

    def check(self, shards: int, data_parallel: int, microbatches: int) -> None:
        """Each shape's rows must split over the data shards (at least one per process), and its
        pieces over the micro-batches times the data-parallel devices, as the full batch does."""
        for rows, length in self.all():
            pieces = rows * (self.full[1] // length)
            for what, n, count in ((f"the {shards} data shards (data.num_shards)", shards, rows),
                                   (f"trainer.microbatches={microbatches} x the {data_parallel} data-parallel "
                                    "devices", microbatches * data_parallel, pieces)):
                if count % n:
                    raise ConfigError(
                        f"the warm-up's batches of {rows} rows cut into pieces of {length} tokens ({pieces} "
                        f"rows) do not split over {what}: raise trainer.batch_warmup_start or "
                        "trainer.seq_warmup_start")

    def cut(self, local: dict, step: int, processes: int, shards: int) -> dict:
        """This process's batch at `step`: the first rows of each of its data shards' blocks
        (batch warm-up: the same rows whatever the number of processes), each cut into pieces
        (sequence warm-up). Keys without a token axis (a row's source) follow."""
        rows, length = self.at(step)
        b, t = self.full[0] // processes, self.full[1]
        blocks = shards // processes  # this process's rows: its shards' blocks, one after another
        keep = rows // shards  # rows kept of each block
        out = {}
        for k, v in local.items():
            v = np.asarray(v)
            if v.ndim == 0 or v.shape[0] != b:
                out[k] = v
                continue
            if keep * blocks < b:
                v = v.reshape(blocks, b // blocks, *v.shape[1:])[:, :keep].reshape(keep * blocks, *v.shape[1:])
            if v.ndim >= 2 and v.shape[1] == t and length < t:
                v = v.reshape(len(v) * (t // length), length, *v.shape[2:])
            out[k] = v
        return out

