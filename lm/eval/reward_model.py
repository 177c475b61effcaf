"""Scoring with a trained reward model: `score` for texts in Python, `lm reward RUN_DIR
--pairs FILE` (`pair_accuracy`) for the pairwise accuracy on a preference file (any
layout of data_pipeline/preferences.py).

A reward is the scalar head "reward" read at the last token of the conversation rendered
with the chat template (the prompt's turns, then the reply and its <|end|>), exactly as
the reward stage trains it. The rows of each batch are laid out over the devices of the
run's mesh (the batch axes: data and fsdp); `pair_accuracy` loads the run onto every
device of every process (data parallel), so each device scores its share of the pairs,
and the rewards are gathered so every process holds them all.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from data_pipeline import chat
from data_pipeline.config import SourceConfig
from data_pipeline.errors import UserError
from data_pipeline.preferences import open_preference_source
from data_pipeline.tokenizer import Tokenizer
from lm.config import ConfigError, MeshConfig
from lm.model.sharding import logical_to_spec, put_rows, to_host
from lm.train.run import load_run, read_config

BATCH = 16  # rows (replies) per forward pass, rounded up to a multiple of the devices the rows are split over


def _no_reward_head(run_dir) -> ConfigError:
    return ConfigError(f"{run_dir or 'this run'} has no reward head (model.scalar_heads lacks 'reward'): "
                       "train one with a reward experiment (stage 'reward')")


def _rewards_fn(loaded):
    """A jitted (inputs, positions, segment_ids) (N, T) -> rewards (N,)."""
    model = loaded.model()
    if "reward" not in loaded.cfg.model.scalar_heads:
        raise _no_reward_head(loaded.run_dir)

    graphdef, params = nnx.split(model)

    @jax.jit
    def rewards(params, inputs, positions, segment_ids):
        m = nnx.merge(graphdef, params)
        h = m.hidden(inputs, positions, segment_ids)
        n, t = inputs.shape
        last = jnp.maximum(segment_ids.sum(-1) - 1, 0)
        return m.scalar(h.reshape(n, t, -1)[jnp.arange(n), last], "reward")

    return lambda *a: rewards(params, *a)


def _rows_sharding(loaded, shape) -> NamedSharding:
    """The layout of a batch of rows on the run's mesh: rows split over its batch axes."""
    mesh = loaded.trainer.mesh
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), shape, mesh))


def _batch_rows(loaded, batch: int) -> int:
    """`batch` rounded up to a multiple of the ways the run's mesh splits rows (data x fsdp)."""
    split = loaded.trainer.mesh.shape["data"] * loaded.trainer.mesh.shape["fsdp"]
    return -(-batch // split) * split


def score_ids(loaded, rendered: Sequence[Sequence[int]], batch: int = BATCH, log: Callable | None = None) -> list[float]:
    """Rewards of conversations already rendered with the chat template (token ids), in
    batches of `batch` rows (rounded up to a multiple of the devices that split the rows;
    each device scores its rows; every process gets every reward). A conversation longer
    than the context is scored on its last tokens (counted, said once per run via `log`)."""
    max_len = loaded.cfg.model.max_seq_len
    fn = loaded.__dict__.get("_reward_fn") or loaded.__dict__.setdefault("_reward_fn", _rewards_fn(loaded))
    batch = _batch_rows(loaded, batch)
    out = []
    for i in range(0, len(rendered), batch):
        part = rendered[i: i + batch]
        longest = max(len(ids) for ids in part)
        # rows as wide as the run's training rows, or the next power of two the batch needs (few shapes)
        t = min(max_len, max(loaded.cfg.data.seq_len, 2 ** math.ceil(math.log2(max(longest, 8)))))
        inputs = np.zeros((batch, t), np.int32)
        seg = np.zeros((batch, t), np.int32)
        for r, ids in enumerate(part):
            if len(ids) > t:
                loaded.__dict__["_reward_cut"] = loaded.__dict__.get("_reward_cut", 0) + 1
                ids = ids[-t:]
            inputs[r, :len(ids)], seg[r, :len(ids)] = ids, 1
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))
        # every process holds the whole host batch; each places only its devices' rows
        sharding = _rows_sharding(loaded, (batch, t))
        rows = [put_rows(a, sharding) for a in (inputs, pos, seg)]
        out += [float(x) for x in to_host(fn(*rows))[:len(part)]]
    cut = loaded.__dict__.get("_reward_cut", 0)
    if cut and log is not None and not loaded.__dict__.get("_reward_cut_said"):
        loaded.__dict__["_reward_cut_said"] = True
        log(f"WARNING: the reward model {loaded.run_dir or ''} scored {cut} conversation(s) longer than its "
            f"context of {max_len} tokens on their last {max_len} tokens (the reply's end, where the reward is read)")
    return out


def score(loaded, conversations: Sequence[tuple[list[dict], str]], batch: int = BATCH,
          log: Callable | None = None) -> list[float]:
    """Rewards of (prompt messages, reply) conversations under the run's reward model, within
    the model's context (model.max_seq_len). A conversation longer than that is scored on its
    last tokens, the ones the reward head reads (the reply's end): counted, and said once
    per run through `log`."""
    rendered = [chat.render(loaded.tokenizer, list(prompt) + [{"role": "assistant", "content": reply}])[0]
                for prompt, reply in conversations]
    return score_ids(loaded, rendered, batch, log)


