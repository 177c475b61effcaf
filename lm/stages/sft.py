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
import os
import shutil
from typing import Callable

from lm.config import Config, ConfigError
from lm.engine import make_engine
from lm.init import init_params_loader, source_model_config, source_tokenizer
from lm.loop import Setup, evaluate
from lm.objectives import NextToken
from lm.stages.pretrain import print_samples, run_meta

SAMPLE_QUESTIONS = ("What is the `json` module for?", "What does `os.path.join` do?",
                    "How do I call `math.isclose`?", "Explain `collections.Counter`.")


def tokenizer_path(cfg: Config, run_dir: str) -> str:
    """The run's tokenizer: data.tokenizer, else the one stored in the run, else the base's."""
    if cfg.trainer.init_from:
        source_model_config(cfg.trainer.init_from)  # a missing or wrong init_from: say so first
    stored = os.path.join(run_dir, "tokenizer.model")
    path = cfg.data.tokenizer or (stored if os.path.exists(stored) else None)
    path = path or (cfg.trainer.init_from and source_tokenizer(cfg.trainer.init_from))
    if not path:
        raise ConfigError(f"stage {cfg.stage!r} needs a tokenizer with chat role tokens: set trainer.init_from to a run that has "
                          "one (e.g. runs/pretrain_tiny) or data.tokenizer=PATH.model")
    return path


def data_config(cfg: Config, run_dir: str):
    """The run's chat sources; the default corpus is the embedded standard-library Q&A set."""
    from data_pipeline.config import SourceConfig

    from data_pipeline import default_chat

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
    from data_pipeline import tasks
    from lm.stages.grpo import problems

    name = path[len("<task:"):-1]
    train, _ = problems(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, task=name)))
    return tasks.write_jsonl(os.path.join(run_dir, "data", f"task_{name}.jsonl"),
                             tasks.sft_records(train, solution=True))


def open_data(cfg: Config, run_dir: str, log: Callable = print, tokenizer=None):
    from data_pipeline.chat_data import ChatData
    from data_pipeline.tokenizer import Tokenizer

    tok = tokenizer or Tokenizer(tokenizer_path(cfg, run_dir))
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size="
                          f"{cfg.model.vocab_size}; take the model config from the base run")
    return ChatData(data_config(cfg, run_dir), run_dir, tokenizer=tok, eval_batches=cfg.trainer.eval_batches,
                    log=log)


def store_tokenizer(cfg: Config, run_dir: str):
    """The run's tokenizer (see tokenizer_path), copied into the run directory, opened."""
    from data_pipeline.tokenizer import Tokenizer

    tok_path = tokenizer_path(cfg, run_dir)
    stored = os.path.join(run_dir, "tokenizer.model")
    if not os.path.exists(stored) or not os.path.samefile(tok_path, stored):
        os.makedirs(run_dir, exist_ok=True)
        shutil.copyfile(tok_path, stored + ".tmp")
        os.replace(stored + ".tmp", stored)  # `lm chat RUN_DIR` finds it here
    return Tokenizer(stored)


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    tok = store_tokenizer(cfg, run_dir)
    engine = make_engine(cfg, mesh, NextToken(cfg))
    data = open_data(cfg, run_dir, log, tok)
    loader = init_params_loader(cfg, engine, log, run_dir)
    if loader is None:
        log("WARNING: SFT from random parameters (no trainer.init_from): set it to a pretrained run")
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, finish=_finish(loader))


def _finish(init_params):
    def finish(ctx, summary: dict) -> None:
        """Held-out assistant-token loss of the base model and of the fine-tuned one; samples."""
        from data_pipeline.chat import generation_prompt

        log = ctx.log
        loss = summary["heldout_loss"]
        if loss != loss:  # NaN: nothing held out (the loop warned at the start)
            log("held-out loss on assistant tokens: n/a (no held-out conversations)")
        elif init_params is not None:
            plain = make_engine(dataclasses.replace(ctx.cfg, lora=dataclasses.replace(ctx.cfg.lora, rank=0)),
                                ctx.engine.mesh, ctx.engine.objective)
            base = evaluate(plain, plain.compile_eval_step(), init_params(), {}, ctx.data.heldout)["eval_loss"]
            summary["base_heldout_loss"] = base
            log(f"held-out loss on assistant tokens: {base:.3f} before SFT -> {loss:.3f} after "
                f"({'lower' if loss < base else 'NOT lower'})")
        else:
            log(f"held-out loss on assistant tokens: {loss:.3f}")
        if ctx.cfg.trainer.num_samples > 0:
            tok = ctx.data.tokenizer

            def encode(q):
                return generation_prompt(tok, [{"role": "user", "content": q}])

            def decode(q, out):
                return f"user: {q}\nassistant: {tok.decode([t for t in out if t not in _stop_ids(tok)])}" + (
                    "  [end]" if out and out[-1] in _stop_ids(tok) else "  [no end token]")

            summary["samples"] = print_samples(ctx, SAMPLE_QUESTIONS, encode, decode)

    return finish


def _stop_ids(tok) -> set[int]:
    from data_pipeline.chat import chat_token_ids

    return {chat_token_ids(tok)["end"], tok.eos_id}
