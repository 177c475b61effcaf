"""Conversations for SFT: common JSON layouts -> a list of {"role", "content"} messages.

Layouts (`SourceConfig.chat_format`; "auto" detects the layout per record from its keys):
- alpaca: `instruction`, optional `input` (appended to the instruction after a blank
  line), `output`; optional `history` [[user, assistant], ...] of earlier turns (the
  LIMA conversion in LLaMA-Factory uses this) and optional `system`. Alpaca seed tasks
  (`instruction` + `instances: [{input, output}]`, no `output`) use their FIRST instance.
- messages: `messages` [{role, content}] with roles system/user/assistant (OpenAI / HF hub).
- sharegpt: `conversations` [{from, value}] with from human/user, gpt/assistant/chatgpt/
  bing/bard, system.
- lima: `conversations` as a list of plain strings alternating user, assistant, ...
Any layout may carry a top-level `system` string.

A record that does not make a valid conversation raises ValueError with a short reason;
`ConversationSource` turns that into a bad `Record` (counted by the pipeline).
"""

from __future__ import annotations

import json
from typing import Sequence

from data_pipeline.chat import validate_messages, validate_tools  # the chat format's rules
from data_pipeline.config import SourceConfig
from data_pipeline.sources import DataError, JsonLines, Record, _open_bytes, expand, open_split

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "lima")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def _text(obj: dict, key: str, required: bool = True) -> str:
    """A string field of a record ("" when optional and absent or null)."""
    if key not in obj or obj[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    if not isinstance(obj[key], str):
        raise ValueError(f"field {key!r} is {type(obj[key]).__name__}, not a string")
    return obj[key]


def _list(obj: dict, key: str) -> list:
    if not isinstance(obj.get(key), list):
        raise ValueError(f"missing field {key!r}" if key not in obj else
                         f"field {key!r} is {type(obj[key]).__name__}, not a list")
    return obj[key]


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        conv = record["conversations"]
        return "lima" if isinstance(conv, list) and conv and all(isinstance(m, str) for m in conv) else "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise ValueError(f"unknown conversation layout (keys {sorted(record)[:6]}; expected instruction/output, "
                     "messages or conversations)")


def _alpaca(r: dict) -> list[dict]:
    prompt, output = _text(r, "instruction"), _text(r, "output", required=False)
    inp = _text(r, "input", required=False)
    if "output" not in r and "instances" in r:  # Alpaca seed tasks: the first instance
        inst = _list(r, "instances")
        if not inst or not isinstance(inst[0], dict):
            raise ValueError("field 'instances' has no {input, output} object")
        inp, output = _text(inst[0], "input", required=False), _text(inst[0], "output")
    elif "output" not in r:
        raise ValueError("missing field 'output'")
    if inp.strip():
        prompt = f"{prompt}\n\n{inp}"
    msgs = []
    for turn in r.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError("field 'history' must be a list of [user, assistant] string pairs")
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _messages(r: dict) -> list[dict]:
    msgs = []
    for m in _list(r, "messages"):
        if not isinstance(m, dict):
            raise ValueError(f"a message is {type(m).__name__}, not an object")
        role = _text(m, "role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {role!r} (expected system, user, assistant or tool)")
        if role == "assistant" and m.get("tool_calls"):  # OpenAI's tool calls (content may be null)
            msgs.append({"role": role, "content": _text(m, "content", required=False) if m.get("content") is not None
                         else "", "tool_calls": m["tool_calls"]})
        else:
            msgs.append({"role": role, "content": _text(m, "content")})
    return msgs


def _sharegpt(r: dict) -> list[dict]:
    msgs = []
    for m in _list(r, "conversations"):
        if not isinstance(m, dict):
            raise ValueError(f"a turn is {type(m).__name__}, not an object")
        who = _text(m, "from")
        if who.lower() not in _SHAREGPT_ROLES:
            raise ValueError(f"unknown speaker {who!r} (expected human, gpt or system)")
        msgs.append({"role": _SHAREGPT_ROLES[who.lower()], "content": _text(m, "value")})
    return msgs


def _lima(r: dict) -> list[dict]:
    turns = _list(r, "conversations")
    if not all(isinstance(t, str) for t in turns):
        raise ValueError("field 'conversations' must be a list of strings")
    return [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]


_PARSERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt, "lima": _lima}


