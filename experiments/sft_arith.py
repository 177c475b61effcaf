"""Teach the pretrained `tiny` model the synthetic addition task (SFT), the start of the RL chain.

From runs/pretrain_tiny (`make pretrain`), on the training problems of the synthetic task
(data_pipeline/tasks.py: "What is 37 + 48?" -> "85", two-digit operands; the held-out
problems GRPO and PPO are measured on are never trained on). Short on purpose: the model
should answer some held-out problems right (roughly 20-60% pass@1), so that the rewards
of a group of samples vary and RL has something to work with.

The tiny model learns this task abruptly: at a constant learning rate of 1e-3 its held-out
pass@1 (greedy) from the 300-step Muon `pretrain_tiny` was 3.0% at step 100, 43.5% at 200
and 95.0% at 300 (it gets the tens and hundreds right first and guesses the units digit,
then learns it; from the earlier 800-step AdamW base the jump came later: 11% at step
260, 28% at 300, and with a cosine decay over 300 steps it stayed near 10%). So the
schedule is constant, and the run stops in the middle of that transition. Measured on
this project's 2-core AMD EPYC machine; another CPU's rounding, or another base run, may
move the transition by some steps.
"""


from data_pipeline.config import SourceConfig
from experiments import pretrain_tiny
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config() -> Config:
    base = pretrain_tiny.config()
    return Config(
        name="sft_arith",
        stage="sft",
        model=base.model,
        rl=RLConfig(task="arith"),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="sources", seq_len=64, batch_size=32, shuffle_rows=64, sources=(
            SourceConfig(name="arith", kind="chat", paths=("<task:arith>",), chat_format="messages",
                         heldout_fraction=0.02),)),
        trainer=TrainerConfig(steps=200, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100,
                              init_from="runs/pretrain_tiny", num_samples=0),
    )
