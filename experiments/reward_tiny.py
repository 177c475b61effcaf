"""A reward model from the fine-tuned `tiny` model, on a CPU in a few minutes.

Starts from runs/sft_tiny (`make sft`) with a scalar head "reward" (zero at the start:
every pair ties) and trains it with the Bradley–Terry loss on the embedded preference
set (data_pipeline/default_preferences.py: stdlib answers preferred to the same words
shuffled; no download). Expected: held-out pairwise accuracy far above the 50% chance
level (> 90%), printed before and after.

Real preference data: experiments/reward_hh.py (Anthropic HH-RLHF from ../shared/data).
"""

import dataclasses

from experiments import sft_tiny
from lm.config import Config, DataConfig, OptimConfig, TrainerConfig


def config() -> Config:
    base = sft_tiny.config()
    return Config(
        name="reward_tiny",
        stage="reward",
        model=dataclasses.replace(base.model, scalar_heads=("reward",)),
        optim=OptimConfig(lr=3e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=128, batch_size=16, heldout_fraction=0.05),
        trainer=TrainerConfig(steps=150, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=50,
                              init_from="runs/sft_tiny", num_samples=0),
    )
