"""Training stages: pretraining, SFT, reward models, DPO, GRPO and PPO, each a thin module
over one engine (`lm.train.engine`) and one loop (`lm.train.loop`).

A stage module defines `STAGE`, a `Stage`: what it trains (`setup` builds the engine with
its objective, its data and hooks), the held-out data `lm eval --tasks heldout` scores for
its runs, and whether its runs answer in chat turns. Everything a stage knows stays in its
module (and what stages share, in `common.py` and `rollouts.py`): no module below this
package names a stage. An experiment picks its stage with `Config.stage`, and
`lm train EXPERIMENT` runs any of them (`runner.train`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Callable

from lm.config import ConfigError

# stage name -> module (imported when used: a run imports only its own stage)
STAGES = {
    "pretrain": "lm.stages.pretrain",
    "sft": "lm.stages.sft",
    "reward": "lm.stages.reward",
    "dpo": "lm.stages.dpo",
    "grpo": "lm.stages.grpo",
    "ppo": "lm.stages.ppo",
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage supplies to the runner and to the commands that read its runs."""

    # (cfg, run_dir, mesh, log) -> lm.train.loop.Setup: engine (objective), data, hooks, report
    setup: Callable
    # (cfg, run_dir, tokenizer, log) -> the DataSource whose held-out batches `lm eval --tasks
    # heldout` scores with the next-token loss; None: that loss is not this stage's measure
    heldout_data: Callable | None
    chat: bool  # its runs are fine-tuned on the chat template (lm chat/serve use the template)
    heldout_tokens: str = "all"  # which tokens its held-out loss counts ("assistant": the replies only)
    measure: str = ""  # where its held-out measure is, when heldout_data is None


def get(name: str) -> Stage:
    """The stage named `name` (a ConfigError with the nearest name for a typo)."""
    if name not in STAGES:
        close = difflib.get_close_matches(name, list(STAGES), n=1)
        raise ConfigError(f"unknown stage {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (stages: {', '.join(STAGES)})")
    return importlib.import_module(STAGES[name]).STAGE
