"""GRPO: advantages, the clipped objective, the KL estimate, normalisation, rewards, and the
agreement of the sampler's log-probabilities with the trainer's."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.config import DataConfig
from lm.config import Config, ModelConfig, RLConfig
from lm.objectives import policy as rl
from lm.stages import rewards

QUIET = dict(log=lambda *_: None)


def test_group_advantages_hand_computed():
    r = [1, 0, 0, 1, 1, 1, 1, 1]  # two groups of 4; the second has no spread
    a = rl.group_advantages(r, 4)
    np.testing.assert_allclose(a[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(a[4:], 0.0)
    np.testing.assert_allclose(rl.group_advantages(r, 4, scale=False)[:4], [0.5, -0.5, -0.5, 0.5])  # Dr. GRPO


def test_clipped_objective_kl_and_normalisation_hand_computed():
    logp, old = jnp.array([0.5, 0.5, 0.1]), jnp.array([0.0, 0.0, 0.0])
    loss, clipped = rl.clipped_objective(logp, old, jnp.array([1.0, -1.0, 1.0]), 0.2, 0.2)
    np.testing.assert_allclose(loss, [-1.2, math.exp(0.5), -math.exp(0.1)], rtol=1e-6)
    assert clipped.tolist() == [True, True, False]
    _, clipped = rl.clipped_objective(logp, old, jnp.ones(3), 0.2, 0.28)  # DAPO's wider upper bound
    assert clipped.tolist() == [True, True, False]
    assert float(rl.k3_kl(jnp.float32(-1.0), jnp.float32(-0.5))) == pytest.approx(math.exp(0.5) - 0.5 - 1, rel=1e-6)
    assert float(rl.k3_kl(jnp.float32(-1.0), jnp.float32(-1.0))) == 0.0
    per = jnp.array([[1.0, 2.0, 5.0], [3.0, 7.0, 7.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(rl.normalise(per, mask, "sequence", 3)[0]) == pytest.approx((1.5 + 3) / 2)
    assert float(rl.normalise(per, mask, "token", 3)[0]) == pytest.approx(6 / 3)
    assert float(rl.normalise(per, mask, "constant", 3)[0]) == pytest.approx(6 / (2 * 3))


def test_rewards():
    ex = {"answer": "1234"}
    assert rewards.exact(" 1234 ", ex) == 1.0 and rewards.exact("1234.", ex) == 0.0
    assert rewards.number("so the total is 1,234.", ex) == 1.0 and rewards.number("12 and 34", ex) == 0.0
    assert rewards.gsm8k_strict("3 + 4 = 7\n#### 1,234", ex) == 1.0
    assert rewards.gsm8k_strict("the answer is 1234", ex) == 0.0
    assert rewards.gsm8k_lenient("the answer is 1234", ex) == 1.0
    assert rewards.get("lm.stages.rewards:exact") is rewards.exact
    with pytest.raises(Exception, match="rl.reward"):
        rewards.get("nope")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_and_trainer_log_probabilities_agree(temperature):
    """The per-token log-probabilities the sampler reports equal those the trainer recomputes
    for the same tokens (float32, to 1e-5): otherwise the importance ratios start away from 1."""
    from lm.model.transformer import Transformer
    from lm.sampling.sampler import rollout
    from lm.stages.rollouts import training_rows

    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
    model = Transformer(cfg, nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    lengths = np.asarray([5, 9, 3, 12, 7, 7], np.int32)
    tokens = np.zeros((6, 16), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = rng.integers(1, 97, n)
    out, count, logps = rollout(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(1),
                                max_new=12, temperature=temperature, stop_ids=[5])
    out, count, logps = np.asarray(out), np.asarray(count), np.asarray(logps)
    assert count.min() >= 1 and np.all(logps[np.arange(12)[None] < count[:, None]] < 0)
    batch = training_rows(tokens, lengths, out, count, logps, np.zeros(6), 12)
    obj = rl.GRPOObjective(Config(model=cfg, rl=RLConfig(temperature=temperature, beta=0.0)))
    trainer_logps, _ = jax.jit(lambda p, b: obj._logps(nnx.merge(graphdef, p), b))(params, batch)
    m = batch["loss_mask"] > 0
    assert m.sum() == count.sum()
    np.testing.assert_allclose(np.asarray(trainer_logps)[m], batch["old_logps"][m], atol=1e-5)


def test_beta_zero_never_builds_a_reference():
    from lm.model.sharding import make_mesh
    from lm.train.engine import make_engine

    model = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
    for beta, frozen in ((0.0, ()), (0.04, ("reference",))):
        cfg = Config(model=model, data=DataConfig(seq_len=32), rl=RLConfig(beta=beta))
        engine = make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), rl.GRPOObjective(cfg))
        assert engine.frozen_names == frozen
        state, fz = engine.init_state(0)
        assert tuple(fz) == frozen


def test_arith_task_split_is_disjoint_and_fixed():
    from data_pipeline import tasks

    train, held = tasks.arith(0, 3000, 200)
    assert len(train) == 3000 and len(held) == 200
    key = lambda p: p["messages"][0]["content"]  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    assert tasks.arith(0, 3000, 200)[1] == held  # the same on every machine
    q = held[0]["messages"][0]["content"]
    a, b = (int(x) for x in q[len("What is "):-1].split(" + "))
    assert held[0]["answer"] == str(a + b)


@pytest.mark.slow
def test_grpo_trains_end_to_end(base_run, tmp_path):
    """A few GRPO steps from a small model with chat tokens: finite metrics, rollouts logged."""
    from lm.stages.runner import train
    from lm.train.logger import read_metrics

    bcfg = base_run["cfg"]
    cfg = Config(name="grpo", stage="grpo", model=bcfg.model,
                 rl=RLConfig(task="arith", group_size=4, max_new=6, eval_prompts=8, train_problems=100),
                 optim=dataclasses.replace(bcfg.optim, lr=1e-4, warmup_steps=1),
                 data=dataclasses.replace(bcfg.data, batch_size=8, seq_len=32),
                 trainer=dataclasses.replace(bcfg.trainer, steps=3, log_every=1, eval_every=2, checkpoint_every=2,
                                             init_from=base_run["run"], num_samples=0))
    s = train(cfg, str(tmp_path / "grpo"), progress=False, **QUIET)
    assert 0.0 <= s["heldout_pass_at_1"] <= 1.0 and 0.0 <= s["base_heldout_pass_at_1"] <= 1.0
    rows = read_metrics(str(tmp_path / "grpo"))
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows if "loss" in r)
    assert "pass@1" in rows[1]


GRPO_EXPERIMENT = """
import dataclasses
from lm import experiment
from lm.config import Config, RLConfig


