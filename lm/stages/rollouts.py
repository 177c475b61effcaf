"""Rollouts: what GRPO and PPO share (their data, held-out pass@1, their setup and report).

A rollout draws P = data.batch_size x rl.minibatches / rl.group_size prompts, G samples
each, from the current parameters with the project's compiled KV-cache sampler
(`lm.sampling.rollout`), with the log-probability of every sampled token; rewards come
from a Python callable (lm/stages/rewards.py) or a reward model, and the stage turns the
rows and rewards into its training batch (`RolloutData.score`: GRPO's group advantages;
PPO overrides it). The run resumes exactly after a kill: the prompt order and the
sampling keys derive from the seed and the rollout count, and a rollout batch still in
use is saved with the data state.

With tools (rl.tools), the prompts carry their definitions and a sample is several turns:
generation stops at the end of a turn; a turn that called tools gets their results (run
on the host of the process that sampled the row, then shared), then the assistant token,
and generation goes on, up to rl.max_tool_calls rounds. Rows waiting for tools and rows
that are done share each round's batch. The results (and the tokens around them) are in
the training rows but never in the loss, the ratio or the KL: only sampled tokens are.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline.chat import chat_token_ids, generation_prompt, parse_reply, tool_token_ids
from data_pipeline.pipeline import DataStats
from lm.agent import registry
from lm.config import Config, ConfigError
from lm.model.sharding import process_rows, put_rows, to_host
from lm.objectives.policy import group_advantages
from lm.sampling.sampler import rollout, rows_sharding
from lm.stages.common import evaluators, problems, run_meta, run_tokenizer, tool_list
from lm.stages.rewards import RewardError, score_all
from lm.train.engine import make_engine
from lm.train.init import init_params_loader
from lm.train.logger import plot_metrics
from lm.train.loop import Hook, Setup

CALLS_PER_TURN = 2  # tool calls run per turn (more are answered with an error result)


class Sampler:
    """Prompts as padded device arrays, and decoding of the sampled tokens (with `tools`: their
    definitions lead every prompt, and up to `max_tool_calls` rounds of calls per sample)."""

    def __init__(self, tokenizer, items: list[dict], max_new: int, tools=(), max_tool_calls: int = 0,
                 result_tokens: int = 32):
        self.tok, self.items = tokenizer, items
        self.tools = list(tools)
        specs = [t.spec() for t in self.tools] or None
        self.ids = [generation_prompt(tokenizer, p["messages"], tools=specs) for p in items]
        self.width = -(-max(len(p) for p in self.ids) // 8) * 8
        self.chat_ids = chat_token_ids(tokenizer)
        self.stops = [self.chat_ids["end"], tokenizer.eos_id]
        self.max_new = max_new
        self.max_tool_calls = max_tool_calls if self.tools else 0
        self.result_tokens = result_tokens
        # a turn's results: per call <|tool|> result <|end|>, then <|assistant|>
        self.insert_width = CALLS_PER_TURN * (result_tokens + 2) + 1
        self.response_width = max_new + self.max_tool_calls * (max_new + self.insert_width)

    def arrays(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(idx), self.width), np.int32)
        for r, i in enumerate(idx):
            tokens[r, : len(self.ids[i])] = self.ids[i]
        return tokens, np.asarray([len(self.ids[i]) for i in idx], np.int32)

    def text(self, out: np.ndarray, count: int, start: int = 0) -> str:
        """The reply: the text of the last turn (from `start`), without its stop token or tool calls."""
        ids = [t for t in out[start:count].tolist() if t not in self.stops]
        return parse_reply(self.tok, ids)[0] if self.tools else self.tok.decode(ids)

    def results(self, segment: list[int]) -> tuple[list[int], int, int]:
        """The tokens to append after a turn's tokens (`segment`, its end token excluded) that
        called tools: each call's result, then <|assistant|>; ([], 0, 0) if it called none.
        Returns (tokens, calls, calls that gave an error)."""
        calls = parse_reply(self.tok, segment)[1]
        if not calls:
            return [], 0, 0
        tool, end = tool_token_ids(self.tok)["tool"], self.chat_ids["end"]
        ids, errors = [], 0
        for k, c in enumerate(calls):
            if k >= CALLS_PER_TURN:
                result = f"error: at most {CALLS_PER_TURN} tool calls are run per turn"
            elif c["name"] is None:
                result = 'error: a tool call is a JSON object {"name": ..., "arguments": {...}}'
            else:
                result = registry.run(self.tools, c["name"], c["arguments"])
            errors += result.startswith("error:")
            if k < CALLS_PER_TURN:
                ids += [tool, *self.tok.encode(result)[: self.result_tokens], end]
        return ids + [self.chat_ids["assistant"]], len(calls), errors


class Sample(NamedTuple):
    """A rollout's rows on the host (every process has all of them): prompts, new tokens,
    their count and log-probabilities; `local` marks the rows this process sampled;
    `sampled` the new tokens that were sampled (not tool results), `start` where each row's
    last turn starts; `calls` and `errors` the tool calls of each row."""

    tokens: np.ndarray
    lengths: np.ndarray
    out: np.ndarray
    count: np.ndarray
    logps: np.ndarray
    local: np.ndarray
    sampled: np.ndarray
    start: np.ndarray
    calls: np.ndarray
    errors: np.ndarray


def _decode(graphdef, params, tokens, lengths, key, temperature: float, max_new: int, stops, mesh=None):
    """Rows of prompts decoded, split over the devices of `mesh` (padded to a multiple of
    them with copies of the last row, dropped after) -> host arrays and the local rows."""
    n = len(tokens)
    devices = 1 if mesh is None else mesh.size
    pad = -n % devices
    if pad:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[-1:], pad, 0)])
    if devices == 1:
        out, count, logps = rollout(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), key,
                                    max_new=max_new, temperature=temperature, stop_ids=stops)
        local = np.ones(len(tokens), bool)
    else:
        rows = rows_sharding(mesh)
        out, count, logps = rollout(graphdef, params, put_rows(tokens, rows), put_rows(lengths, rows), key,
                                    max_new=max_new, temperature=temperature, stop_ids=stops, mesh=mesh)
        local = owned_rows(count)
    out, count, logps = (to_host(a)[:n] for a in (out, count, logps))
    return out, count, logps, local[:n]


def owned_rows(a: jax.Array) -> np.ndarray:
    """The rows of a global array (split by its first axis) that this process owns: of the
    processes whose devices hold a row (several, when the row's devices are a tensor-parallel
    group that spans processes), the lowest-numbered one. Every row has exactly one owner."""
    n = a.shape[0]
    owner = np.full(n, jax.process_count(), np.int64)
    for device, index in a.sharding.devices_indices_map(a.shape).items():
        sl = index[0] if index else slice(None)
        owner[sl] = np.minimum(owner[sl], device.process_index)
    return owner == jax.process_index()


def sample(graphdef, params, sampler: Sampler, idx: list[int], key, temperature: float, mesh=None) -> Sample:
    """Sample one row per entry of `idx` (a prompt index), the rows split over every device of
    `mesh` (and so over the processes): each device decodes its share. With tools, the rows
    go on after their calls' results (see the module docstring)."""
    n = len(idx)
    tokens, lengths = sampler.arrays(idx)
    out, count, logps, local = _decode(graphdef, params, tokens, lengths, key, temperature, sampler.max_new,
                                       sampler.stops, mesh)
    width = sampler.response_width
    resp, lps = np.zeros((n, width), np.int32), np.zeros((n, width), np.float32)
    resp[:, : out.shape[1]], lps[:, : out.shape[1]] = out, logps
    sampled = np.arange(width)[None, :] < count[:, None]
    count, start = count.astype(np.int64), np.zeros(n, np.int64)
    calls, errors = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for round_ in range(1, sampler.max_tool_calls + 1):
        end = sampler.chat_ids["end"]
        # each process runs the tools of the rows it sampled; the results are shared
        inserts = np.zeros((n, sampler.insert_width), np.int64)
        sizes = np.zeros((n, 3), np.int64)  # tokens, calls, errors
        for r in np.flatnonzero(local):
            if count[r] > start[r] and resp[r, count[r] - 1] == end:  # the turn ended (not cut at max_new)
                ids, k, bad = sampler.results(resp[r, start[r]: count[r] - 1].tolist())
                if ids and count[r] + len(ids) + sampler.max_new <= width:
                    inserts[r, : len(ids)] = ids
                    sizes[r] = (len(ids), k, bad)
        if jax.process_count() > 1:
            inserts, sizes = (np.asarray(multihost_utils.process_allgather(a)).sum(axis=0) for a in (inserts, sizes))
        going = np.flatnonzero(sizes[:, 0])
        if not len(going):
            break
        cont = np.zeros((n, sampler.width + width), np.int32)
        cont_len = np.ones(n, np.int32)  # rows that are done decode a one-token prompt, discarded
        cont[:, 0] = tokens[:, 0]
        for r in going:
            size = sizes[r, 0]
            resp[r, count[r]: count[r] + size] = inserts[r, :size]
            count[r] += size
            start[r] = count[r]
            calls[r] += sizes[r, 1]
            errors[r] += sizes[r, 2]
            seq = np.concatenate([tokens[r, : lengths[r]], resp[r, : count[r]]])
            cont[r, : len(seq)], cont_len[r] = seq, len(seq)
        out, more, logps, _ = _decode(graphdef, params, cont, cont_len, jax.random.fold_in(key, 1000 + round_),
                                      temperature, sampler.max_new, sampler.stops, mesh)
        for r in going:
            k = int(more[r])
            resp[r, count[r]: count[r] + k], lps[r, count[r]: count[r] + k] = out[r, :k], logps[r, :k]
            sampled[r, count[r]: count[r] + k] = True
            count[r] += k
    return Sample(tokens, lengths, resp, count.astype(np.int32), lps, local, sampled, start, calls, errors)


