"""`pretrain_shakespeare` with the speedrun levers that won its ablation (README "Levers").

The same data, split, tokenizer and model shape as `pretrain_shakespeare`, plus:
zero-initialised output projections, U-net skips, NorMuon, sliding windows of 64 tokens
in layers 0 and 2, and sequence-length warm-up (the first 120 steps train on each row cut
into pieces of 64, then 128 tokens); batches of 8 rows of 256 tokens instead of 16, 305
steps instead of 165 (at this data size more, smaller steps learn more per token).

Measured on an idle 2-core AMD EPYC, 2026-12-07: **1.5475 nats/char in 2m52s** of
wall-clock (2m56s in a second run, the same loss), the process's whole life (tokenizer, three compilations, the evaluation of
the whole held-out tenth and a sample included); `pretrain_shakespeare`: 1.630 in 2m52s.
On the way (each measured the same way): the levers without windows and warm-up, with
multi-token prediction, 330 steps: 1.559 in 3m17s; 295 steps with windows and MTP: 1.574
in 3m12s; windows instead of MTP (6% faster a step), 310 steps: 1.5705 (3m22s on a busy
CPU); with the warm-up over 100 steps, 295 steps: 1.5656 in ~2m54s. A decay to zero, a
50% linear decay (WSD) and 1.5x the learning rates did not help (1.611, 1.606, 1.5975
against 1.5986 at 290 steps).
"""

import dataclasses

from experiments import pretrain_shakespeare
from lm.config import Config


def config() -> Config:
    base = pretrain_shakespeare.config()
    return dataclasses.replace(
        base,
        name="pretrain_shakespeare_levers",
        model=dataclasses.replace(base.model, zero_init_out=True, unet_skips=True, window=64),
        optim=dataclasses.replace(base.optim, muon_normalize=True, warmup_steps=40),
        data=dataclasses.replace(base.data, batch_size=8),
        # eval_batches: the whole held-out tenth (~39k tokens) in one evaluation, at the end
        trainer=dataclasses.replace(base.trainer, steps=305, eval_batches=24, seq_warmup_steps=120,
                                    seq_warmup_start=64),
    )
