"""GRPO on the synthetic addition task, from the SFT model, on a CPU in minutes.

From runs/sft_arith (which starts from runs/pretrain_tiny): 8 prompts x 8 samples per
rollout, reward 1 for the exact sum, group-relative advantages scaled by the group's std,
clipped ratio (0.2), KL penalty 0.04 to the starting model (the k3 estimator). Expected:
held-out pass@1 (greedy, 200 problems never trained on) rises from the SFT model's,
printed before and after, with the KL to the reference reported; curves in
runs/grpo_arith/rl.png.
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
                    eval_prompts=200),
        optim=OptimConfig(lr=2e-5, warmup_steps=5, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=64, batch_size=64),
        trainer=TrainerConfig(steps=100, log_every=5, eval_every=25, checkpoint_every=25,
                              init_from="runs/sft_arith", num_samples=0),
    )