def score_rows(reward_fn: Callable, pairs: list[tuple], local: np.ndarray) -> np.ndarray:
    """The rewards of (completion, example) `pairs`, each computed by the process that sampled
    it and shared with all: (len(pairs),) float64. A reward error on any process stops all
    of them with one line."""
    rewards, error = np.zeros(len(pairs)), None
    mine = np.flatnonzero(local)
    try:
        if len(mine):
            rewards[mine] = score_all(reward_fn, [pairs[i] for i in mine])
    except RewardError as e:
        if jax.process_count() == 1:
            raise
        error = str(e)
    if jax.process_count() == 1:
        return rewards
    failed = np.asarray(multihost_utils.process_allgather(np.asarray([error is not None])))
    if failed.any():
        raise RewardError(error or f"the reward function failed on process {int(np.argmax(failed))} (see its log)")
    return np.asarray(multihost_utils.process_allgather(rewards)).sum(axis=0)


def training_rows(tokens, lengths, out, count, logps, advantages, max_new: int, sampled=None) -> dict:
    """Prompt + completion rows (B, W + max_new) with the loss on the completion tokens (on
    those `sampled` marks, if given: a tool's results are not the policy's)."""
    b, w = tokens.shape
    t = w + max_new
    batch = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((b, t), np.float32)
    batch["old_logps"] = np.zeros((b, t), np.float32)
    for r in range(b):
        p, n = int(lengths[r]), int(count[r])
        ids = np.concatenate([tokens[r, :p], out[r, :n]])
        batch["inputs"][r, : p + n] = ids
        batch["targets"][r, : p + n - 1] = ids[1:]
        batch["segment_ids"][r, : p + n] = 1
        batch["positions"][r, : p + n] = np.arange(p + n)
        batch["loss_mask"][r, p - 1: p + n - 1] = 1.0 if sampled is None else sampled[r, :n]  # sampled targets
        batch["old_logps"][r, p - 1: p + n - 1] = logps[r, :n]
    batch["advantages"] = np.asarray(advantages, np.float32)
    return batch


