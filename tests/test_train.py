"""Training: the step's numerics, a short run whose loss falls, and the run's outputs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline.pipeline import global_batch, synthetic_batches
from lm import experiment
from lm.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainerConfig
from lm.model.sharding import make_mesh
from lm.objectives.losses import chunked_cross_entropy, cross_entropy
from lm.stages.runner import train
from lm.train.engine import make_trainer
from lm.train.optim import decay_mask, schedule

MODEL = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=32, attention_block=16)
ONE = MeshConfig(data=1, fsdp=1, tensor=1)


def test_cross_entropy_hand_computed_with_mask_and_z_loss():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]))
    targets = jnp.array([0, 2, 1])
    mask = jnp.array([1.0, 1.0, 0.0])
    loss, ce, n = cross_entropy(logits, targets, mask, 0.0)
    assert float(n) == 2
    np.testing.assert_allclose(ce, (-np.log(0.5) - np.log(0.8)) / 2, rtol=1e-6)
    # log-probabilities have logsumexp 0, so z-loss adds nothing; shift by 2 and it adds 4 * w
    loss_z, ce_z, _ = cross_entropy(logits + 2.0, targets, mask, 0.1)
    np.testing.assert_allclose(ce_z, ce, rtol=1e-6)
    np.testing.assert_allclose(loss_z, ce + 0.1 * 4.0, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    # eps raised: Adam turns rounding differences in near-zero gradients into sign flips
    cfg = Config(model=MODEL, mesh=ONE, optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-4),
                 data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8), trainer=TrainerConfig(steps=3))
    batch = next(synthetic_batches(128, 32, 8, seed=1))
    batch["loss_mask"][0, :20] = 0  # uneven token counts across micro-batches
    results = []
    for m in (1, 4):
        c = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, microbatches=m))
        tr = make_trainer(c, make_mesh(ONE, jax.devices()[:1]))
        state, _ = tr.init_state(0)
        state, metrics = tr.compile_train_step()(state, global_batch(batch, tr.batch_sharding))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_update_that_would_poison_the_state_is_skipped():
    """The step checks the *updated* state, not only the loss and gradients: optimiser
    moments holding NaN or 3e38 must not reach the parameters (nor be kept as moments)."""
    cfg = Config(model=dataclasses.replace(MODEL, n_layers=1), mesh=ONE,
                 optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                 data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8), trainer=TrainerConfig(steps=3))
    tr = make_trainer(cfg, make_mesh(ONE, jax.devices()[:1]))
    step = tr.compile_train_step()
    batches = [global_batch(b, tr.batch_sharding) for b, _ in zip(synthetic_batches(128, 32, 8, seed=1), range(2))]
    state, _ = step(tr.init_state(0)[0], batches[0])  # a good step first
    good = jax.device_get(state)
    # one value of one of Adam's moments: NaN in the second, 3e38 in the first
    for moment, value in (("nu", np.nan), ("mu", 3e38)):
        state = jax.tree.map(np.copy, good)
        for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
            if any(getattr(k, "name", None) == moment for k in path) and "wq" in jax.tree_util.keystr(path):
                x.reshape(-1)[0] = value
        state = jax.device_put(state, tr.state_sharding)
        state, metrics = step(state, batches[1])
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))  # only the update
        assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1 and int(state.bad_streak) == 1, moment
        for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_array_equal(a, b)  # the old parameters, kept


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    cos = schedule(cfg, 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1, abs=1e-6)
    wsd = schedule(dataclasses.replace(cfg, schedule="wsd"), 100)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.55, abs=1e-6) and float(wsd(100)) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embeddings():
    cfg = Config(model=dataclasses.replace(MODEL, qk_norm=True), mesh=ONE, data=DataConfig(seq_len=32))
    tr = make_trainer(cfg, make_mesh(ONE, jax.devices()[:1]))
    params = jax.eval_shape(lambda: tr._init_params(0))
    mask = decay_mask(params, OptimConfig()).to_pure_dict()
    assert mask["embed"] is False and mask["head"] is False and mask["final_norm"]["scale"] is False
    assert mask["blocks"]["attn"]["q_norm"]["scale"] is False
    assert mask["blocks"]["attn"]["wq"] is True and mask["blocks"]["mlp"]["w_down"] is True


def test_short_run_on_synthetic_data_learns(tmp_path):
    cfg = Config(model=MODEL, optim=OptimConfig(lr=1e-2, warmup_steps=5),
                 data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8),
                 trainer=TrainerConfig(steps=40, log_every=5, eval_batches=2))
    summary = train(cfg, str(tmp_path), log=lambda *_: None, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1] + list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu", "data_wait_fraction"):
        assert np.isfinite(rows[-1][key]), key
    assert "tokens_per_s" not in rows[0]  # step 1 includes compilation
    assert summary["heldout_loss"] < summary["heldout_unigram_entropy"]


@pytest.mark.slow  # (32 s: `make pretrain`'s own experiment, shortened)
def test_tiny_experiment_on_default_corpus_lowers_loss(tmp_path):
    """The default job, shortened: tokenizer, grain pipeline, training, eval, samples, outputs."""
    cfg = experiment.load("pretrain_tiny", [
        "model.n_layers=2", "model.d_model=128", "model.d_ff=352", "model.vocab_size=1024",
        "data.seq_len=128", "data.batch_size=8", "data.tokenizer_sample_mb=1",
        "trainer.steps=60", "trainer.eval_every=30", "trainer.eval_batches=4",
        "trainer.num_samples=2", "trainer.sample_tokens=16", "optim.warmup_steps=10"])
    logs = []
    summary = train(cfg, str(tmp_path), log=logs.append, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert summary["heldout_loss"] < summary["heldout_unigram_entropy"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json", "tokenizer.model", "checkpoints"):
        assert os.path.exists(tmp_path / name), name
    assert os.listdir(tmp_path / "tensorboard")
    # the samples continue the stage's prompts
    from lm.stages.pretrain import SAMPLE_PROMPTS

    samples = summary["samples"]
    assert len(samples) == 2 and all(s.startswith(p) for s, p in zip(samples, SAMPLE_PROMPTS))
    assert any(len(s) > len(p) for s, p in zip(samples, SAMPLE_PROMPTS))
    assert any("held-out loss" in str(m) for m in logs)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_cross_entropy_equals_plain(z_loss):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 16, 8, 11
    h = jnp.asarray(rng.normal(size=(b * t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b * t,)), jnp.int32)
    mask = jnp.asarray(rng.random(b * t) > 0.3, jnp.float32)

    def plain(h, w):
        loss, ce, _ = cross_entropy(h @ w, targets, mask, z_loss)
        return loss + 0.5 * ce  # exercise both outputs' gradients

    def chunked(h, w):
        loss, ce, _ = chunked_cross_entropy(h, w, targets, mask, z_loss, b, 4)
        return loss + 0.5 * ce

    np.testing.assert_allclose(chunked(h, w), plain(h, w), rtol=1e-6)
    for a, c in zip(jax.grad(plain, (0, 1))(h, w), jax.grad(chunked, (0, 1))(h, w)):
        np.testing.assert_allclose(c, a, atol=1e-6)


def test_lm_compare_plots_and_tabulates_runs_at_equal_steps_tokens_and_time(tmp_path, capsys):
    """Two fake runs: the table reads their last evaluations and each one's loss at the
    faster run's wall-clock (a resumed run's clock is joined end to end); bad input is one line."""
    from lm.cli import main

    def fake_run(name, rows, batch=4, seq=8):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"data": {"batch_size": batch, "seq_len": seq}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    a = fake_run("fast", [{"step": 10, "loss": 3.0, "wall_s": 5.0, "cpu_s": 9.0},
                          {"step": 20, "eval_loss": 2.5, "eval_bpb": 1.0, "wall_s": 10.0, "cpu_s": 19.0}])
    b = fake_run("slow", [{"step": 10, "eval_loss": 2.8, "wall_s": 8.0, "cpu_s": 8.0},
                          {"step": 20, "eval_loss": 2.6, "wall_s": 4.0, "cpu_s": 4.0},  # resumed: 8 + 4 s
                          {"step": 30, "eval_loss": 2.2, "wall_s": 9.0, "cpu_s": 9.0}], batch=8)
    out = tmp_path / "cmp.png"
    assert main(["compare", a, b, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert os.path.getsize(out) > 1000
    fast = next(line for line in text.splitlines() if line.startswith("fast")).split()
    slow = next(line for line in text.splitlines() if line.startswith("slow")).split()
    assert fast[1:4] == ["20", "640", "10"] and float(fast[5]) == 2.5 and float(fast[6]) == pytest.approx(0.693, abs=1e-3)
    assert slow[1:4] == ["30", "1,920", "17"] and float(slow[5]) == 2.2
    assert "@10s" in text and float(slow[-1]) == 2.8 and float(fast[-1]) == 2.5  # at the fast run's 10 s
    # by CPU time the resumed run is the faster (8 + 9 s): the other has no evaluation by then
    assert main(["compare", a, b, "--clock", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "@17s" in text and [line.split()[-1] for line in text.splitlines()[2:4]] == ["nan", "2.2000"]
    assert main(["compare", a, str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    empty = fake_run("empty", [{"step": 10, "loss": 3.0}])
    assert main(["compare", empty]) == 2 and "never evaluated" in capsys.readouterr().err
