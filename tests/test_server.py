"""`lm serve`: a live server (a child process on 127.0.0.1, a free port) driven by the official
`openai` client and httpx: greedy answers equal `lm sample`'s and the chat template's,
concurrency and streaming, throughput, bad requests, disconnection and the API key.
Skipped when the serving packages are missing (`pip install -e .[serve,test]`; CI installs them)."""

import concurrent.futures as cf
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import corpus_tokenizer, cpu_env

pytest.importorskip("starlette", reason="starlette not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e .[serve])")
openai = pytest.importorskip("openai", reason="openai not installed (pip install -e .[test])")
httpx = pytest.importorskip("httpx", reason="httpx not installed (pip install -e .[test])")

KEY = "sk-test-key"
PROMPTS = [f"def f{i}(x):\n    return" for i in range(32)]


def _make_run(d, n_heads: int = 4, n_kv_heads: int = 2):
    """A random chat-capable run: the project's tokenizer (with chat tokens), a small model
    with peaked logits (init_std 0.2: greedy choices far from ties), imported as a run."""
    from flax import nnx

    from lm.config import ModelConfig
    from lm.interop.hf import export_llama
    from lm.model.transformer import Transformer
    from lm.tools.hf_runs import import_run

    tok = corpus_tokenizer(d, 1024)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      d_ff=128, max_seq_len=256, init_std=0.2)
    export_llama(cfg, nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param), str(d / "hf"), tokenizer_model=tok.path)
    run = d / "chat_run"
    import_run(str(d / "hf"), str(run), log=lambda *_: None)
    c = json.loads((run / "config.json").read_text())
    c["stage"] = "sft"  # a fine-tuned run's stage: the server applies the chat template
    (run / "config.json").write_text(json.dumps(c))
    return str(run)


@contextlib.contextmanager
def _serving(run: str, tensor: int):
    """`lm serve RUN --tensor TENSOR` in a child with that many CPU devices, until the block
    ends (SIGINT): (its URL, the lines it printed so far and on)."""
    env = {**cpu_env(tensor), "LM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "lm", "serve", run, "--port", "0", "--slots", "8",
                             "--request-timeout", "2", "--tensor", str(tensor)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        url = None
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("lm serve exited before listening:\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
            assert time.monotonic() < deadline, "lm serve did not start in time:\n" + "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        yield url, lines, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-device", "tensor2"])
def server(tmp_path_factory, request):
    """A live server; again (slow phase) with the model split over 2 tensor-parallel devices:
    every test below then holds the split engine to one device's answers."""
    d = tmp_path_factory.mktemp("serve")
    run = _make_run(d)
    with _serving(run, request.param) as (url, lines, proc):
        from lm.train.run import load_run

        loaded = load_run(run, log=lambda *_: None)
        yield {"url": url, "run": run, "loaded": loaded, "log": lines, "pid": proc.pid,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=60, max_retries=0)}


def _greedy(loaded, prompt_ids, max_new, stops):
    """What `lm sample` runs: lm.sampling.stream, greedy, up to a stop token; decoded."""
    from lm.sampling.sampler import stream

    ids = []
    for t in stream(loaded.graphdef, loaded.params, prompt_ids, max_new, loaded.cfg.model.max_seq_len,
                    temperature=0.0, stop_ids=stops):
        if t in stops:
            break
        ids.append(t)
    return loaded.tokenizer.decode_after(prompt_ids, ids)