class RolloutData:
    """The data of a GRPO or PPO run: rollout batches sampled from the current policy (a DataSource).

    A rollout holds data.batch_size x rl.minibatches rows (prompts x rl.group_size samples);
    each of its rl.updates_per_rollout passes feeds the minibatches in a fresh order, one
    optimiser step each. Subclasses turn the sampled rows and their rewards into the
    training batch (`score`).
    """

    def __init__(self, cfg: Config, tokenizer, train: list[dict], engine, reward_fn: Callable, log: Callable):
        rl = cfg.rl
        rows = cfg.data.batch_size * rl.minibatches
        if rows % rl.group_size:
            raise ConfigError(f"data.batch_size x rl.minibatches = {rows} must be a multiple of rl.group_size="
                              f"{rl.group_size} (rows = prompts x samples per prompt)")
        self.cfg, self.rl, self.reward_fn, self.log = cfg, rl, reward_fn, log
        self.graphdef, self.mesh, self.batch_sharding = engine.graphdef, engine.mesh, engine.batch_sharding
        self.tokenizer = tokenizer
        self.sampler = Sampler(tokenizer, train, rl.max_new, tool_list(cfg), rl.max_tool_calls, rl.tool_result_tokens)
        self.names, self.weights = [rl.task], [1.0]

        self.stats = DataStats(self.names)
        self.heldout, self.heldout_bytes = {}, {}
        self.prompts_per_rollout = rows // rl.group_size
        self.rollouts, self._metrics, self.ctx = 0, {}, None
        self.current: dict | None = None  # the rollout batch in use
        self.plan: list[list[int]] = []  # its minibatches still to feed (row indices)

    def attach(self, ctx) -> None:
        self.ctx = ctx

    def _order(self, k: int) -> int:
        """The k-th prompt drawn: a new permutation of the training prompts every epoch."""
        n = len(self.sampler.ids)
        epoch, i = divmod(k, n)
        return int(np.random.default_rng([self.cfg.data.seed, epoch]).permutation(n)[i])

    def next_train(self) -> dict:
        if not self.plan:
            self._rollout()
        rows = self.plan.pop(0)
        mine = process_rows(self.batch_sharding["inputs"], len(rows))  # (all of them in one process)
        return {k: v[rows][mine] for k, v in self.current.items()}

    def score(self, tokens, lengths, out, count, logps, rewards, sampled=None) -> tuple[dict, dict]:
        """The training batch of a rollout and its metrics: GRPO's group-relative advantages."""
        adv = group_advantages(rewards, self.rl.group_size, self.rl.scale_rewards)
        return (training_rows(tokens, lengths, out, count, logps, adv, self.sampler.response_width, sampled),
                {"advantage_abs": float(np.abs(adv).mean())})

    def _rollout(self) -> None:
        rl, g = self.rl, self.rl.group_size
        t0 = time.perf_counter()
        start = self.rollouts * self.prompts_per_rollout
        prompts = [self._order(start + j) for j in range(self.prompts_per_rollout)]
        idx = [p for p in prompts for _ in range(g)]
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.trainer.seed + 17), self.rollouts)
        s = sample(self.graphdef, self.ctx.model_params, self.sampler, idx, key, rl.temperature, self.mesh)
        t1 = time.perf_counter()
        rewards = score_rows(self.reward_fn, [(self.sampler.text(s.out[r], s.count[r], s.start[r]),
                                               self.sampler.items[i]) for r, i in enumerate(idx)], s.local)
        t2 = time.perf_counter()
        self.current, extra = self.score(s.tokens, s.lengths, s.out, s.count, s.logps, rewards,
                                         s.sampled if self.sampler.tools else None)
        if self.sampler.tools:
            extra.update(tool_calls=float(s.calls.mean()),
                         tool_error_rate=float(s.errors.sum() / max(1, s.calls.sum())))
        b = self.cfg.data.batch_size
        rng = np.random.default_rng([self.cfg.data.seed, self.rollouts, 1])
        self.plan = [order[i: i + b].tolist() for _ in range(rl.updates_per_rollout)
                     for order in [rng.permutation(len(idx)) if rl.minibatches > 1 else np.arange(len(idx))]
                     for i in range(0, len(idx), b)]
        groups = rewards.reshape(-1, g)
        spread = {"reward_std": float(groups.std(axis=1).mean()),
                  "groups_all_same": float((groups.std(axis=1) == 0).mean())} if g > 1 else {}
        self._metrics = {"reward": float(rewards.mean()), **spread,
                         "response_length": float(s.sampled.sum(1).mean()), **extra,
                         "rollout_s": t1 - t0, "reward_s": t2 - t1, "score_s": time.perf_counter() - t2}
        self.rollouts += 1

    def metrics(self) -> dict:
        return dict(self._metrics)

    def get_state(self) -> dict:
        return {"rollouts": self.rollouts, "metrics": self._metrics, "plan": self.plan,
                "current": None if self.current is None else {k: v.tolist() for k, v in self.current.items()}}

    def set_state(self, state: dict) -> None:
        self.rollouts = int(state["rollouts"])
        self._metrics = dict(state.get("metrics", {}))
        self.plan = [list(map(int, rows)) for rows in state.get("plan", [])]
        cur = state.get("current")
        self.current = None if cur is None else {
            k: np.asarray(v, np.int32 if k in INT_KEYS else np.float32) for k, v in cur.items()}


