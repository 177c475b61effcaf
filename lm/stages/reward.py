"""Reward model: a scalar head on the transformer, trained with the Bradley–Terry loss on
preference pairs (lm/objectives/preference.py). Start it from a pretrained or SFT run
(`trainer.init_from`) with `model.scalar_heads=("reward",)`; score texts with
`lm reward RUN_DIR --pairs FILE` or `lm.eval.reward_model.score`.
"""

from __future__ import annotations

from typing import Callable

from lm.config import Config
from lm.objectives.preference import RewardObjective
from lm.stages import Stage, pairs
from lm.train.loop import Setup


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    # the embedded pairs: a reply against another question's (see default_preferences)
    return pairs.setup(cfg, run_dir, log, mesh, RewardObjective(cfg), _finish, embedded="shuffled")


def _finish(init_params):
    def finish(ctx, summary: dict) -> None:
        pairs.before_after(ctx, summary, init_params, {"accuracy": "pairwise accuracy (chance 0.5)",
                                                       "margin": "mean reward margin, chosen - rejected"})
    return finish


STAGE = Stage(setup=setup, heldout_data=None, chat=True,
              measure="held-out pairwise accuracy and margin in summary.json; `lm reward RUN_DIR --pairs FILE` scores other pairs")
