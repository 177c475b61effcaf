"""Preference objectives: a Bradley–Terry reward model, and DPO with its variants.

Batches are pairs (data_pipeline/preferences.py): arrays (B, 2, T), chosen then
rejected, with `loss_mask` on the reply's target tokens. Per sequence the policy gives
the summed log-probability of the reply, `logp`, and its token count `n`.

Losses per pair (mean over the batch), with x = (logp_c - ref_c) - (logp_r - ref_r):
- "dpo":   -(1 - e) log σ(βx) - e log σ(-βx)      (e: label smoothing; cDPO)
- "ipo":   ((logp_c - ref_c)/n_c - (logp_r - ref_r)/n_r - 1/(2β))²   (TRL's length-normalised IPO)
- "simpo": -(1 - e) log σ(β(logp_c/n_c - logp_r/n_r) - γ) - e log σ(-(...))   (no reference)
- "orpo":  NLL of the chosen tokens - λ log σ(log odds_c - log odds_r), odds = p/(1-p),
           p = exp(logp/n)                                                      (no reference)
- reward model: -log σ(r_c - r_r - margin), r read by the scalar head "reward" at the
  last token of each sequence.
The implicit rewards logged for DPO/IPO are β(logp - ref); for SimPO/ORPO β·logp/n.
DPO, IPO, SimPO and the reward loss equal TRL's (DPOTrainer, CPOTrainer, RewardTrainer) to
1e-6 on the same model and pairs (tests/test_preference_parity.py). ORPO's odds-ratio term
equals TRL's; its NLL covers the chosen reply's tokens, as in the ORPO paper, where TRL's
ORPOTrainer also counts the prompt's tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import Config, ConfigError

PAIR = ("batch", None, "seq")  # logical axes of a (B, 2, T) array of a pair batch
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
LOSSES = ("dpo", "ipo", "simpo", "orpo")


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def bt_loss(r_c, r_r, margin=0.0):
    return -jax.nn.log_sigmoid(r_c - r_r - margin)


def dpo_loss(x, beta, smoothing=0.0):
    return -(1 - smoothing) * jax.nn.log_sigmoid(beta * x) - smoothing * jax.nn.log_sigmoid(-beta * x)


def ipo_loss(ratio_c, ratio_r, n_c, n_r, beta):
    return (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2


def simpo_loss(logp_c, logp_r, n_c, n_r, beta, gamma, smoothing=0.0):
    return dpo_loss(logp_c / n_c - logp_r / n_r - gamma / beta, beta, smoothing)


def orpo_odds_term(logp_c, logp_r, n_c, n_r):
    """log σ(log odds ratio) of the length-normalised chosen vs rejected probabilities."""
    a_c, a_r = logp_c / n_c, logp_r / n_r
    return jax.nn.log_sigmoid((a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r)))


def _flat(batch: dict) -> dict:
    return {k: batch[k].reshape((-1,) + batch[k].shape[2:]) for k in KEYS}


def reply_logps(model, batch: dict):
    """(logp (B, 2), n (B, 2), hidden (2B*T, D)): summed log-probabilities of the reply tokens."""
    b, _, t = batch["inputs"].shape
    f = _flat(batch)
    h = model.hidden(f["inputs"], f["positions"], f["segment_ids"])
    logits = model.logits(h)  # (2B*T, V) float32
    tgt = f["targets"].reshape(-1)
    lp = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    mask = f["loss_mask"].reshape(-1)
    logp = (lp * mask).reshape(b, 2, t).sum(-1)
    n = mask.reshape(b, 2, t).sum(-1)
    return logp, n, h


def _valid(batch):
    """1.0 for real pairs, 0.0 for the padding rows of a short held-out batch."""
    return (batch["segment_ids"][:, :, 0] > 0).all(axis=1).astype(jnp.float32)


def _mean(x, w):
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _wins(a, b):
    """1 where a > b, 0.5 on a tie (an untrained head ties every pair: chance, not 0)."""
    return jnp.where(a > b, 1.0, jnp.where(a == b, 0.5, 0.0))


class RewardObjective:
    """Bradley–Terry loss on the scalar head "reward" (read at each sequence's last token)."""

    name = "reward"
    batch_axes = {k: PAIR for k in KEYS}
    frozen: tuple[str, ...] = ()
    precomputed = False  # (no reference model)

    def __init__(self, cfg: Config):
        if "reward" not in cfg.model.scalar_heads:
            raise ConfigError("a reward model needs model.scalar_heads=('reward',)")
        self.margin = cfg.pref.margin

    def rewards(self, model, batch: dict):
        b, _, t = batch["inputs"].shape
        h = model.hidden(*(_flat(batch)[k] for k in ("inputs", "positions", "segment_ids")))
        last = jnp.maximum(batch["segment_ids"].reshape(2 * b, t).sum(-1) - 1, 0)
        h_last = h.reshape(2 * b, t, -1)[jnp.arange(2 * b), last]
        return model.scalar(h_last, "reward").reshape(b, 2)

    def loss(self, model, batch: dict, frozen: dict):
        r = self.rewards(model, batch)
        w = _valid(batch)
        loss = _mean(bt_loss(r[:, 0], r[:, 1], self.margin), w)
        return loss, {"loss": loss, "accuracy": _mean(_wins(r[:, 0], r[:, 1]), w),
                      "margin": _mean(r[:, 0] - r[:, 1], w), "reward_chosen": _mean(r[:, 0], w),
                      "reward_rejected": _mean(r[:, 1], w), "weight": jnp.sum(w)}


class PreferenceObjective:
    """DPO, IPO, SimPO or ORPO (`pref.loss`) on the policy; the reference (DPO, IPO) is the
    starting model: frozen["reference"], or with LoRA the base without adapters."""

    name = "preference"
    batch_axes = {k: PAIR for k in KEYS}

    def __init__(self, cfg: Config):
        p = cfg.pref
        if p.loss not in LOSSES:
            raise ConfigError(f"pref.loss={p.loss!r}; choose one of {', '.join(LOSSES)}")
        self.cfg = p
        self.needs_reference = p.loss in ("dpo", "ipo")
        self.precomputed = self.needs_reference and p.reference == "precomputed"
        self.frozen = ("reference",) if self.needs_reference and not cfg.lora.rank and not self.precomputed else ()
        if self.precomputed:
            self.batch_axes = {**self.batch_axes, "ref_logps": ("batch", None)}

    def reference_logps(self, model, batch: dict, frozen: dict):
        if self.precomputed:
            return batch["ref_logps"]  # (B, 2), from the data (lm/stages/pairs.py ReferenceTable)
        params = frozen["reference"] if "reference" in frozen else frozen["base"]
        ref = nnx.merge(nnx.graphdef(model), params)
        return jax.lax.stop_gradient(reply_logps(ref, batch)[0])

    def loss(self, model, batch: dict, frozen: dict):
        p = self.cfg
        logp, n, _ = reply_logps(model, batch)
        n = jnp.maximum(n, 1.0)
        w = _valid(batch)
        lc, lr, nc, nr = logp[:, 0], logp[:, 1], n[:, 0], n[:, 1]
        if self.needs_reference:
            ref = self.reference_logps(model, batch, frozen)
            rc, rr = lc - ref[:, 0], lr - ref[:, 1]
            per = dpo_loss(rc - rr, p.beta, p.label_smoothing) if p.loss == "dpo" else ipo_loss(rc, rr, nc, nr, p.beta)
            chosen, rejected = p.beta * rc, p.beta * rr
        else:
            chosen, rejected = p.beta * lc / nc, p.beta * lr / nr
            if p.loss == "simpo":
                per = simpo_loss(lc, lr, nc, nr, p.beta, p.simpo_gamma, p.label_smoothing)
            else:  # orpo: the chosen replies' token-mean NLL, minus lambda x the odds-ratio term
                nll = -jnp.sum(lc * w) / jnp.maximum(jnp.sum(nc * w), 1.0)
                per = nll - p.orpo_lambda * orpo_odds_term(lc, lr, nc, nr)
        loss = _mean(per, w)
        return loss, {"loss": loss, "accuracy": _mean(_wins(chosen, rejected), w),
                      "margin": _mean(chosen - rejected, w), "reward_chosen": _mean(chosen, w),
                      "reward_rejected": _mean(rejected, w), "logp_chosen": _mean(lc, w),
                      "logp_rejected": _mean(lr, w), "logp_accuracy": _mean(_wins(lc, lr), w),
                      "logp_margin": _mean(lc - lr, w), "weight": jnp.sum(w)}
