"""GRPO with a calculator tool on the "calc_add" task, from the SFT model, on a CPU in minutes.

From runs/sft_calc (which starts from runs/pretrain_tools): rollouts of 8 prompts x 8
samples in which the policy may call the calculator once (its result appended to the
sequence, generation going on after it, the result masked out of the loss, the ratio and
the KL), reward 1 for the exact answer. Printed at the end: held-out pass@1 (greedy, 200
problems never trained on) of the SFT model without tools, with tools, and of the GRPO
model with tools: 0.0%, 93.0% and 100.0% on 2026-12-06 (README, Tools).
"""

import dataclasses

from experiments import sft_calc
from lm.config import Config, DataConfig, OptimConfig, TrainerConfig


def config() -> Config:
    base = sft_calc.config()
    return Config(
        name="grpo_calc",
        stage="grpo",
        model=base.model,
        rl=dataclasses.replace(base.rl, reward="exact", group_size=8, temperature=1.0, beta=0.04, eval_prompts=200,
                               updates_per_rollout=2),
        optim=OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=256, batch_size=64),
        trainer=TrainerConfig(steps=40, log_every=5, eval_every=20, checkpoint_every=10,
                              init_from="runs/sft_calc", num_samples=0),
    )