def _health(server):
    return httpx.get(server["url"] + "/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_greedy_completion_equals_lm_sample(server):
    client, tok = server["client"], server["loaded"].tokenizer
    assert [m.id for m in client.models.list().data] == ["chat_run"]
    prompt = PROMPTS[0]
    r = client.completions.create(model="chat_run", prompt=prompt, max_tokens=24, temperature=0)
    want = _greedy(server["loaded"], tok.encode(prompt, bos=True), 24, [tok.eos_id])
    assert r.choices[0].text == want and len(want) > 10
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")
    # streamed: the same text in pieces
    pieces = [c.choices[0].text for c in client.completions.create(model="chat_run", prompt=prompt, max_tokens=24,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) > 2


@pytest.mark.slow
def test_greedy_completion_equals_the_lm_sample_command(server):
    prompt = PROMPTS[5]
    r = server["client"].completions.create(model="chat_run", prompt=prompt, max_tokens=24, temperature=0)
    out = subprocess.run([sys.executable, "-m", "lm", "sample", server["run"], "--prompt", prompt, "--max-new", "24",
                          "--temperature", "0"], env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert out.stdout == prompt + r.choices[0].text + "\n" and len(r.choices[0].text) > 10


def test_chat_completion_uses_the_template(server):
    from lm.serve.chat import Chat

    client = server["client"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is os.path?"}]
    r = client.chat.completions.create(model="chat_run", messages=messages, max_tokens=20, temperature=0)
    chat = Chat(server["loaded"], system="Answer briefly.", max_new=20, temperature=0.0)
    want = chat.reply("What is os.path?")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="chat_run", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_32_concurrent_streaming_clients_get_their_own_answers(server):
    """32 streams over 8 slots (24 wait, then join as others leave): each answer equals that
    prompt's greedy answer alone, however the requests were batched."""
    from lm.sampling.sampler import generate

    loaded, tok = server["loaded"], server["loaded"].tokenizer
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    want = [tok.decode_after(p, [t for t in o if t != tok.eos_id])
            for p, o in zip(ids, generate(loaded.graphdef, loaded.params, ids, 16, 256, temperature=0.0, eos_id=tok.eos_id))]
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, timeout=120, max_retries=0)

    def one(i):
        text, finish = "", None
        for c in client.completions.create(model="chat_run", prompt=PROMPTS[i], max_tokens=16, temperature=0,
                                           stream=True):
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        return text, finish

    with cf.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(one, range(32)))
    assert [g[0] for g in got] == want
    assert all(g[1] in ("stop", "length") for g in got)
    assert len(set(want)) > 20  # the prompts' answers differ: a mix-up would show


def test_a_lone_client_costs_one_slot_and_concurrent_clients_share_steps(server):
    """From the server's counters, not a clock (the speed is measured by `lm bench serve`):
    a lone client's steps compute one slot, not eight; 8 concurrent clients share the steps,
    several slots per step, so the same steps serve several times the tokens."""
    client = server["client"]

    def one(i):
        r = client.completions.create(model="chat_run", prompt=PROMPTS[i], max_tokens=160, temperature=1.0, seed=i)
        return r.usage.completion_tokens

    def run(n):
        with cf.ThreadPoolExecutor(n) as ex:
            return sum(ex.map(one, range(n)))

    run(8)  # warm up the client and server
    before = _health(server)
    assert run(1) > 0
    after = _health(server)
    assert after["steps"] > before["steps"] + 20
    assert after["slot_steps"] - before["slot_steps"] == after["steps"] - before["steps"]  # one slot per step
    before = _health(server)
    tokens = run(8)
    after = _health(server)
    steps, slot_steps = after["steps"] - before["steps"], after["slot_steps"] - before["slot_steps"]
    assert slot_steps >= 4 * steps, (steps, slot_steps)  # on average at least 4 of the 8 clients in each step
    assert steps < tokens / 4, (steps, tokens)


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server):
    client, url = server["client"], server["url"]
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(path, content, status, code=None):
        r = httpx.post(url + path, content=content, headers={**auth, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and "Traceback" not in r.text
        if code:
            assert err["code"] == code
        return err

    post("/v1/completions", b'{"model": "chat_run", "prompt": "x"', 400)  # malformed JSON
    post("/v1/completions", b"\xff\xfe", 400)
    post("/v1/completions", b"[1, 2]", 400)
    post("/v1/chat/completions", json.dumps({"model": "chat_run", "messages": [{"role": "robot", "content": "x"}]}),
         400)
    post("/v1/chat/completions", json.dumps({"model": "chat_run", "messages": "hi"}), 400)
    assert post("/v1/completions", json.dumps({"model": "chat_run", "prompt": "x", "temperature": 3}),
                400)["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=3)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat_run", prompt="def " * 400, max_tokens=3)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat_run", prompt="x", max_tokens=-5)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat_run", messages=[{"role": "user", "content": "x"}], max_tokens=300)
    tool = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(openai.BadRequestError, match="was not trained to call tools"):  # no tool tokens
        client.chat.completions.create(model="chat_run", messages=[{"role": "user", "content": "x"}], tools=[tool])
    with pytest.raises(openai.BadRequestError, match="tools are for /v1/chat/completions"):
        client.completions.create(model="chat_run", prompt="x", extra_body={"tools": [tool]})
    assert httpx.get(url + "/v1/completions", headers=auth, timeout=30).status_code == 405
    assert httpx.get(url + "/v1/nothing", headers=auth, timeout=30).status_code == 404
    # none of it hurt the server
    assert client.completions.create(model="chat_run", prompt="x", max_tokens=3, temperature=0).choices[0].text
    assert _health(server)["errors"] == 0
    assert "Traceback" not in "".join(server["log"])


def test_api_key_is_required(server):
    url = server["url"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="chat_run", prompt="x", max_tokens=2)
    assert "listening on http://127.0.0.1:" in "".join(server["log"])  # this machine only, by default


def test_disconnect_mid_stream_frees_the_slot(server):
    url = server["url"]
    before = _health(server)
    body = {"model": "chat_run", "prompt": PROMPTS[1], "max_tokens": 240, "temperature": 1.0, "top_p": 0.9,
            "seed": 0, "stream": True}
    for _ in range(4):
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the answer has started; now hang up
    deadline = time.monotonic() + 30
    while (h := _health(server))["active"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] - before["cancelled"] == 4 and h["finished"] == before["finished"]
    # the slots serve new requests, with the right answer
    tok = server["loaded"].tokenizer
    r = server["client"].completions.create(model="chat_run", prompt=PROMPTS[4], max_tokens=6, temperature=0)
    assert r.choices[0].text == _greedy(server["loaded"], tok.encode(PROMPTS[4], bos=True), 6, [tok.eos_id])


def test_stop_strings_seeds_and_mixed_sampling(server):
    client = server["client"]
    full = client.completions.create(model="chat_run", prompt=PROMPTS[2], max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model="chat_run", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="chat_run", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text

    def sample(seed, temperature=1.0, top_p=0.8):
        return client.completions.create(model="chat_run", prompt=PROMPTS[3], max_tokens=20, temperature=temperature,
                                         top_p=top_p, seed=seed).choices[0].text

    with cf.ThreadPoolExecutor(6) as ex:  # sampled and greedy requests share steps
        a, b, c, g1, g2, a2 = ex.map(lambda args: sample(*args), [(1,), (2,), (3,), (1, 0.0), (2, 0.0), (1,)])
    assert a == a2 and len({a, b, c}) == 3 and g1 == g2
    # a seeded sample is what the sampler draws for that seed (lm sample --seed)
    from lm.sampling.sampler import stream

    loaded = server["loaded"]
    tok = loaded.tokenizer
    ids, prompt_ids = [], tok.encode(PROMPTS[3], bos=True)
    for t in stream(loaded.graphdef, loaded.params, prompt_ids, 20, 256, temperature=1.0,
                    top_p=0.8, stop_ids=[tok.eos_id], seed=1):
        if t == tok.eos_id:
            break
        ids.append(t)
    assert a == tok.decode_after(prompt_ids, ids)


def test_with_stop_strings_logprobs_end_with_the_answer(server):
    """The tokens returned with `logprobs` are the answer's: none of them begins inside or
    after the stop string (the text they join into runs at most one token past the answer)."""
    client = server["client"]
    for prompt in PROMPTS:  # (the random model writes byte pieces too: one whose first 11 pieces are text)
        full = client.completions.create(model="chat_run", prompt=prompt, max_tokens=30, temperature=0,
                                         logprobs=1).choices[0]
        pieces = full.logprobs.tokens
        head = "".join(pieces[:11])
        if len(pieces) >= 12 and full.text.startswith(head) and "\ufffd" not in head and len(head.strip()) > 6:
            break
    else:
        pytest.fail("no greedy answer starts with 11 text pieces")
    stop = "".join(pieces[8:11])[-3:]  # ends inside the 11th token: 8 to 10 tokens belong to the answer
    for stream in (False, True):
        r = client.completions.create(model="chat_run", prompt=prompt, max_tokens=30, temperature=0,
                                      stop=[stop], logprobs=1, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            got = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        else:
            text, got = r.choices[0].text, r.choices[0].logprobs.tokens
        assert text == full.text[: full.text.index(stop)], stream
        assert "".join(got).startswith(text), (stream, text, got)
        assert len("".join(got[:-1])) < len(text) if text else got == [], (stream, text, got)
        assert got == pieces[: len(got)]


def test_logprobs_are_the_samplers(server):
    r = server["client"].completions.create(model="chat_run", prompt=PROMPTS[4], max_tokens=8, temperature=0.7,
                                            seed=5, logprobs=1)
    lp = r.choices[0].logprobs.token_logprobs
    assert len(lp) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert all(x < 0 for x in lp) and np.isfinite(lp).all()


def test_cli_refuses_a_port_in_use(server):
    port = int(server["url"].rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, "-m", "lm", "serve", server["run"], "--port", str(port)], env=cpu_env(1),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_hostile_bodies_and_fields_get_4xx(server):
    """What JSON allows but a request must not carry (lone surrogates, NaN, nesting deeper
    than the parser goes, strings for booleans, unserved options, a huge body) gets an
    OpenAI-style 4xx naming the field; the server answers the next request as before."""
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def post(content, status=400, param=None, path="/v1/completions"):
        r = httpx.post(url + path, content=content, headers=auth, timeout=60)
        assert r.status_code == status, (content[:80], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in r.text
        if param:
            assert err["param"] == param, err

    def body(**kw):
        return json.dumps({"model": "chat_run", "prompt": "x", "max_tokens": 2, **kw})

    post(b'{"model": "chat_run", "prompt": "a\\ud800", "max_tokens": 2}', param="prompt")
    post(b'{"model": "chat_run", "messages": [{"role": "user", "content": "a\\udfff"}]}', param="messages",
         path="/v1/chat/completions")
    post(b'{"model": "chat_run", "prompt": "x", "stop": ["\\ud800"]}', param="stop")
    post(b"[" * 100_000 + b"]" * 100_000)
    post(body()[:-1].encode() + b', "temperature": NaN}', param="temperature")
    post(body()[:-1].encode() + b', "top_p": NaN}', param="top_p")
    post(body(seed=10 ** 30), param="seed")
    post(body(stream="false"), param="stream")
    post(body(stream=True, stream_options="yes"), param="stream_options")
    post(body(stream=True, stream_options={"include_usage": "no"}), param="include_usage")
    post(body(logprobs=-1), param="logprobs")
    post(body(logprobs=3), param="logprobs")
    post(body(frequency_penalty=0.5), param="frequency_penalty")
    post(body(logit_bias={"5": 10}), param="logit_bias")
    post(body(response_format={"type": "json_object"}), param="response_format")
    post(json.dumps({"model": "chat_run", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2,
                     "logprobs": True}), param="top_logprobs", path="/v1/chat/completions")
    post(body(prompt="x" * (5 << 20)), status=413)
    # the models route, HTTP conventions
    client = server["client"]
    assert client.models.retrieve("chat_run").id == "chat_run"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.get(url + "/v1/completions", headers=auth, timeout=30)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=30).status_code == 200
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}  # no counters without the key
    assert client.completions.create(model="chat_run", prompt="x", max_tokens=3, temperature=0).choices[0].text
    assert _health(server)["errors"] == 0
    assert "Traceback" not in "".join(server["log"])


def test_completion_text_reads_on_from_the_prompt(server):
    """prompt + completion is the text of prompt + answer tokens: the answer's first space
    is kept (decoding the answer alone drops it), a stop string may start with it, and the
    logprobs' token texts join into the completion."""
    client, loaded = server["client"], server["loaded"]
    tok = loaded.tokenizer
    from lm.sampling.sampler import generate

    spaced = None
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        out = generate(loaded.graphdef, loaded.params, [ids], 12, 256, temperature=0.0, eos_id=tok.eos_id)[0]
        out = [t for t in out if t != tok.eos_id]
        if out and tok.piece(out[0]).startswith("\u2581"):
            spaced = prompt, ids, out
            break
    assert spaced, "no prompt whose greedy answer starts with a spaced piece"
    prompt, ids, out = spaced
    r = client.completions.create(model="chat_run", prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    text = r.choices[0].text
    assert text.startswith(" ") and prompt + text == tok.decode(ids + out)
    assert "".join(r.choices[0].logprobs.tokens) == text
    stop = text[:3]  # begins with the space
    cut = client.completions.create(model="chat_run", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"


def test_any_64_bit_seed_draws_what_the_sampler_draws(server):
    """Seeds outside [0, 2**31) (negative, beyond 32 bits) give what lm.sampling.stream
    (`lm sample --seed`) gives for them, not a seed folded by the server."""
    from lm.sampling.sampler import stream

    client, loaded = server["client"], server["loaded"]
    tok = loaded.tokenizer
    ids = tok.encode(PROMPTS[6], bos=True)
    for seed in (-5, (1 << 31) + 7, (1 << 63) - 1):
        got = client.completions.create(model="chat_run", prompt=PROMPTS[6], max_tokens=12, temperature=1.0,
                                        seed=seed).choices[0].text
        out = []
        for t in stream(loaded.graphdef, loaded.params, ids, 12, 256, temperature=1.0, stop_ids=[tok.eos_id],
                        seed=seed):
            if t == tok.eos_id:
                break
            out.append(t)
        assert got == tok.decode_after(ids, out), seed


def test_disconnect_without_streaming_frees_the_slot(server):
    """A non-streaming client with stop strings (an event every token: the handler never
    waits idle) that hangs up has its request cancelled, not decoded to the end."""
    url = server["url"]
    before = _health(server)
    body = {"model": "chat_run", "prompt": "x", "max_tokens": 250, "temperature": 1.0, "seed": 3,
            "stop": ["QQQZZZ"]}

    def gone(_):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.05)

    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(gone, range(4)))
    deadline = time.monotonic() + 30
    while (h := _health(server))["active"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] - before["cancelled"] == 4 and h["finished"] == before["finished"], (before, h)
    assert h["tokens"] - before["tokens"] < 4 * 250 / 2, (before, h)  # stopped well before the end


def _connect(server) -> socket.socket:
    host, port = server["url"].split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


HEAD = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY +
        "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()


def test_stalled_connections_time_out_and_a_hang_up_mid_upload_is_no_error(server):
    """(--request-timeout 2) A connection that sends nothing, or half its headers, is closed; one
    that stalls in its body gets a 408; one that hangs up mid-upload is not logged as an error."""
    start = time.monotonic()
    silent, half, slow = _connect(server), _connect(server), _connect(server)
    half.sendall(HEAD[:40])
    slow.sendall(HEAD + b'{"model": "chat_run", ')
    assert silent.recv(100) == b"" and half.recv(100) == b""  # closed by the server
    reply = b""
    while chunk := slow.recv(65536):  # (closed after the answer)
        reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply, reply
    assert time.monotonic() - start < 8
    for sock in (silent, half, slow):
        sock.close()
    logged = len(server["log"])
    gone = _connect(server)
    gone.sendall(HEAD + b'{"model": ')
    gone.close()
    time.sleep(0.5)
    r = server["client"].completions.create(model="chat_run", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert not [line for line in server["log"][logged:] if "error" in line.lower()], server["log"][logged:]


def _rss(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) >> 10 for k in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_a_burst_of_prompts_over_the_context_leaves_the_memory_as_it_was(server):
    """24 concurrent 4 MB prompts (each refused: longer than the context; or 503 while other
    bodies fill the bytes in flight) raise the server's peak memory by well under a gigabyte
    (it was 4.6 GB when they were tokenised) and leave it near where it was."""
    before = _rss(server["pid"])
    body = json.dumps({"model": "chat_run", "prompt": "word " * ((4 << 20) // 5 - 40)})

    def post(_):
        r = httpx.post(server["url"] + "/v1/completions", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        return r.status_code, r.json()["error"].get("code")

    for _ in range(2):
        with cf.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(post, range(24)))
        assert set(answers) <= {(400, "context_length_exceeded"), (503, "too_many_bytes_in_flight")}, answers
    after = _rss(server["pid"])
    assert after["VmHWM"] - before["VmHWM"] < 1024 and after["VmRSS"] - before["VmRSS"] < 400, (before, after)


def test_echo_gives_the_prompt_log_probabilities_the_harness_scores(server):
    """`echo` with `logprobs` (what lm-evaluation-harness's `local-completions` model sends for
    log-likelihood tasks): the prompt's tokens with the model's own log-probabilities (the
    first has none), the most likely token at each position, then any generated token; and
    the harness itself scores a continuation through the server as the model does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    client, loaded = server["client"], server["loaded"]
    tok = loaded.tokenizer
    ids = tok.encode(PROMPTS[6] + " x + 1", bos=True)
    r = client.completions.create(model="chat_run", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(lp.tokens) == len(ids)
    logits = nnx.merge(loaded.graphdef, loaded.params)(jnp.asarray([ids[:-1]]))
    own = np.asarray(jax.nn.log_softmax(logits, -1))[0, np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], own, atol=2e-4)
    assert all(max(t.values()) >= c - 1e-5 for t, c in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert r.usage.completion_tokens == 0 and r.choices[0].text == tok.decode(ids)
    one = client.completions.create(model="chat_run", prompt=PROMPTS[6], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    assert one.text.startswith(PROMPTS[6]) and len(one.logprobs.tokens) == len(tok.encode(PROMPTS[6], bos=True)) + 1

    api = pytest.importorskip("lm_eval.models.openai_completions", reason="lm-eval not installed")
    pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra (pip install lm-eval[api])")
    import pathlib

    from lm_eval.api.instance import Instance

    hf = pathlib.Path(server["run"]).parent / "hf"
    model = api.LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model="chat_run", tokenizer=str(hf),
                                    tokenizer_backend="huggingface", max_length=256, header={
                                        "Authorization": f"Bearer {KEY}"}, max_retries=1)
    context, continuation = PROMPTS[7], " x + 1"
    (score, _greedy_flag), = model.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    whole = model.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(model.tokenizer(context, add_special_tokens=False)["input_ids"])
    logits = nnx.merge(loaded.graphdef, loaded.params)(jnp.asarray([whole[:-1]]))
    own = np.asarray(jax.nn.log_softmax(logits, -1))[0, np.arange(len(whole) - 1), whole[1:]]
    assert score == pytest.approx(float(own[n_ctx - 1:].sum()), abs=1e-3)


@pytest.mark.slow
def test_servers_split_over_2_4_and_8_devices_answer_token_for_token_as_one_device(tmp_path, capsys):
    """`lm serve --tensor 2|4|8` (a model of 16 heads, 8 key/value heads: each device holds
    whole heads) on as many CPU devices: greedy completions of 12 prompts sent at once
    (batched over the slots, streamed or not) and a chat reply equal one device's greedy
    decoding token for token, and the server prints its per-device share of the weights
    (`lm plan --serve`'s figure); `lm sample --tensor 4|8` writes what one device writes."""
    from lm.sampling.sampler import generate
    from lm.serve.chat import Chat
    from lm.tools import plan
    from lm.train.run import load_run

    run = _make_run(tmp_path, n_heads=16, n_kv_heads=8)
    loaded = load_run(run, log=lambda *_: None)
    tok = loaded.tokenizer
    prompts = PROMPTS[:12]
    ids = [tok.encode(p, bos=True) for p in prompts]
    want = [tok.decode_after(p, [t for t in o if t != tok.eos_id])
            for p, o in zip(ids, generate(loaded.graphdef, loaded.params, ids, 20, 256, temperature=0.0,
                                          eos_id=tok.eos_id))]
    assert len(set(want)) > 8  # the answers differ: a mix-up would show
    messages = [{"role": "user", "content": "What is os.path?"}]
    chat = Chat(loaded, max_new=20, temperature=0.0).reply("What is os.path?")
    for tensor in (2, 4, 8):
        with _serving(run, tensor) as (url, lines, _):
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=120, max_retries=0)

            def one(i, client=client):
                if i % 2:  # streamed
                    return "".join(c.choices[0].text for c in client.completions.create(
                        model="chat_run", prompt=prompts[i], max_tokens=20, temperature=0, stream=True))
                return client.completions.create(model="chat_run", prompt=prompts[i], max_tokens=20,
                                                 temperature=0).choices[0].text

            with cf.ThreadPoolExecutor(len(prompts)) as ex:
                got = list(ex.map(one, range(len(prompts))))
            assert got == want, f"--tensor {tensor}"
            r = client.chat.completions.create(model="chat_run", messages=messages, max_tokens=20, temperature=0)
            assert r.choices[0].message.content == chat, f"--tensor {tensor}"
            split = [x for x in lines if "decode weights split over" in x]
            assert split and f"split over {tensor} devices" in split[0], "".join(lines)
            r = plan.serve_plan(loaded.cfg.model, tensor)  # (its figures are held to a hand computation)
            assert (f"{r['weight_bytes'] / 2**20:,.1f} MiB on each of {r['weight_bytes_all'] / 2**20:,.1f} MiB"
                    in split[0]), split[0]
    # `lm sample --tensor 4|8` on the same run writes what one device writes
    from lm.cli import main

    outs = []
    for tensor in ("1", "4", "8"):
        assert main(["sample", run, "--prompt", "def read(path):", "--temperature", "0", "--max-new", "24",
                     "--tensor", tensor]) == 0
        o = capsys.readouterr()
        outs.append([line for line in o.out.splitlines() if not line.startswith("decode weights")])
        assert tensor == "1" or f"decode weights split over {tensor} devices" in o.out + o.err
    assert outs[0] == outs[1] == outs[2] and len("".join(outs[0])) >= len("def read(path):")
