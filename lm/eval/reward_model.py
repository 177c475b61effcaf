"""Scoring with a trained reward model: `score` for texts in Python, `lm reward RUN_DIR
--pairs FILE` for the pairwise accuracy on a preference file (any layout of
data_pipeline/preferences.py).

A reward is the scalar head "reward" read at the last token of the conversation rendered
with the chat template (the prompt's turns, then the reply and its <|end|>), exactly as
the reward stage trains it.
"""

from __future__ import annotations

import json
import math
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


def score(loaded, conversations: Sequence[tuple[list[dict], str]], batch: int = 16,
          log: Callable | None = None) -> list[float]:
    """Rewards of (prompt messages, reply) conversations under the run's reward model, within
    the model's context (model.max_seq_len). A conversation longer than that is scored on its
    last tokens, the ones the reward head reads (the reply's end): counted, and said once
    per run through `log`."""
    tok, max_len = loaded.tokenizer, loaded.cfg.model.max_seq_len
    fn = loaded.__dict__.get("_reward_fn") or loaded.__dict__.setdefault("_reward_fn", _rewards_fn(loaded))
    out = []
    for i in range(0, len(conversations), batch):
        part = conversations[i: i + batch]
        rendered = [chat.render(tok, list(prompt) + [{"role": "assistant", "content": reply}])[0]
                    for prompt, reply in part]
        longest = max(len(ids) for ids in rendered)
        # rows as wide as the run's training rows, or the next power of two the batch needs (few shapes)
        t = min(max_len, max(loaded.cfg.data.seq_len, 2 ** math.ceil(math.log2(max(longest, 8)))))
        inputs = np.zeros((batch, t), np.int32)
        seg = np.zeros((batch, t), np.int32)
        for r, ids in enumerate(rendered):
            if len(ids) > t:
                loaded.__dict__["_reward_cut"] = loaded.__dict__.get("_reward_cut", 0) + 1
                ids = ids[-t:]
            inputs[r, :len(ids)], seg[r, :len(ids)] = ids, 1
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))
        out += [float(x) for x in np.asarray(fn(inputs, pos, seg))[:len(part)]]
    cut = loaded.__dict__.get("_reward_cut", 0)
    if cut and log is not None and not loaded.__dict__.get("_reward_cut_said"):
        loaded.__dict__["_reward_cut_said"] = True
        log(f"WARNING: the reward model {loaded.run_dir or ''} scored {cut} conversation(s) longer than its "
            f"context of {max_len} tokens on their last {max_len} tokens (the reply's end, where the reward is read)")
    return out


def score_pairs(loaded, path: str, fmt: str = "auto", limit: int | None = None, log: Callable = print) -> dict:
    """Pairwise accuracy (ties count half) and mean margin of the reward model on a file of pairs."""
    src, _ = open_preference_source(SourceConfig(name="pairs", kind="preference", paths=(path,), chat_format=fmt,
                                                 heldout_fraction=0.0))

    tok, t = loaded.tokenizer, loaded.cfg.model.max_seq_len
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
