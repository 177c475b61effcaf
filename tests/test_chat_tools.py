"""Tool turns in the chat format (data_pipeline/chat.py): rendering, the loss mask, parsing a
reply's calls, and token equality with transformers' apply_chat_template(tools=...)."""

import json

import pytest

from data_pipeline import default_corpus
from data_pipeline.chat import (
    ChatFormatError,
    call_json,
    chat_token_ids,
    generation_prompt,
    parse_reply,
    render,
    tool_token_ids,
)
from data_pipeline.tokenizer import TOOL_TOKENS, train_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.",
                                      "parameters": {"type": "object", "required": ["expression"],
                                                     "properties": {"expression": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "search", "description": "Search the notes (café, 中文).",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
]


def _call(name, args, openai_style=True):
    return {"type": "function", "id": "call_1", "function": {"name": name, "arguments": args}} if openai_style \
        else {"name": name, "arguments": args}


CONVERSATIONS = {
    "one call": [
        {"role": "user", "content": "What is 1234 + 5678?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("calculator", '{"expression": "1234 + 5678"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "6912"},
        {"role": "assistant", "content": "It is 6912."},
    ],
    "two calls in a turn, dict arguments, text before": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Add then search."},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [_call("calculator", {"expression": "2 * 3"}, openai_style=False),
                        _call("search", {"q": "naïve \"quoted\""})]},
        {"role": "tool", "content": "6"},
        {"role": "tool", "content": "error: nothing found"},
        {"role": "assistant", "content": "6, and nothing found."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    "calls in two turns": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "", "tool_calls": [_call("calculator", '{"expression": "1"}')]},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": None, "tool_calls": [_call("calculator", '{"expression": "2"}')]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "done"},
    ],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [d.text() for d in default_corpus.documents()[:150]]
    return train_tokenizer(corpus, 768, str(tmp_path_factory.mktemp("tok") / "sp"), tool_tokens=True)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    corpus = [d.text() for d in default_corpus.documents()[:150]]
    return train_tokenizer(corpus, 768, str(tmp_path_factory.mktemp("plain") / "sp"))


def test_layout_and_loss_mask(tok):
    conv = CONVERSATIONS["one call"]
    ids, mask = render(tok, conv, tools=TOOLS[:1])
    c, t = chat_token_ids(tok), tool_token_ids(tok)
    tools_text = tok.encode(json.dumps(TOOLS[0], ensure_ascii=False))
    call = tok.encode('{"name": "calculator", "arguments": {"expression": "1234 + 5678"}}')
    user, result, answer = tok.encode(conv[0]["content"]), tok.encode("6912"), tok.encode("It is 6912.")
    want = ([tok.bos_id, t["tools"], *tools_text, c["end"], c["user"], *user, c["end"], c["assistant"], t["tool_call"],
             *call, c["end"], t["tool"], *result, c["end"], c["assistant"], *answer, c["end"]])
    assert ids == want
    # trained: the call (its <|tool_call|> too) and <|end|>, the answer and <|end|>; never the
    # definitions, the user, the tool's result or role tokens
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [t["tool_call"], *call, c["end"], *answer, c["end"]]
    assert len(mask) == len(ids)


def test_generation_prompt_after_tool_results(tok):
    conv = CONVERSATIONS["one call"][:3]
    prompt = generation_prompt(tok, conv, tools=TOOLS)
    assert prompt[-1] == chat_token_ids(tok)["assistant"]
    assert render(tok, CONVERSATIONS["one call"], tools=TOOLS)[0][: len(prompt)] == prompt


def test_parse_reply_reads_the_calls_back(tok):
    conv = CONVERSATIONS["two calls in a turn, dict arguments, text before"]
    ids, _ = render(tok, conv)
    c = chat_token_ids(tok)
    start = ids.index(c["assistant"]) + 1
    end = ids.index(c["end"], start)
    text, calls = parse_reply(tok, ids[start:end])
    assert text == "Let me check."
    assert calls == [{"name": "calculator", "arguments": '{"expression": "2 * 3"}'},
                     {"name": "search", "arguments": '{"q": "naïve \\"quoted\\""}'}]
    t = tool_token_ids(tok)["tool_call"]
    assert parse_reply(tok, [t, *tok.encode('{"name": 3}')])[1] == [{"name": None, "arguments": '{"name": 3}'}]
    assert parse_reply(tok, tok.encode("no calls"))[1] == []


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}],
     "message 2 has role 'tool' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [_call("x", "{}")]},
      {"role": "user", "content": "c"}], "message 2 has role 'user' where 'tool' was expected"),
    ([{"role": "user", "content": "a", "tool_calls": [_call("x", "{}")]}], "only assistant messages call tools"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "tool call 0 needs a name"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [_call("x", 3)]}],
     "arguments must be a JSON object"),
])
def test_bad_tool_messages(tok, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        render(tok, messages)


def test_a_tokenizer_without_tool_tokens_says_how_to_get_them(plain_tok):
    with pytest.raises(ChatFormatError, match=r"data.tool_tokens=True, or `lm tokenizer train --tool-tokens`"):
        render(plain_tok, CONVERSATIONS["one call"])
    with pytest.raises(ChatFormatError, match="no tool tokens"):
        render(plain_tok, [{"role": "user", "content": "a"}], tools=TOOLS)
    render(plain_tok, [{"role": "user", "content": "a"}])  # no tools: as before


def test_tool_tokens_are_reserved_only_when_asked(tok, plain_tok):
    assert all(tok.sp.piece_to_id(p) != tok.sp.unk_id() for p in TOOL_TOKENS)
    assert all(plain_tok.sp.piece_to_id(p) == plain_tok.sp.unk_id() for p in TOOL_TOKENS)


def test_call_json_keeps_text_arguments_as_written():
    assert call_json({"name": "f", "arguments": '{"a":1}'}) == '{"name": "f", "arguments": {"a":1}}'
    assert call_json({"name": "f", "arguments": {"a": "é"}}) == '{"name": "f", "arguments": {"a": "é"}}'


# ---------------------------------------------------------------------------------------
# Hugging Face parity


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")
    from lm.interop.hf import _export_tokenizer

    out = tmp_path_factory.mktemp("hf")
    _export_tokenizer(tok.path, str(out))
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _hf(hf_tok, messages, tools, add_generation_prompt=False, **kw):
    out = hf_tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt,
                                     **kw)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-definitions", "definitions"])