def config():
    b = experiment.load({exp!r})
    return Config(name="grpo", stage="grpo", model=b.model,
                  rl=RLConfig(task="arith", group_size=4, max_new=6, eval_prompts=8, train_problems=100,
                              updates_per_rollout=2),
                  optim=dataclasses.replace(b.optim, lr=1e-3, warmup_steps=1),
                  data=dataclasses.replace(b.data, batch_size=8, seq_len=32),
                  trainer=dataclasses.replace(b.trainer, steps=9, log_every=1, eval_every=0, checkpoint_every=3,
                                              init_from={run!r}, num_samples=0))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sigkill_during_grpo_then_resume_reproduces_every_step(base_run, tmp_path, stage):
    """Rollouts resume exactly: the sampling keys derive from the rollout count, and a rollout
    batch still in use (updates_per_rollout=2) is saved with the data state (with PPO: in
    minibatches, and the adaptive KL coefficient too)."""
    import json
    import os
    import subprocess

    from helpers import ROOT, cpu_env, kill_at_checkpoint_then_resume, train_cmd

    exp = tmp_path / "grpo_exp.py"
    template = GRPO_EXPERIMENT if stage == "grpo" else PPO_EXPERIMENT.replace("{steps}", "9").replace(
        "{eval_every}", "0")
    exp.write_text(template.format(exp=base_run["exp"], run=base_run["run"]))

    def steps(run):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        return [(r["step"], r["loss"], r["reward"], r["response_length"], r.get("kl_coef")) for r in rows
                if "loss" in r]

    ref = tmp_path / "ref"
    p = subprocess.run(train_cmd(str(exp), ref), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    p = kill_at_checkpoint_then_resume(str(exp), run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from the checkpoint of step" in p.stdout + p.stderr
    assert steps(run) == steps(ref) and len(steps(ref)) == 9


# -- PPO ----------------------------------------------------------------------------------


def test_gae_against_a_hand_computed_trajectory():
    # one row: a prompt position, three completion tokens (rewards 0, 0, 1), then padding
    r = np.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
    v = np.array([[9.0, 0.5, 0.6, 0.7, 9.0]])  # values outside the mask must not leak in
    m = np.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    a = rl.gae(r, v, m, gamma=0.9, lam=0.8)
    # A3 = 1 - 0.7; A2 = (0.9*0.7 - 0.6) + 0.72*A3; A1 = (0.9*0.6 - 0.5) + 0.72*A2
    a3 = 0.3
    a2 = 0.03 + 0.72 * a3
    a1 = 0.04 + 0.72 * a2
    np.testing.assert_allclose(a, [[0.0, a1, a2, a3, 0.0]], rtol=1e-6, atol=1e-7)
    # gamma = lambda = 1: the Monte Carlo return minus the value; rows are independent
    two = rl.gae(np.vstack([r, r * 2]), np.vstack([v, v]), np.vstack([m, m]), 1.0, 1.0)
    np.testing.assert_allclose(two[1, 1:4], 2.0 - v[0, 1:4], rtol=1e-6)
    # lambda = 0: one-step TD errors
    np.testing.assert_allclose(rl.gae(r, v, m, 0.9, 0.0)[0, 1:4], [0.04, 0.03, 0.3], rtol=1e-5)


def test_value_loss_whitening_and_adaptive_kl_hand_computed():
    v, old, ret = jnp.array([1.0, 0.0, 0.5]), jnp.array([0.5, 0.0, 0.5]), jnp.array([0.0, 1.0, 0.6])
    loss, clipped = rl.clipped_value_loss(v, old, ret, 0.2)
    # token 0: V moved 0.5 from V_old; clipped V = 0.7, (0.7 - 0)^2 < (1 - 0)^2, so the unclipped term counts
    np.testing.assert_allclose(loss, [0.5 * 1.0, 0.5 * 1.0, 0.5 * 0.01], rtol=1e-6)
    assert clipped.tolist() == [False, False, False]
    loss, clipped = rl.clipped_value_loss(jnp.array([0.0]), jnp.array([1.0]), jnp.array([-0.1]), 0.2)
    np.testing.assert_allclose(loss, [0.5 * 0.9**2], rtol=1e-6)  # clipped V = 0.8 is further from R
    assert clipped.tolist() == [True]
    x = np.array([[5.0, 1.0, 2.0, 3.0]])
    m = np.array([[0.0, 1.0, 1.0, 1.0]])
    w = rl.whiten(x, m)
    assert w[0, 0] == 0.0 and abs(w[0, 1:].mean()) < 1e-6 and w[0, 1:].std() == pytest.approx(1.0, rel=1e-4)
    assert rl.whiten(x, m, shift_mean=False)[0, 1:].mean() == pytest.approx(2.0, rel=1e-6)
    kl = rl.AdaptiveKL(0.1, target=6.0, horizon=100)
    assert kl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped to +0.2
    assert kl.update(5.7, 10) == pytest.approx(0.1 * 1.02 * (1 - 0.05 * 0.1))
    assert rl.AdaptiveKL(0.1, 0.0, 100).update(50.0, 10) == 0.1  # no target: fixed


def test_ppo_loss_starts_at_the_value_loss_and_moves_the_policy_along_the_advantage():
    """With the sampler's log-probabilities, the ratio is 1: the surrogate is -mean(A) and the
    gradient raises the log-probability of tokens with positive advantage."""
    from lm.model.transformer import Transformer

    cfg = Config(model=ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                                   max_seq_len=16, scalar_heads=("value",)),
                 rl=RLConfig(beta=0.0, temperature=1.0, max_new=4, loss_norm="token", vf_coef=0.5))
    model = Transformer(cfg.model, nnx.Rngs(0))
    obj = rl.PPOObjective(cfg)
    rng = np.random.default_rng(0)
    b, t = 2, 8
    inputs = rng.integers(1, 61, (b, t)).astype(np.int32)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "loss_mask": np.zeros((b, t), np.float32)}
    batch["loss_mask"][:, 3:7] = 1.0
    logits = model(jnp.asarray(inputs))
    from lm.sampling.sampler import token_logps

    batch["old_logps"] = np.asarray(token_logps(logits, jnp.asarray(batch["targets"]), 1.0))
    batch["advantages"] = np.where(batch["loss_mask"] > 0, rng.normal(size=(b, t)), 0).astype(np.float32)
    batch["old_values"] = np.zeros((b, t), np.float32)  # the fresh value head reads 0
    batch["returns"] = (batch["loss_mask"] * 2.0).astype(np.float32)
    batch["ref_logps"] = batch["old_logps"]
    graphdef, params = nnx.split(model)
    loss_of = jax.jit(lambda p: obj.loss(nnx.merge(graphdef, p), batch, {}))  # one compiled program each
    loss, aux = loss_of(params)
    m = batch["loss_mask"] > 0
    assert float(aux["pg_loss"]) == pytest.approx(-batch["advantages"][m].mean(), abs=1e-6)
    assert float(aux["value_loss"]) == pytest.approx(0.5 * 4.0, rel=1e-6)
    assert float(loss) == pytest.approx(-batch["advantages"][m].mean() + 0.5 * 2.0, abs=1e-5)
    assert float(aux["ratio"]) == pytest.approx(1.0, abs=1e-6)

    @jax.jit
    def step_and_logps(p):  # a step down the surrogate's gradient, and the log-probabilities after it
        grads = jax.grad(lambda q: obj.loss(nnx.merge(graphdef, q), batch, {})[1]["pg_loss"])(p)
        new = jax.tree.map(lambda w, g: w - 0.1 * g, p, grads)
        return token_logps(nnx.merge(graphdef, new)(jnp.asarray(inputs)), jnp.asarray(batch["targets"]), 1.0)

    new_logps = np.asarray(step_and_logps(params))
    gain = ((new_logps - batch["old_logps"]) * batch["advantages"])[m].sum()
    assert gain > 0
    with pytest.raises(Exception, match="value head"):
        rl.PPOObjective(Config(model=ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                 d_ff=48, max_seq_len=16)))