def to_messages(record: dict, fmt: str = "auto", system_prompt: str = "") -> list[dict]:
    """One JSON record -> [{"role", "content"}] (validated; ValueError with a short reason)."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, not an object")
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat_format {fmt!r} (choose one of {', '.join(FORMATS)})")
    msgs = _PARSERS[detect_format(record) if fmt == "auto" else fmt](record)
    system = _text(record, "system", required=False) or system_prompt
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    # Trailing user turns carry no loss (nothing answers them): leave them out.
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    if not msgs:
        raise ValueError("no assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") for m in msgs):
        raise ValueError("empty assistant reply")
    return validate_messages(msgs)


def record_tools(record: dict) -> list | None:
    """A record's tool definitions ("tools", as OpenAI and apply_chat_template take them), or None."""
    tools = record.get("tools") if isinstance(record, dict) else None
    return validate_tools(tools) if tools else None


class ConversationSource(JsonLines):
    """Conversations in JSON Lines (.jsonl, .gz, .bz2) or JSON array (.json) files.

    `src[i]` is a Record whose text is the JSON of the validated messages list (a plain,
    picklable record for grain), or text None with the reason for a bad record.
    Files are indexed exactly as JsonLines indexes them (random access for plain .jsonl).
    """

    def __init__(self, files: Sequence[str], fmt: str = "auto", system_prompt: str = ""):
        super().__init__(files)
        self.fmt, self.system_prompt = fmt, system_prompt

    def _raw(self, i: int) -> tuple[object, str, str | None]:
        """(parsed JSON object, where, error) of record i."""
        if i < len(self.index):
            fi, start, end, line = self.index[i]
            where = f"{self.files[fi]}:{line}"
            try:
                with _open_bytes(self.files[fi]) as f:
                    f.seek(start)
                    raw = f.read(end - start)
            except OSError as e:
                return None, where, f"unreadable file ({e.strerror or e})"
        else:
            raw, where = self.loaded[i - len(self.index)]
            if raw is None:  # a whole file that could not be read: "path:0 unreadable (...)"
                return None, where.split(" ", 1)[0], where.split(" ", 1)[-1]
            if not isinstance(raw, bytes):  # an item of a JSON array, already parsed
                return raw, where, None
        try:
            return json.loads(raw.decode("utf-8")), where, None
        except UnicodeDecodeError as e:
            return None, where, f"invalid UTF-8 ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            return None, where, f"malformed JSON ({e.msg})"

    def __getitem__(self, i: int) -> Record:
        obj, where, error = self._raw(i)
        if error is not None:
            return Record(None, where, error)
        try:
            msgs = to_messages(obj, self.fmt, self.system_prompt)
            tools = record_tools(obj)
        except ValueError as e:
            return Record(None, where, str(e))
        # with tool definitions: {"messages": ..., "tools": ...} (data_pipeline/chat_data.py reads both)
        return Record(json.dumps(msgs if tools is None else {"messages": msgs, "tools": tools}, ensure_ascii=False),
                      where)


def open_chat_source(cfg: SourceConfig) -> tuple[ConversationSource, object]:
    """(train, held-out) conversation sources: validation_paths, else the hash split."""
    if cfg.kind != "chat":
        raise DataError(f"source {cfg.name!r} has kind {cfg.kind!r}; SFT reads conversations: "
                        "set its kind to 'chat' (and chat_format, default 'auto')")
    if not cfg.paths:
        raise DataError(f"source {cfg.name!r}: no paths given")
    if cfg.chat_format not in FORMATS:
        raise DataError(f"source {cfg.name!r}: unknown chat_format {cfg.chat_format!r}; "
                        f"choose one of {', '.join(FORMATS)}")
    return open_split(cfg, lambda patterns: ConversationSource(expand(patterns), cfg.chat_format, cfg.system_prompt))
