"""Objectives: what a stage trains for (see `lm.train.engine.Objective`).

`NextToken` is the cross-entropy of next-token prediction over the tokens the batch's
`loss_mask` keeps: every token of a document in pretraining, the assistant turns (and
their end tokens) in SFT. The data decides which tokens count; the loss is the same.
"""

from __future__ import annotations

import jax

from lm.config import Config
from lm.model.transformer import Transformer
from lm.objectives.losses import chunked_cross_entropy, cross_entropy

TOKENS = ("batch", "seq")  # logical axes of a (B, T) array of a batch


class NextToken:
    """Mean cross-entropy over masked target tokens (+ optional z-loss)."""

    name = "next_token"
    batch_axes = {k: TOKENS for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    frozen: tuple[str, ...] = ()

    def __init__(self, cfg: Config):
        self.z_loss = cfg.optim.z_loss
        self.chunks = cfg.trainer.loss_chunks

    def loss(self, model: Transformer, batch: dict, frozen: dict) -> tuple[jax.Array, dict]:
        b, t = batch["inputs"].shape
        h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B*T, D)
        targets, mask = batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1)
        if self.chunks > 1 and t % self.chunks == 0:
            loss, ce, n = chunked_cross_entropy(h, model.output_weights(), targets, mask, self.z_loss, b, self.chunks,
                                                model.cfg.logit_softcap)
        else:
            loss, ce, n = cross_entropy(model.logits(h), targets, mask, self.z_loss)
        return loss, {"loss": ce, "weight": n}
