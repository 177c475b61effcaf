"""Pretrain the ~110M `small` model (GPT-2-small scale) with a 1024-token context.

A single-accelerator configuration: bfloat16 compute, data parallel over all devices,
global batch 256 x 1024 tokens. Expected: a steady loss decrease; use it as the first
step up from `tiny` when checking a new accelerator.
"""

from lm.config import Config, DataConfig, OptimConfig, TrainerConfig
from lm.model.sizes import LEARNING_RATES, size


def config() -> Config:
    return Config(
        name="pretrain_small",
        model=size("small"),
        optim=OptimConfig(lr=LEARNING_RATES["small"], warmup_steps=500),
        data=DataConfig(corpus="default", seq_len=1024, batch_size=256, tokenizer_sample_mb=20),
        trainer=TrainerConfig(steps=20_000, microbatches=4, log_every=10, eval_every=500),
    )
