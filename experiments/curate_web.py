"""Curation demo: the shared data's web documents (c4-demo, JSON Lines) and raw HTML pages
(html-pages) through every step, keeping English. `lm data curate experiments/curate_web.py`;
the curated shards land in runs/curate_web/data/ (a SourceConfig(kind="jsonl") reads them)."""

import os

from data_pipeline.config import SHARED_DATA
from data_pipeline.curate import CurateConfig, CurateInput


def config() -> CurateConfig:
    return CurateConfig(
        inputs=(CurateInput("c4", "jsonl", (os.path.join(SHARED_DATA, "c4-demo", "*.jsonl"),)),
                CurateInput("html", "html", (os.path.join(SHARED_DATA, "html-pages", "*.html*"),))),
        output_dir="runs/curate_web",
        languages=("en",),
        mask_pii=True,
        tasks=2,
        workers=1,
    )
