"""DPO on LLaMA-Factory's English preference demo (../shared/data/dpo-en-demo) from a
fine-tuned model. On a CPU with `tiny` this is a check of the data road and the loss
(the prompts are long: pairs cut at the row's end are counted); meant for `small` and up
on an accelerator (`--set trainer.init_from=...` of an SFT run of that size). The held-out
preference accuracy and log-likelihood margin are printed before and after; no
accelerator figure has been measured for it yet.
"""

import os

from data_pipeline.config import SHARED_DATA, SourceConfig
from experiments import sft_tiny
from lm.config import Config, DataConfig, OptimConfig, PreferenceConfig, TrainerConfig

DEMO = os.path.join(SHARED_DATA, "dpo-en-demo", "dpo_en_demo.json")


def config() -> Config:
    base = sft_tiny.config()
    return Config(
        name="dpo_hh",
        stage="dpo",
        model=base.model,
        pref=PreferenceConfig(loss="dpo", beta=0.1),
        optim=OptimConfig(lr=5e-5, warmup_steps=10, schedule="cosine", weight_decay=0.0),
        data=DataConfig(corpus="sources", seq_len=256, batch_size=8, sources=(
            SourceConfig(name="dpo_en_demo", kind="preference", paths=(DEMO,), chat_format="sharegpt",
                         heldout_fraction=0.1),)),
        trainer=TrainerConfig(steps=60, log_every=10, eval_every=30, eval_batches=4, checkpoint_every=30,
                              init_from="runs/sft_tiny", num_samples=0),
    )
