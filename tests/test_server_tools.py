"""Tool calls through `lm serve`'s protocol (lm/serve/server.py), with the official `openai`
client: requests with `tools`, replies with `tool_calls` and finish_reason "tool_calls"
(streamed as deltas too), `role: tool` messages sent back, malformed definitions refused
by field. The HTTP app is the real one on a real port; the engine behind it is scripted
(a random model does not call tools), and records the prompts it was given."""

import json
import socket
import threading
import time

import pytest
from helpers import corpus_tokenizer

pytest.importorskip("starlette", reason="starlette not installed (pip install -e .[serve])")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e .[serve])")
openai = pytest.importorskip("openai", reason="openai not installed (pip install -e .[test])")

from data_pipeline.chat import generation_prompt, tool_token_ids  # noqa: E402
from lm.serve.batching import Event  # noqa: E402
from lm.serve.server import Service, make_app  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}},
                                                          "required": ["expression"]}}}]


class ScriptedEngine:
    """Stands in for the Batcher: answers each request with the next scripted reply (token ids),
    token by token when streaming."""

    max_len = 4096

    def __init__(self, tok):
        self.tok, self.replies, self.prompts = tok, [], []

    def submit(self, req, emit):
        self.prompts.append(list(req.prompt))
        ids = self.replies.pop(0)

        def run():
            sent = ""
            pieces = [[t] for t in ids] if req.stream else [ids]
            done = []
            for k, piece in enumerate(pieces):
                done += piece
                text = self.tok.decode_after(req.prompt, done)
                last = k == len(pieces) - 1
                emit(Event(text=text[len(sent):], tokens=piece, logprobs=[0.0] * len(piece),
                           finish="stop" if last else None, prompt_tokens=len(req.prompt),
                           completion_tokens=len(done) + (1 if last else 0)))
                sent = text

        threading.Thread(target=run, daemon=True).start()
        return type("H", (), {"cancel": lambda self: None})()

    def status(self):
        return {}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = corpus_tokenizer(tmp_path_factory.mktemp("tok"), 1024, tool_tokens=True)
    engine = ScriptedEngine(tok)
    app = make_app(Service(engine, tok, "calc", chat=True, log=lambda *_: None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    yield tok, engine, client
    server.should_exit = True
    thread.join(timeout=10)


def _call_ids(tok, text_before, expression):
    call = tool_token_ids(tok)["tool_call"]
    return tok.encode(text_before) + [call] + tok.encode(json.dumps({"name": "calculator",
                                                                      "arguments": {"expression": expression}}))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_call_round_trip_with_the_openai_client(live, stream):
    tok, engine, client = live
    engine.replies = [_call_ids(tok, "Let me compute.", "1234 * 56"), tok.encode("It is 69104.")]
    messages = [{"role": "user", "content": "What is 1234 * 56?"}]
    if stream:
        chunks = list(client.chat.completions.create(model="calc", messages=messages, tools=TOOLS, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert content == "Let me compute." and finish == ["tool_calls"]
        assert len(deltas) == 1 and deltas[0].index == 0
        call = deltas[0]
    else:
        r = client.chat.completions.create(model="calc", messages=messages, tools=TOOLS)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content == "Let me compute."
        (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "1234 * 56"}
    # the client runs the tool and sends the result back
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "calculator", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "69104"}]
    r = client.chat.completions.create(model="calc", messages=messages, tools=TOOLS)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It is 69104."
    assert not r.choices[0].message.tool_calls
    # the engine saw the template's rendering of the whole exchange, definitions first
    want = generation_prompt(tok, [messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {"name": "calculator", "arguments": call.function.arguments}]}, messages[2]], tools=TOOLS)
    assert engine.prompts[-1] == want


def test_tool_choice_none_leaves_the_definitions_out_and_calls_unparsed(live):
    tok, engine, client = live
    engine.replies = [tok.encode("Four.")]
    r = client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "2+2?"}], tools=TOOLS,
                                       tool_choice="none")
    assert r.choices[0].message.content == "Four."
    assert engine.prompts[-1] == generation_prompt(tok, [{"role": "user", "content": "2+2?"}])


@pytest.mark.parametrize("tools,param", [
    ({"type": "function"}, "tools"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function", "function": "calculator"}], "tools[0].function"),
    ([{"type": "function", "function": {"description": "x"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
])
def test_malformed_tool_definitions_get_a_400_naming_the_field(live, tools, param):
    _, _, client = live
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert e.value.body["param"] == param, e.value.body


def test_other_tool_choices_and_functions_are_refused(live):
    _, _, client = live
    with pytest.raises(openai.BadRequestError, match="tool_choice must be 'auto' or 'none'"):
        client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                       tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="functions are not supported"):
        client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "hi"}],
                                       functions=[{"name": "f"}])
    with pytest.raises(openai.BadRequestError, match="message 1 has role 'tool' where 'assistant'"):
        client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "hi"},
                                                               {"role": "tool", "content": "x"}], tools=TOOLS)
