"""Objectives: what a stage trains for (see `lm.train.engine.Objective`).

`NextToken` is the cross-entropy of next-token prediction over the tokens the batch's
`loss_mask` keeps: every token of a document in pretraining, the assistant turns (and
their end tokens) in SFT. The data decides which tokens count; the loss is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.config import Config
from lm.model.transformer import Transformer
from lm.objectives.losses import chunked_cross_entropy, cross_entropy

TOKENS = ("batch", "seq")  # logical axes of a (B, T) array of a batch


class NextToken:
    """Mean cross-entropy over masked target tokens (+ optional z-loss).

    With `model.mtp_tokens` = k > 0 (multi-token prediction), the loss adds mtp_weight x the
    mean over j = 2..k+1 of the cross-entropy of predicting the token j ahead, over the
    positions whose token j ahead is in the row, in the same document and kept by the mask.
    Those sums are divided by the next-token count, so micro-batches add up exactly. The
    reported "loss" stays the next-token cross-entropy ("mtp_loss": the extra term).
    """

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
        aux = {"loss": ce, "weight": n}
        k = model.cfg.mtp_tokens
        if k:
            extra = 0.0
            for ahead in range(2, k + 2):
                shift = ahead - 1  # targets[:, i + shift] is the token `ahead` positions after inputs[:, i]
                seg = batch["segment_ids"]
                keep = batch["loss_mask"][:, shift:] * (seg[:, shift:] == seg[:, :-shift])
                pad = ((0, 0), (0, shift))
                tj = jnp.pad(batch["targets"][:, shift:], pad).reshape(-1)
                mj = jnp.pad(keep.astype(mask.dtype), pad).reshape(-1)
                hj = model.mtp_hidden(h, ahead)
                if self.chunks > 1 and t % self.chunks == 0:
                    _, cej, nj = chunked_cross_entropy(hj, model.output_weights(), tj, mj, 0.0, b, self.chunks,
                                                       model.cfg.logit_softcap)
                else:
                    _, cej, nj = cross_entropy(model.logits(hj), tj, mj, 0.0)
                extra = extra + cej * nj
            extra = extra / (k * jnp.maximum(n, 1.0))
            loss = loss + model.cfg.mtp_weight * extra
            aux["mtp_loss"] = extra
        return loss, aux