PPO_EXPERIMENT = """
import dataclasses
from lm import experiment
from lm.config import Config, RLConfig


def config():
    b = experiment.load({exp!r})
    return Config(name="ppo", stage="ppo", model=dataclasses.replace(b.model, scalar_heads=("value",)),
                  rl=RLConfig(task="arith", group_size=1, max_new=6, eval_prompts=8, train_problems=100,
                              updates_per_rollout=2, minibatches=2, beta=0.05, kl_target=1.0, kl_horizon=64),
                  optim=dataclasses.replace(b.optim, lr=1e-3, warmup_steps=1),
                  data=dataclasses.replace(b.data, batch_size=8, seq_len=32),
                  trainer=dataclasses.replace(b.trainer, steps={steps}, log_every=1, eval_every={eval_every},
                                              checkpoint_every=3, init_from={run!r}, num_samples=0))
"""


@pytest.mark.slow  # (the PPO loss and GAE are checked by hand above; PPO runs in the slow phase)
def test_ppo_trains_with_minibatches_and_an_adaptive_kl(base_run, tmp_path):
    """PPO steps from a small base run: a rollout of 16 rows in 2 minibatches of 8, two passes
    (4 optimiser steps per rollout); value head, GAE and the adaptive KL coefficient logged."""
    from lm import experiment
    from lm.stages.runner import train
    from lm.train.logger import read_metrics

    exp = tmp_path / "ppo_exp.py"
    exp.write_text(PPO_EXPERIMENT.format(exp=base_run["exp"], run=base_run["run"], steps=5, eval_every=4))
    s = train(experiment.load(str(exp)), str(tmp_path / "ppo"), progress=False, **QUIET)
    assert 0.0 <= s["heldout_pass_at_1"] <= 1.0
    rows = [r for r in read_metrics(str(tmp_path / "ppo")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["value_loss"]) for r in rows)
    assert rows[0]["kl_coef"] == pytest.approx(0.05)
    assert rows[4]["kl_coef"] != pytest.approx(0.05)  # the second rollout's coefficient moved
    assert "pass@1" in rows[3]


@pytest.mark.slow
def test_ppo_with_a_reward_model_run(base_run, tmp_path):
    """rl.reward = "run:DIR": the reward model scores each reply (batched), and the held-out
    metric is its mean score of greedy replies."""
    from helpers import pair_file, pref_config

    from lm import experiment
    from lm.stages.runner import train

    rcfg = pref_config(base_run, "reward", pair_file(tmp_path / "p.jsonl", 60))
    train(rcfg, str(tmp_path / "rm"), progress=False, **QUIET)
    exp = tmp_path / "ppo_exp.py"
    exp.write_text(PPO_EXPERIMENT.format(exp=base_run["exp"], run=base_run["run"], steps=2, eval_every=0).replace('task="arith",', f'task="arith", reward="run:{tmp_path / "rm"}",'))
    s = train(experiment.load(str(exp)), str(tmp_path / "ppo"), progress=False, **QUIET)
    assert np.isfinite(s["heldout_reward"]) and np.isfinite(s["base_heldout_reward"])
    assert "heldout_pass_at_1" not in s
