"""Pretraining: next-token prediction on a weighted mixture of corpora.

The tokenizer is the run's own (trained on a sample of the mixture when none is given);
at the end the run reports held-out loss against the unigram entropy of the held-out
tokens (a model that learned nothing beyond token frequencies scores that) and prints
a few samples.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from lm import checkpoint
from lm.config import Config
from lm.engine import make_engine
from lm.init import init_params_loader
from lm.loop import Setup
from lm.objectives import NextToken

SAMPLE_PROMPTS = ("def ", "import os\n\n", "The ", "class ")


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    from data_pipeline.pipeline import RunData

    engine = make_engine(cfg, mesh, NextToken(cfg))
    data = RunData(cfg.data, run_dir, vocab_size=cfg.model.vocab_size, eval_batches=cfg.trainer.eval_batches, log=log)
    return Setup(engine=engine, data=data, meta=run_meta(cfg, data.tokenizer),
                 init_params=init_params_loader(cfg, engine, log, run_dir), finish=finish)


def run_meta(cfg: Config, tokenizer) -> dict:
    """What every checkpoint records about the run."""
    from lm.config import to_dict

    return {"config": to_dict(cfg), "vocab_size": cfg.model.vocab_size,
            "tokenizer_sha256": checkpoint.file_sha256(tokenizer.path) if tokenizer is not None else None,
            "init_from": cfg.trainer.init_from and {"path": cfg.trainer.init_from, "step": cfg.trainer.init_step}}


def finish(ctx, summary: dict) -> None:
    """Held-out loss vs unigram entropy, per-source numbers, samples."""
    from data_pipeline.pipeline import unigram_entropy

    data, log = ctx.data, ctx.log
    evals, eval_loss = summary["heldout"], summary["heldout_loss"]
    entropy = unigram_entropy([b for bs in data.heldout.values() for b in bs])
    summary["heldout_unigram_entropy"] = entropy
    log(f"held-out loss {eval_loss:.3f} nats/token vs unigram entropy {entropy:.3f} "
        f"of the held-out tokens ({np.exp(eval_loss):.1f} vs {np.exp(entropy):.1f} perplexity)"
        + (f"; {evals['eval_bpb']:.3f} bits/byte" if "eval_bpb" in evals else ""))
    for k, v in sorted(evals.items()):
        if "/" in k:
            log(f"  {k} = {v:.4f}")
    if data.tokenizer is not None and ctx.cfg.trainer.num_samples > 0:
        summary["samples"] = print_samples(ctx, SAMPLE_PROMPTS)


def print_samples(ctx, prompts, encode=None, decode=None) -> list[str]:
    """Sample continuations of `prompts` (cycled to trainer.num_samples) and log them."""
    from lm.sampling import generate

    cfg, tok = ctx.cfg, ctx.data.tokenizer
    prompts = [prompts[i % len(prompts)] for i in range(cfg.trainer.num_samples)]
    encode = encode or (lambda p: tok.encode(p, bos=True))
    ids = [encode(p) for p in prompts]
    host_params = jax.device_get(ctx.model_params)  # small models: sample on one device
    outs = generate(ctx.engine.graphdef, host_params, ids, cfg.trainer.sample_tokens, cfg.model.max_seq_len,
                    temperature=cfg.trainer.sample_temperature, eos_id=tok.eos_id,
                    stop_ids=[i for i in _end_ids(tok)], seed=cfg.trainer.seed, top_k=50)
    texts = []
    for p, o in zip(prompts, outs):
        text = (decode or (lambda p, o: p + tok.decode(o)))(p, o)
        texts.append(text)
        ctx.log("-" * 30 + " sample " + "-" * 30 + "\n" + text)
    return texts


def _end_ids(tok) -> list[int]:
    """The chat end token, where the vocabulary has it as a piece of its own."""
    i = tok.sp.piece_to_id("<|end|>")
    return [i] if i != tok.sp.unk_id() else []
