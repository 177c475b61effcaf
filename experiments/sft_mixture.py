"""SFT of the pretrained `tiny` model on a weighted mixture of real instruction sets.

Alpaca-format demonstrations (alpaca-demo), LIMA's curated answers (with their multi-turn
histories) and the Stanford Alpaca seed tasks, from the local files in ../shared/data
(set LM_DATA to move the folder), mixed by tokens with the embedded standard-library
Q&A set so the model keeps what it knows about its own corpus. The tiny model's context
is 256 tokens: most LIMA answers and many Alpaca ones are longer, so those are left out
(counted as "longer than the row"; multi-turn ones are cut after their last whole turn
that fits). Use a larger model with a longer context for these sets. Expected: the held-out loss on assistant tokens falls well below the base
model's for every source (printed per source); a 5M-parameter model pretrained on
Python will not write good English answers, so read the samples as a format check.
"""

import dataclasses
import os

from data_pipeline import default_chat
from data_pipeline.config import SHARED_DATA
from experiments import sft_tiny
from lm.config import Config, DataConfig, SourceConfig

DATA = SHARED_DATA


def _p(*parts: str) -> str:
    return os.path.normpath(os.path.join(DATA, *parts))


def config() -> Config:
    base = sft_tiny.config()
    sources = (
        SourceConfig(name="alpaca", kind="chat", paths=(_p("alpaca-demo", "*.json"),), weight=0.5),
        SourceConfig(name="lima", kind="chat", paths=(_p("lima", "lima.json"),), weight=0.15),
        SourceConfig(name="seed_tasks", kind="chat", paths=(_p("alpaca-seed-tasks", "seed_tasks.jsonl"),),
                     weight=0.15),
        SourceConfig(name="stdlib_chat", kind="chat", paths=(default_chat.EMBEDDED,), chat_format="messages",
                     weight=0.2),
    )
    return dataclasses.replace(
        base, name="sft_mixture",
        data=DataConfig(corpus="sources", sources=sources, seq_len=256, batch_size=16, shuffle_rows=64),
        trainer=dataclasses.replace(base.trainer, steps=400, eval_every=200),
    )
