"""What the stages share, written once: the run's tokenizer, what every checkpoint records,
the starting model's held-out figures, samples, downstream-task evaluation, the RL tasks'
problems and the text held-out data `lm eval` scores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax

from data_pipeline import tasks
from data_pipeline.chat import generation_prompt
from data_pipeline.pipeline import DataSource, text_data
from data_pipeline.tokenizer import Tokenizer, tokenizer_for_run
from lm.agent import registry
from lm.config import Config, ConfigError, to_dict
from lm.eval.evaluate import TASK_METRICS, task_evaluator
from lm.sampling.sampler import generate
from lm.train import checkpoint
from lm.train.engine import make_engine
from lm.train.init import source_model_config, source_tokenizer
from lm.train.loop import Context, evaluate

# ---------------------------------------------------------------------------------------
# The run's tokenizer and what its checkpoints record


def tokenizer_path(cfg: Config, run_dir: str) -> str:
    """The tokenizer of a run that starts from another: data.tokenizer, else the one stored
    in the run, else the base's (`trainer.init_from`)."""
    if cfg.trainer.init_from:
        source_model_config(cfg.trainer.init_from)  # a missing or wrong init_from: say so first
    stored = os.path.join(run_dir, "tokenizer.model")
    path = cfg.data.tokenizer or (stored if os.path.exists(stored) else None)
    path = path or (cfg.trainer.init_from and source_tokenizer(cfg.trainer.init_from))
    if not path:
        raise ConfigError(f"stage {cfg.stage!r} needs a tokenizer with chat role tokens: set trainer.init_from to a "
                          "run that has one (e.g. runs/pretrain_tiny) or data.tokenizer=PATH.model")
    return path


def run_tokenizer(cfg: Config, run_dir: str) -> Tokenizer:
    """`tokenizer_path`'s tokenizer, checked against the base model's (`check_base_tokenizer`)
    and model.vocab_size, and copied into the run directory (`lm chat RUN_DIR` finds it there)."""
    path = tokenizer_path(cfg, run_dir)
    check_base_tokenizer(cfg, path)
    return tokenizer_for_run([], cfg.model.vocab_size, run_dir, path, fix="take the model config from the base run")


def check_base_tokenizer(cfg: Config, path: str) -> None:
    """A run that starts from another model (`trainer.init_from`) reads text with that model's
    tokenizer: another one, even of the same size, gives its token ids other meanings."""
    base = cfg.trainer.init_from and source_tokenizer(cfg.trainer.init_from)
    if base and checkpoint.file_sha256(base) != checkpoint.file_sha256(path):
        raise ConfigError(f"the tokenizer {path} is not the one trainer.init_from={cfg.trainer.init_from!r} was "
                          f"trained with ({base}): its token ids would mean other pieces to that model; leave "
                          "data.tokenizer unset to use the base's, or start from a model of this tokenizer")


def run_meta(cfg: Config, tokenizer: Tokenizer | None) -> dict:
    """What every checkpoint records about the run."""
    return {"config": to_dict(cfg), "vocab_size": cfg.model.vocab_size,
            "tokenizer_sha256": checkpoint.file_sha256(tokenizer.path) if tokenizer is not None else None,
            "init_from": cfg.trainer.init_from and {"path": cfg.trainer.init_from, "step": cfg.trainer.init_step}}


# ---------------------------------------------------------------------------------------
# Evaluation


def check_tasks(cfg: Config) -> None:
    """trainer.eval_tasks must name log-likelihood tasks (checked before any work)."""
    unknown = [t for t in cfg.trainer.eval_tasks if t not in TASK_METRICS]
    if unknown:
        raise ConfigError(f"trainer.eval_tasks: unknown task(s) {unknown}; available: {', '.join(TASK_METRICS)}")


def evaluators(cfg: Config, engine, tokenizer: Tokenizer | None, log: Callable) -> list[Callable]:
    """trainer.eval_tasks as figures of each evaluation (their items are read now: a missing
    task folder fails before training starts)."""
    tasks_fn = task_evaluator(cfg, engine, tokenizer, log)
    return [tasks_fn] if tasks_fn is not None else []


def base_evals(ctx: Context, init_params: Callable) -> dict:
    """Held-out figures of the model the run started from (`init_params`), on the run's own
    held-out batches, with the run's objective (its frozen sets: that same model)."""
    plain = make_engine(dataclasses.replace(ctx.cfg, lora=dataclasses.replace(ctx.cfg.lora, rank=0)),
                        ctx.engine.mesh, ctx.engine.objective)
    params = init_params()
    frozen = {name: params for name in plain.frozen_names}
    return evaluate(plain, plain.compile_eval_step(), params, frozen, ctx.data.heldout)


