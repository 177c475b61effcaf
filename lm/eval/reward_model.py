"""Scoring with a trained reward model: `score` for texts in Python, `lm reward RUN_DIR
--pairs FILE` for the pairwise accuracy on a preference file (any layout of
data_pipeline/preferences.py).

A reward is the scalar head "reward" read at the last token of the conversation rendered
with the chat template (the prompt's turns, then the reply and its <|end|>), exactly as
the reward stage trains it.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import chat
from data_pipeline.config import SourceConfig
from data_pipeline.preferences import open_preference_source
from lm.config import ConfigError


def _rewards_fn(loaded):
    """A jitted (inputs, positions, segment_ids) (N, T) -> rewards (N,)."""
    model = loaded.model()
    if "reward" not in loaded.cfg.model.scalar_heads:
        raise ConfigError(f"{loaded.run_dir or 'this run'} has no reward head (model.scalar_heads lacks 'reward'): "
                          "train one with a reward experiment (stage 'reward')")

    graphdef, params = nnx.split(model)

    @jax.jit
    def rewards(params, inputs, positions, segment_ids):
        m = nnx.merge(graphdef, params)
        h = m.hidden(inputs, positions, segment_ids)
        n, t = inputs.shape
        last = jnp.maximum(segment_ids.sum(-1) - 1, 0)
        return m.scalar(h.reshape(n, t, -1)[jnp.arange(n), last], "reward")

    return lambda *a: rewards(params, *a)


def score(loaded, conversations: Sequence[tuple[list[dict], str]], batch: int = 16) -> list[float]:
    """Rewards of (prompt messages, reply) conversations under the run's reward model."""
    tok, t = loaded.tokenizer, loaded.cfg.data.seq_len
    fn = loaded.__dict__.get("_reward_fn") or loaded.__dict__.setdefault("_reward_fn", _rewards_fn(loaded))
    out = []
    for i in range(0, len(conversations), batch):
        part = conversations[i: i + batch]
        inputs = np.zeros((batch, t), np.int32)
        seg = np.zeros((batch, t), np.int32)
        for r, (prompt, reply) in enumerate(part):
            ids = chat.render(tok, list(prompt) + [{"role": "assistant", "content": reply}])[0][:t]
            inputs[r, :len(ids)], seg[r, :len(ids)] = ids, 1
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))
        out += [float(x) for x in np.asarray(fn(inputs, pos, seg))[:len(part)]]
    return out


def score_pairs(loaded, path: str, fmt: str = "auto", limit: int | None = None, log: Callable = print) -> dict:
    """Pairwise accuracy (ties count half) and mean margin of the reward model on a file of pairs."""
    src, _ = open_preference_source(SourceConfig(name="pairs", kind="preference", paths=(path,), chat_format=fmt,
                                                 heldout_fraction=0.0))

    tok, t = loaded.tokenizer, loaded.cfg.data.seq_len
    pairs, bad, long, first = [], 0, 0, []
    for i in range(len(src)):
        r = src[i]
        if r.text is None:
            bad += 1
            first += [f"{r.where}: {r.error}"][: 3 - len(first)]
            continue
        pair = json.loads(r.text)
        # the reward is read at the reply's last token: a pair cut off before it would score a tie
        if max(len(chat.render(tok, pair["prompt"] + [{"role": "assistant", "content": pair[k]}])[0])
               for k in ("chosen", "rejected")) > t:
            long += 1
            first += [f"{r.where}: longer than the model's rows of {t} tokens"][: 3 - len(first)]
            continue
        pairs.append(pair)
        if limit and len(pairs) >= limit:
            break
    if bad or long:
        log(f"{path}: skipped {bad} bad record(s) and {long} pair(s) too long to score; first: {'; '.join(first)}")
    if not pairs:
        raise ConfigError(f"{path}: no usable preference pair ({bad} bad, {long} too long; first: "
                          f"{'; '.join(first) or 'the file is empty'})")
    convs = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    r = np.asarray(score(loaded, convs)).reshape(-1, 2)
    wins = np.where(r[:, 0] > r[:, 1], 1.0, np.where(r[:, 0] == r[:, 1], 0.5, 0.0))
    return {"pairs": len(pairs), "bad_records": bad, "too_long": long, "accuracy": float(wins.mean()),
            "margin": float((r[:, 0] - r[:, 1]).mean()), "chance": 0.5}
