"""Rollouts: what GRPO and PPO share (their data, held-out pass@1, their setup and report).

A rollout draws P = data.batch_size x rl.minibatches / rl.group_size prompts, G samples
each, from the current parameters with the project's compiled KV-cache sampler
(`lm.sampling.rollout`), with the log-probability of every sampled token; rewards come
from a Python callable (lm/stages/rewards.py) or a reward model, and the stage turns the
rows and rewards into its training batch (`RolloutData.score`: GRPO's group advantages;
PPO overrides it). The run resumes exactly after a kill: the prompt order and the
sampling keys derive from the seed and the rollout count, and a rollout batch still in
use is saved with the data state.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline.chat import chat_token_ids, generation_prompt
from data_pipeline.pipeline import DataStats
from lm.config import Config, ConfigError
from lm.model.sharding import process_rows, put_rows, to_host
from lm.objectives.policy import group_advantages
from lm.sampling.sampler import rollout, rows_sharding
from lm.stages.common import evaluators, problems, run_meta, run_tokenizer
from lm.stages.rewards import RewardError, score_all
from lm.train.engine import make_engine
from lm.train.init import init_params_loader
from lm.train.logger import plot_metrics
from lm.train.loop import Hook, Setup


class Sampler:
    """Prompts as padded device arrays, and decoding of the sampled tokens."""

    def __init__(self, tokenizer, items: list[dict], max_new: int):
        self.tok, self.items = tokenizer, items
        self.ids = [generation_prompt(tokenizer, p["messages"]) for p in items]
        self.width = -(-max(len(p) for p in self.ids) // 8) * 8
        self.stops = [chat_token_ids(tokenizer)["end"], tokenizer.eos_id]
        self.max_new = max_new

    def arrays(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(idx), self.width), np.int32)
        for r, i in enumerate(idx):
            tokens[r, : len(self.ids[i])] = self.ids[i]
        return tokens, np.asarray([len(self.ids[i]) for i in idx], np.int32)

    def text(self, out: np.ndarray, count: int) -> str:
        ids = [t for t in out[:count].tolist() if t not in self.stops]
        return self.tok.decode(ids)


class Sample(NamedTuple):
    """A rollout's rows on the host (every process has all of them): prompts, new tokens,
    their count and log-probabilities; `local` marks the rows this process sampled."""

    tokens: np.ndarray
    lengths: np.ndarray
    out: np.ndarray
    count: np.ndarray
    logps: np.ndarray
    local: np.ndarray


def sample(graphdef, params, sampler: Sampler, idx: list[int], key, temperature: float, mesh=None) -> Sample:
    """Sample one row per entry of `idx` (a prompt index), the rows split over every device of
    `mesh` (and so over the processes): each device decodes its share (padded to a multiple
    of the device count with copies of the last row, dropped after)."""
    n = len(idx)
    devices = 1 if mesh is None else mesh.size
    padded = idx + [idx[-1]] * (-n % devices)
    tokens, lengths = sampler.arrays(padded)
    if devices == 1:
        out, count, logps = rollout(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), key,
                                    max_new=sampler.max_new, temperature=temperature, stop_ids=sampler.stops)
        local = np.ones(len(padded), bool)
    else:
        rows = rows_sharding(mesh)
        out, count, logps = rollout(graphdef, params, put_rows(tokens, rows), put_rows(lengths, rows), key,
                                    max_new=sampler.max_new,
                                    temperature=temperature, stop_ids=sampler.stops, mesh=mesh)
        local = np.zeros(len(padded), bool)
        for sl in rows.addressable_devices_indices_map((len(padded),)).values():
            local[sl[0]] = True
    out, count, logps = (to_host(a)[:n] for a in (out, count, logps))
    return Sample(tokens[:n], lengths[:n], out, count, logps, local[:n])


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


def training_rows(tokens, lengths, out, count, logps, advantages, max_new: int) -> dict:
    """Prompt + completion rows (B, W + max_new) with the loss on the completion tokens."""
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
        batch["loss_mask"][r, p - 1: p + n - 1] = 1.0  # targets that are sampled tokens
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
        self.sampler = Sampler(tokenizer, train, rl.max_new)
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

    def score(self, tokens, lengths, out, count, logps, rewards) -> tuple[dict, dict]:
        """The training batch of a rollout and its metrics: GRPO's group-relative advantages."""
        adv = group_advantages(rewards, self.rl.group_size, self.rl.scale_rewards)
        return (training_rows(tokens, lengths, out, count, logps, adv, self.rl.max_new),
                {"advantage_abs": float(np.abs(adv).mean())})

    def _rollout(self) -> None:
        rl, g = self.rl, self.rl.group_size
        t0 = time.perf_counter()
        start = self.rollouts * self.prompts_per_rollout
        prompts = [self._order(start + j) for j in range(self.prompts_per_rollout)]
        idx = [p for p in prompts for _ in range(g)]
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.trainer.seed + 17), self.rollouts)
        tokens, lengths, out, count, logps, local = sample(self.graphdef, self.ctx.model_params, self.sampler, idx,
                                                           key, rl.temperature, self.mesh)
        t1 = time.perf_counter()
        rewards = score_rows(self.reward_fn, [(self.sampler.text(out[r], count[r]), self.sampler.items[i])
                                              for r, i in enumerate(idx)], local)
        t2 = time.perf_counter()
        self.current, extra = self.score(tokens, lengths, out, count, logps, rewards)
        b = self.cfg.data.batch_size
        rng = np.random.default_rng([self.cfg.data.seed, self.rollouts, 1])
        self.plan = [order[i: i + b].tolist() for _ in range(rl.updates_per_rollout)
                     for order in [rng.permutation(len(idx)) if rl.minibatches > 1 else np.arange(len(idx))]
                     for i in range(0, len(idx), b)]
        groups = rewards.reshape(-1, g)
        spread = {"reward_std": float(groups.std(axis=1).mean()),
                  "groups_all_same": float((groups.std(axis=1) == 0).mean())} if g > 1 else {}
        self._metrics = {"reward": float(rewards.mean()), **spread, "response_length": float(count.mean()), **extra,
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
        r = score_rows(reward_fn, [(sampler.text(s.out[k], s.count[k]), sampler.items[i])
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
    held = Sampler(tok, heldout, cfg.rl.max_new)
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
        log(f"held-out {metric} on {len(held.items)} {cfg.rl.task} prompts (greedy): {fmt.format(start)} before -> "
            f"{fmt.format(end)} after")
        summary["headline"] = (f"held-out mean reward of greedy replies {start:.3f} -> {end:.3f}" if model_reward
                               else f"held-out pass@1 {start:.1%} -> {end:.1%}")
        path = plot_metrics(ctx.run_dir, {"reward": "mean reward (rollouts)", metric: f"held-out {metric}", **curves},
                            "rl.png")
        if path:
            log(f"curves: {path}")

    hooks = [Hook(evaluation, cfg.trainer.eval_every, False, metric)] if cfg.trainer.eval_every else []
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, hooks=hooks, finish=finish,
                 evaluators=evaluators(cfg, engine, tok, log), scores_heldout=True)
