"""Teach the pretrained `tiny` model the synthetic addition task (SFT), the start of the RL chain.

From runs/pretrain_tiny (`make pretrain`), on the training problems of the synthetic task
(data_pipeline/tasks.py: "What is 37 + 48?" -> "85", two-digit operands; the held-out
problems GRPO and PPO are measured on are never trained on). Short on purpose: the model
should answer some held-out problems right (roughly 20-60% pass@1), so that the rewards
of a group of samples vary and RL has something to work with.

The tiny model learns this task abruptly: at a constant learning rate of 1e-3 its held-out
pass@1 (greedy) was 11% at step 260, 13% at 280 and 28% at 300 (it had the tens and
hundreds right and guessed the units digit, then learned it); with a cosine decay over
the 300 steps it stays near 10%. So the schedule is constant, and the run stops in the
middle of that transition. Measured on this project's 2-core AMD EPYC machine; another
CPU's rounding may move the transition by some steps.
"""


from experiments import pretrain_tiny
from data_pipeline.config import SourceConfig
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
        trainer=TrainerConfig(steps=300, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100,
                              init_from="runs/pretrain_tiny", num_samples=0),
    )
