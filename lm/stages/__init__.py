"""Training stages: each is a thin module over one engine (`lm.engine`) and one loop (`lm.loop`).

A stage module defines `setup(cfg, run_dir, mesh, log) -> lm.loop.Setup`: its objective,
its data and its extra hooks. An experiment picks its stage with `Config.stage`, and
`lm train EXPERIMENT` runs any of them.
"""

from __future__ import annotations

import importlib

# stage name -> module (imported when used)
STAGES = {
    "pretrain": "lm.stages.pretrain",
    "sft": "lm.stages.sft",
    "reward": "lm.stages.reward",
    "dpo": "lm.stages.dpo",
    "grpo": "lm.stages.grpo",
    "ppo": "lm.stages.ppo",
}


def get(name: str):
    return importlib.import_module(STAGES[name])
