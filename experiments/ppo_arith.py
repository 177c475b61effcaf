"""PPO on the synthetic addition task, from the SFT model, on a CPU in minutes.

From runs/sft_arith: 128 prompts x 1 sample per rollout, a value head on the policy
(zero at the start), GAE (gamma 1, lambda 0.95) over the reply's tokens, whitened
advantages, clipped policy and value losses, and a KL penalty to the starting model in
the per-token reward (coefficient 0.05), two passes over each rollout, learning rate 1e-4.
Reward 1 for the exact sum. Held-out pass@1
(greedy, 200 problems never trained on) is printed before and after; curves in
runs/ppo_arith/rl.png.
"""

import dataclasses

from experiments import grpo_arith
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config() -> Config:
    base = grpo_arith.config()
    return Config(
        name="ppo_arith",
        stage="ppo",
        model=dataclasses.replace(base.model, scalar_heads=("value",)),
        rl=RLConfig(task="arith", reward="exact", group_size=1, temperature=1.0, max_new=8, beta=0.05,
                    eval_prompts=200, updates_per_rollout=2, minibatches=1, vf_coef=0.1, lam=0.95),
        optim=OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=64, batch_size=128),
        trainer=TrainerConfig(steps=60, log_every=5, eval_every=10, checkpoint_every=20,
                              init_from="runs/sft_arith", num_samples=0),
    )
