"""GRPO and PPO: policy optimisation on rollouts of the policy itself.

GRPO (group-relative policy optimisation):

A rollout batch holds P prompts x G samples (rows), each the prompt followed by the
sampled completion. Per row: the reward r (a Python callable, lm/stages/rewards.py) and the
per-token log-probabilities `old_logps` the sampler reported. Advantages are relative to
the row's group (the G samples of one prompt):

    A = (r - mean_group(r)) / (std_group(r) + 1e-4)      (scale_rewards=False: no division, Dr. GRPO)

and every completion token of the row gets A. Per token, with ratio = exp(logp - old_logp):

    loss = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL
    KL   = exp(ref - logp) - (ref - logp) - 1               (the k3 estimator; >= 0)

normalised per sequence then averaged ("sequence", GRPO), over all tokens of the batch
("token", DAPO), or over rows x max_new ("constant", Dr. GRPO). The log-probabilities use
softmax(logits / temperature), as the sampler does (lm.sampling.token_logps).

PPO: a value head "value" on the policy's final hidden states estimates, at each
completion token, the return that follows. The rollout's token rewards are the sequence's
reward on its last token minus kl_coef x (logp - ref_logp) on every token (or the KL goes
into the loss, as in GRPO); advantages come from GAE(gamma, lambda) and are whitened over
the rollout; the loss is the clipped surrogate plus vf_coef x the clipped value loss

    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2),     R = A + V_old.

The KL coefficient is fixed (rl.beta) or adapted towards a target KL per sequence
(`AdaptiveKL`, Ziegler et al. 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import Config, ConfigError
from lm.sampling.sampler import token_logps

TOKENS = ("batch", "seq")
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "old_logps")
PPO_KEYS = KEYS + ("advantages", "returns", "old_values", "ref_logps")


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


def policy_stats(logits, logp, old_logp, clipped, mask, temperature: float) -> dict:
    """Means over the completion tokens: clip fraction, entropy at the sampling temperature,
    importance ratio."""
    n = jnp.maximum(mask.sum(), 1.0)
    scaled = logits / temperature
    entropy = -(jax.nn.softmax(scaled, axis=-1) * jax.nn.log_softmax(scaled, axis=-1)).sum(-1)
    return {"clip_fraction": (clipped * mask).sum() / n, "entropy": (entropy * mask).sum() / n,
            "ratio": (jnp.exp(logp - old_logp) * mask).sum() / n}


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
        aux.update(loss=loss, weight=weight, **policy_stats(logits, logp, batch["old_logps"], clipped, mask,
                                                            rl.temperature))
        return loss, aux


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Generalised advantage estimates (B, T) over the masked (completion) positions of each
    row, which are contiguous; the value after a row's last completion token is 0."""
    rewards, values, mask = (np.asarray(a, np.float64) for a in (rewards, values, mask))
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0])
    next_value = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        g = delta + gamma * lam * last
        adv[:, t] = np.where(m, g, 0.0)
        last = np.where(m, g, last)
        next_value = np.where(m, values[:, t], next_value)
    return adv.astype(np.float32)


def whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """x scaled to unit variance (and zero mean if `shift_mean`) over the masked positions."""
    m = np.asarray(mask) > 0
    if m.sum() < 2:
        return np.asarray(x, np.float32)
    mean, std = x[m].mean(), x[m].std()
    out = (x - mean) / (std + 1e-8) + (0.0 if shift_mean else mean)
    return np.where(m, out, 0.0).astype(np.float32)


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) (c = 0: no clipping),
    and where the clipped term was the larger."""
    vf = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * vf, jnp.zeros_like(vf, jnp.bool_)
    vf_clipped = (old_values + jnp.clip(values - old_values, -clip, clip) - returns) ** 2
    return 0.5 * jnp.maximum(vf, vf_clipped), vf_clipped > vf


class AdaptiveKL:
    """The KL penalty coefficient, moved towards a target KL per sequence: after a rollout
    of n rows with mean KL k, coef *= 1 + clip(k / target - 1, -0.2, 0.2) * n / horizon.
    target 0: the coefficient stays fixed."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = float(coef), float(target), int(horizon)

    def update(self, kl: float, rows: int) -> float:
        if self.target > 0:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.coef *= 1.0 + error * rows / self.horizon
        return self.coef


class PPOObjective:
    """Clipped surrogate + clipped value loss (+ the KL in the loss when rl.kl_in="loss")."""

    name = "ppo"
    batch_axes = {k: TOKENS for k in PPO_KEYS}

    def __init__(self, cfg: Config):
        if "value" not in cfg.model.scalar_heads:
            raise ConfigError("PPO needs a value head: model.scalar_heads=('value',)")
        self.rl = cfg.rl
        # the reference is read when the rollout is scored (and here when the KL is in the loss)
        self.frozen = ("reference",) if cfg.rl.beta > 0 and not cfg.lora.rank else ()

    def loss(self, model, batch: dict, frozen: dict):
        rl = self.rl
        mask = batch["loss_mask"]
        b, t = batch["inputs"].shape
        h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = model.logits(h).reshape(b, t, -1)
        values = model.scalar(h, "value").reshape(b, t)
        logp = token_logps(logits, batch["targets"], rl.temperature)
        eps_high = rl.clip_eps_high or rl.clip_eps
        pg, clipped = clipped_objective(logp, batch["old_logps"], batch["advantages"], rl.clip_eps, eps_high)
        vf, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], rl.value_clip)
        per = pg + rl.vf_coef * vf
        n = jnp.maximum(mask.sum(), 1.0)
        aux = {}
        if rl.kl_in == "loss" and rl.beta > 0:
            kl = k3_kl(logp, batch["ref_logps"])
            per = per + rl.beta * kl
            aux["kl_loss"] = (kl * mask).sum() / n
        loss, weight = normalise(per, mask, rl.loss_norm, rl.max_new)
        aux.update(loss=loss, pg_loss=(pg * mask).sum() / n, value_loss=(vf * mask).sum() / n,
                   value_clip_fraction=(value_clipped * mask).sum() / n, weight=weight,
                   **policy_stats(logits, logp, batch["old_logps"], clipped, mask, rl.temperature))
        return loss, aux
