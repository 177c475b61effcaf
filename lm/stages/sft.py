"""Supervised fine-tuning: next-token loss on the assistant turns of chat conversations.

The objective is pretraining's (`NextToken`); what changes is the data: conversations
(Alpaca, OpenAI `messages`, ShareGPT, LIMA records) rendered with the chat template
(`data_pipeline/chat.py`), packed several to a row, and a loss mask that keeps only the
assistant replies and their end tokens. The run starts from another run's parameters
(`trainer.init_from`) and uses its tokenizer, which must have the chat role tokens.

With `data.corpus="default"` the conversations are the embedded standard-library Q&A set
(`data_pipeline/default_chat.py`): nothing to download.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Callable

from data_pipeline import default_chat, tasks
from data_pipeline.chat import chat_token_ids, generation_prompt
from data_pipeline.chat_data import chat_data
from data_pipeline.config import SourceConfig
from data_pipeline.pipeline import Streams
from data_pipeline.tokenizer import Tokenizer
from lm.agent import registry
from lm.config import Config, ConfigError
from lm.objectives.next_token import NextToken
from lm.stages import Stage
from lm.stages.common import base_evals, evaluators, print_samples, problems, run_meta, run_tokenizer, tool_list
from lm.train.engine import make_engine
from lm.train.init import init_params_loader
from lm.train.loop import Setup

SAMPLE_QUESTIONS = ("What is the `json` module for?", "What does `os.path.join` do?",
                    "How do I call `math.isclose`?", "Explain `collections.Counter`.")


def data_config(cfg: Config, run_dir: str):
    """The run's chat sources; the default corpus is the embedded standard-library Q&A set."""
    d = cfg.data
    embedded = lambda: default_chat.write_jsonl(os.path.join(run_dir, "data", "stdlib_chat.jsonl"), d.seed)  # noqa: E731
    if d.corpus == "default":
        src = SourceConfig(name="stdlib_chat", kind="chat", paths=(embedded(),), chat_format="messages",
                           heldout_fraction=d.heldout_fraction)
        return dataclasses.replace(d, corpus="sources", sources=(src,))
    task_paths = {p for s in d.sources for p in s.paths if p.startswith("<task:")}
    if task_paths:  # the training problems of an RL task (data_pipeline/tasks.py) as chat records
        d = dataclasses.replace(d, sources=tuple(
            dataclasses.replace(s, paths=tuple(_task_file(cfg, run_dir, p) if p in task_paths else p for p in s.paths))
            for s in d.sources))
    if any(default_chat.EMBEDDED in s.paths for s in d.sources):  # the embedded set as one source of a mixture
        d = dataclasses.replace(d, sources=tuple(
            dataclasses.replace(s, paths=tuple(embedded() if p == default_chat.EMBEDDED else p for p in s.paths))
            for s in d.sources))
    if d.corpus != "sources":
        raise ConfigError(f"data.corpus={d.corpus!r}: SFT reads chat sources (data.corpus='sources' with "
                          "kind='chat' sources) or the embedded set (data.corpus='default')")
    return d


def _task_file(cfg: Config, run_dir: str, path: str) -> str:
    """"<task:arith>" -> a JSON Lines file of that task's training problems with their answers
    (only the training split: the RL stage's held-out prompts stay unseen)."""
    name = path[len("<task:"):-1]
    task_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, task=name))
    train, _ = problems(task_cfg)
    tools = tool_list(task_cfg)
    records = (tool_records(train, tools, cfg.rl.sft_without_tools) if tools
               else tasks.sft_records(train, solution=True))
    return tasks.write_jsonl(os.path.join(run_dir, "data", f"task_{name}.jsonl"), records)


