"""GRPO on the synthetic addition task, from the SFT model, on a CPU in minutes.

From runs/sft_arith (which starts from runs/pretrain_tiny): 16 prompts x 8 samples per
rollout, two optimiser steps per rollout (learning rate 1e-4), reward 1 for the exact
sum, group-relative advantages scaled by the group's std, clipped ratio (0.2), KL penalty
0.04 to the starting model (the k3 estimator). Held-out pass@1 (greedy, 200 problems never
trained on) is printed before and after, with the KL to the reference; curves in
runs/grpo_arith/rl.png. See the README (Post-training) for the measured figures.
"""

from experiments import sft_arith
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config() -> Config:
    base = sft_arith.config()
    return Config(
        name="grpo_arith",
        stage="grpo",
        model=base.model,
        rl=RLConfig(task="arith", reward="exact", group_size=8, temperature=1.0, max_new=8, beta=0.04,
                    eval_prompts=200, updates_per_rollout=2),
        optim=OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=64, batch_size=128),
        trainer=TrainerConfig(steps=60, log_every=5, eval_every=10, checkpoint_every=20,
                              init_from="runs/sft_arith", num_samples=0),
    )
