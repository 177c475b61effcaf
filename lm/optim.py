"""Optimiser and learning-rate schedules (Optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from lm.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay, warmup-stable-decay (WSD), or a constant."""
    warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=floor)
    if cfg.schedule == "wsd":
        decay = max(1, int(round(total_steps * cfg.decay_fraction)))
        stable = max(0, total_steps - warmup - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
             optax.constant_schedule(cfg.lr),
             optax.linear_schedule(cfg.lr, floor, decay)],
            boundaries=[warmup, warmup + stable])
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
            boundaries=[warmup])
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def decay_mask(params: nnx.State, cfg: OptimConfig):
    """True for weights that get weight decay: matrices, but not norms or embeddings."""

    def one(path, v):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        is_embedding = "embed" in name or name.startswith("head")
        is_norm = v.ndim <= 1 or (v.ndim == 2 and "norm" in name)
        if is_norm:
            return False
        return cfg.decay_norms_and_embeddings or not is_embedding

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, params: nnx.State, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(
        learning_rate=schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask(params, cfg)))
    return optax.chain(*parts)
