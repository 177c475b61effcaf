"""GRPO: group-relative policy optimisation on rollouts of the policy itself.

A rollout batch holds P prompts x G samples (rows), each the prompt followed by the
sampled completion. Per row: the reward r (a Python callable, lm/rewards.py) and the
per-token log-probabilities `old_logps` the sampler reported. Advantages are relative to
the row's group (the G samples of one prompt):

    A = (r - mean_group(r)) / (std_group(r) + 1e-4)      (scale_rewards=False: no division, Dr. GRPO)

and every completion token of the row gets A. Per token, with ratio = exp(logp - old_logp):

    loss = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL
    KL   = exp(ref - logp) - (ref - logp) - 1               (the k3 estimator; >= 0)

normalised per sequence then averaged ("sequence", GRPO), over all tokens of the batch
("token", DAPO), or over rows x max_new ("constant", Dr. GRPO). The log-probabilities use
softmax(logits / temperature), as the sampler does (lm.sampling.token_logps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import Config
from lm.sampling import token_logps

TOKENS = ("batch", "seq")
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "old_logps")


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool = True) -> np.ndarray:
    """Rewards (P*G,) in groups of G consecutive rows -> advantages (P*G,)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + 1e-4)
    return a.reshape(-1).astype(np.float32)


def clipped_objective(logp, old_logp, adv, eps_low, eps_high):
    """Per-token PPO surrogate loss (to minimise) and whether the ratio was clipped."""
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1 - eps_low, 1 + eps_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    return loss, (ratio < 1 - eps_low) | (ratio > 1 + eps_high)


def k3_kl(logp, ref_logp):
    d = ref_logp - logp
    return jnp.exp(d) - d - 1


def normalise(per_token, mask, how: str, max_new: int):
    """Per-token losses (B, T) -> a scalar, and the weight it averages over (for accumulation)."""
    if how == "sequence":
        rows = (mask.sum(-1) > 0).astype(jnp.float32)
        per_row = (per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        return (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0), rows.sum()
    if how == "token":
        return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0), mask.sum()
    rows = jnp.float32(mask.shape[0])
    return (per_token * mask).sum() / (rows * max_new), rows


class GRPOObjective:
    name = "grpo"
    batch_axes = {**{k: TOKENS for k in KEYS}, "advantages": ("batch",)}

    def __init__(self, cfg: Config):
        self.rl = cfg.rl
        self.frozen = ("reference",) if cfg.rl.beta > 0 and not cfg.lora.rank else ()

    def _logps(self, model, batch):
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B, T, V) float32
        return token_logps(logits, batch["targets"], self.rl.temperature), logits

    def loss(self, model, batch: dict, frozen: dict):
        rl = self.rl
        mask = batch["loss_mask"]
        logp, logits = self._logps(model, batch)
        eps_high = rl.clip_eps_high or rl.clip_eps
        pg, clipped = clipped_objective(logp, batch["old_logps"], batch["advantages"][:, None], rl.clip_eps, eps_high)
        per = pg
        n = jnp.maximum(mask.sum(), 1.0)
        aux = {}
        if rl.beta > 0:
            params = frozen["reference"] if "reference" in frozen else frozen["base"]
            ref_logp = jax.lax.stop_gradient(self._logps(nnx.merge(nnx.graphdef(model), params), batch)[0])
            kl = k3_kl(logp, ref_logp)
            per = pg + rl.beta * kl
            aux["kl"] = (kl * mask).sum() / n
        loss, weight = normalise(per, mask, rl.loss_norm, rl.max_new)
        scaled = logits / rl.temperature
        probs = jax.nn.softmax(scaled, axis=-1)
        entropy = -(probs * jax.nn.log_softmax(scaled, axis=-1)).sum(-1)
        aux.update(loss=loss, clip_fraction=(clipped * mask).sum() / n, entropy=(entropy * mask).sum() / n,
                   ratio=(jnp.exp(logp - batch["old_logps"]) * mask).sum() / n, weight=weight)
        return loss, aux
