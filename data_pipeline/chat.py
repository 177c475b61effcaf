"""The chat format: one token layout for SFT, and the same layout as a Hugging Face chat template.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`:
an optional system message first, then user and assistant turns alternating, starting with
user. It becomes these token ids (role tokens and <|end|> are the tokenizer's control
symbols, inserted by id; they are never produced by encoding text):

    BOS [<|system|> enc(system) <|end|>] (<|user|> enc(user) <|end|> <|assistant|> enc(answer) <|end|>)*

where `enc(text)` is the plain SentencePiece encoding of the content, exactly as `Tokenizer.encode`
gives it: with SentencePiece's dummy prefix, so "Hi" -> "▁Hi", a content starts the way a
pretraining document does, and "" -> no tokens. A generation prompt ends with `<|assistant|>`;
the model then writes an answer and closes it with `<|end|>` (the stop token of a chat model).

SFT trains on the answer: the loss mask is 1 on each assistant content token and on the
`<|end|>` that closes it (so the model learns to stop), 0 elsewhere (BOS, role tokens, the
system prompt and user turns).

Tools (a tokenizer trained with the tool tokens, `data.tool_tokens`): the tool definitions
(OpenAI's `{"type": "function", "function": {...}}` dicts, as `apply_chat_template(tools=...)`
takes them) come first, one JSON line each; an assistant message may carry `tool_calls`
(OpenAI's `{"type": "function", "function": {"name", "arguments"}}` or plain `{"name",
"arguments"}`; arguments a dict or a JSON string), each written as `{"name": ..., "arguments":
...}`; a message of role `tool` is a result, and results follow the calls in order:

    BOS [<|tools|> json(tool 1) "\n" json(tool 2) ... <|end|>] [<|system|> ...]
    <|user|> ... <|end|> <|assistant|> enc(content) (<|tool_call|> enc(json(call)))* <|end|>
    (<|tool|> enc(result) <|end|>)* <|assistant|> ... <|end|>

The loss mask covers the assistant's content, its calls (their <|tool_call|> tokens
included) and its <|end|>; never the definitions nor the results. After an assistant turn
with calls come one or more tool messages, then an assistant turn; a generation prompt may
follow a user message or tool results.

Hugging Face: `CHAT_TEMPLATE` writes `bos_token`, then per message the role token and the
content, then `<|end|>`. The exported tokenizer (lm/interop/hf.py `tokenizer_json`) splits the text
at the special tokens and gives each chunk between them SentencePiece's dummy prefix, so a content
encodes exactly as `Tokenizer.encode` encodes it alone, and `apply_chat_template` gives the ids of
`render` (a content that starts with spaces or a line break included). Parity needs contents
that do not contain the special tokens' text ("<s>", "<|user|>", ...) literally: HF would read
those as the special tokens, while `render` encodes them as plain text (which is what training
should see). Checked with transformers 5.24 and 4.57. HF `generate` stops at
the config's eos (`</s>`): pass `eos_token_id=<|end|>'s id` to stop a chat answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from data_pipeline.errors import UserError
from data_pipeline.tokenizer import CHAT_TOKENS, TOOL_TOKENS

Message = dict  # {"role": "system"|"user"|"assistant"|"tool", "content": str (+ "tool_calls")}

ROLES = ("system", "user", "assistant", "tool")
_KEYS = ("system", "user", "assistant", "end")  # the keys of chat_token_ids, in CHAT_TOKENS order


class ChatFormatError(UserError, ValueError):
    """A conversation that does not follow the chat format, or a tokenizer without chat tokens."""


def chat_token_ids(tokenizer) -> dict[str, int]:
    """{"system", "user", "assistant", "end"} -> the id of that control token in `tokenizer`."""
    sp = tokenizer.sp
    ids = {key: sp.piece_to_id(piece) for key, piece in zip(_KEYS, CHAT_TOKENS)}
    # piece_to_id answers unk for a piece that is not in the vocabulary
    missing = [piece for key, piece in zip(_KEYS, CHAT_TOKENS) if ids[key] == sp.unk_id()]
    if missing:
        raise ChatFormatError(
            f"tokenizer {getattr(tokenizer, 'path', '?')} has no chat role tokens ({', '.join(missing)} "
            "missing; it was trained before they existed): retrain it with `lm tokenizer train` "
            "or use the tokenizer of a newer run")
    return ids


def tool_token_ids(tokenizer) -> dict[str, int]:
    """{"tools", "tool_call", "tool"} -> their ids; ChatFormatError for a tokenizer without them."""
    sp = tokenizer.sp
    ids = {piece[2:-2]: sp.piece_to_id(piece) for piece in TOOL_TOKENS}
    if any(i == sp.unk_id() for i in ids.values()):
        raise ChatFormatError(f"tokenizer {getattr(tokenizer, 'path', '?')} has no tool tokens "
                              f"({', '.join(TOOL_TOKENS)}): "
                              "conversations with tools need a tokenizer trained with them (data.tool_tokens=True, "
                              "or `lm tokenizer train --tool-tokens`)")
    return ids


def has_tool_tokens(tokenizer) -> bool:
    try:
        tool_token_ids(tokenizer)
    except ChatFormatError:
        return False
    return True


def call_json(call: Mapping) -> str:
    """A tool call as the model writes it: {"name": ..., "arguments": ...} (arguments given as a
    JSON string are written as they are)."""
    args = call["arguments"]
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": ' + args + "}"


def _tool_calls(i: int, calls) -> list[dict]:
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)) or not calls:
        raise ChatFormatError(f"message {i}: tool_calls must be a non-empty list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function", c) if isinstance(c, Mapping) else None
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str) or "arguments" not in f:
            raise ChatFormatError(f"message {i}: tool call {j} needs a name (a string) and arguments, as "
                                  "{'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
        if not isinstance(f["arguments"], (str, Mapping)):
            raise ChatFormatError(f"message {i}: tool call {j}'s arguments must be a JSON object or its text")
        out.append({"name": f["name"], "arguments": f["arguments"] if isinstance(f["arguments"], str)
                    else dict(f["arguments"])})
    return out


def validate_tools(tools) -> list[dict]:
    """Tool definitions as apply_chat_template takes them: {"type": "function", "function":
    {"name": str, ...}} dicts (returned as given)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatFormatError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ChatFormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  "'description': ..., 'parameters': {...}}}}")
    return list(tools)


