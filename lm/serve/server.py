"""`lm serve RUN_DIR`: an OpenAI-compatible HTTP server over continuous batching.

Endpoints: `GET /v1/models` (and `/v1/models/ID`), `POST /v1/completions`, `POST
/v1/chat/completions` (the chat template of data_pipeline/chat.py; a base model has none
and is refused there), and `GET /health` (slots in use, queue, counters: for key holders).
Options: `max_tokens` (`max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed`,
`stream` (server-sent events, with `stream_options.include_usage`), `logprobs` (the chosen
tokens'), `echo` on /v1/completions (the prompt first, with its tokens' log-probabilities
and the most likely token at each position; `max_tokens` 0 for the prompt alone: what
lm-evaluation-harness's `local-completions` model sends), `tools` and `tool_choice` ("auto"
or "none") on /v1/chat/completions for a model whose tokenizer has the tool tokens (the
reply's calls come back as `tool_calls` with finish_reason "tool_calls", streamed as
deltas; the client runs them and sends `role: tool` messages back). Not supported, and
refused with a 400 rather than ignored: `n` > 1, `best_of`, `echo` with `stream`,
`suffix`, `functions`, other `tool_choice`s, `top_logprobs`, `logit_bias`, penalties, a
non-text `response_format`.

Every request runs in one slot of the `lm.serve.batching.Batcher`, which steps all slots at
once on its own thread; the event loop only queues and streams (bodies are parsed and
prompts tokenised in a worker thread). Bad requests get OpenAI-style errors (`{"error":
{"message", "type", "param", "code"}}`, status 400, 401, 404, 405, 413), never a
traceback; a bug answers its request with a 500 of that shape and the server lives on. A
client that goes away mid-answer frees its slot at the next step. The ASGI stack is
Starlette on uvicorn. `--api-key` (or LM_API_KEY) makes every request need
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import socket
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from data_pipeline.chat import chat_token_ids, generation_prompt, has_tool_tokens, parse_reply, tool_token_ids
from data_pipeline.errors import UserError
from lm.sampling import decode
from lm.serve.batching import Batcher, Event, Request
from lm.serve.chat import is_chat_model
from lm.train.run import load_run

MAX_STOPS = 4  # as OpenAI
SHUTTING_DOWN = "the server is shutting down: retry on another server, or here when it is back"
RETRY_AFTER = "5"  # seconds, in 503 answers while the server stops
DISCONNECT_CHECK = 0.05  # seconds between checks that a non-streaming client is still there
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 4 << 20  # bytes of a request body (a prompt that long exceeds any context anyway)
MAX_IN_FLIGHT = 64 << 20  # bytes of request bodies being read or parsed at once; more wait (503)
REQUEST_TIMEOUT = 30.0  # seconds a client has to send a request's headers, and then its body
PREFIX_CACHE_MB = 64.0  # memory for saved prompts' keys/values (lm/serve/batching.py PrefixCache)


class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after


def _error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


# ---------------------------------------------------------------------------------------
# Request parsing: JSON body -> lm.serve.batching.Request


def _number(body: dict, name: str, default, low=None, high=None, integer: bool = False, low_open: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int))
            or (isinstance(v, float) and not math.isfinite(v))):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {v!r:.40}", name)
    if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
        rng = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise APIError(400, f"'{name}' must be in {rng}, got {v}", name)
    return v


def _text(s: str, param: str) -> str:
    """`s` if it is valid Unicode (JSON can carry lone UTF-16 surrogates, which are not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode text (it holds a lone UTF-16 surrogate)", param) from None
    return s


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, got {v!r:.40}", name)
    return bool(v)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(_text(s, "stop") for s in stops if s)


def _unsupported(body: dict, chat: bool = False) -> None:
    if _number(body, "n", 1, 1, integer=True) != 1:
        raise APIError(400, "only n=1 is supported (send the request n times, with different seeds)", "n")
    if body.get("best_of", 1) not in (None, 1):
        raise APIError(400, "best_of is not supported", "best_of")
    if body.get("echo") and chat:
        raise APIError(400, "echo is for /v1/completions", "echo")
    if body.get("echo") and body.get("stream"):
        raise APIError(400, "echo with stream is not supported: echo without streaming", "echo")
    if body.get("suffix"):
        raise APIError(400, "suffix is not supported", "suffix")
    if body.get("functions") or body.get("function_call"):
        raise APIError(400, "functions are not supported: use tools", "functions")
    if body.get("tools") and not chat:
        raise APIError(400, "tools are for /v1/chat/completions", "tools")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise APIError(400, f"{name} is not supported (leave it 0)", name)
    for name in ("top_k", "min_tokens", "min_p", "repetition_penalty"):  # other servers' extensions
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server (it samples with temperature, top_p, "
                                "seed, stop and max_tokens)", name)
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    if _number(body, "top_logprobs", 0, 0, 20, integer=True) > 0:
        raise APIError(400, "top_logprobs is not supported: logprobs gives the chosen tokens' only", "top_logprobs")


def _want_logprobs(body: dict, chat: bool) -> bool:
    """Chat: `logprobs` true or false. Completions: an integer (alternatives per token, of
    which only 0 or 1 is served: the chosen token's) or a boolean."""
    if chat:
        return _flag(body, "logprobs")
    v = body.get("logprobs")
    if isinstance(v, bool) or v is None:
        return bool(v)
    if _number(body, "logprobs", 0, 0, 5, integer=True) > 1:
        raise APIError(400, "only the chosen tokens' log-probabilities are served: logprobs must be 0 or 1",
                       "logprobs")
    return v == 1


def _stream_usage(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with stream: true", "stream_options")
    return _flag(opts, "include_usage")


def _tools(body: dict) -> list[dict] | None:
    """The request's tool definitions, checked field by field (None: no tools, or
    tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise APIError(400, "tool_choice must be 'auto' or 'none' (forcing a call is not supported)", "tool_choice")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of tool definitions", "tools")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise APIError(400, f"tools[{i}] must be an object with type 'function'", f"tools[{i}].type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise APIError(400, f"tools[{i}].function must be an object", f"tools[{i}].function")
        if not isinstance(f.get("name"), str) or not f["name"] or len(f["name"]) > 64:
            raise APIError(400, f"tools[{i}].function.name must be a string of 1 to 64 characters",
                           f"tools[{i}].function.name")
        if "description" in f and not isinstance(f["description"], str):
            raise APIError(400, f"tools[{i}].function.description must be a string",
                           f"tools[{i}].function.description")
        if "parameters" in f and not isinstance(f["parameters"], dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
    return None if choice == "none" else tools


def _message(m, i: int) -> dict:
    """A chat message of the request: role, content, and an assistant's tool calls."""
    if not isinstance(m, dict):
        raise APIError(400, "each message must be an object with 'role' and 'content'", "messages")
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise APIError(400, f"messages[{i}].tool_calls must be a list of {{type, id, function}} objects",
                           f"messages[{i}].tool_calls")
        content = m.get("content")
        return {"role": "assistant", "content": "" if content is None else _message_text(content),
                "tool_calls": [c["function"] for c in calls]}
    return {"role": m.get("role"), "content": _message_text(m.get("content"))}


def _message_text(content) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return _text(content, "messages")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return _text("".join(p["text"] for p in content), "messages")
    raise APIError(400, "a message's content must be a string or a list of text parts", "messages")


class Service:
    """The protocol side of the server: requests -> batcher, events -> OpenAI answers."""

    def __init__(self, batcher: Batcher, tokenizer, model_name: str, chat: bool, api_key: str | None = None,
                 log: Callable = print, host: str = "127.0.0.1", request_timeout: float = REQUEST_TIMEOUT,
                 max_in_flight: int = MAX_IN_FLIGHT):
        self.batcher, self.tok, self.model_name, self.chat, self.api_key = batcher, tokenizer, model_name, chat, api_key
        self.host = host  # the address it listens on
        self.request_timeout, self.max_in_flight = request_timeout, max_in_flight
        self.in_flight = 0  # bytes of bodies being read, parsed or tokenised (event loop only)
        self.log = log
        self.stop_ids = (tokenizer.eos_id,)
        self.chat_stop_ids = self.stop_ids
        if chat:
            self.chat_stop_ids = (chat_token_ids(tokenizer)["end"], tokenizer.eos_id)
        self.tools = chat and has_tool_tokens(tokenizer)  # it can be asked with tools
        self.tool_call_id = tool_token_ids(tokenizer)["tool_call"] if self.tools else None
        self.created = int(time.time())
        # No token covers more characters than its piece has (a byte piece "<0x41>" covers one):
        # a text longer than max_len times this is over the context, known without tokenising it
        # (SentencePiece needs hundreds of bytes per character of what it encodes).
        self.chars_per_token = max(len(tokenizer.sp.id_to_piece(i)) for i in range(tokenizer.vocab_size))

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise APIError(400, "you must provide a model parameter", "model")
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def request(self, body: dict, chat: bool) -> Request:
        """Check a completion request's fields and tokenise its prompt."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body)
        _unsupported(body, chat)
        if chat:
            if not self.chat:
                raise APIError(400, f"'{self.model_name}' is a base model without chat fine-tuning (no chat "
                                    "template): use /v1/completions", "messages")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list of messages", "messages")

            msgs = [_message(m, i) for i, m in enumerate(messages)]
            tools = _tools(body)
            uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)
            if uses_tools and not self.tools:
                raise APIError(400, f"'{self.model_name}' was not trained to call tools (its tokenizer has no tool "
                                    "tokens)", "tools")
            self._check_chars(sum(len(m["content"]) for m in msgs) + len(json.dumps(tools or [])), "messages")
            try:
                prompt = generation_prompt(self.tok, msgs, tools=tools)
            except UserError as e:
                raise APIError(400, str(e), "messages") from None
            stop_ids = self.chat_stop_ids
        else:
            prompt = self._prompt(body.get("prompt"))
            stop_ids = self.stop_ids
        max_len = self.batcher.max_len
        if len(prompt) >= max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the prompt has "
                                f"{len(prompt)}: shorten it", "messages" if chat else "prompt",
                           "context_length_exceeded")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        room = max_len - len(prompt)
        echo = not chat and _flag(body, "echo")  # (max_tokens 0: the prompt's log-probabilities only)
        max_tokens = _number(body, name, room if chat else min(16, room), 0 if echo else 1, integer=True)
        if len(prompt) + max_tokens > max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt has "
                                f"{len(prompt)} and {name} asks for {max_tokens} more: lower {name} to at most "
                                f"{room}", name, "context_length_exceeded")
        seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)  # as `lm sample --seed`
        req = Request(prompt=prompt, max_tokens=max_tokens,
                      temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                      top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
                      seed=secrets.randbits(31) if seed is None else seed, stop_ids=stop_ids,
                      stop_text=_stops(body))
        req.with_tools = bool(chat and tools)  # the reply's tool calls are parsed out of its tokens
        return req

    def tool_reply(self, prompt: list[int], tokens: list[int]) -> tuple[str, list[dict]]:
        """A reply's text (before its first call) and its tool calls in OpenAI's shape."""
        text, calls = parse_reply(self.tok, tokens)
        cut = tokens.index(self.tool_call_id) if self.tool_call_id in tokens else len(tokens)
        text = self.tok.decode_after(prompt, tokens[:cut]) if calls else text
        return text, [{"id": "call_" + secrets.token_hex(12), "type": "function",
                       "function": {"name": c["name"] or "", "arguments": c["arguments"]}} for c in calls]

    def prompt_logprobs(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(each prompt token's log-probability after the ones before it, the most likely
        token there, its log-probability), for tokens 1.. of `prompt` (one forward pass on the
        server's weights; the prompt padded to a power of two)."""
        width = min(self.batcher.max_len, decode.pow2_width(len(prompt), 16))
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(prompt)] = prompt
        out = decode.prompt_logprobs(self.batcher.w, tokens)
        return tuple(np.asarray(a)[0, : len(prompt) - 1] for a in out)

    def _check_chars(self, n: int, param: str) -> None:
        """Refuse a text that cannot fit the context, before tokenising it."""
        max_len = self.batcher.max_len
        if n > max_len * self.chars_per_token:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the {param} has "
                                f"{n:,} characters, more than {max_len} tokens of at most {self.chars_per_token} "
                                "characters each: shorten it", param, "context_length_exceeded")

    def _prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
            return self.tok.encode(_text(prompt, "prompt"), bos=True)
        if (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            if not all(0 <= t < self.batcher.w.cfg.vocab_size for t in prompt):
                raise APIError(400, f"token ids must be in [0, {self.batcher.w.cfg.vocab_size})", "prompt")
            return list(prompt)
        if prompt is None:
            raise APIError(400, "you must provide a prompt", "prompt")
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list holding one of them "
                            "(batches of several prompts are not supported: send one request each)", "prompt")