INT_KEYS = ("inputs", "targets", "segment_ids", "positions")


def pass_at_1(graphdef, params, sampler: Sampler, reward_fn: Callable, batch: int = 100, mean: bool = False,
              mesh=None) -> float:
    """The share of the prompts of `sampler` whose greedy reply earns a reward of at least 1 (a
    pass; for 0/1 rewards, their mean), or with `mean` the mean reward (a reward model's).
    The prompts are split over the devices of `mesh` (and its processes), as rollouts are."""
    total = 0.0
    n = len(sampler.items)
    for lo in range(0, n, batch):
        idx = list(range(lo, min(n, lo + batch)))
        idx += [idx[-1]] * (batch - len(idx))  # one compiled shape
        s = sample(graphdef, params, sampler, idx, jax.random.PRNGKey(0), 0.0, mesh)
        real = min(batch, n - lo)
        r = score_rows(reward_fn, [(sampler.text(s.out[k], s.count[k], s.start[k]), sampler.items[i])
                                   for k, i in enumerate(idx[:real])], s.local[:real])
        total += float(r.sum() if mean else (r >= 1.0).sum())
    return total / n


def setup(cfg: Config, run_dir: str, mesh, log: Callable, *, objective, data_cls: type, reward_fn: Callable,
          curves: dict[str, str], what: str, model_reward: bool = False) -> Setup:
    """The setup of an RL stage: `objective` trained on rollouts (`data_cls`, a RolloutData)
    rewarded by `reward_fn`, from the model `trainer.init_from` names; held-out pass@1 (or
    the mean reward of greedy replies, for a reward model) every `trainer.eval_every`
    steps and at the end, against the starting model's (`model_reward`: the reward is a
    reward model's score, not a 0/1 check); `curves` plotted as rl.png."""
    tok = run_tokenizer(cfg, run_dir)
    engine = make_engine(cfg, mesh, objective)
    train, heldout = problems(cfg, tok, log)
    data = data_cls(cfg, tok, train, engine, reward_fn, log)
    tools = tool_list(cfg)
    held = Sampler(tok, heldout, cfg.rl.max_new, tools, cfg.rl.max_tool_calls, cfg.rl.tool_result_tokens)
    no_tools = Sampler(tok, heldout, cfg.rl.max_new) if tools else None
    loader = init_params_loader(cfg, engine, log, run_dir)
    if loader is None:
        raise ConfigError(f"{what} improves a model that can already answer sometimes: set trainer.init_from "
                          "(an SFT run)")
    metric, key = ("reward@greedy", "reward") if model_reward else ("pass@1", "pass_at_1")

    def evaluation(ctx, m):
        m[metric] = pass_at_1(engine.graphdef, ctx.model_params, held, reward_fn, mean=model_reward, mesh=mesh)

    def finish(ctx, summary: dict) -> None:
        end = pass_at_1(engine.graphdef, ctx.model_params, held, reward_fn, mean=model_reward, mesh=mesh)
        start = pass_at_1(engine.graphdef, jax.device_put(loader(), engine.param_sharding), held, reward_fn,
                          mean=model_reward, mesh=mesh)
        summary.update({f"heldout_{key}": end, f"base_heldout_{key}": start})
        fmt = "{:.3f}" if model_reward else "{:.1%}"
        if no_tools is not None:  # the starting model asked without tools (no definitions, no calls run)
            alone = pass_at_1(engine.graphdef, jax.device_put(loader(), engine.param_sharding), no_tools, reward_fn,
                              mean=model_reward, mesh=mesh)
            summary[f"base_heldout_{key}_without_tools"] = alone
            log(f"held-out {metric} of the starting model without tools: {fmt.format(alone)}")
        log(f"held-out {metric} on {len(held.items)} {cfg.rl.task} prompts (greedy{', with tools' if tools else ''}): "
            f"{fmt.format(start)} before -> {fmt.format(end)} after")
        summary["headline"] = (f"held-out mean reward of greedy replies {start:.3f} -> {end:.3f}" if model_reward
                               else f"held-out pass@1 {start:.1%} -> {end:.1%}")
        path = plot_metrics(ctx.run_dir, {"reward": "mean reward (rollouts)", metric: f"held-out {metric}", **curves},
                            "rl.png")
        if path:
            log(f"curves: {path}")

    hooks = [Hook(evaluation, cfg.trainer.eval_every, False, metric)] if cfg.trainer.eval_every else []
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, hooks=hooks, finish=finish,
                 evaluators=evaluators(cfg, engine, tok, log), scores_heldout=True)