def validate_messages(messages) -> list[Message]:
    """Check the roles and contents of a conversation; returns plain {"role", "content"} dicts."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"a conversation is a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise ChatFormatError(f"message {i} ({role}) has tool_calls; only assistant messages call tools")
        if content is None and calls:
            content = ""  # OpenAI's assistant message that only calls tools
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} has content of type {type(content).__name__}; "
                                  "content must be a str")
        msg = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = _tool_calls(i, calls)
        out.append(msg)
    # after an optional system message: user, assistant, user, ...; an assistant that calls
    # tools is followed by their results (role tool), then by an assistant again
    first = 1 if out and out[0]["role"] == "system" else 0
    expect = ("user",)
    for i in range(first, len(out)):
        role = out[i]["role"]
        if role not in expect:
            raise ChatFormatError(f"message {i} has role {role!r} where {' or '.join(map(repr, expect))} was expected "
                                  "(a conversation is an optional first system message, then user and assistant turns "
                                  "alternating, starting with user; tool results follow an assistant's tool calls)")
        expect = {"user": ("assistant",), "tool": ("tool", "assistant"),
                  "assistant": ("tool",) if out[i].get("tool_calls") else ("user",)}[role]
    if len(out) == first:
        raise ChatFormatError("a conversation needs at least one user message")
    return out


def render(tokenizer, messages, add_generation_prompt: bool = False, tools=None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the SFT loss mask (both of length T).

    mask[i] == 1 iff token i is part of an assistant turn's content, its tool calls or that
    turn's closing <|end|>. With add_generation_prompt the last message must be a user
    message or a tool result, and the ids end with <|assistant|> (mask 0): what a chat model
    continues from. `tools`: tool definitions, written first (see the module docstring).
    """
    messages = validate_messages(messages)
    if add_generation_prompt and messages[-1]["role"] not in ("user", "tool"):
        raise ChatFormatError(f"a generation prompt must end with a user message or tool results, not "
                              f"{messages[-1]['role']!r}")
    tok_ids = chat_token_ids(tokenizer)
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    tool_ids = tool_token_ids(tokenizer) if uses_tools else {}
    ids, mask = [tokenizer.bos_id], [0]
    if tools:
        lines = tokenizer.encode("\n".join(json.dumps(t, ensure_ascii=False) for t in validate_tools(tools)))
        ids += [tool_ids["tools"], *lines, tok_ids["end"]]
        mask += [0] * (len(lines) + 2)
    for m in messages:
        content = tokenizer.encode(m["content"])  # dummy prefix included; "" -> []
        trained = int(m["role"] == "assistant")
        ids += [tool_ids["tool"] if m["role"] == "tool" else tok_ids[m["role"]], *content]
        mask += [0] + [trained] * len(content)
        for call in m.get("tool_calls", ()):
            text = tokenizer.encode(call_json(call))
            ids += [tool_ids["tool_call"], *text]
            mask += [1] * (len(text) + 1)
        ids.append(tok_ids["end"])
        mask.append(trained)
    if add_generation_prompt:
        ids.append(tok_ids["assistant"])
        mask.append(0)
    return ids, mask