def tool_records(problems: list[dict], tools: list, without: float) -> list[dict]:
    """Demonstrations of a task whose problems carry an "expression" (data_pipeline/tasks.py
    "calc"): the question, a call of the first tool with it, the tool's result (computed by
    the tool itself, as rollouts will see it), then the answer. A share `without` of them,
    drawn at random, answers directly with no tools defined: the same model can then be
    asked with and without tools."""
    specs = [t.spec() for t in tools]
    alone = set(random.Random(0).sample(range(len(problems)), round(without * len(problems))))  # at random:
    out = []  # (not every k-th: that could be one kind of problem only)
    for i, p in enumerate(problems):
        if "expression" not in p:
            raise ConfigError("rl.tools on an SFT task: its problems need an 'expression' to call a tool with "
                              "(the 'calc' task has one)")
        if i in alone:
            out.append({"messages": p["messages"] + [{"role": "assistant", "content": p["answer"]}]})
            continue
        args = json.dumps({"expression": p["expression"]})
        call = {"type": "function", "function": {"name": tools[0].name, "arguments": args}}
        out.append({"tools": specs, "messages": p["messages"] + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": registry.run(tools, tools[0].name, args)},
            {"role": "assistant", "content": p["answer"]}]})
    return out


def open_data(cfg: Config, run_dir: str, log: Callable = print, tokenizer: Tokenizer | None = None) -> Streams:
    """The run's conversations (`tokenizer`: the run's, else `run_tokenizer`'s)."""
    tok = tokenizer or run_tokenizer(cfg, run_dir)
    return chat_data(data_config(cfg, run_dir), run_dir, tokenizer=tok, eval_batches=cfg.trainer.eval_batches,
                     log=log)


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    if cfg.trainer.seq_warmup_steps:  # (the batch-size warm-up is fine: whole conversations)
        raise ConfigError("trainer.seq_warmup_steps would cut conversations into pieces, replies apart from their "
                          "prompts: set it to 0 for SFT")
    tok = run_tokenizer(cfg, run_dir)
    engine = make_engine(cfg, mesh, NextToken(cfg))
    data = open_data(cfg, run_dir, log, tok)
    loader = init_params_loader(cfg, engine, log, run_dir)
    if loader is None:
        log("WARNING: SFT from random parameters (no trainer.init_from): set it to a pretrained run")
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, finish=_finish(loader),
                 evaluators=evaluators(cfg, engine, tok, log))


def _finish(init_params):
    def finish(ctx, summary: dict) -> None:
        """Held-out assistant-token loss of the base model and of the fine-tuned one; samples."""
        log = ctx.log
        loss = summary["heldout_loss"]
        if loss != loss:  # NaN: nothing held out (the loop warned at the start)
            log("held-out loss on assistant tokens: n/a (no held-out conversations)")
        elif init_params is not None:
            base = base_evals(ctx, init_params)["eval_loss"]
            summary["base_heldout_loss"] = base
            summary["headline"] = f"held-out loss {loss:.3f} (the base model: {base:.3f})"
            log(f"held-out loss on assistant tokens: {base:.3f} before SFT -> {loss:.3f} after "
                f"({'lower' if loss < base else 'NOT lower'})")
        else:
            log(f"held-out loss on assistant tokens: {loss:.3f}")
        if ctx.cfg.trainer.num_samples > 0:
            tok = ctx.data.tokenizer
            stops = {chat_token_ids(tok)["end"], tok.eos_id}

            def encode(q):
                return generation_prompt(tok, [{"role": "user", "content": q}])

            def decode(q, out):
                return f"user: {q}\nassistant: {tok.decode([t for t in out if t not in stops])}" + (
                    "  [end]" if out and out[-1] in stops else "  [no end token]")

            summary["samples"] = print_samples(ctx, SAMPLE_QUESTIONS, encode, decode)

    return finish


def heldout_data(cfg: Config, run_dir: str, tokenizer: Tokenizer | None, log: Callable) -> Streams:
    """`lm eval --tasks heldout`: the loss on the assistant tokens of the held-out conversations."""
    return open_data(cfg, run_dir, log, tokenizer)


STAGE = Stage(setup=setup, heldout_data=heldout_data, chat=True, heldout_tokens="assistant")
