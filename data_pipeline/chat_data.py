"""SFT batches: conversations rendered with the chat template, packed whole, loss on replies.

One road per source, as in pipeline.py: conversations (conversations.py) -> this shard's
share -> shuffle per epoch -> render (data_pipeline/chat.py: ids + 0/1 assistant mask) ->
fit to a row (truncate on a turn boundary, or drop) -> first-fit packing into rows of
T+1 tokens -> inputs, targets, segment ids, positions, loss mask. The sources' rows are
mixed by weight, batched and prefetched by the one core every kind of data shares
(`pipeline.Streams`): `chat_data` gives it this reading road, and `next_train`,
`get_state` and `set_state` (exact resume) are the core's.

Packing is always first-fit, never concatenate-and-split: a conversation is never cut
across rows (the second half would be trained without its context); rows are padded
where nothing else fits. The loss mask is packed alongside the tokens (a grain "meta"
sequence feature: same offsets as the tokens, no segment ids of its own).
"""

from __future__ import annotations

import json
from typing import Callable

import grain
import numpy as np

from data_pipeline import chat
from data_pipeline.config import DataConfig
from data_pipeline.conversations import open_chat_source
from data_pipeline.pipeline import DataStats, Layout, Streams, shard_documents
from data_pipeline.sources import DataError, DocumentSource, Record, source_configs
from data_pipeline.tokenizer import Tokenizer

__all__ = ["chat_data", "ChatStats", "RenderChat", "chat_rows", "fit_conversation", "to_sft_example"]

CHECK_RECORDS = 64  # records of each source rendered up front: one must be usable
# Rendering is Python work on local files: a few reader threads and a short read-ahead do
# not slow it down, and keep restarts (set_state) and GIL contention cheap.
READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


class ChatStats(DataStats):
    """DataStats plus a count of conversations cut to fit a row (not errors, reported apart)."""

    def __init__(self, names, keep: int = 5):
        super().__init__(names, keep)
        self.truncated = {n: 0 for n in names}

    def record_truncated(self, source: str) -> None:
        with self._lock:
            self.truncated[source] += 1

    def counters(self) -> dict[str, dict[str, int]]:
        """Counts logged with the training metrics (besides bad records)."""
        return {**super().counters(), "truncated": dict(self.truncated)}

    def report(self) -> str:
        lines = [super().report()] if self.total() else []
        lines += [f"source {n!r}: {k} conversation(s) longer than a row cut after their last whole turn that fits"
                  for n, k in self.truncated.items() if k]
        return "\n".join(lines)


class TooLong(ValueError):
    pass


def fit_conversation(tokenizer: Tokenizer, messages: list[dict], max_len: int,
                     long: str = "truncate", tools: list | None = None) -> tuple[list[int], list[int], int | None]:
    """Render `messages` in at most `max_len` tokens -> (ids, mask, assistant turns kept or None if whole).

    "truncate" keeps the longest prefix ending with a whole assistant turn (its <|end|>
    included) that fits; TooLong when not even the first reply fits, or with "drop".
    """
    ids, mask = chat.render(tokenizer, messages, tools=tools)
    if len(ids) <= max_len:
        return ids, mask, None
    if long != "truncate":
        raise TooLong(f"longer than the row ({len(ids)} tokens > {max_len})")
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    # Closing <|end|> tokens of replies that fit in the full render: the likely number of
    # replies kept. Re-render the prefix (so the template decides what a prefix looks
    # like) and step back while it is still too long.
    end = chat.chat_token_ids(tokenizer)["end"]
    fits = sum(1 for i in range(max_len) if ids[i] == end and mask[i])
    for n in range(min(fits, len(replies) - 1), 0, -1):
        ids, mask = chat.render(tokenizer, messages[: replies[n - 1] + 1], tools=tools)
        if len(ids) <= max_len:
            return ids, mask, n
    raise TooLong(f"longer than the row (its first reply needs more than {max_len} tokens)")


