"""Fine-tune the pretrained `tiny` model into an assistant (SFT), on a CPU in a few minutes.

Starts from the run `make pretrain` writes (runs/pretrain_tiny; `make sft` trains it first
if it is missing) and fine-tunes every parameter on the embedded standard-library Q&A set
(data_pipeline/default_chat.py: questions about modules, functions and signatures,
answered from docstrings; no download), with the loss on assistant turns only. Expected
result: the held-out loss on assistant tokens falls well below the base model's (the run
prints both), and `lm chat runs/sft_tiny` answers in turns that end with the end token.

Other data: experiments/sft_mixture.py (Alpaca, LIMA and the Alpaca seed tasks from ../shared/data).
"""

import dataclasses

from experiments import pretrain_tiny
from lm.config import Config, DataConfig, OptimConfig, TrainerConfig


def config() -> Config:
    base = pretrain_tiny.config()
    return Config(
        name="sft_tiny",
        stage="sft",
        model=base.model,  # the base run's shape
        optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        data=dataclasses.replace(DataConfig(corpus="default", seq_len=256, batch_size=16, shuffle_rows=64),
                                 heldout_fraction=0.05),
        trainer=TrainerConfig(steps=300, log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100,
                              init_from="runs/pretrain_tiny", num_samples=4, sample_tokens=64,
                              sample_temperature=0.0),
    )