# ---------------------------------------------------------------------------------------
# The ASGI application


def make_app(service: Service):
    """The Starlette application over `service`."""
    from starlette.applications import Starlette  # optional extra [serve]
    from starlette.concurrency import run_in_threadpool  # optional extra [serve]
    from starlette.exceptions import HTTPException  # optional extra [serve]
    from starlette.requests import ClientDisconnect  # optional extra [serve]
    from starlette.requests import Request as HTTPRequest  # optional extra [serve]
    from starlette.responses import JSONResponse, Response, StreamingResponse  # optional extra [serve]
    from starlette.routing import Route  # optional extra [serve]

    def error(e: APIError, headers: dict | None = None) -> JSONResponse:
        if e.retry_after:
            headers = {**(headers or {}), "Retry-After": e.retry_after}
        if e.status == 408:  # the rest of the body may still come: not this connection's next request
            headers = {**(headers or {}), "Connection": "close"}
        return JSONResponse(_error_body(e), status_code=e.status, headers=headers)

    def authorised(request: HTTPRequest) -> bool:
        if not service.api_key:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), service.api_key.encode())

    def local_host(request: HTTPRequest) -> bool:
        """Without an API key, a server on a loopback address answers only requests addressed to
        it by a loopback name: a web page cannot reach it by DNS rebinding (its Host would be the
        page's domain)."""
        if service.api_key or service.host not in LOOPBACK:
            return True
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        return name in LOOPBACK

    def guarded(handler: Callable):
        async def endpoint(request: HTTPRequest):
            if not local_host(request):
                return error(APIError(421, f"this server answers requests to {service.host} (Host "
                                           f"{request.headers.get('host', '')!r} is not it); use an API key "
                                           "(--api-key) to serve other names", code="misdirected_request"))
            if not authorised(request):
                return error(APIError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"))
            try:
                return await handler(request)
            except ClientDisconnect:  # the client left before its request was read: nobody to answer
                return Response(status_code=400)
            except APIError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001 -- a bug answers this request with a 500, the server lives on
                service.log(f"server: internal error on {request.method} {request.url.path}:\n"
                            f"{traceback.format_exc()}")
                return error(APIError(500, f"internal server error ({type(e).__name__})", kind="server_error"))

        return endpoint

    @contextlib.asynccontextmanager
    async def body_bytes(request: HTTPRequest):
        """The bytes of the request's body received so far (`held[0]`), counted among the bytes
        in flight (MAX_IN_FLIGHT) until it is parsed and its prompt tokenised: a burst of large
        bodies waits its turn (503) instead of taking the server's memory. Bytes are counted as
        they arrive, so a client that declares a large body and stalls holds only what it sent."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY}")
        held = [0]
        try:
            yield held
        finally:
            service.in_flight -= held[0]

    async def read_json(request: HTTPRequest, held: list[int]) -> Any:
        """The body as JSON, at most MAX_BODY bytes, all of it within the request timeout,
        parsed off the event loop (a large body must not stall the running streams)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"the request body must be JSON with 'Content-Type: application/json' (got "
                                f"{ctype or 'none'!r})")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise APIError(413, f"the request body is over the limit of {MAX_BODY} bytes")
                others = service.in_flight - held[0]
                if others and service.in_flight + len(chunk) > service.max_in_flight:
                    raise APIError(503, f"the server is busy reading {others:,} bytes of other requests: retry "
                                        "shortly", kind="server_error", code="too_many_bytes_in_flight",
                                   retry_after="1")
                service.in_flight += len(chunk)
                held[0] += len(chunk)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            data = await asyncio.wait_for(read(), service.request_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {service.request_timeout:g}s",
                           code="request_timeout") from None
        try:
            return await run_in_threadpool(json.loads, data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({str(e)[:200] or type(e).__name__})") from None

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "lm"}

    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: HTTPRequest):
        name = request.path_params["model"]
        if name != service.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{service.model_name}'",
                           "model", "model_not_found")
        return JSONResponse(model_card())

    async def health(request: HTTPRequest):
        if not authorised(request):  # alive, but the counters are for key holders
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": service.model_name, **service.batcher.status()})

    async def completions(request: HTTPRequest, chat: bool = False):
        async with body_bytes(request) as held:
            body = await read_json(request, held)
            req = await run_in_threadpool(service.request, body, chat)  # tokenising a long prompt takes a while
        stream = req.stream = _flag(body, "stream")
        with_tools = req.with_tools
        include_usage = _stream_usage(body, stream)
        want_logprobs = _want_logprobs(body, chat)
        context = list(req.prompt)  # the tokens before the next event's: each token's text follows them
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        echo = None  # with `echo`: (the prompt's text, its tokens' logprobs or None)
        if not chat and _flag(body, "echo"):
            p = body.get("prompt")
            p = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)) else p
            lps = await run_in_threadpool(service.prompt_logprobs, req.prompt) if want_logprobs else None
            echo = (p if isinstance(p, str) else service.tok.decode(req.prompt),
                    _echo_logprobs(service.tok, req.prompt, lps) if lps is not None else None)
            if req.max_tokens == 0:  # the prompt alone (what evaluation harnesses score)
                c = {"index": 0, "text": echo[0], "finish_reason": "length", "logprobs": echo[1]}
                return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                                     "model": service.model_name, "choices": [c],
                                     "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": 0,
                                               "total_tokens": len(req.prompt)}})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = service.batcher.submit(req, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except RuntimeError as e:
            raise APIError(503, str(e), kind="server_error", retry_after=RETRY_AFTER) from None
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": service.model_name}

        def choice(ev: Event) -> dict:
            if chat:
                c = {"index": 0, "delta": {"content": ev.text} if ev.text else {}, "finish_reason": ev.finish}
            else:
                c = {"index": 0, "text": ev.text, "finish_reason": ev.finish, "logprobs": None}
            if want_logprobs:
                c["logprobs"] = _logprobs(service.tok, context, ev, chat)
                context.extend(ev.tokens)
            return c

        if stream:
            async def events():
                done = False
                try:
                    extra = {"usage": None} if include_usage else {}
                    if chat:  # the first chunk names the role, as OpenAI's do
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": None}], **extra})
                    toks, shown = [], ""  # with tools: the reply's tokens, the text sent (the text before a call)
                    while True:
                        ev = await queue.get()
                        if ev.error:
                            yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None,
                                                  "code": None}})
                            break
                        if with_tools:  # text until the first call; the calls at the end, as deltas
                            toks += ev.tokens
                            cut = toks.index(service.tool_call_id) if service.tool_call_id in toks else None
                            if ev.finish:
                                text, calls = service.tool_reply(req.prompt, toks)
                            elif cut is not None:  # a call has begun: its text is not content
                                text, calls = service.tok.decode_after(req.prompt, toks[:cut]), []
                            else:
                                text, calls = shown + ev.text, []
                            ev = dataclasses.replace(ev, text=text[len(shown):] if len(text) > len(shown) else "")
                            shown += ev.text
                            if calls:
                                deltas = [{"index": k, **c, "function": dict(c["function"])}
                                          for k, c in enumerate(calls)]
                                if ev.text:
                                    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": ev.text},
                                                                     "finish_reason": None}], **extra})
                                yield _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": deltas},
                                                                 "finish_reason": None}], **extra})
                                ev = dataclasses.replace(ev, text="", finish="tool_calls")
                            if not ev.finish and ev.text == "":
                                continue
                        if ev.text or ev.finish or (want_logprobs and ev.tokens):
                            yield _sse({**base, "choices": [choice(ev)], **extra})
                        if ev.finish:
                            if include_usage:
                                yield _sse({**base, "choices": [], "usage": _usage(ev)})
                            break
                    done = True
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:  # the client went away (or the server stops): free the slot
                        handle.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text, tokens, logps = [], [], []
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK)
                except asyncio.TimeoutError:
                    ev = None
                if ev is None or time.monotonic() - checked > DISCONNECT_CHECK:  # gone? (also while tokens flow)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        handle.cancel()
                        return JSONResponse({}, status_code=499)
                    if ev is None:
                        continue
                if ev.error:
                    if ev.error == SHUTTING_DOWN:
                        raise APIError(503, ev.error, kind="server_error", retry_after=RETRY_AFTER)
                    raise APIError(500, ev.error, kind="server_error")
                text.append(ev.text)
                tokens += ev.tokens
                logps += ev.logprobs
                if ev.finish:
                    break
        except asyncio.CancelledError:
            handle.cancel()
            raise
        final = Event(text="".join(text), tokens=tokens, logprobs=logps, finish=ev.finish)
        calls = []
        if with_tools:
            reply_text, calls = service.tool_reply(req.prompt, tokens)
            final = dataclasses.replace(final, text=reply_text)
        if calls:
            c = {"index": 0, "message": {"role": "assistant", "content": final.text or None, "tool_calls": calls},
                 "finish_reason": "tool_calls"}
        elif chat:
            c = {"index": 0, "message": {"role": "assistant", "content": final.text}, "finish_reason": ev.finish}
        else:
            c = {"index": 0, "text": final.text, "finish_reason": ev.finish, "logprobs": None}
        if want_logprobs:
            c["logprobs"] = _logprobs(service.tok, context, final, chat)
        if echo is not None:  # the prompt first: its text, tokens and log-probabilities
            c["text"] = echo[0] + c["text"]
            if echo[1] is not None:
                mine = c["logprobs"]
                top = [{t: lp} for t, lp in zip(mine["tokens"], mine["token_logprobs"])]  # (the chosen: see README)
                c["logprobs"] = {"tokens": echo[1]["tokens"] + mine["tokens"],
                                 "token_logprobs": echo[1]["token_logprobs"] + mine["token_logprobs"],
                                 "top_logprobs": echo[1]["top_logprobs"] + top, "text_offset": None}
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion", "choices": [c],
                             "usage": _usage(ev)})

    async def chat_completions(request: HTTPRequest):
        return await completions(request, chat=True)

    async def not_found(request: HTTPRequest, exc: HTTPException):
        status = exc.status_code
        message = (f"{request.method} {request.url.path} is not allowed" if status == 405
                   else f"no route {request.url.path} (try /v1/models, /v1/completions, /v1/chat/completions)"
                   if status == 404 else str(exc.detail))
        return error(APIError(status, message), headers=getattr(exc, "headers", None))

    routes = [Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def _echo_logprobs(tok, prompt: list[int], lps) -> dict:
    """Completions' `logprobs` for the prompt's tokens (OpenAI's shape with echo: the first
    token has none; `top_logprobs` holds the most likely token at each position)."""
    chosen, top, top_lp = lps
    pieces = tok.token_texts([], prompt)
    top_pieces = [tok.token_texts(prompt[: i + 1], [int(t)])[0] for i, t in enumerate(top)]
    return {"tokens": pieces, "token_logprobs": [None] + [float(x) for x in chosen],
            "top_logprobs": [None] + [{p: float(x)} for p, x in zip(top_pieces, top_lp)], "text_offset": None}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _logprobs(tok, context: list[int], ev: Event, chat: bool) -> dict:
    """The chosen tokens' log-probabilities; each token's text as it reads after the tokens
    before it (`context`), so that they join into the answer."""
    pieces = tok.token_texts(context, ev.tokens)
    if chat:
        return {"content": [{"token": p, "logprob": lp, "bytes": tok.token_bytes(t, p), "top_logprobs": []}
                            for t, p, lp in zip(ev.tokens, pieces, ev.logprobs)]}
    return {"tokens": pieces, "token_logprobs": ev.logprobs, "top_logprobs": None, "text_offset": None}


# ---------------------------------------------------------------------------------------
# Running it


def build(run_dir: str, slots: int = 8, max_len: int | None = None, api_key: str | None = None,
          model_name: str | None = None, log: Callable = print, host: str = "127.0.0.1",
          request_timeout: float = REQUEST_TIMEOUT, tensor: int = 1,
          quantize: str | None = None, prefix_cache_mb: float = PREFIX_CACHE_MB) -> tuple[Any, Batcher]:
    """Load the run (split over `tensor` devices), start its batcher (compiling the decode
    programs) and make the app."""
    run = load_run(run_dir, log=log, tensor=tensor)
    if run.tokenizer is None:
        raise UserError(f"{run_dir} has no tokenizer.model: the server needs the run's tokenizer")
    cfg = run.cfg.model
    if max_len is not None and not 2 <= max_len <= cfg.max_seq_len:
        raise UserError(f"--max-len {max_len} must be in [2, {cfg.max_seq_len}] (the model's context)")
    name = model_name or os.path.basename(os.path.abspath(run_dir))
    batcher = Batcher(run.decode_weights(log, quantize), run.tokenizer.decode_after, slots=slots,
                      max_len=max_len or cfg.max_seq_len, log=log, prefix_cache_mb=prefix_cache_mb).start()
    chat = is_chat_model(run)
    template = "chat template" if chat else "no chat template: /v1/completions only"
    log(f"serving {run_dir} as '{name}' ({run.cfg.stage}, step {run.step}, {template}), {slots} slots of "
        f"{batcher.max_len} tokens")
    service = Service(batcher, run.tokenizer, name, chat, api_key, log=log, host=host, request_timeout=request_timeout)
    return make_app(service), batcher


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, slots: int = 8, max_len: int | None = None,
          api_key: str | None = None, model_name: str | None = None, log: Callable = print,
          request_timeout: float = REQUEST_TIMEOUT, tensor: int = 1, quantize: str | None = None,
          prefix_cache_mb: float = PREFIX_CACHE_MB) -> int:
    """`lm serve`: bind (port 0: any free port), build the app and serve until interrupted."""
    import uvicorn  # optional extra [serve]

    try:  # first, so a port in use is reported at once
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        app, batcher = build(run_dir, slots, max_len, api_key, model_name, log, host=host,
                             request_timeout=request_timeout, tensor=tensor, quantize=quantize,
                             prefix_cache_mb=prefix_cache_mb)
    except BaseException:
        sock.close()
        raise
    log(f"listening on http://{host}:{sock.getsockname()[1]}" + (" (API key required)" if api_key else "")
        + " -- Ctrl-C stops")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE + 2,
                            http=_protocol_class(request_timeout))
    try:
        _Server(config, batcher, log).run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
    return 0