def text_heldout(cfg: Config, run_dir: str, tokenizer: Tokenizer | None, log: Callable) -> DataSource:
    """The held-out documents of the run's text sources (`lm eval --tasks heldout`)."""
    return text_data(cfg.data, run_dir, vocab_size=cfg.model.vocab_size, eval_batches=cfg.trainer.eval_batches,
                     log=log)


# ---------------------------------------------------------------------------------------
# Samples


def print_samples(ctx: Context, prompts: Sequence[str], encode: Callable | None = None,
                  decode: Callable | None = None) -> list[str]:
    """Sample continuations of `prompts` (cycled to trainer.num_samples) and log them."""
    cfg, tok = ctx.cfg, ctx.data.tokenizer
    prompts = [prompts[i % len(prompts)] for i in range(cfg.trainer.num_samples)]
    encode = encode or (lambda p: tok.encode(p, bos=True))
    ids = [encode(p) for p in prompts]
    host_params = jax.device_get(ctx.model_params)  # small models: sample on one device
    outs = generate(ctx.engine.graphdef, host_params, ids, cfg.trainer.sample_tokens, cfg.model.max_seq_len,
                    temperature=cfg.trainer.sample_temperature, eos_id=tok.eos_id, stop_ids=end_ids(tok),
                    seed=cfg.trainer.seed, top_k=50)
    texts = []
    for p, o in zip(prompts, outs):
        text = (decode or (lambda p, o: p + tok.decode(o)))(p, o)
        texts.append(text)
        ctx.log("-" * 30 + " sample " + "-" * 30 + "\n" + text)
    return texts


def end_ids(tok: Tokenizer) -> list[int]:
    """The chat end token, where the vocabulary has it as a piece of its own."""
    i = tok.sp.piece_to_id("<|end|>")
    return [i] if i != tok.sp.unk_id() else []


# ---------------------------------------------------------------------------------------
# RL tasks (GRPO and PPO train on them; SFT can read their training problems)


def tool_list(cfg: Config) -> list:
    """The tools of rl.tools (lm/agent/registry.py), or []: ConfigError for a bad name."""
    if not cfg.rl.tools:
        return []
    try:
        return registry.resolve(cfg.rl.tools)
    except registry.ToolError as e:
        raise ConfigError(f"rl.tools={cfg.rl.tools!r}: {e}") from None


def problems(cfg: Config, tokenizer: Tokenizer | None = None,
             log: Callable | None = None) -> tuple[list[dict], list[dict]]:
    """The task's training and held-out problems; with a tokenizer, those whose prompt leaves
    no room for rl.max_new tokens in the model's context are dropped (and counted)."""
    rl = cfg.rl
    if rl.task == "arith":
        train, test = tasks.arith(cfg.data.seed, rl.train_problems, rl.eval_prompts, rl.digits)
    elif rl.task in ("calc", "calc_add"):
        train, test = tasks.calc(cfg.data.seed, rl.train_problems, rl.eval_prompts, "+*" if rl.task == "calc" else "+")
    elif rl.task == "gsm8k":
        train, test = tasks.gsm8k(log=log)
        test = test[: rl.eval_prompts]
    else:
        raise ConfigError(f"rl.task={rl.task!r}: choose 'arith', 'calc', 'calc_add' or 'gsm8k'")
    if not test:
        raise ConfigError(f"rl.eval_prompts={rl.eval_prompts} leaves no held-out problem to score; set it to 1 or more")
    if tokenizer is not None:
        limit = (cfg.model.max_seq_len - rl.max_new) // 8 * 8  # the sampler pads prompts to a multiple of 8
        if limit <= 0:
            raise ConfigError(f"rl.max_new={rl.max_new} leaves no room for a prompt in model.max_seq_len="
                              f"{cfg.model.max_seq_len}; lower rl.max_new")
        specs = [t.spec() for t in tool_list(cfg)] or None  # the tools' definitions lead every prompt
        n = lambda p: len(generation_prompt(tokenizer, p["messages"], tools=specs))  # noqa: E731
        train = tasks.drop_long_prompts(train, n, limit, f"rl.task={rl.task} training", log)
        test = tasks.drop_long_prompts(test, n, limit, f"rl.task={rl.task} held-out", log)
    return train, test