def read_pairs(tok, max_len: int, path: str, fmt: str = "auto", limit: int | None = None,
               log: Callable = print) -> dict:
    """The usable pairs of a preference file, rendered (no device touched): {"rendered": [chosen
    ids, rejected ids, ...], "where": [file:line, ...], "bad_records", "too_long"}. A pair whose
    reply would end past `max_len` tokens is skipped (it would score a tie), counted and said."""
    src, _ = open_preference_source(SourceConfig(name="pairs", kind="preference", paths=(path,), chat_format=fmt,
                                                 heldout_fraction=0.0))
    rendered, where, bad, long, first = [], [], 0, 0, []
    for i in range(len(src)):
        r = src[i]
        if r.text is None:
            bad += 1
            first += [f"{r.where}: {r.error}"][: 3 - len(first)]
            continue
        pair = json.loads(r.text)
        ids = [chat.render(tok, pair["prompt"] + [{"role": "assistant", "content": pair[k]}])[0]
               for k in ("chosen", "rejected")]
        # the reward is read at the reply's last token: a pair cut off before it would score a tie
        if max(map(len, ids)) > max_len:
            long += 1
            first += [f"{r.where}: longer than the model's rows of {max_len} tokens"][: 3 - len(first)]
            continue
        rendered += ids
        where.append(str(r.where))
        if limit and len(where) >= limit:
            break
    if (bad or long) and where:  # (with none left, the error below says it)
        log(f"{path}: skipped {bad} bad record(s) and {long} pair(s) too long to score; first: {'; '.join(first)}")
    if not where:
        raise ConfigError(f"{path}: no usable preference pair ({bad} bad, {long} too long; first: "
                          f"{'; '.join(first) or 'the file is empty'})")
    return {"rendered": rendered, "where": where, "bad_records": bad, "too_long": long}


def _figures(pairs: dict, rewards: Sequence[float]) -> dict:
    r = np.asarray(rewards, np.float64).reshape(-1, 2)
    wins = np.where(r[:, 0] > r[:, 1], 1.0, np.where(r[:, 0] == r[:, 1], 0.5, 0.0))
    return {"pairs": len(r), "bad_records": pairs["bad_records"], "too_long": pairs["too_long"],
            "accuracy": float(wins.mean()), "margin": float((r[:, 0] - r[:, 1]).mean()), "chance": 0.5,
            "rewards": r.tolist(), "where": pairs["where"]}


def score_pairs(loaded, path: str, fmt: str = "auto", limit: int | None = None, log: Callable = print) -> dict:
    """Pairwise accuracy (ties count half) and mean margin of the reward model on a file of pairs
    (and each pair's rewards, chosen then rejected, with the line it came from)."""
    pairs = read_pairs(loaded.tokenizer, loaded.cfg.model.max_seq_len, path, fmt, limit, log)
    return _figures(pairs, score_ids(loaded, pairs["rendered"], log=log))


def pair_accuracy(run_dir: str, path: str, fmt: str = "auto", limit: int | None = None, log: Callable = print,
                  batch: int = BATCH, out: str | None = None) -> dict:
    """`lm reward`: `score_pairs` with the run loaded onto every device of every process (the
    parameters whole on each device, a batch's rows split over all of them). Every process
    reads and checks the inputs first, before any parameter is read; if one fails, all stop,
    each with one line (UserError). Every process returns the same figures; process 0 writes
    each pair's rewards to `out` (JSON Lines: where, chosen, rejected) if given."""
    main = jax.process_index() == 0
    try:
        if out and main and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"cannot write {out}: its folder does not exist")
        cfg = read_config(run_dir)
        if "reward" not in cfg.model.scalar_heads:
            raise _no_reward_head(run_dir)
        tok_path = os.path.join(run_dir, "tokenizer.model")
        if not os.path.exists(tok_path):
            raise UserError(f"{run_dir} has no tokenizer.model: the reward model's tokenizer renders the pairs")
        pairs = read_pairs(Tokenizer(tok_path), cfg.model.max_seq_len, path, fmt, limit, log)
        failure = None
    except (UserError, OSError) as e:
        failure, pairs = e, None
    _agree(failure, pairs, path)
    loaded = load_run(run_dir, log=log, mesh=MeshConfig(data=-1, fsdp=1, tensor=1))
    rewards = score_ids(loaded, pairs["rendered"], batch, log)
    rows = _batch_rows(loaded, batch)
    sharding = _rows_sharding(loaded, (rows, 1))  # (the layout of every batch scored)
    log(f"scored {len(pairs['where'])} pairs on {len(sharding.device_set)} device(s) of {jax.process_count()} "
        f"process(es), {sharding.shard_shape((rows, 1))[0]} of each batch's {rows} rows on each device")
    figures = _figures(pairs, rewards)
    if out and main:
        with open(out, "w") as f:
            f.writelines(json.dumps({"where": w, "chosen": c, "rejected": r}) + "\n"
                         for w, (c, r) in zip(figures["where"], figures["rewards"]))
    return figures


def _agree(failure: Exception | None, pairs: dict | None, path: str) -> None:
    """Across processes: raise `failure` where it happened and one line naming the failed
    processes everywhere else; stop all if the processes read different pairs."""
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    digest = 0 if pairs is None else zlib.crc32(np.concatenate([np.asarray(ids, np.int32) for ids in
                                                                 pairs["rendered"]]).tobytes())
    mine = np.asarray([failure is None, 0 if pairs is None else len(pairs["where"]), digest], np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if failure is not None:
        raise failure
    failed = [i for i, row in enumerate(every) if not row[0]]
    if failed:
        raise UserError(f"process(es) {', '.join(map(str, failed))} stopped on its inputs (the run, the pairs or "
                        "--scores: its own line says why); every process stops")
    if len({tuple(row[1:]) for row in every}) > 1:
        raise UserError(f"{path}: the processes read different pairs ({', '.join(str(int(r[1])) for r in every)} "
                        "usable pairs by process): give every process the same file and flags")