def test_hf_apply_chat_template_with_tools_matches_render(tok, hf_tok, name, tools):
    conv = CONVERSATIONS[name]
    out = _hf(hf_tok, conv, tools, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = render(tok, conv, tools=tools)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask  # transformers finds exactly our loss mask
    # a generation prompt after the first tool results
    k = next(i for i, m in enumerate(conv) if m["role"] == "tool") + 1
    assert list(_hf(hf_tok, conv[:k], tools, add_generation_prompt=True, return_dict=True)["input_ids"]) \
        == generation_prompt(tok, conv[:k], tools=tools)


def test_hf_template_refuses_results_without_calls(hf_tok):
    with pytest.raises(Exception, match="tool results follow an assistant"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                                   tokenize=False)
    names = hf_tok.convert_tokens_to_ids(list(TOOL_TOKENS))
    assert len(set(names)) == 3 and hf_tok.unk_token_id not in names


# ---------------------------------------------------------------------------------------
# The tool loop of lm chat (lm/serve/chat.py), with the model's replies scripted


def test_chat_runs_the_tools_a_reply_calls_and_goes_on(tok, plain_tok):
    import types

    from lm.agent import registry
    from lm.serve.chat import Chat

    cfg = types.SimpleNamespace(model=types.SimpleNamespace(max_seq_len=2048))
    run = types.SimpleNamespace(tokenizer=tok, cfg=cfg, run_dir="r", graphdef=None, params=None)
    chat = Chat(run, max_new=64, tools=registry.resolve("calculator"))
    call = tool_token_ids(tok)["tool_call"]
    replies = [[*tok.encode("Computing."), call, *tok.encode('{"name": "calculator", "arguments": {"expression": '
                                                             '"1234 * 56"}}'), call, *tok.encode("not json")],
               tok.encode("It is 69104.")]
    prompts, shown, tools_seen = [], [], []

    def scripted(prompt, on_text):
        prompts.append(prompt)
        ids = replies[len(prompts) - 1]
        on_text(tok.decode(ids[: ids.index(call)] if call in ids else ids))
        return ids

    chat._generate = scripted
    text = chat.reply("What is 1234 * 56?", on_text=shown.append, on_tool=lambda *a: tools_seen.append(a))
    assert text == "It is 69104."
    assert tools_seen == [("calculator", '{"expression": "1234 * 56"}', "69104"),
                          ("?", "not json", 'error: a tool call is a JSON object {"name": ..., "arguments": {...}}')]
    assert shown == ["Computing.", "It is 69104."]  # the calls' text is not shown as the reply
    # the second prompt is the first one with the calls and their results after it
    assert prompts[1][: len(prompts[0]) - 1] == prompts[0][:-1]
    assert tok.decode(prompts[1]).count("69104") == 1 and tool_token_ids(tok)["tool"] in prompts[1]
    assert [m["role"] for m in chat.history] == ["user", "assistant", "tool", "tool", "assistant"]
    assert render(tok, chat.history, tools=[t.spec() for t in chat.tools])  # a valid conversation
    # a reply that keeps calling stops after max_tool_calls rounds
    chat2 = Chat(run, max_new=64, tools=registry.resolve("calculator"), max_tool_calls=2)
    chat2._generate = lambda prompt, on_text: [call, *tok.encode('{"name": "calculator", "arguments": '
                                                                 '{"expression": "1"}}')]
    chat2.reply("loop", on_tool=lambda *a: tools_seen.append(a))
    assert len(tools_seen) == 2 + 2
    # a run whose tokenizer has no tool tokens refuses tools with what to do
    plain = types.SimpleNamespace(tokenizer=plain_tok, cfg=cfg, run_dir="base", graphdef=None, params=None)
    with pytest.raises(ChatFormatError, match="base was not trained to call tools.*data.tool_tokens=True"):
        Chat(plain, tools=registry.resolve("calculator"))


# ---------------------------------------------------------------------------------------
# SFT files with tool calls: OpenAI-style messages, tools per record


def test_conversation_files_with_tool_calls_render_with_their_tools(tok, tmp_path):
    from data_pipeline.chat_data import RenderChat
    from data_pipeline.conversations import ConversationSource

    conv = CONVERSATIONS["one call"]
    records = [{"tools": TOOLS[:1], "messages": conv},  # OpenAI's shape, content null on the calling turn
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
               {"tools": {"not": "a list"}, "messages": conv},
               {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
                             {"role": "assistant", "content": "c"}]}]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    src = ConversationSource([str(path)], "messages")
    assert src[0].text is not None and src[1].text is not None
    assert "tools must be a list" in src[2].error and "role 'tool' where 'assistant'" in src[3].error
    render_chat = RenderChat(tok.path, 512, "truncate", "tools", None, strict=False)
    row = render_chat.map(src[0])
    assert row["tokens"].tolist() == render(tok, conv, tools=TOOLS[:1])[0]
    assert row["mask"].tolist() == render(tok, conv, tools=TOOLS[:1])[1]
    assert render_chat.map(src[1])["tokens"].tolist() == render(tok, records[1]["messages"])[0]