class Drops:
    """The unusable records of one source, as a rendering transform meets them: each is
    counted in `stats` (a bad one raises with `strict`; a too-long one never does: it is a
    length choice, not bad input), and more than `max_in_row` in a row raise, naming the
    source: on an endless repeat of a source with nothing usable, grain's filter would
    otherwise wait forever for a record."""

    def __init__(self, source: str, stats: DataStats | None, strict: bool, max_in_row: int | None, what: str,
                 fix: str):
        self.source, self.stats, self.strict, self.max_in_row, self.what, self.fix = (
            source, stats, strict, max_in_row, what, fix)
        self.in_row = 0

    def drop(self, record: Record, e: Exception, bad: bool = True) -> None:
        if self.strict and bad:
            raise DataError(f"source {self.source!r}: {record.where}: {e} "
                            "(data.strict=true; set it false to skip and count bad records)") from e
        if self.stats is not None:
            self.stats.record_bad(self.source, record.where, str(e))
        self.in_row += 1
        if self.max_in_row is not None and self.in_row > self.max_in_row:
            raise DataError(f"source {self.source!r}: {self.in_row} {self.what} in a row were unusable (more than "
                            f"an epoch of this shard); {self.fix}"
                            + (f"\n{self.stats.report()}" if self.stats else "")) from e

    def kept(self, truncated: bool) -> None:
        self.in_row = 0
        if truncated and self.stats is not None:
            self.stats.record_truncated(self.source)


class RenderChat(grain.transforms.Map):
    """Record -> {"tokens": int32 [n], "mask": int32 [n]} with n <= max_len; n = 0 for a dropped record.

    Bad records and conversations too long for a row are counted in `stats` (and a bad
    record raises with `strict`; a too-long one never does: it is a length choice, not bad
    input). `max_dropped_in_row` guards an infinite repeat of a source with nothing usable:
    grain's filter would wait forever for a record, so that many drops in a row raise.
    """

    def __init__(self, tokenizer_path: str, max_len: int, long: str, source: str,
                 stats: ChatStats | None, strict: bool, max_dropped_in_row: int | None = None):
        self.tokenizer_path, self.max_len, self.long = tokenizer_path, max_len, long
        self.drops = Drops(source, stats, strict, max_dropped_in_row, "conversations",
                           "fix the data or its chat_format")
        self._tok = None

    def map(self, record: Record):
        if self._tok is None:  # opened lazily: grain workers build their own
            self._tok = Tokenizer(self.tokenizer_path)
        try:
            if record.text is None:
                raise chat.ChatFormatError(record.error or "bad record")
            conv = json.loads(record.text)  # the messages, or {"messages", "tools"} (a record with tools)
            messages, tools = (conv["messages"], conv["tools"]) if isinstance(conv, dict) else (conv, None)
            ids, mask, kept = fit_conversation(self._tok, messages, self.max_len, self.long, tools=tools)
        except (chat.ChatFormatError, TooLong, json.JSONDecodeError) as e:
            self.drops.drop(record, e, bad=not isinstance(e, TooLong))
            return {"tokens": np.zeros((0,), np.int32), "mask": np.zeros((0,), np.int32)}
        self.drops.kept(kept is not None)
        return {"tokens": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.int32)}


def to_sft_example(row: dict, source_id: int = 0) -> dict:
    """A packed row of T+1 tokens -> inputs/targets [T]; the loss is on reply tokens only.

    Same keys and dtypes as pipeline.to_example. loss_mask[i] = mask[i+1] (target i+1 is a
    reply token or the <|end|> closing a reply) and target i+1 is in the conversation of
    input i (never predicted across conversations; padding has segment 0).
    """
    tokens, seg, pos, mask = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"], row["mask"]
    same_conv = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        "loss_mask": ((mask[1:] > 0) & same_conv).astype(np.float32),
        "source_id": np.int32(source_id),
    }


