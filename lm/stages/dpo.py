"""Direct preference optimisation and its variants (`pref.loss`: dpo, ipo, simpo, orpo) on
preference pairs, from an SFT run (`trainer.init_from`), which is also the frozen
reference of DPO and IPO (with LoRA: the base without its adapters, no second copy).
"""

from __future__ import annotations

from typing import Callable

from lm.config import Config
from lm.objectives.preference import PreferenceObjective
from lm.stages import Stage, pairs
from lm.train.loop import Setup


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    # the embedded pairs: a reply against one that answers another module (see default_preferences)
    return pairs.setup(cfg, run_dir, log, mesh, PreferenceObjective(cfg), _finish, embedded="mismatched")


def _finish(init_params):
    def finish(ctx, summary: dict) -> None:
        pairs.before_after(ctx, summary, init_params, {
            "logp_accuracy": "preference accuracy, P(log p(chosen) > log p(rejected))",
            "logp_margin": "mean log p(chosen) - log p(rejected)"})
    return finish


STAGE = Stage(setup=setup, heldout_data=None, chat=True,
              measure="held-out preference accuracy and margin in summary.json")
