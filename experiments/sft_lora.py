"""SFT with low-rank adapters (LoRA) on the frozen pretrained `tiny` model.

The same data and base as sft_tiny, but only rank-8 adapters on every attention and MLP
matrix are trained (about 3% of the parameters): checkpoints hold the adapters and a
reference to the base (trainer.init_from), and `lm export-hf` merges them into plain
LLaMA weights. Expected result: the held-out assistant-token loss falls below the
base model's, less far than full fine-tuning in the same steps.
"""

import dataclasses

from experiments import sft_tiny
from lm.config import Config, LoraConfig


def config() -> Config:
    cfg = sft_tiny.config()
    return dataclasses.replace(
        cfg, name="sft_lora",
        lora=LoraConfig(rank=8, alpha=16.0),
        optim=dataclasses.replace(cfg.optim, lr=3e-3),
    )
