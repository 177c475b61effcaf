"""PPO: reinforcement learning with a value head, GAE and a KL penalty, on rollouts of the policy.

Each rollout: data.batch_size x rl.minibatches rows, rl.group_size samples per prompt
(1 is usual for PPO), sampled by the compiled KV-cache sampler from the current
parameters with their per-token log-probabilities (as in GRPO: lm/stages/rollouts.py). One
compiled forward pass then reads the value head over the rows (V_old) and the
reference's log-probabilities. The reward is a Python callable (lm/stages/rewards.py) or a
reward model run (`rl.reward = "run:runs/reward_tiny"`, read at the reply's last token).
Token rewards, GAE, whitened advantages and the losses are in lm/objectives/policy.py. The KL
coefficient (rl.beta) is fixed or adaptive (rl.kl_target) and is part of the data state,
so a resumed run continues exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import Config, ConfigError
from lm.eval.reward_model import score
from lm.model.sharding import put_rows, to_host
from lm.objectives.policy import AdaptiveKL, PPOObjective, gae, whiten
from lm.sampling.sampler import token_logps
from lm.stages import Stage, rewards, rollouts
from lm.train.loop import Setup
from lm.train.run import load_run


@partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _values_and_ref(graphdef, params, ref_params, batch, *, temperature: float):
    """V_old (B, T) of the policy and the reference's log-probabilities of the targets (B, T)."""
    b, t = batch["inputs"].shape
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    policy = nnx.merge(graphdef, params)
    values = policy.scalar(policy.hidden(*args), "value").reshape(b, t)
    if ref_params is None:
        return values, jnp.zeros((b, t), jnp.float32)
    ref = nnx.merge(graphdef, ref_params)
    logits = ref(*args)
    return values, token_logps(logits, batch["targets"], temperature)


class PPOData(rollouts.RolloutData):
    def __init__(self, cfg: Config, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.kl = AdaptiveKL(cfg.rl.beta, cfg.rl.kl_target, cfg.rl.kl_horizon)

    def _reference(self):
        f = self.ctx.frozen
        return f.get("reference", f.get("base")) if self.rl.beta > 0 else None

    def score(self, tokens, lengths, out, count, logps, rewards, sampled=None):
        rl = self.rl
        batch = rollouts.training_rows(tokens, lengths, out, count, logps, np.zeros(len(rewards)),
                                       self.sampler.response_width, sampled)
        del batch["advantages"]
        device = {k: put_rows(batch[k], self.batch_sharding[k])
                  for k in ("inputs", "positions", "segment_ids", "targets")}  # the rows split as in training
        values, ref_logps = (to_host(a) for a in _values_and_ref(
            self.graphdef, self.ctx.model_params, self._reference(), device, temperature=rl.temperature))
        mask = batch["loss_mask"]
        values = values * mask
        kl_tokens = (batch["old_logps"] - ref_logps) * mask if rl.beta > 0 else np.zeros_like(mask)
        kl_seq = float(kl_tokens.sum(-1).mean())
        coef = self.kl.coef
        token_rewards = np.zeros_like(mask)
        if rl.kl_in == "reward":
            token_rewards -= coef * kl_tokens
        last = lengths.astype(np.int64) + count.astype(np.int64) - 2  # the reply's last target position
        token_rewards[np.arange(len(rewards)), last] += rewards
        if rl.whiten_rewards:
            token_rewards = whiten(token_rewards, mask, shift_mean=False)
        adv = gae(token_rewards, values, mask, rl.gamma, rl.lam)
        returns = (adv + values) * mask
        batch.update(advantages=whiten(adv, mask), returns=returns.astype(np.float32),
                     old_values=values.astype(np.float32), ref_logps=(ref_logps * mask).astype(np.float32))
        self.kl.update(kl_seq, len(rewards))
        m = mask > 0
        explained = 1.0 - np.var(returns[m] - values[m]) / max(np.var(returns[m]), 1e-8)
        return batch, {"kl": kl_seq, "kl_coef": coef, "value_mean": float(values[m].mean()),
                       "return_mean": float(returns[m].mean()), "explained_variance": float(explained),
                       "advantage_abs": float(np.abs(adv[m]).mean())}

    def get_state(self) -> dict:
        return {**super().get_state(), "kl_coef": self.kl.coef}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.kl.coef = float(state.get("kl_coef", self.rl.beta))


def reward_function(cfg: Config, log: Callable) -> Callable:
    """rl.reward: a verifiable reward by name or "module:function", or "run:RUN_DIR", a reward model."""
    if not cfg.rl.reward.startswith("run:"):
        return rewards.get(cfg.rl.reward)

    loaded = load_run(cfg.rl.reward[4:], log=log)
    if loaded.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the reward model {cfg.rl.reward[4:]} has another tokenizer than the policy; train it "
                          "from the same base run")

    def rm(completion: str, example: dict) -> float:
        return score(loaded, [(example["messages"], completion)], log=log)[0]

    rm.batched = lambda pairs: score(loaded, [(e["messages"], c) for c, e in pairs], batch=64, log=log)  # noqa: E731
    return rm


def setup(cfg: Config, run_dir: str, mesh, log: Callable) -> Setup:
    if cfg.rl.kl_target > 0 and cfg.rl.kl_in != "reward":
        raise ConfigError("rl.kl_target (an adaptive KL coefficient) needs rl.kl_in='reward'")
    return rollouts.setup(cfg, run_dir, mesh, log, objective=PPOObjective(cfg), data_cls=PPOData,
                          reward_fn=reward_function(cfg, log), what="PPO", model_reward=cfg.rl.reward.startswith("run:"),
                          curves={"kl": "KL to the reference (per sequence)", "value_loss": "value loss",
                                  "entropy": "entropy"})


STAGE = Stage(setup=setup, heldout_data=None, chat=True,
              measure="held-out pass@1 (or mean reward) in summary.json and metrics.jsonl")