def parse_reply(tokenizer, ids: Sequence[int]) -> tuple[str, list[dict]]:
    """An assistant turn's tokens (after <|assistant|>, without the closing <|end|>) -> (its
    text, its tool calls as {"name", "arguments": the JSON text}). A call whose text is not a
    JSON object with a string "name" is kept with name None and its text as "arguments" (the
    caller answers it with an error result)."""
    tool_call = tool_token_ids(tokenizer)["tool_call"] if has_tool_tokens(tokenizer) else None
    parts, current = [], []
    for t in ids:
        if t == tool_call:
            parts.append(current)
            current = []
        else:
            current.append(t)
    parts.append(current)
    text, calls = tokenizer.decode(parts[0]), []
    for part in parts[1:]:
        raw = tokenizer.decode(part).strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", {})
            calls.append({"name": obj["name"], "arguments": args if isinstance(args, str)
                          else json.dumps(args, ensure_ascii=False)})
        else:
            calls.append({"name": None, "arguments": raw})
    return text, calls


def generation_prompt(tokenizer, messages, tools=None) -> list[int]:
    """The ids a chat model continues from: the conversation, then <|assistant|>."""
    return render(tokenizer, messages, add_generation_prompt=True, tools=tools)[0]


# The same layout for transformers' `apply_chat_template` (rendered with trim_blocks and
# lstrip_blocks; the tokenizer gives each content its dummy prefix, see above).
# It checks the roles as validate_messages does.
CHAT_TEMPLATE = (
    "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{%- if messages | length == offset -%}"
    "{{- raise_exception('a conversation needs at least one user message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- if tools -%}"  # the tool definitions, one JSON line each
    "{{- '<|tools|>' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(expect='user') -%}"
    "{%- for message in messages -%}"
    "{%- set calls = message.tool_calls if message.tool_calls is defined and message.tool_calls else [] -%}"
    "{%- set want = 'system' if loop.index0 < offset else ns.expect -%}"  # the roles allowed here, '|'-joined
    "{%- if message['role'] not in want.split('|') -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ' where ' ~ want"
    " ~ ' was expected: an optional system message first, then user and assistant alternate starting with user;"
    " tool results follow an assistant\\'s tool calls') -}}"
    "{%- endif -%}"
    "{%- if loop.index0 >= offset -%}"
    "{%- set ns.expect = {'user': 'assistant', 'tool': 'tool|assistant'}.get(message['role'],"
    " 'tool' if calls else 'user') -%}"
    "{%- endif -%}"
    "{%- set content = message['content'] if message['content'] is defined and message['content'] is not none"
    " else ('' if calls else none) -%}"
    "{%- if content is not string -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': content must be a string') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    # An assistant's text, its tool calls and its <|end|> are what SFT trains on: marked as a
    # `generation` block, so transformers' return_assistant_tokens_mask (and TRL's
    # assistant-only loss) find exactly our loss mask. The markers add no text.
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{{- content -}}"
    "{%- for call in calls -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    "{{- '<|tool_call|>{\"name\": ' ~ (f.name | tojson) ~ ', \"arguments\": ' -}}"
    "{%- if f.arguments is string -%}{{- f.arguments -}}{%- else -%}{{- f.arguments | tojson -}}{%- endif -%}"
    "{{- '}' -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endgeneration -%}{%- else -%}"
    "{{- content -}}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] not in ['user', 'tool'] -%}"
    "{{- raise_exception('a generation prompt must end with a user message or tool results') -}}"
    "{%- endif -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)
