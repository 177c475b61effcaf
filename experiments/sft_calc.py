"""Teach the tool-token `tiny` model to use a calculator (SFT), the start of `make rl-tools`.

From runs/pretrain_tools (`pretrain_tiny` with the tool tokens reserved), on the training
problems of the "calc_add" task (data_pipeline/tasks.py: 4-digit additions, which a 5M
model cannot do in its head; "calc" adds 3-digit x 2-digit products, whose operands this
model fails to copy into its calls: see the README, Tools). Three quarters of the
demonstrations define the calculator and call it: the question, a call with the
expression, the calculator's result, then the answer copied from it; a quarter answer
directly with no tools defined, so the same model can be asked both ways. grpo_calc then
measures held-out pass@1 without tools and with them, and improves the latter.
"""

from data_pipeline.config import SourceConfig
from experiments import pretrain_tools
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config() -> Config:
    base = pretrain_tools.config()
    return Config(
        name="sft_calc",
        stage="sft",
        model=base.model,
        rl=RLConfig(task="calc_add", tools="calculator", sft_without_tools=0.25, max_new=36, max_tool_calls=1,
                    tool_result_tokens=12),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="constant", weight_decay=0.0),
        data=DataConfig(corpus="sources", seq_len=256, batch_size=16, shuffle_rows=64, sources=(
            SourceConfig(name="calc", kind="chat", paths=("<task:calc>",), chat_format="messages",
                         heldout_fraction=0.02),)),
        trainer=TrainerConfig(steps=300, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100,
                              init_from="runs/pretrain_tools", num_samples=0),
    )
