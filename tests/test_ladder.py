"""`lm ladder`: the rungs follow their stated rules, the fit recovers a known power law from
noisy points, a finished rung is never trained again, bad input is one line; and (slow) a
real three-rung ladder end to end."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, cpu_env

from data_pipeline.errors import UserError
from lm import cli
from lm.config import to_dict
from lm.model.transformer import flops_per_token
from lm.tools import ladder as ld

# ---------------------------------------------------------------------------------------
# The fit


def power_law(c, E=1.9, A=1743.0, alpha=0.25):
    return E + A * np.asarray(c, dtype=float) ** -alpha


def test_the_fit_recovers_a_known_law_exactly_and_under_noise():
    c = np.geomspace(1e11, 1e14, 7)
    fit = ld.fit_power_law(c, power_law(c))
    assert fit.E == pytest.approx(1.9, rel=1e-3) and fit.alpha == pytest.approx(0.25, rel=1e-3)
    assert fit.A == pytest.approx(1743.0, rel=1e-2) and fit.rms < 1e-5

    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):  # 0.3% multiplicative noise, as held-out evaluations have
        noisy = power_law(c) * (1 + 0.003 * rng.standard_normal(len(c)))
        fit = ld.fit_power_law(c, noisy)
        assert 1.4 < fit.E < 2.3 and 0.17 < fit.alpha < 0.35, fit
        errors.append(abs(fit.predict(1e15) / power_law(1e15) - 1))  # 10x beyond the last point
    assert np.median(errors) < 0.02 and max(errors) < 0.06


def test_the_fit_is_not_fooled_by_a_floor_of_zero_or_a_pure_power_law():
    c = np.geomspace(1e9, 1e12, 5)
    fit = ld.fit_power_law(c, power_law(c, E=0.0, A=50.0, alpha=0.1))
    assert fit.E == pytest.approx(0.0, abs=0.05) and fit.alpha == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("compute, loss, says", [
    ([1e9, 1e10], [4.0, 3.5], "needs at least 3 rungs"),
    ([1e9, 1e10, 1e11], [4.0, float("nan"), 3.0], "not a finite number for rung_1"),
    ([1e9, 1e10, 1e11], [4.0, 3.5, 3.6], "does not fall with compute: rung_2"),
    ([1e9, 1e9, 1e11], [4.0, 3.5, 3.0], "the same compute"),
])
def test_points_no_law_fits_are_one_line(compute, loss, says):
    with pytest.raises(UserError, match=says) as e:
        ld.fit_power_law(compute, loss, [f"rung_{k}" for k in range(len(loss))])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# The rungs


def test_the_rungs_follow_the_stated_rules(tmp_path):
    rungs = ld.plan_ladder("pretrain_tiny", [], widths=[128, 32, 64], tokens_per_param=20, out=str(tmp_path))
    base_steps, base_warmup, per_step = 300, 50, 16 * 256
    assert [r.width for r in rungs] == [32, 64, 128]  # smallest compute first
    for k, r in enumerate(rungs):
        m = r.cfg.model
        assert r.name == f"rung_{k}" and r.run_dir == str(tmp_path / f"rung_{k}")
        assert m.n_layers == max(1, math.floor(m.d_model / 64 + 0.5))  # tiny: 256 wide, 4 deep
        assert (m.n_heads, m.n_kv_heads, m.head_size) == (4, 2, m.d_model // 4)
        assert m.d_ff % 16 == 0 and m.d_model * 2.75 <= m.d_ff < m.d_model * 2.75 + 16
        assert (m.vocab_size, m.max_seq_len, m.remat) == (4096, 256, "full")  # the rest is the base's
        assert r.non_embedding == r.params - 2 * 4096 * m.d_model
        assert abs(r.tokens - 20 * r.non_embedding) <= per_step / 2 and r.tokens == r.steps * per_step
        assert r.cfg.optim.warmup_steps == round(r.steps * base_warmup / base_steps)
        assert (r.cfg.optim.lr, r.cfg.optim.muon_lr) == (3e-3, 0.02)  # constant
        assert r.compute == flops_per_token(m, 256) * r.tokens
        assert r.cfg.data == rungs[0].cfg.data  # the same data, so the same held-out tokens
    assert [r.cfg.model.n_layers for r in rungs] == [1, 1, 2]

    wide = ld.plan_ladder("pretrain_tiny", ["optim.lr=1e-3"], widths=[32, 64, 512], lr_rule="inverse-width",
                          aspect=128, tokens_per_param=1, out=str(tmp_path))
    assert [r.cfg.optim.lr for r in wide] == pytest.approx([1e-3 * 256 / 32, 1e-3 * 256 / 64, 1e-3 * 256 / 512])
    assert [r.cfg.model.n_layers for r in wide] == [1, 1, 4] and wide[0].cfg.optim.muon_lr == 0.02
    assert ld.geometric_widths(32, 256, 4, 8) == [32, 64, 128, 256]


@pytest.mark.parametrize("kwargs, says", [
    (dict(widths=[30, 64, 128]), "width 30 is not a positive multiple of 8"),
    (dict(widths=[32, 64]), "needs at least 3 rungs"),
    (dict(widths=[32, 64, 96], holdout=1), "2 rung(s) to fit"),
    (dict(widths=[32, 64, 64]), "repeats a width"),
    (dict(widths=[32, 64, 96], overrides=["model.d_model=64"]), "--set model.d_model: the ladder sets it"),
    (dict(widths=[32, 64, 96], overrides=["optim.lrr=1"]), "unknown config key 'optim.lrr'"),
    (dict(rungs=9, min_width=32, max_width=48), "repeat a width"),
])
def test_bad_ladders_are_one_line(kwargs, says):
    with pytest.raises(UserError) as e:
        ld.plan_ladder("pretrain_tiny", kwargs.pop("overrides", []), **kwargs)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_bad_flags_are_one_line(capsys):
    assert cli.main(["ladder", "pretrain_tiny", "--widths", "32,64,100", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width 100 is not a positive multiple of 8" in err
    assert cli.main(["ladder", "pretrain_tiny", "--widths", "32,64,128", "--rungs", "3", "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err
    for flags in (["--widths", "32,x"], ["--tokens-per-param", "nan"], ["--holdout", "-1"], ["--lr-rule", "sqrt"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["ladder", "pretrain_tiny", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("lm ladder: error:")


def test_dry_run_prints_the_rungs(capsys):
    assert cli.main(["ladder", "pretrain_tiny", "--rungs", "3", "--min-width", "32", "--max-width", "128",
                     "--tokens-per-param", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rung_2" in out and "nothing trained" in out and "tokens = 5 x non-embedding" in out


# ---------------------------------------------------------------------------------------
# Training, resuming, fitting and plotting (a stand-in for `lm train`)


def fake_trainer(calls, law=power_law, unigram=None):
    """Writes what a finished `lm train` leaves that the ladder reads: config.json and
    summary.json with a held-out loss on `law` (and the held-out unigram entropy)."""

    def train(spec, rung, log):
        calls.append(rung.name)
        os.makedirs(rung.run_dir, exist_ok=True)
        with open(os.path.join(rung.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(rung.cfg), f)
        with open(os.path.join(rung.run_dir, "summary.json"), "w") as f:
            json.dump({"steps": rung.steps, "stopped": None, "heldout_loss": float(law(rung.compute)),
                       "heldout_unigram_entropy": unigram}, f)

    return train


def test_a_ladder_trains_what_is_missing_fits_predicts_and_plots(tmp_path):
    calls = []
    kw = dict(widths=[32, 48, 64, 96], tokens_per_param=2, holdout=1, out=str(tmp_path / "lad"),
              targets=[("10x", 1e13)], log=lambda *_: None)
    r = ld.ladder("pretrain_tiny", [], train=fake_trainer(calls), **kw)
    assert calls == ["rung_0", "rung_1", "rung_2", "rung_3"]
    assert r["fit"]["alpha"] == pytest.approx(0.25, rel=1e-2) and r["fit"]["n"] == 3
    (held,) = r["holdout"]
    assert held["rung"] == "rung_3" and abs(held["error"]) < 1e-3
    assert r["targets"][0]["predicted"] == pytest.approx(power_law(1e13), rel=1e-3)
    assert os.path.getsize(r["png"]) > 10_000 and r["png"] == str(tmp_path / "lad" / "ladder.png")
    saved = json.load(open(tmp_path / "lad" / "ladder.json"))
    assert [x["rung"] for x in saved["rungs"]] == ["rung_0", "rung_1", "rung_2", "rung_3"]
    assert "held out rung_3" in r["text"] and "fit: L(C) =" in r["text"]

    # resumable: finished rungs are not trained again; a missing one is
    calls.clear()
    os.remove(tmp_path / "lad" / "rung_2" / "summary.json")
    r2 = ld.ladder("pretrain_tiny", [], train=fake_trainer(calls), **kw)
    assert calls == ["rung_2"] and r2["fit"] == r["fit"]
    calls.clear()
    ld.ladder("pretrain_tiny", [], train=fake_trainer(calls), fit_only=True, **kw)
    assert calls == []

    # a finished rung of another configuration is not taken for this one
    with pytest.raises(UserError, match="rung_0 holds a finished run of another configuration.*optim.lr"):
        ld.ladder("pretrain_tiny", ["optim.lr=1e-3"], train=fake_trainer(calls), **kw)
    assert calls == []


def test_rungs_no_better_than_unigram_are_left_out_of_the_fit(tmp_path):
    calls, logs = [], []
    kw = dict(widths=[16, 24, 32, 40], tokens_per_param=2, out=str(tmp_path), log=logs.append)
    c0 = ld.make_rung("pretrain_tiny", [], 0, 16, 2, "constant", None, str(tmp_path)).compute
    unigram = float(power_law(c0 * 1.01))  # just below the smallest rung's loss
    r = ld.ladder("pretrain_tiny", [], train=fake_trainer(calls, unigram=unigram), **kw)
    assert r["fit"]["rungs"] == ["rung_1", "rung_2", "rung_3"] and r["fit"]["alpha"] == pytest.approx(0.25, rel=1e-2)
    assert any("rung_0 is left out of the fit" in str(x) for x in logs)
    assert "(not fitted: loss" in r["text"]
    assert ld.ladder("pretrain_tiny", [], train=fake_trainer(calls), fit_all=True, fit_only=True,
                     **kw)["fit"]["n"] == 4
    with pytest.raises(UserError, match="only 2 finished rung"):  # too few left
        ld.ladder("pretrain_tiny", [], widths=[16, 24, 32], tokens_per_param=2, out=str(tmp_path / "b"),
                  train=fake_trainer([], unigram=unigram), log=logs.append)


def test_a_rung_that_does_not_finish_stops_the_ladder(tmp_path):
    def stopped(spec, rung, log):  # e.g. preempted: it saved and left without a summary
        os.makedirs(rung.run_dir, exist_ok=True)

    with pytest.raises(UserError, match="rung_0 stopped before its last step.*run the same command again"):
        ld.ladder("pretrain_tiny", [], widths=[32, 48, 64], out=str(tmp_path), train=stopped, log=lambda *_: None)


def test_a_rung_whose_training_fails_is_one_line(tmp_path, monkeypatch):
    (rung,) = ld.plan_ladder("pretrain_tiny", [], widths=[32, 48, 64], out=str(tmp_path))[:1]
    rung.sets = rung.sets + ["trainer.steps=-1"]  # the child `lm train` refuses it (exit code 2)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with pytest.raises(UserError, match="training rung_0 failed \\(exit code 2") as e:
        ld.train_rung("pretrain_tiny", rung, log=lambda *_: None)
    assert "\n" not in str(e.value)


def test_losses_that_rise_with_compute_are_one_line(tmp_path, capsys):
    calls = []
    rising = fake_trainer(calls, law=lambda c: 3.0 + 1e-13 * c)
    with pytest.raises(UserError, match="does not fall with compute") as e:
        ld.ladder("pretrain_tiny", [], widths=[32, 48, 64], out=str(tmp_path), train=rising, log=lambda *_: None)
    assert "\n" not in str(e.value) and len(calls) == 3


def test_a_target_experiment_is_its_training_compute():
    flops, what = ld.target_compute("pretrain_tiny", 1_000_000)
    cfg = ld.exp.load("pretrain_tiny")
    assert flops == flops_per_token(cfg.model, 256) * 1_000_000 and "1,000,000 tokens" in what
    assert ld.target_compute("pretrain_tiny")[0] == flops_per_token(cfg.model, 256) * 300 * 16 * 256


def test_each_rung_shares_the_first_rungs_tokenizer(tmp_path):
    rungs = ld.plan_ladder("pretrain_tiny", [], widths=[32, 48, 64], out=str(tmp_path))
    os.makedirs(rungs[0].run_dir)
    (tmp_path / "rung_0" / "tokenizer.model").write_bytes(b"tok")
    ld.share_tokenizer(rungs, rungs[2])
    assert (tmp_path / "rung_2" / "tokenizer.model").read_bytes() == b"tok"
    cmd = ld.train_cmd("pretrain_tiny", rungs[2])
    assert cmd[1:5] == ["-m", "lm", "train", "pretrain_tiny"] and "model.d_model=64" in cmd
    assert cmd[cmd.index("--run-dir") + 1] == rungs[2].run_dir


# ---------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_a_real_three_rung_ladder_end_to_end(tmp_path):
    """`lm ladder` trains three micro rungs (child `lm train` runs on the default corpus),
    fits them and plots; `lm compare` reads the rungs; the same command again trains nothing."""
    out = tmp_path / "lad"
    sets = ["model.vocab_size=512", "data.seq_len=64", "model.max_seq_len=64", "data.batch_size=8",
            "data.tokenizer_sample_mb=0.5",
            "trainer.eval_batches=4", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.num_samples=0",
            "trainer.log_every=5"]
    cmd = [sys.executable, "-m", "lm", "ladder", "pretrain_tiny", "--widths", "24,32,48", "--aspect", "1000",
           "--tokens-per-param", "12", "--out", str(out), "--target-compute", "1e12"]
    for s in sets:
        cmd += ["--set", s]
    env = cpu_env(1)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "fit: L(C) =" in p.stdout and "target 1e+12 FLOPs" in p.stdout, p.stdout
    report = json.load(open(out / "ladder.json"))
    losses = [r["heldout_loss"] for r in report["rungs"]]
    assert losses == sorted(losses, reverse=True) and all(2 < x < 7 for x in losses)
    assert os.path.getsize(out / "ladder.png") > 10_000
    toks = [open(out / f"rung_{k}" / "tokenizer.model", "rb").read() for k in range(3)]
    assert toks[0] == toks[1] == toks[2]
    assert cli.main(["compare", *(str(out / f"rung_{k}") for k in range(3)), "--out", str(tmp_path / "c.png")]) == 0

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not trained again") + again.stderr.count(
        "not trained again") == 3
    assert "run directory" not in again.stdout + again.stderr  # no `lm train` ran
