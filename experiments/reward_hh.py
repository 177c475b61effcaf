"""A reward model on Anthropic HH-RLHF (harmless-base test pairs in ../shared/data), from the
fine-tuned `tiny` model (runs/sft_tiny).

The pairs are dialogues whose last assistant turn differs; 10% are held out by hash.
Expected on a CPU: held-out pairwise accuracy only a little above the 50% chance level —
a 5M-parameter model trained on Python's standard library knows little about harmful
requests; the point is the data road (the HH layout, bad records counted, long
dialogues cut at the row's end) and the number printed beside chance.
"""

import dataclasses
import os

from data_pipeline.config import SHARED_DATA, SourceConfig
from experiments import sft_tiny
from lm.config import Config, DataConfig, OptimConfig, TrainerConfig

HH = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base", "test.jsonl.gz")


def config() -> Config:
    base = sft_tiny.config()
    return Config(
        name="reward_hh",
        stage="reward",
        model=dataclasses.replace(base.model, scalar_heads=("reward",)),
        optim=OptimConfig(lr=1e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0),
        data=DataConfig(corpus="sources", seq_len=256, batch_size=16, sources=(
            SourceConfig(name="hh", kind="preference", paths=(HH,), chat_format="hh", heldout_fraction=0.1),)),
        trainer=TrainerConfig(steps=120, log_every=10, eval_every=60, eval_batches=14, checkpoint_every=60,
                              init_from="runs/sft_tiny", num_samples=0),
    )
