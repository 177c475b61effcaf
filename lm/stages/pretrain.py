"""Pretraining: next-token prediction on a weighted mixture of corpora.

The tokenizer is the run's own (trained on a sample of the mixture when none is given);
at the end the run reports held-out loss against the unigram entropy of the held-out
tokens (a model that learned nothing beyond token frequencies scores that) and prints
a few samples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from data_pipeline.pipeline import text_data, unigram_entropy
from lm.config import Config
from lm.objectives.next_token import NextToken
from lm.stages import Stage
from lm.stages.common import check_base_tokenizer, evaluators, print_samples, run_meta, text_heldout
from lm.train.engine import make_engine
from lm.train.init import init_params_loader, source_tokenizer
from lm.train.loop import Setup

SAMPLE_PROMPTS = ("def ", "import os\n\n", "The ", "class ")


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    engine = make_engine(cfg, mesh, NextToken(cfg))
    d = cfg.data
    base_tok = cfg.trainer.init_from and source_tokenizer(cfg.trainer.init_from)
    if base_tok and not d.tokenizer and not os.path.exists(os.path.join(run_dir, "tokenizer.model")):
        d = dataclasses.replace(d, tokenizer=base_tok)  # continued pretraining reads text as its base did
    if base_tok and d.tokenizer:
        check_base_tokenizer(cfg, d.tokenizer)
    data = text_data(d, run_dir, vocab_size=cfg.model.vocab_size, eval_batches=cfg.trainer.eval_batches, log=log)
    if base_tok and data.tokenizer is not None:
        check_base_tokenizer(cfg, data.tokenizer.path)
    return Setup(engine=engine, data=data, meta=run_meta(cfg, data.tokenizer),
                 init_params=init_params_loader(cfg, engine, log, run_dir), finish=finish,
                 evaluators=evaluators(cfg, engine, data.tokenizer, log))


def finish(ctx, summary: dict) -> None:
    """Held-out loss vs unigram entropy, per-source numbers, samples."""
    data, log = ctx.data, ctx.log
    evals, eval_loss = summary["heldout"], summary["heldout_loss"]
    entropy = unigram_entropy([b for bs in data.heldout.values() for b in bs])
    summary["heldout_unigram_entropy"] = entropy
    log(f"held-out loss {eval_loss:.3f} nats/token vs unigram entropy {entropy:.3f} "
        f"of the held-out tokens ({np.exp(eval_loss):.1f} vs {np.exp(entropy):.1f} perplexity)"
        + (f"; {evals['eval_bpb']:.3f} bits/byte" if "eval_bpb" in evals else ""))
    if eval_loss == eval_loss:  # (NaN: nothing held out)
        summary["headline"] = (f"held-out loss {eval_loss:.3f} {'<' if eval_loss < entropy else '>='} "
                               f"unigram entropy {entropy:.3f}")
    for k, v in sorted(evals.items()):
        if "/" in k:
            log(f"  {k} = {v:.4f}")
    if data.tokenizer is not None and ctx.cfg.trainer.num_samples > 0:
        summary["samples"] = print_samples(ctx, SAMPLE_PROMPTS)


STAGE = Stage(setup=setup, heldout_data=text_heldout, chat=False)