GRACE = 5.0  # seconds the running requests get to finish after SIGTERM/SIGINT


def _server_class():
    import uvicorn  # optional extra [serve]

    class Server(uvicorn.Server):
        """uvicorn's server, stopping in order on SIGTERM/SIGINT: admissions end at once (new and
        queued requests get 503 with Retry-After), the running ones have GRACE seconds to finish
        and are then ended with an error event (and [DONE] for streams), then it exits."""

        def __init__(self, config, batcher: Batcher, log: Callable):
            super().__init__(config)
            self.batcher, self.log, self.stopping = batcher, log, False

        def handle_exit(self, sig, frame) -> None:
            if self.stopping:  # a second signal: at once
                return super().handle_exit(sig, frame)
            self.stopping = True
            self.batcher.drain(SHUTTING_DOWN)
            self.log(f"stopping: no new requests; the running ones get {GRACE:.0f}s to finish")

            def later():
                deadline = time.monotonic() + GRACE
                while time.monotonic() < deadline and self.batcher.status()["active"]:
                    time.sleep(0.05)
                self.batcher.fail_running(SHUTTING_DOWN)
                time.sleep(0.5)  # (their error events reach the clients)
                super(Server, self).handle_exit(sig, None)

            threading.Thread(target=later, daemon=True).start()

    return Server


def _protocol_class(timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request's
    headers within `timeout` seconds of opening (or of its first byte after an answer): uvicorn
    waits for them forever, so idle sockets would pile up. The body's time is the app's."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # optional extra [serve]

    class Protocol(H11Protocol):
        header_timer = None

        def waiting(self) -> bool:  # for a request's headers
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(timeout, self.expire)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def expire(self) -> None:
            self.header_timer = None
            if self.waiting() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            if self.waiting():
                self.arm()
            super().data_received(data)
            if not self.waiting():  # a request has begun: its headers are in
                self.disarm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return Protocol


def _Server(config, batcher: Batcher, log: Callable):
    return _server_class()(config, batcher, log)
