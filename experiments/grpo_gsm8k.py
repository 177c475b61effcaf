"""GRPO on GSM8K (../shared/data/gsm8k) for an accelerator, from an SFT run of `small` or larger.

Reward: 1 when the reply ends with "#### N" and N is the reference answer
(`rl.reward=gsm8k_lenient` accepts the last number in any format). 16 prompts x 8 samples
per rollout, up to 256 new tokens, DAPO-style asymmetric clipping (0.2 / 0.28), token-level
loss normalisation, no KL penalty (beta 0: no reference copy). Point trainer.init_from at
an SFT run trained on GSM8K solutions (experiments/sft_arith.py's pattern with
`paths=("<task:gsm8k>",)`). Not measured yet: no accelerator run of this experiment has
been made, so no expected pass@1 is claimed; a `tiny` model on a CPU stays near 0%.
"""

from experiments import pretrain_small
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config() -> Config:
    base = pretrain_small.config()
    return Config(
        name="grpo_gsm8k",
        stage="grpo",
        model=base.model,
        rl=RLConfig(task="gsm8k", reward="gsm8k_strict", group_size=8, temperature=1.0, max_new=256, beta=0.0,
                    clip_eps=0.2, clip_eps_high=0.28, loss_norm="token", eval_prompts=500),
        optim=OptimConfig(lr=1e-6, warmup_steps=10, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=1024, batch_size=128),
        trainer=TrainerConfig(steps=500, log_every=5, eval_every=50, checkpoint_every=50,
                              init_from="runs/sft_gsm8k", num_samples=0),
    )
