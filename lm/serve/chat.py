"""Talking to a run: chat-template conversations with a fine-tuned model.

`Chat` keeps the history of one conversation, renders it with the chat template
(`data_pipeline/chat.py`), drops the oldest turns when the prompt and the reply would not
fit the model's context, and streams the reply token by token until the end token.
A base model (a pretraining run) has never seen the template: `is_chat_model` tells, and
`lm chat` then says so and continues the transcript as plain text.
"""

from __future__ import annotations

from typing import Callable, Iterator

from data_pipeline.chat import ChatFormatError, chat_token_ids, generation_prompt
from lm import stages
from lm.sampling import decode
from lm.sampling.sampler import stream, warm_up_stream
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


class Chat:
    def __init__(self, run: LoadedRun, system: str = "", max_new: int = 256, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 0.95, seed: int = 0, weights=None):
        self.run, self.system = run, system
        self.weights = weights  # split decode weights (LoadedRun.decode_weights), or None: prepared per call
        self.tok = run.tokenizer
        ids = chat_token_ids(self.tok)
        self.stops = [ids["end"], self.tok.eos_id]
        self.max_new = max_new
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.history: list[dict] = []
        self.dropped = 0  # turns left out of the prompt to fit the context

    def warm_up(self) -> int:
        """Compile every program a conversation will run (lm/sampling/sampler.py
        `warm_up_stream`): `lm chat` does it while the user types the first message."""
        w = self.weights if self.weights is not None else decode.prepare(self.run.graphdef, self.run.params)
        return warm_up_stream(w, self.run.cfg.model.max_seq_len, self.max_new, self.kw["top_k"])

    def reset(self) -> None:
        self.history, self.dropped = [], 0

    def prompt_ids(self, user: str) -> list[int]:
        """The generation prompt for `user` after the history, oldest exchanges dropped to fit."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        room = self.run.cfg.model.max_seq_len - self.max_new
        history = list(self.history)
        while True:
            ids = generation_prompt(self.tok, system + history + [{"role": "user", "content": user}])
            if len(ids) <= room or not history:
                break
            history = history[2:]  # drop the oldest user/assistant exchange
            self.dropped += 1
        if len(ids) > room:
            raise ValueError(f"the message is {len(ids)} tokens; with --max-new {self.max_new} the model's "
                             f"context of {self.run.cfg.model.max_seq_len} leaves room for {room}: "
                             "shorten it or lower --max-new")
        self.history = history
        return ids

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> str:
        """Stream the assistant's reply to `user` (calling on_text with each new piece of
        text); the exchange is added to the history."""
        text = ""
        for text_now in self._stream(self.prompt_ids(user)):
            if on_text is not None:
                on_text(text_now[len(text):])
            text = text_now
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        self.seed += 1
        return text

    def _stream(self, ids: list[int]) -> Iterator[str]:
        out: list[int] = []
        for t in stream(self.run.graphdef, self.run.params, ids, self.max_new, self.run.cfg.model.max_seq_len,
                        stop_ids=self.stops, seed=self.seed, weights=self.weights, **self.kw):
            if t in self.stops:
                self.ended = True
                return
            out.append(t)
            yield self.tok.decode(out)  # decode the whole reply: pieces can merge across tokens
        self.ended = False
