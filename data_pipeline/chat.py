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

from collections.abc import Mapping, Sequence

from data_pipeline.errors import UserError
from data_pipeline.tokenizer import CHAT_TOKENS

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

ROLES = ("system", "user", "assistant")
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


def validate_messages(messages) -> list[Message]:
    """Check the roles and contents of a conversation; returns plain {"role", "content"} dicts."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"a conversation is a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) has content of type {type(content).__name__}; "
                                  "content must be a str")
        out.append({"role": role, "content": content})
    # after an optional system message: user, assistant, user, ...
    first = 1 if out and out[0]["role"] == "system" else 0
    for i in range(first, len(out)):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if out[i]["role"] != want:
            raise ChatFormatError(f"message {i} has role {out[i]['role']!r} where {want!r} was expected (a "
                                  "conversation is an optional first system message, then user and assistant turns "
                                  "alternating, starting with user)")
    if len(out) == first:
        raise ChatFormatError("a conversation needs at least one user message")
    return out


def render(tokenizer, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the SFT loss mask (both of length T).

    mask[i] == 1 iff token i is part of an assistant turn's content or that turn's closing <|end|>.
    With add_generation_prompt the last message must be a user message, and the ids end with
    <|assistant|> (mask 0): what a chat model continues from.
    """
    messages = validate_messages(messages)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ChatFormatError(f"a generation prompt must end with a user message, not {messages[-1]['role']!r}")
    tok_ids = chat_token_ids(tokenizer)
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        content = tokenizer.encode(m["content"])  # dummy prefix included; "" -> []
        trained = int(m["role"] == "assistant")
        ids += [tok_ids[m["role"]], *content, tok_ids["end"]]
        mask += [0] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tok_ids["assistant"])
        mask.append(0)
    return ids, mask


def generation_prompt(tokenizer, messages) -> list[int]:
    """The ids a chat model continues from: the conversation, then <|assistant|>."""
    return render(tokenizer, messages, add_generation_prompt=True)[0]


# The same layout for transformers' `apply_chat_template` (rendered with trim_blocks and
# lstrip_blocks; the tokenizer gives each content its dummy prefix, see above).
# It checks the roles as validate_messages does.
CHAT_TEMPLATE = (
    "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{%- if messages | length == offset -%}"
    "{{- raise_exception('a conversation needs at least one user message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set i = loop.index0 - offset -%}"  # the turn's position after the system message
    "{%- set want = 'system' if i < 0 else ('user' if i % 2 == 0 else 'assistant') -%}"
    "{%- if message['role'] != want -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ' where ' ~ want"
    " ~ ' was expected: an optional system message first, then user and assistant alternate starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': content must be a string') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    # An assistant's text and its <|end|> are what SFT trains on: marked as a `generation`
    # block, so transformers' return_assistant_tokens_mask (and TRL's assistant-only loss)
    # find exactly our loss mask. The markers add no text.
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{{- message['content'] -}}"
    "{{- '<|end|>' -}}"
    "{%- endgeneration -%}{%- else -%}"
    "{{- message['content'] -}}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] != 'user' -%}"
    "{{- raise_exception('a generation prompt must end with a user message') -}}"
    "{%- endif -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)
