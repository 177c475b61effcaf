"""GRPO: reinforcement learning with verifiable rewards, on rollouts of the policy itself.

Each rollout: P = data.batch_size / rl.group_size prompts, G samples each, drawn by the
project's compiled KV-cache sampler from the current parameters on the training devices,
with the log-probability of every sampled token (lm/stages/rollouts.py). Rewards come
from a Python callable (lm/stages/rewards.py), advantages from the group
(lm/objectives/policy.py), and the batch feeds `rl.updates_per_rollout` optimiser steps.
Held-out pass@1 (greedy) is measured every `trainer.eval_every` steps and at the end, and
printed against the starting model's.
"""

from __future__ import annotations

from typing import Callable

from lm.config import Config
from lm.objectives.policy import GRPOObjective
from lm.stages import Stage, rewards, rollouts
from lm.train.loop import Setup


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    return rollouts.setup(cfg, run_dir, mesh, log, objective=GRPOObjective(cfg), data_cls=rollouts.RolloutData,
                          reward_fn=rewards.get(cfg.rl.reward), what="GRPO",
                          curves={"kl": "KL to the reference", "response_length": "response length",
                                  "entropy": "entropy"})


STAGE = Stage(setup=setup, heldout_data=None, chat=True,
              measure="held-out pass@1 in summary.json and metrics.jsonl")
