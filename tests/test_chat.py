"""The chat format (data_pipeline.chat): token layout, SFT mask, errors, and parity of the
exported chat template with transformers' apply_chat_template (skipped without transformers)."""

import io
import json

import pytest
import sentencepiece as spm

from data_pipeline import default_corpus
from data_pipeline.chat import (
    CHAT_TEMPLATE,
    ROLES,
    ChatFormatError,
    chat_token_ids,
    generation_prompt,
    render,
    validate_messages,
)
from data_pipeline.tokenizer import CHAT_TOKENS, TOOL_TOKENS, Tokenizer, train_tokenizer

SYSTEM = {"role": "system", "content": "You answer briefly."}


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def corpus():
    # a couple of MB of the default corpus (standard-library code and docs): trains in about a second
    return [d.text() for d in default_corpus.documents()[:150]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus):
    return train_tokenizer(corpus, 768, str(tmp_path_factory.mktemp("tok") / "sp"))


@pytest.fixture(scope="module")
def old_tok(tmp_path_factory, corpus):
    """A tokenizer as trained before the chat role tokens existed (no control symbols)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(t[:2048] for t in corpus), model_writer=model,
                                   model_type="bpe", vocab_size=400, byte_fallback=True, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, minloglevel=2)
    path = tmp_path_factory.mktemp("old") / "old.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(str(path))


CONVERSATIONS = {
    "multi-turn+system": [SYSTEM, _u("What is 2 + 2?"), _a("4."), _u("And times 3?"),
                          _a("12, since (2 + 2) * 3 = 12.")],
    "unicode": [_u("Café, naïve, 中文 and emoji 😀?"), _a("Oui: 日本語 🚀🚀 é")],
    "leading spaces": [_u("  two spaces"), _a(" one space"), _u("   ")],
    "newlines": [_u("\n\nleading newlines"), _a("trailing newlines\n\n"), _u("\n")],
    "empty-ish": [_u(""), _a(""), _u(" "), _a("\t")],
    "code": [SYSTEM, _u("Write a function."),
             _a("```python\ndef f(x):\n    if x:\n        return [i for i in range(x)]\n\treturn  None\n```\n")],
}


# ---------------------------------------------------------------------------------------
# render


def test_layout_and_mask(tok):
    ids, mask = render(tok, CONVERSATIONS["multi-turn+system"])
    t = chat_token_ids(tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
    # role tokens are single control ids, never produced by encoding their text
    assert sorted(t.values()) == sorted(tok.sp.piece_to_id(p) for p in CHAT_TOKENS)
    assert all(tok.sp.is_control(i) for i in t.values())
    assert not set(tok.encode("".join(CHAT_TOKENS))) & set(t.values())

    # walk the layout: role, content, end per message; mask = assistant content + its end
    pos = 1
    for m in CONVERSATIONS["multi-turn+system"]:
        content = tok.encode(m["content"])
        assert ids[pos] == t[m["role"]] and mask[pos] == 0
        assert ids[pos + 1:pos + 1 + len(content)] == content
        assert tok.decode(content) == m["content"]
        end = pos + 1 + len(content)
        assert ids[end] == t["end"]
        assert mask[pos + 1:end + 1] == [int(m["role"] == "assistant")] * (len(content) + 1)
        pos = end + 1
    assert pos == len(ids)
    # the masked tokens decode to exactly the answers
    trained = [i for i, k in zip(ids, mask) if k and i != t["end"]]
    assert tok.decode(trained) == tok.decode(tok.encode("4.") + tok.encode("12, since (2 + 2) * 3 = 12."))
    assert sum(1 for i, k in zip(ids, mask) if k and i == t["end"]) == 2


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_content_round_trips(tok, name):
    ids, mask = render(tok, CONVERSATIONS[name])
    t = chat_token_ids(tok)
    # split at role/end tokens: what is in between decodes back to each content
    contents, cur = [], None
    for i in ids[1:]:
        if i == t["end"]:
            contents.append(tok.decode(cur))
        elif i in t.values():
            cur = []
        else:
            cur.append(i)
    assert contents == [m["content"] for m in CONVERSATIONS[name]]


def test_generation_prompt(tok):
    conv = CONVERSATIONS["multi-turn+system"][:-1]
    t = chat_token_ids(tok)
    prompt = generation_prompt(tok, conv)
    ids, mask = render(tok, conv, add_generation_prompt=True)
    assert prompt == ids and prompt[-1] == t["assistant"] and mask[-1] == 0
    assert prompt[:-1] == render(tok, conv)[0]
    # the full conversation continues the prompt
    assert render(tok, CONVERSATIONS["multi-turn+system"])[0][:len(prompt)] == prompt
    with pytest.raises(ChatFormatError, match="must end with a user message"):
        generation_prompt(tok, CONVERSATIONS["multi-turn+system"])


@pytest.mark.parametrize("messages,match", [
    ([], "at least one user message"),
    ([SYSTEM], "at least one user message"),
    ("hello", "list of messages"),
    ({"role": "user", "content": "hi"}, "list of messages"),
    ([_a("hi")], "message 0 has role 'assistant' where 'user'"),
    ([_u("a"), _u("b")], "message 1 has role 'user' where 'assistant'"),
    ([_u("a"), SYSTEM], "message 1 has role 'system'"),
    ([SYSTEM, SYSTEM, _u("a")], "message 1 has role 'system'"),
    ([_u("a"), {"role": "tool", "content": "x"}], "message 1 has role 'tool' where 'assistant' was expected"),
    ([_u("a"), {"role": "robot", "content": "x"}], "message 1 has role 'robot'; roles are system, user, assistant, tool"),
    ([{"role": "user", "content": ["hi"]}], "content of type list"),
    ([{"role": "user", "content": None}], "content of type NoneType"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
    (["hi"], "must be a dict"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        render(tok, messages)


def test_validate_returns_plain_messages():
    msgs = validate_messages(({"role": "user", "content": "hi", "name": "x"},))
    assert msgs == [{"role": "user", "content": "hi"}]
    assert ROLES == ("system", "user", "assistant", "tool")


def test_old_tokenizer_says_to_retrain(old_tok):
    with pytest.raises(ChatFormatError) as e:
        render(old_tok, [_u("hi")])
    msg = str(e.value)
    assert "\n" not in msg and old_tok.path in msg and "<|user|>" in msg
    assert "retrain" in msg and "lm tokenizer train" in msg and "newer run" in msg


def test_template_names_the_chat_tokens():
    # the template writes '<|' ~ role ~ '|>' and '<|end|>': the names of CHAT_TOKENS
    assert CHAT_TOKENS == tuple(f"<|{r}|>" for r in ROLES[:3]) + ("<|end|>",)
    assert TOOL_TOKENS[2] == f"<|{ROLES[3]}|>"
    assert "<|end|>" in CHAT_TEMPLATE and "<|assistant|>" in CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------
# Hugging Face parity


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")
    from lm.interop.hf import _export_tokenizer

    out = tmp_path_factory.mktemp("hf")
    _export_tokenizer(tok.path, str(out))
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _hf_ids(hf_tok, messages, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out if isinstance(out, list) else out["input_ids"])  # transformers 5 may give a BatchEncoding


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_hf_chat_template_matches_render(tok, hf_tok, name):
    conv = CONVERSATIONS[name]
    assert _hf_ids(hf_tok, conv, False) == render(tok, conv)[0]
    # a generation prompt: up to the last user message, then <|assistant|>
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    prompt = conv[:last_user + 1]
    assert _hf_ids(hf_tok, prompt, True) == generation_prompt(tok, prompt)


def test_hf_keeps_chat_tokens_special(tok, hf_tok):
    t = chat_token_ids(tok)
    assert hf_tok.convert_tokens_to_ids(list(CHAT_TOKENS)) == [t[k] for k in ("system", "user", "assistant", "end")]
    # decoding without special tokens gives the text back
    ids = render(tok, CONVERSATIONS["unicode"])[0]
    assert hf_tok.decode(ids, skip_special_tokens=True).split() == " ".join(
        m["content"] for m in CONVERSATIONS["unicode"]).split()
    # plain text still encodes as SentencePiece does (tests/test_hf_tokenizer.py checks many more)
    for text in ["def f(x):\n    return x", "Café 中文 😀", "x  two\n", " leading space", "\n\nclass A:"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)


def test_hf_template_rejects_bad_order(hf_tok):
    with pytest.raises(Exception, match="where user was expected"):
        hf_tok.apply_chat_template([_a("hi")], tokenize=False)
    with pytest.raises(Exception, match="must end with a user message"):
        hf_tok.apply_chat_template([_u("a"), _a("b")], tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="at least one user message"):
        hf_tok.apply_chat_template([SYSTEM], tokenize=False)


def test_export_of_old_tokenizer_has_no_chat_template(old_tok, tmp_path):
    from lm.interop.hf import _export_tokenizer

    _export_tokenizer(old_tok.path, str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and "added_tokens_decoder" not in config


def test_chat_module_does_not_import_lm():
    import ast

    import data_pipeline.chat as chat

    tree = ast.parse(open(chat.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n == "lm" or n.startswith("lm.")]
