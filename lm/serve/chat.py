"""Talking to a run: chat-template conversations with a fine-tuned model.

`Chat` keeps the history of one conversation, renders it with the chat template
(`data_pipeline/chat.py`), drops the oldest turns when the prompt and the reply would not
fit the model's context, and streams the reply token by token until the end token.
With a draft (`draft`, `lm chat --draft RUN_DIR`) each reply is decoded speculatively
(lm/sampling/speculative.py): the same greedy reply, sampled replies from the same
distribution, shown whole when it is done rather than token by token.
A base model (a pretraining run) has never seen the template: `is_chat_model` tells, and
`lm chat` then says so and continues the transcript as plain text.
"""

from __future__ import annotations

import threading
from typing import Callable

from data_pipeline.chat import (
    ChatFormatError,
    chat_token_ids,
    generation_prompt,
    has_tool_tokens,
    parse_reply,
    tool_token_ids,
)
from lm import stages
from lm.agent import registry
from lm.sampling import decode, speculative
from lm.sampling.sampler import _pack, stream, warm_up_stream
from lm.stages import STAGES
from lm.train.run import LoadedRun


def is_chat_model(run: LoadedRun) -> bool:
    """A run fine-tuned on conversations whose tokenizer has the chat role tokens."""
    if run.tokenizer is None or run.cfg.stage not in STAGES or not stages.get(run.cfg.stage).chat:
        return False
    try:
        chat_token_ids(run.tokenizer)
    except ChatFormatError:
        return False
    return True


MAX_TOOL_CALLS = 4  # rounds of tool calls within one reply