def chat_rows(docs: DocumentSource, tokenizer_path: str, seq_len: int, *, source: str = "chat",
              source_id: int = 0, seed: int = 0, shuffle: bool = True, repeat: bool = True,
              process_index: int = 0, process_count: int = 1, long: str = "truncate",
              stats: ChatStats | None = None, strict: bool = False, shuffle_rows: int = 0,
              num_packing_bins: int = 16) -> grain.IterDataset:
    """SFT examples (rows of `seq_len` inputs) of one conversation source, for one shard."""
    n = len(range(process_index, len(docs), process_count))  # records of this shard
    ds = shard_documents(docs, source, "conversations", seed, shuffle, repeat, process_index, process_count)
    # With one usable record per epoch, at most 2(n-1) drops come in a row (the end of one
    # epoch, the start of the next); the margin covers the prefetch threads' reordering.
    render = RenderChat(tokenizer_path, seq_len + 1, long, source, stats, strict,
                        max_dropped_in_row=2 * n + 64 if repeat else None)
    ds = ds.map(render).to_iter_dataset(READ).filter(lambda x: len(x["tokens"]) > 0)
    length = {"tokens": seq_len + 1, "mask": seq_len + 1}
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=length, meta_features=("mask",),
                                                    num_packing_bins=num_packing_bins, seed=seed,
                                                    shuffle_bins=shuffle)
    if shuffle and shuffle_rows > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_rows, seed=seed)
    return ds.map(lambda row: to_sft_example(row, source_id))


def check_usable(docs: DocumentSource, tokenizer: Tokenizer, max_len: int, long: str, name: str,
                 limit: int = CHECK_RECORDS) -> None:
    """Fail now, with the reasons, if none of up to `limit` records spread over `docs` is usable."""
    stats = ChatStats([name])
    render = RenderChat(tokenizer.path, max_len, long, name, stats, strict=False)
    render._tok = tokenizer
    for i in np.unique(np.linspace(0, len(docs) - 1, min(len(docs), limit)).astype(int)):
        if len(render.map(docs[int(i)])["tokens"]):
            return
    raise DataError(f"source {name!r}: none of the {stats.bad[name]} conversations checked is usable; "
                    f"check its paths and chat_format. {stats.report()}")


def chat_data(data: DataConfig, run_dir: str, *, tokenizer: Tokenizer, eval_batches: int = 16,
              log: Callable = print, process_index: int | None = None, process_count: int | None = None) -> Streams:
    """SFT training and held-out batches of one run, for this process (pipeline.Streams).

    `tokenizer` must have the chat control tokens (a pretraining run's tokenizer from
    data_pipeline.tokenizer.train_tokenizer has them). Every source must have kind "chat".
    `data.packing` is ignored: conversations are always packed first-fit.
    """
    d = data
    try:
        chat.chat_token_ids(tokenizer)  # an old tokenizer without role tokens fails here, in one line
    except chat.ChatFormatError as e:
        raise DataError(str(e)) from None
    layout = Layout.of(d, process_index, process_count)
    if d.corpus != "sources":
        raise DataError(f"SFT reads conversations: set data.corpus='sources' with sources of kind 'chat' "
                        f"(data.corpus is {d.corpus!r})")
    configs = source_configs(d)
    for c in configs:
        if c.kind != "chat":
            raise DataError(f"source {c.name!r} has kind {c.kind!r}; SFT reads conversations: set its "
                            "kind to 'chat' (and its chat_format, default 'auto')")
    names = [c.name for c in configs]
    stats = ChatStats(names)
    opened = [open_chat_source(c) for c in configs]
    for c, (train, _) in zip(configs, opened):
        if len(train) == 0:
            raise DataError(f"source {c.name!r}: no training conversations found")
        check_usable(train, tokenizer, d.seq_len + 1, d.long_conversations, c.name)

    def rows(docs, k: int, shard: int | None, num_shards: int):
        c = configs[k]
        if shard is None:
            return chat_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, shuffle=False,
                             repeat=False, long=d.long_conversations, strict=d.strict)
        return chat_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, seed=d.seed + 1000 * k,
                         stats=stats, shuffle_rows=d.shuffle_rows, process_index=shard, process_count=num_shards,
                         long=d.long_conversations, strict=d.strict)

    return Streams(d, layout, names=names, weights=[c.weight for c in configs], opened=opened, rows=rows,
                   stats=stats, tokenizer=tokenizer, eval_batches=eval_batches, log=log)
