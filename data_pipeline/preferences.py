"""Preference pairs for reward models and DPO: (prompt, chosen reply, rejected reply).

Record layouts (`SourceConfig.chat_format` of a `kind="preference"` source; "auto"
detects the layout per record):
- hh: Anthropic HH-RLHF, `chosen` and `rejected` transcripts ("\\n\\nHuman: ...\\n\\n
  Assistant: ...") that share everything but the last assistant turn;
- sharegpt: `conversations` [{from, value}] (the prompt) with `chosen` and `rejected`
  {from: gpt, value} (LLaMA-Factory's preference layout, e.g. dpo_en_demo.json);
- prompt: `prompt` (a string, or a list of messages) with `chosen` and `rejected` (a
  string, or a list holding one assistant message): TRL's layout.

A pair is rendered with the chat template (data_pipeline/chat.py): the prompt's turns,
then the reply and its <|end|>. Each pair is one example of two rows, chosen first:
`inputs` (2, T) the rendered ids padded with 0, `targets` the next ids, `loss_mask` 1 on
the targets that are reply tokens (the reply's own tokens and its <|end|>), `segment_ids`
1 on real tokens and 0 on padding, `positions`. A reward is read at the last real token
(the <|end|> of the reply). A pair longer than T is cut at the end of its replies (and
counted as truncated); one whose prompt leaves fewer than 2 reply tokens is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Sequence

import grain
import numpy as np

from data_pipeline import chat, jsonl
from data_pipeline.chat_data import READ, ChatStats, Drops
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.conversations import ConversationSource, _sharegpt, _text
from data_pipeline.pipeline import DataStats, Layout, Streams, shard_documents
from data_pipeline.sources import DataError, DocumentSource, Record, expand, open_split, source_configs
from data_pipeline.tokenizer import Tokenizer

FORMATS = ("auto", "hh", "sharegpt", "prompt")
CHECK_RECORDS = 64
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_messages(transcript: str) -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b ..." -> [{"role": "user", "content": "a"}, ...]."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]


def _reply(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("value", value.get("content")), str):
        return value.get("value", value.get("content"))
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return _reply(value[0], key)
    raise ValueError(f"field {key!r} must be a string or one assistant message")


def detect_format(record: dict) -> str:
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"not a preference pair (keys {sorted(record)[:6]}; expected chosen and rejected)")
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record:
        return "prompt"
    return "hh"


def to_pair(record: dict, fmt: str = "auto", system_prompt: str = "") -> dict:
    """One JSON record -> {"prompt": messages, "chosen": str, "rejected": str} (ValueError if bad)."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, not an object")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "hh":
        chosen, rejected = hh_messages(_text(record, "chosen")), hh_messages(_text(record, "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected transcripts differ before their last turn")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("a transcript does not end with an assistant turn")
        prompt, c, r = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    elif fmt == "sharegpt":
        prompt, c, r = _sharegpt(record), _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    elif fmt == "prompt":
        p = record.get("prompt")
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        c, r = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    else:
        raise ValueError(f"unknown preference format {fmt!r} (choose one of {', '.join(FORMATS)})")
    system = record.get("system") if isinstance(record.get("system"), str) else system_prompt
    if system and not any(m.get("role") == "system" for m in prompt if isinstance(m, dict)):
        prompt = [{"role": "system", "content": system}] + list(prompt)
    if not c.strip() or not r.strip():
        raise ValueError("empty chosen or rejected reply")
    prompt = chat.validate_messages(prompt)
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    return {"prompt": prompt, "chosen": c, "rejected": r}


class PreferenceSource(ConversationSource):
    """Preference pairs in JSON Lines or JSON array files; `src[i]` is a Record whose text
    is the JSON of `to_pair`'s result (or a bad Record with the reason)."""

    def __getitem__(self, i: int) -> Record:
        obj, where, error = self._raw(i)
        if error is not None:
            return Record(None, where, error)
        try:
            pair = to_pair(obj, self.fmt, self.system_prompt)
        except (ValueError, chat.ChatFormatError) as e:
            return Record(None, where, str(e))
        return Record(json.dumps(pair, ensure_ascii=False), where)


def open_preference_source(cfg: SourceConfig) -> tuple[PreferenceSource, object]:
    if cfg.kind != "preference":
        raise DataError(f"source {cfg.name!r} has kind {cfg.kind!r}; reward models and DPO read preference "
                        "pairs: set its kind to 'preference' (and chat_format: auto, hh, sharegpt or prompt)")
    if not cfg.paths:
        raise DataError(f"source {cfg.name!r}: no paths given")
    if cfg.chat_format not in FORMATS:
        raise DataError(f"source {cfg.name!r}: chat_format {cfg.chat_format!r} is not a preference layout; "
                        f"choose one of {', '.join(FORMATS)}")
    return open_split(cfg, lambda patterns: PreferenceSource(expand(patterns), cfg.chat_format, cfg.system_prompt))


def render_pair(tokenizer: Tokenizer, pair: dict, seq_len: int) -> tuple[dict, bool]:
    """A pair -> (example of two rows of `seq_len`, truncated?). ValueError if it cannot fit."""
    prompt = chat.generation_prompt(tokenizer, pair["prompt"])
    if len(prompt) > seq_len - 2:
        raise ValueError(f"the prompt alone is too long for rows of {seq_len} tokens")  # no count: reasons group
    rows, cut = [], False
    for reply in (pair["chosen"], pair["rejected"]):
        ids, mask = chat.render(tokenizer, pair["prompt"] + [{"role": "assistant", "content": reply}])
        if ids[:len(prompt)] != prompt:
            raise ValueError("the chat template rendered the prompt differently inside the conversation")
        mask = [0] * len(prompt) + mask[len(prompt):]  # the last reply only
        if len(ids) > seq_len:
            ids, mask, cut = ids[:seq_len], mask[:seq_len], True
        rows.append((ids, mask))
    out = {k: np.zeros((2, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((2, seq_len), np.float32)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids)
        out["inputs"][r, :n] = ids
        out["targets"][r, :n - 1] = ids[1:]
        out["loss_mask"][r, :n - 1] = mask[1:]
        out["segment_ids"][r, :n] = 1
        out["positions"][r, :n] = np.arange(n)
    return out, cut


class PairStats(ChatStats):
    def report(self) -> str:
        lines = [DataStats.report(self)] if self.total() else []
        lines += [f"source {n!r}: {k} pair(s) longer than a row, cut at the row's end" for n, k in self.truncated.items() if k]
        return "\n".join(lines)


class RenderPair(grain.transforms.Map):
    """Record -> pair example (or an empty marker for a bad or unusable record, counted)."""

    def __init__(self, tokenizer_path: str, seq_len: int, source: str, source_id: int, stats: ChatStats | None,
                 strict: bool, max_dropped_in_row: int | None = None):
        self.tokenizer_path, self.seq_len, self.source_id = tokenizer_path, seq_len, source_id
        self.drops = Drops(source, stats, strict, max_dropped_in_row, "pairs", "fix the data or its chat_format")
        self._tok = None

    def map(self, record: Record):
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        try:
            if record.text is None:
                raise ValueError(record.error or "bad record")
            example, cut = render_pair(self._tok, json.loads(record.text), self.seq_len)
        except (ValueError, chat.ChatFormatError) as e:
            self.drops.drop(record, e)
            return {"empty": True}
        self.drops.kept(cut)
        example["source_id"] = np.int32(self.source_id)
        return example


def pair_rows(docs: DocumentSource, tokenizer_path: str, seq_len: int, *, source: str, source_id: int = 0,
              seed: int = 0, shuffle: bool = True, repeat: bool = True, process_index: int = 0,
              process_count: int = 1, stats: ChatStats | None = None, strict: bool = False) -> grain.IterDataset:
    n = len(range(process_index, len(docs), process_count))
    ds = shard_documents(docs, source, "pairs", seed, shuffle, repeat, process_index, process_count)
    render = RenderPair(tokenizer_path, seq_len, source, source_id, stats, strict,
                        max_dropped_in_row=2 * n + 64 if repeat else None)
    return ds.map(render).to_iter_dataset(READ).filter(lambda x: "empty" not in x)


def check_usable(docs: DocumentSource, tokenizer: Tokenizer, seq_len: int, name: str) -> float:
    """Fail now, with the reasons, if none of up to CHECK_RECORDS pairs spread over `docs` is
    usable; else the share of the usable ones whose chosen and rejected replies are the same
    (such a pair teaches nothing)."""
    stats = PairStats([name])
    render = RenderPair(tokenizer.path, seq_len, name, 0, stats, strict=False)
    render._tok = tokenizer
    usable = same = 0
    for i in np.unique(np.linspace(0, len(docs) - 1, min(len(docs), CHECK_RECORDS)).astype(int)):
        ex = render.map(docs[int(i)])
        if "empty" not in ex:
            usable += 1
            same += bool(np.array_equal(ex["inputs"][0], ex["inputs"][1]))
    if not usable:
        raise DataError(f"source {name!r}: none of the {stats.bad[name]} preference pairs checked is usable; "
                        f"check its paths and chat_format. {stats.report()}")
    return same / usable


def preference_data(data: DataConfig, run_dir: str, *, tokenizer: Tokenizer, eval_batches: int = 16,
                    log: Callable = print, process_index: int | None = None,
                    process_count: int | None = None) -> Streams:
    """Preference-pair training and held-out batches of one run (pipeline.Streams): arrays
    (B, 2, T), chosen then rejected. Sources must have kind "preference"."""
    d = data
    try:
        chat.chat_token_ids(tokenizer)
    except chat.ChatFormatError as e:
        raise DataError(str(e)) from None
    layout = Layout.of(d, process_index, process_count)
    if d.corpus != "sources":
        raise DataError(f"preference training reads pairs: set data.corpus='sources' with sources of kind "
                        f"'preference' (data.corpus is {d.corpus!r})")
    configs = source_configs(d)
    names = [c.name for c in configs]
    stats = PairStats(names)
    opened = [open_preference_source(c) for c in configs]
    for c, (train, _) in zip(configs, opened):
        if len(train) == 0:
            raise DataError(f"source {c.name!r}: no training pairs found")
        same = check_usable(train, tokenizer, d.seq_len, c.name)
        if same >= 0.5:
            log(f"WARNING: source {c.name!r}: in {same:.0%} of the pairs checked the chosen and the rejected "
                "reply are the same (within the rows' length): such pairs teach nothing; check the data")

    def rows(docs, k: int, shard: int | None, num_shards: int):
        c = configs[k]
        if shard is None:
            return pair_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, shuffle=False,
                             repeat=False, strict=d.strict)
        return pair_rows(docs, tokenizer.path, d.seq_len, source=c.name, source_id=k, seed=d.seed + 1000 * k,
                         stats=stats, process_index=shard, process_count=num_shards, strict=d.strict)

    return Streams(d, layout, names=names, weights=[c.weight for c in configs], opened=opened, rows=rows,
                   stats=stats, tokenizer=tokenizer, eval_batches=eval_batches, log=log)


def write_jsonl(path: str, pairs: Sequence[dict]) -> str:
    """Write pairs ({"prompt", "chosen", "rejected"}) as JSON Lines (the "prompt" layout)."""
    return jsonl.write_jsonl(path, pairs)
