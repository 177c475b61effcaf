"""Pretrain `tiny` on a weighted mixture of real corpora, as the seed's recipe describes.

Web text (the C4 sample), Wikipedia (WikiText-2 and plain articles), arXiv (LaTeX
sections and SciTLDR abstracts), books (Tiny Shakespeare) and code (the standard library)
from the local files in ../shared/data (override a source's files with e.g.
`--set data.sources.web.paths=/data/c4/*.jsonl.gz`; set LM_DATA to move the folder).
The log reports the realised share of tokens per source, which should sit within two
points of the weights, and the evaluation reports held-out loss and bits per byte per
source: expect code and web to be the easiest and arXiv LaTeX the hardest.
"""

import os

from data_pipeline.config import SHARED_DATA
from lm.config import Config, DataConfig, OptimConfig, SourceConfig, TrainerConfig
from lm.model.sizes import LEARNING_RATES, size

DATA = SHARED_DATA


def _p(*parts: str) -> str:
    return os.path.normpath(os.path.join(DATA, *parts))


def config() -> Config:
    sources = (
        SourceConfig(name="web", kind="jsonl", paths=(_p("c4-demo", "*.jsonl"),), weight=0.5),
        SourceConfig(name="wiki", kind="text", doc_per="block", weight=0.2,
                     paths=(_p("wikitext-2", "*.txt"), _p("wiki-demo", "*.txt"))),
        SourceConfig(name="arxiv", kind="jsonl", paths=(_p("arxiv-redpajama-sample", "*.jsonl"),), weight=0.05),
        SourceConfig(name="papers", kind="jsonl", paths=(_p("scitldr", "*.jsonl"),), text_field="source",
                     weight=0.05),
        SourceConfig(name="books", kind="text", doc_per="block", paths=(_p("tinyshakespeare", "input.txt"),),
                     weight=0.1),
        SourceConfig(name="code", kind="default", weight=0.1, heldout_fraction=0.02),
    )
    return Config(
        name="pretrain_mixture",
        model=size("tiny"),
        optim=OptimConfig(lr=LEARNING_RATES["tiny"], warmup_steps=50),
        data=DataConfig(corpus="sources", sources=sources, seq_len=256, batch_size=16, tokenizer_sample_mb=6),
        trainer=TrainerConfig(steps=800, log_every=10, eval_every=200, eval_batches=4),
    )
