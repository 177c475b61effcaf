"""Train a small model on one text file (Tiny Shakespeare by default), character-level style.

The file is cut into documents at blank lines (speeches) and 10% of them are held out.
Evaluation reports held-out loss per token and per byte (bits per byte does not depend
on the tokenizer, so it compares with character-level models: nanoGPT's char model
reaches about 1.47 nats/char = 2.1 bits/byte on this data). Point it at another file
with `--set data.sources.text.paths=/path/to/file.txt`.
"""

import os

from lm.config import Config, DataConfig, OptimConfig, SourceConfig, TrainerConfig
from lm.sizes import size

DATA = os.environ.get("LM_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def config() -> Config:
    path = os.path.normpath(os.path.join(DATA, "tinyshakespeare", "input.txt"))
    return Config(
        name="pretrain_shakespeare",
        model=size("tiny", vocab_size=1024, max_seq_len=256),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        data=DataConfig(corpus="sources", seq_len=256, batch_size=16, tokenizer_sample_mb=2,
                        sources=(SourceConfig(name="text", kind="text", paths=(path,), doc_per="block",
                                              heldout_fraction=0.1),)),
        trainer=TrainerConfig(steps=600, log_every=10, eval_every=200, eval_batches=8),
    )