class Chat:
    """One conversation. With `tools` (lm/agent/registry.py `Tool`s) their definitions lead
    the prompt, and a reply that calls tools gets their results (run here) and goes on, up
    to `max_tool_calls` rounds; `on_tool(name, arguments, result)` sees each call."""

    def __init__(self, run: LoadedRun, system: str = "", max_new: int = 256, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 0.95, seed: int = 0, weights=None, tools=None,
                 max_tool_calls: int = MAX_TOOL_CALLS, draft: decode.Weights | None = None, draft_k: int = 4):
        self.run, self.system = run, system
        self.draft, self.draft_k = draft, draft_k  # speculative decoding: a draft's decode weights
        self.drafted = self.accepted = 0  # the draft's proposals so far, and how many the run kept
        self._lock = threading.Lock()
        self.tools = list(tools or [])
        if self.tools and not has_tool_tokens(run.tokenizer):
            raise ChatFormatError(f"{run.run_dir or 'this run'} was not trained to call tools: its tokenizer has no "
                                  "tool tokens (fine-tune a run whose tokenizer has them: data.tool_tokens=True)")
        self.tool_call_id = tool_token_ids(run.tokenizer)["tool_call"] if self.tools else None
        self.max_tool_calls = max_tool_calls
        self.weights = weights  # split decode weights (LoadedRun.decode_weights), or None: prepared per call
        self.tok = run.tokenizer
        ids = chat_token_ids(self.tok)
        self.stops = [ids["end"], self.tok.eos_id]
        self.max_new = max_new
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.history: list[dict] = []
        self.dropped = 0  # turns left out of the prompt to fit the context

    def warm_up(self, stop=None) -> int:
        """Compile every program a conversation will run (lm/sampling/sampler.py
        `warm_up_stream`): `lm chat` does it while the user types the first message."""
        w = self._target()
        max_len = self.run.cfg.model.max_seq_len
        if self.draft is None:
            return warm_up_stream(w, max_len, self.max_new, self.kw["top_k"], stop=stop)
        # the speculative program of every prompt width (one whole reply each, on a dummy prompt)
        room = max(1, max_len - self.max_new)
        widths = sorted({_pack([[1] * n], self.max_new, max_len, speculative.BUCKET, pow2=True)[0].shape[1]
                         for n in range(1, room + 1)})
        for width in widths:
            if stop is not None and stop.is_set():  # (a threading.Event: the conversation is over)
                break
            speculative.generate(w, self.draft, [1] * width, self.max_new, max_len, k=self.draft_k,
                                 stop_ids=self.stops, **self.kw)
        return len(widths)

    def _target(self) -> decode.Weights:
        with self._lock:  # (the warm-up thread and the first reply may both ask)
            if self.weights is None:
                self.weights = decode.prepare(self.run.graphdef, self.run.params)
            return self.weights

    def reset(self) -> None:
        self.history, self.dropped = [], 0

    def prompt_ids(self, user: str, turn: list[dict] = ()) -> list[int]:
        """The generation prompt for `user` (and this turn's tool calls and results so far)
        after the history, oldest exchanges dropped to fit."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        room = self.run.cfg.model.max_seq_len - self.max_new
        history = list(self.history)
        specs = [t.spec() for t in self.tools] or None
        while True:
            ids = generation_prompt(self.tok, system + history + [{"role": "user", "content": user}, *turn],
                                    tools=specs)
            if len(ids) <= room or not history:
                break
            # drop the oldest exchange: up to the next user message (tool calls and results included)
            nxt = next((i for i, m in enumerate(history) if i and m["role"] == "user"), len(history))
            history = history[nxt:]
            self.dropped += 1
        if len(ids) > room:
            raise ValueError(f"the message is {len(ids)} tokens; with --max-new {self.max_new} the model's "
                             f"context of {self.run.cfg.model.max_seq_len} leaves room for {room}: "
                             "shorten it or lower --max-new")
        self.history = history
        return ids

    def reply(self, user: str, on_text: Callable[[str], None] | None = None,
              on_tool: Callable[[str, str, str], None] | None = None) -> str:
        """Stream the assistant's reply to `user` (calling on_text with each new piece of
        text, on_tool with each tool call and its result); the exchange is added to the
        history. Returns the reply's text (the last turn's, after any tool calls)."""
        turn: list[dict] = []
        for rounds in range(self.max_tool_calls + 1):
            ids = self._generate(self.prompt_ids(user, turn), on_text)
            text, calls = parse_reply(self.tok, ids) if self.tools else (self.tok.decode(ids), [])
            if not calls or rounds == self.max_tool_calls:  # (the last round's calls are not run)
                break
            turn.append({"role": "assistant", "content": text,
                         "tool_calls": [{"name": c["name"] or "invalid", "arguments": c["arguments"]}
                                        for c in calls]})
            for c in calls:
                result = (registry.run(self.tools, c["name"], c["arguments"]) if c["name"] is not None else
                          'error: a tool call is a JSON object {"name": ..., "arguments": {...}}')
                if on_tool is not None:
                    on_tool(c["name"] or "?", c["arguments"], result)
                turn.append({"role": "tool", "content": result})
            self.seed += 1
        self.history += [{"role": "user", "content": user}, *turn, {"role": "assistant", "content": text}]
        self.seed += 1
        return text

    def _generate(self, prompt: list[int], on_text) -> list[int]:
        """The reply's tokens (before its end token); the text before any tool call streamed."""
        ids: list[int] = []
        shown, calling = "", False
        self.ended = False  # whether the reply ended with its end token (else it ran to max_new)
        if self.draft is not None:
            return self._speculate(prompt, on_text)
        for t in stream(self.run.graphdef, self.run.params, prompt, self.max_new, self.run.cfg.model.max_seq_len,
                        stop_ids=self.stops, seed=self.seed, weights=self.weights, **self.kw):
            if t in self.stops:
                self.ended = True
                break
            ids.append(t)
            calling = calling or t == self.tool_call_id
            if not calling and on_text is not None:
                text = self.tok.decode(ids)  # the whole reply: pieces can merge across tokens
                on_text(text[len(shown):])
                shown = text
        return ids

    def _speculate(self, prompt: list[int], on_text) -> list[int]:
        r = speculative.generate(self._target(), self.draft, prompt, self.max_new, self.run.cfg.model.max_seq_len,
                                 k=self.draft_k, stop_ids=self.stops, seed=self.seed, **self.kw)
        self.drafted += r.drafted
        self.accepted += r.accepted
        ids = []
        for t in r.tokens:
            if t in self.stops:
                self.ended = True
                break
            ids.append(t)
        if on_text is not None:
            shown = ids[:ids.index(self.tool_call_id)] if self.tool_call_id in ids else ids
            on_text(self.tok.decode(shown))
        return ids
