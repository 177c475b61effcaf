"""Configuration of the data pipeline: one corpus (`SourceConfig`) and a run's data (`DataConfig`).

These live with the data pipeline, its ground floor: `data_pipeline` never imports `lm`;
`lm.config.Config` holds a `DataConfig` and re-exports both classes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

# The optional folder of public data sets beside the repository (../shared/data), or LM_DATA.
# Nothing needs it: experiments and tasks that read it say so when it is absent.
SHARED_DATA = os.environ.get("LM_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                     "shared", "data"))


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One corpus of a data mixture (see data_pipeline/sources.py for the kinds)."""

    name: str
    # "chat": JSON Lines or a JSON array of conversations (SFT; see data_pipeline/conversations.py)
    # "preference": (prompt, chosen, rejected) pairs (reward models, DPO; data_pipeline/preferences.py)
    kind: Literal["default", "text", "jsonl", "json", "parquet", "arrayrecord", "tfds", "chat", "preference"] = "text"
    paths: tuple[str, ...] = ()  # globs
    weight: float = 1.0  # share of training tokens (normalised over the sources)
    text_field: str = "text"  # jsonl/json/parquet/arrayrecord/tfds: the field with the text
    doc_per: Literal["file", "block", "line"] = "file"  # text files: a document per ...
    validation_paths: tuple[str, ...] = ()  # explicit validation split (else heldout_fraction)
    heldout_fraction: float = 0.01  # documents held out by a hash of their location
    # "hash": documents held out by a hash of their location; "tail" (text files): the last
    # heldout_fraction of every file's bytes (nanoGPT's split: later plays of Shakespeare)
    heldout_split: Literal["hash", "tail"] = "hash"
    # kind="chat": the record layout; "auto" detects it per record. alpaca: instruction/input/output;
    # messages: [{role, content}] (OpenAI style); sharegpt: conversations [{from, value}];
    # lima: conversations as a list of alternating user/assistant strings
    # kind="preference": auto, hh (HH-RLHF transcripts), sharegpt (conversations + chosen/rejected), prompt (TRL)
    chat_format: Literal["auto", "alpaca", "messages", "sharegpt", "lima", "hh", "prompt"] = "auto"
    system_prompt: str = ""  # kind="chat": a system message for conversations that have none ("": none)
    tfds_name: str = ""  # e.g. "wikipedia/20230601.en"
    tfds_split: str = "train"
    tfds_data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "default": the embedded default corpus; "synthetic": random patterns (tests);
    # "sources": the weighted mixture in `sources`.
    corpus: Literal["default", "synthetic", "sources"] = "default"
    sources: tuple[SourceConfig, ...] = ()
    packing: Literal["concat", "first_fit"] = "concat"  # concatenate-and-split, or first-fit bins
    shuffle_rows: int = 256  # packed rows are shuffled within a window of this many (0: off)
    # Documents longer than about this many tokens are cut into pieces of that size before the
    # document-level shuffle, so a batch samples the whole corpus (-1: seq_len; 0: never cut)
    chunk_tokens: int = -1
    strict: bool = False  # a bad record (malformed line, bad UTF-8, ...) raises instead of being counted
    seq_len: int = 256  # T
    batch_size: int = 8  # global batch, in sequences
    heldout_fraction: float = 0.02  # documents kept out of training, chosen by hash
    tokenizer: str | None = None  # path to a SentencePiece .model; None trains one
    cache_dir: str | None = None  # read the pre-tokenised cache here (`lm data cache` builds it)
    tokenizer_sample_mb: float = 4.0  # text used to train the tokenizer
    tool_tokens: bool = False  # a tokenizer trained here reserves the tool-use tokens (data_pipeline/chat.py)
    num_shards: int = 0  # logical data shards (0: one per process); fixes the data order across process counts
    num_workers: int = 0  # grain worker processes per shard (0: in the main process)
    prefetch: int = 4  # batches prepared ahead in a background thread
    seed: int = 0
    # SFT: a conversation longer than a row is cut after its last whole turn that fits
    # ("truncate") or left out ("drop"); either way it is counted
    long_conversations: Literal["truncate", "drop"] = "truncate"
