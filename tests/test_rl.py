"""GRPO: advantages, the clipped objective, the KL estimate, normalisation, rewards, and the
agreement of the sampler's log-probabilities with the trainer's."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import rewards, rl
from data_pipeline.config import DataConfig
from lm.config import Config, ModelConfig, RLConfig

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
    assert rewards.get("lm.rewards:exact") is rewards.exact
    with pytest.raises(Exception, match="rl.reward"):
        rewards.get("nope")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_and_trainer_log_probabilities_agree(temperature):
    """The per-token log-probabilities the sampler reports equal those the trainer recomputes
    for the same tokens (float32, to 1e-5): otherwise the importance ratios start away from 1."""
    from lm.model import Transformer
    from lm.sampling import rollout
    from lm.stages.grpo import training_rows

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
    from lm.engine import make_engine
    from lm.sharding import make_mesh

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
def test_grpo_trains_end_to_end(tmp_path):
    """A few GRPO steps from a small model with chat tokens: finite metrics, rollouts logged."""
    from test_sft import BASE  # the small base run's experiment
    from helpers import write_experiment
    from lm import experiment
    from lm.logger import read_metrics
    from lm.train import train

    base = tmp_path / "base"
    train(experiment.load(write_experiment(tmp_path, BASE, "base")), str(base), progress=False, **QUIET)
    bcfg = experiment.load(write_experiment(tmp_path, BASE, "base"))
    cfg = Config(name="grpo", stage="grpo", model=bcfg.model,
                 rl=RLConfig(task="arith", group_size=4, max_new=6, eval_prompts=8, train_problems=100),
                 optim=dataclasses.replace(bcfg.optim, lr=1e-4, warmup_steps=1),
                 data=dataclasses.replace(bcfg.data, batch_size=8, seq_len=32),
                 trainer=dataclasses.replace(bcfg.trainer, steps=3, log_every=1, eval_every=2, checkpoint_every=2,
                                             init_from=str(base), num_samples=0))
    s = train(cfg, str(tmp_path / "grpo"), progress=False, **QUIET)
    assert 0.0 <= s["heldout_pass_at_1"] <= 1.0 and 0.0 <= s["base_heldout_pass_at_1"] <= 1.0
    rows = read_metrics(str(tmp_path / "grpo"))
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows if "loss" in r)
    assert "pass@1" in rows[1]


GRPO_EXPERIMENT = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
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
def test_sigkill_during_grpo_then_resume_reproduces_every_step(tmp_path):
    """Rollouts resume exactly: the sampling keys derive from the rollout count, and a rollout
    batch still in use (updates_per_rollout=2) is saved with the data state."""
    import json
    import os
    import signal
    import subprocess
    import time

    from helpers import ROOT, cpu_env, train_cmd, write_experiment
    from lm import experiment
    from lm.train import train
    from test_sft import BASE

    base_exp = write_experiment(tmp_path, BASE, "base")
    train(experiment.load(base_exp), str(tmp_path / "base"), progress=False, **QUIET)
    exp = tmp_path / "grpo_exp.py"
    exp.write_text(GRPO_EXPERIMENT.format(tests=os.path.dirname(os.path.abspath(__file__)), exp=base_exp,
                                          run=str(tmp_path / "base")))

    def steps(run):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        return [(r["step"], r["loss"], r["reward"], r["response_length"]) for r in rows if "loss" in r]

    ref = tmp_path / "ref"
    p = subprocess.run(train_cmd(str(exp), ref), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(str(exp), run), cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0, path = time.time(), run / "metrics.jsonl"
    while time.time() - t0 < 400 and proc.poll() is None:
        # the checkpoint of step 3 is written (its rollout batch has one more update to give)
        if (run / "checkpoints" / "3").is_dir() and path.exists() and sum(1 for _ in open(path)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = subprocess.run(train_cmd(str(exp), run), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from the checkpoint of step" in p.stdout + p.stderr
    assert steps(run) == steps(ref) and len(steps(ref)) == 9
