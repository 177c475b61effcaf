"""Pretrain the `tiny` model (~5M parameters) on the embedded default corpus, on a CPU.

The default job of `make pretrain`: no download; the corpus is the Python standard
library's code and documentation, read at run time. On a 2-core CPU it runs in well
under 10 minutes including tokenizer training and compilation. Expected result: the
held-out loss falls far below the unigram entropy of the held-out tokens (about 3.0
against 6.0 nats/token), and samples look like Python code.
"""

from lm.config import Config, DataConfig, OptimConfig, TrainerConfig
from lm.sizes import LEARNING_RATES, size


def config() -> Config:
    return Config(
        name="pretrain_tiny",
        model=size("tiny"),
        optim=OptimConfig(lr=LEARNING_RATES["tiny"], warmup_steps=50, schedule="cosine"),
        data=DataConfig(corpus="default", seq_len=256, batch_size=16),
        trainer=TrainerConfig(steps=800, log_every=10, eval_every=100, eval_batches=16, checkpoint_every=200),
    )
