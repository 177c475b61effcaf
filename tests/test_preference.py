"""Preference pairs, the reward-model and DPO-family losses, and the reward / DPO stages."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import pair_file, pref_config

from data_pipeline import preferences as P
from data_pipeline.config import SHARED_DATA, SourceConfig
from lm.config import ConfigError, LoraConfig, PreferenceConfig
from lm.objectives import preference as L

QUIET = dict(log=lambda *_: None)
sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# -- losses against hand-derived values ---------------------------------------------------

def test_losses_equal_hand_derived_values():
    assert float(L.bt_loss(1.0, 0.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(L.bt_loss(1.0, 0.0, margin=1.0)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(L.dpo_loss(0.0, 0.1)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(L.dpo_loss(2.0, 0.5)) == pytest.approx(-math.log(sigmoid(1.0)), abs=1e-6)
    assert float(L.dpo_loss(2.0, 0.5, 0.1)) == pytest.approx(
        -0.9 * math.log(sigmoid(1.0)) - 0.1 * math.log(sigmoid(-1.0)), abs=1e-6)
    # IPO: (2/4 - (-1)/2 - 1/(2*0.25))^2 = (1 - 2)^2
    assert float(L.ipo_loss(2.0, -1.0, 4.0, 2.0, 0.25)) == pytest.approx(1.0, abs=1e-6)
    # SimPO: beta * (-4/4 - (-6/3)) - gamma = 2 * 1 - 0.5
    assert float(L.simpo_loss(-4.0, -6.0, 4.0, 3.0, 2.0, 0.5)) == pytest.approx(-math.log(sigmoid(1.5)), abs=1e-6)
    # ORPO: log odds of p = e^-1 against p = e^-2
    odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
    expect = math.log(sigmoid(odds(-1.0) - odds(-2.0)))
    assert float(L.orpo_odds_term(-4.0, -4.0, 4.0, 2.0)) == pytest.approx(expect, abs=1e-6)
    np.testing.assert_allclose(L.log1mexp(jnp.array([-1e-6, -0.5, -30.0])),
                               [math.log(1 - math.exp(-1e-6)), math.log(1 - math.exp(-0.5)), -math.exp(-30)], rtol=1e-5)


def test_loss_gradients_equal_hand_derived_values():
    # d/dx -log sigmoid(b x) = -b (1 - sigmoid(b x))
    assert float(jax.grad(L.dpo_loss)(2.0, 0.5)) == pytest.approx(-0.5 * (1 - sigmoid(1.0)), abs=1e-6)
    # d/d(ratio_c) of IPO = 2 (value) / n_c
    assert float(jax.grad(L.ipo_loss)(2.0, -1.0, 4.0, 2.0, 0.25)) == pytest.approx(2 * (-1.0) / 4, abs=1e-6)
    # d/dr_c of BT = -(1 - sigmoid(r_c - r_r)), and the opposite for r_r
    g = jax.grad(L.bt_loss, (0, 1))(0.3, -0.2)
    assert float(g[0]) == pytest.approx(-(1 - sigmoid(0.5)), abs=1e-6) and float(g[1]) == pytest.approx(-float(g[0]))
    # SimPO: d/d(logp_c) = -beta (1 - sigmoid(beta x - gamma)) / n_c
    assert float(jax.grad(L.simpo_loss)(-4.0, -6.0, 4.0, 3.0, 2.0, 0.5)) == pytest.approx(
        -2 * (1 - sigmoid(1.5)) / 4, abs=1e-6)


# -- preference data ----------------------------------------------------------------------

HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Is 2+2 4?\n\nAssistant: Yes, it is.",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Is 2+2 4?\n\nAssistant: No."}


def test_pair_layouts_parse_and_bad_records_say_why():
    p = P.to_pair(HH)
    assert p["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Is 2+2 4?"}]
    assert (p["chosen"], p["rejected"]) == ("Yes, it is.", "No.")
    sg = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"}],
          "chosen": {"from": "gpt", "value": "A."}, "rejected": {"from": "gpt", "value": "B."}}
    assert P.to_pair(sg) == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                             "chosen": "A.", "rejected": "B."}
    assert P.to_pair({"prompt": "Q?", "chosen": "A.", "rejected": [{"role": "assistant", "content": "B."}]}) == {
        "prompt": [{"role": "user", "content": "Q?"}], "chosen": "A.", "rejected": "B."}
    for bad, why in [({"chosen": "x"}, "not a preference pair"),
                     (dict(HH, rejected=HH["rejected"].replace("Hi there", "Bye")), "differ before"),
                     ({"prompt": "Q", "chosen": " ", "rejected": "B"}, "empty"),
                     ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "A", "rejected": "B"}, "user")]:
        with pytest.raises(ValueError, match=why):
            P.to_pair(bad)


def test_rendered_pair_masks_the_last_reply_only(base_run):
    from data_pipeline.chat import chat_token_ids, generation_prompt, render
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(base_run["run"] + "/tokenizer.model")
    pair = P.to_pair(HH)
    ex, cut = P.render_pair(tok, pair, 64)
    assert not cut and ex["inputs"].shape == (2, 64)
    prompt = generation_prompt(tok, pair["prompt"])
    for r, reply in enumerate((pair["chosen"], pair["rejected"])):
        ids, _ = render(tok, pair["prompt"] + [{"role": "assistant", "content": reply}])
        n = len(ids)
        np.testing.assert_array_equal(ex["inputs"][r, :n], ids)
        assert ex["segment_ids"][r, :n].all() and not ex["segment_ids"][r, n:].any()
        supervised = ex["targets"][r][ex["loss_mask"][r] > 0]
        np.testing.assert_array_equal(supervised, ids[len(prompt):])  # the reply and its <|end|>, nothing else
        assert supervised[-1] == chat_token_ids(tok)["end"]
    ex, cut = P.render_pair(tok, pair, len(prompt) + 3)
    assert cut and ex["loss_mask"][0].sum() == 3  # the row ends 3 tokens into the reply
    with pytest.raises(ValueError, match="prompt alone is too long"):
        P.render_pair(tok, pair, len(prompt) + 1)


def test_shared_preference_files_parse(tmp_path):
    import os

    hh = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base", "test.jsonl.gz")
    if not os.path.exists(hh):
        pytest.skip(f"optional data not here: {hh} (set LM_DATA)")
    train, val = P.open_preference_source(SourceConfig(name="hh", kind="preference", paths=(hh,)))
    bad = sum(train[i].text is None for i in range(len(train)))
    assert len(train) + len(val) == 2312 and bad < 0.02 * len(train)
    dpo = os.path.join(SHARED_DATA, "dpo-en-demo", "dpo_en_demo.json")
    if not os.path.exists(dpo):
        pytest.skip(f"optional data not here: {dpo} (set LM_DATA)")
    train, val = P.open_preference_source(SourceConfig(name="d", kind="preference", paths=(dpo,)))
    assert sum(train[i].text is None for i in range(len(train))) == 0


# -- the stages -------------------------------------------------------------------------

def _engine_batch(cfg):
    from lm.model.sharding import make_mesh
    from lm.objectives.preference import PreferenceObjective, RewardObjective
    from lm.train.engine import make_engine

    engine = make_engine(cfg, make_mesh(cfg.mesh), (RewardObjective if cfg.stage == "reward" else
                                                     PreferenceObjective)(cfg))
    from data_pipeline.preferences import preference_data
    from data_pipeline.tokenizer import Tokenizer

    data = preference_data(cfg.data, "/tmp", tokenizer=Tokenizer(cfg.trainer.init_from + "/tokenizer.model"),
                          eval_batches=1, **QUIET)
    return engine, data


def test_dpo_loss_is_ln2_at_the_start_and_references_are_built_only_when_needed(base_run, tmp_path):
    from data_pipeline.pipeline import global_batch
    from lm.train.init import init_params_loader

    cfg = pref_config(base_run, "dpo", pair_file(tmp_path / "p.jsonl", 40))
    engine, data = _engine_batch(cfg)
    assert engine.frozen_names == ("reference",)
    state, frozen = engine.init_state(0, init_params_loader(cfg, engine, **QUIET)())
    batch = global_batch(data.next_train(), engine.batch_sharding)
    loss, aux = jax.jit(engine.loss_fn)(state.params, batch, frozen)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(aux["accuracy"]) == pytest.approx(0.5) and float(aux["margin"]) == 0.0
    # the summed reply log-probabilities equal a direct computation from the model's logits
    logp, n, _ = L.reply_logps(engine.model(state.params), batch)
    logits = engine.model(state.params)(batch["inputs"][0], batch["positions"][0], batch["segment_ids"][0])
    lp = jax.nn.log_softmax(logits, -1)
    direct = [(np.take_along_axis(np.asarray(lp[r]), np.asarray(batch["targets"][0, r])[:, None], 1)[:, 0]
               * np.asarray(batch["loss_mask"][0, r])).sum() for r in range(2)]
    np.testing.assert_allclose(np.asarray(logp[0]), direct, rtol=1e-5)
    for loss_name in ("simpo", "orpo"):  # reference-free: no frozen copy of the model
        c = dataclasses.replace(cfg, pref=PreferenceConfig(loss=loss_name))
        assert _engine_batch(c)[0].frozen_names == ()
    lora = dataclasses.replace(cfg, lora=LoraConfig(rank=4))  # the base without adapters is the reference
    assert _engine_batch(lora)[0].frozen_names == ("base",)
    with pytest.raises(ConfigError, match="scalar_heads"):
        L.RewardObjective(dataclasses.replace(cfg, stage="reward"))


@pytest.mark.parametrize("loss_name", ["dpo"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("ipo", "simpo", "orpo")])
def test_dpo_family_trains_and_raises_the_preference(base_run, tmp_path, loss_name):
    from lm.stages.runner import train

    cfg = pref_config(base_run, "dpo", pair_file(tmp_path / "p.jsonl"), pref=PreferenceConfig(loss=loss_name))
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=12))
    s = train(cfg, str(tmp_path / "run"), progress=False, **QUIET)
    assert np.isfinite(s["heldout_loss"])
    assert s["heldout_logp_margin"] > s["base_heldout_logp_margin"]


@pytest.mark.slow  # make test time; CI's slow phase runs it
def test_precomputed_reference_gives_the_online_run_without_a_second_copy(base_run, tmp_path):
    """DPO with the reference's log-probabilities computed once before training: no frozen
    copy of the weights, and every step's loss and margin equal the online run's."""
    import os

    from lm.stages.runner import train
    from lm.train.logger import read_metrics

    cfg = pref_config(base_run, "dpo", pair_file(tmp_path / "p.jsonl", 120))
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=4, eval_every=2))
    pre = dataclasses.replace(cfg, pref=PreferenceConfig(reference="precomputed"))
    assert _engine_batch(pre)[0].frozen_names == ()
    runs = {}
    for name, c in (("online", cfg), ("pre", pre)):
        s = train(c, str(tmp_path / name), progress=False, **QUIET)
        runs[name] = [(r["step"], r.get("loss"), r.get("margin"), r.get("eval_loss")) for r in
                      read_metrics(str(tmp_path / name))]
        runs[name + "_summary"] = s
    assert os.path.exists(tmp_path / "pre" / "reference_logps.npz")
    for a, b in zip(runs["online"], runs["pre"], strict=True):
        assert a[0] == b[0]
        np.testing.assert_allclose([x for x in a[1:] if x is not None], [x for x in b[1:] if x is not None],
                                   rtol=2e-5, atol=2e-6)
    assert runs["pre"][0][1] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1
    # a damaged table is computed again (one warning line), never a traceback
    npz = tmp_path / "pre" / "reference_logps.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    lines = []
    train(dataclasses.replace(pre, trainer=dataclasses.replace(pre.trainer, steps=5)), str(tmp_path / "pre"),
          progress=False, log=lines.append)
    assert any("unreadable" in str(x) for x in lines)
    # after 4 steps, rounding differences of the two programs show at ~1e-4 relative
    assert runs["pre_summary"]["heldout"] == pytest.approx(runs["online_summary"]["heldout"], rel=1e-3, abs=1e-5)


@pytest.mark.slow  # make test-all / CI's slow phase
def test_reward_model_learns_a_rule(base_run, tmp_path):
    from lm.stages.runner import train

    cfg = pref_config(base_run, "reward", pair_file(tmp_path / "p.jsonl"))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=3e-3),
                              trainer=dataclasses.replace(cfg.trainer, steps=30, checkpoint_every=10))
    s = train(cfg, str(tmp_path / "run"), progress=False, **QUIET)
    assert s["base_heldout_accuracy"] == pytest.approx(0.5)  # a zero head ties every pair
    assert s["heldout_accuracy"] > 0.6 and s["heldout_margin"] > 0
    # scoring from Python / `lm reward`: the run's reward model on fresh pairs of the same rule
    from lm.eval import reward_model as reward
    from lm.train.run import load_run

    loaded = load_run(str(tmp_path / "run"), **QUIET)
    r = reward.score_pairs(loaded, pair_file(tmp_path / "new.jsonl", 64, seed=9))
    assert r["pairs"] == 64 and r["accuracy"] > 0.6 and r["margin"] > 0
    # a pair the rows cannot hold is skipped and counted, not scored as a tie
    with open(tmp_path / "new.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "What is 1 + 2? " * 40, "chosen": "Yes: 3.", "rejected": "No: 4."}) + "\n")
    lines = []
    r = reward.score_pairs(loaded, str(tmp_path / "new.jsonl"), log=lines.append)
    assert r["pairs"] == 64 and r["too_long"] == 1 and "too long" in lines[0] and "new.jsonl:65" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_no_held_out_pairs_still_finishes(base_run, tmp_path, stage):
    """A held-out fraction of 0 leaves nothing to evaluate: the run warns at the start and
    reports n/a, and it finishes (summary.json), rather than failing at the very end."""
    from lm.stages.runner import train

    cfg = pref_config(base_run, stage, pair_file(tmp_path / "p.jsonl", 40))
    src = dataclasses.replace(cfg.data.sources[0], heldout_fraction=0.0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(src,)),
                              trainer=dataclasses.replace(cfg.trainer, steps=2))
    lines = []
    s = train(cfg, str(tmp_path / "run"), progress=False, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "no held-out data" in text and "n/a (no held-out pairs)" in text
    key = "heldout_accuracy" if stage == "reward" else "heldout_logp_accuracy"
    assert os.path.exists(tmp_path / "run" / "summary.json") and s[key] is None
