"""`pretrain_shakespeare` with the speedrun levers that won its ablation (README "Levers").

The same data, split, tokenizer and model shape as `pretrain_shakespeare`, plus:
zero-initialised output projections, U-net skips, one extra token of multi-token
prediction (weight 0.3) and NorMuon; batches of 8 rows of 256 tokens instead of 16 and
330 steps instead of 165 (the same 1.35M tokens in twice the updates: at this data size
more, smaller steps learn more per token; batches of 4 and 600 steps did worse, 1.588).

Measured on an idle 2-core AMD EPYC, 2026-12-07: **1.559 nats/char in 3m17s** of
wall-clock, tokenizer, compilation and evaluation included (`pretrain_shakespeare`:
1.630 in the same conditions). Neither issue #26's 1.55 within 3 minutes nor nanoGPT's
1.47 is reached: cut to 295 steps (3m12s, with sliding windows of 64 in layers 0 and 2
besides) it gave 1.574.
"""

import dataclasses

from experiments import pretrain_shakespeare
from lm.config import Config


def config() -> Config:
    base = pretrain_shakespeare.config()
    return dataclasses.replace(
        base,
        name="pretrain_shakespeare_levers",
        model=dataclasses.replace(base.model, zero_init_out=True, unet_skips=True, mtp_tokens=1),
        optim=dataclasses.replace(base.optim, muon_normalize=True, warmup_steps=40),
        data=dataclasses.replace(base.data, batch_size=8),
        # eval_batches: the whole held-out tenth (~39k tokens) in one evaluation, at the end
        trainer=dataclasses.replace(base.trainer, steps=330, eval_batches=24),
    )
