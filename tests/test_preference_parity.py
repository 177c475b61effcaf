"""Preference-loss parity with TRL (skipped when torch/transformers/TRL are absent; CI installs them).

On the same small model, exported to Hugging Face, and the same pairs, rendered by our chat
template and by the exported one to the same token ids:
1. DPO (pref.loss="dpo") equals TRL's `DPOTrainer` with loss_type "sigmoid";
2. IPO equals `DPOTrainer` with loss_type "ipo" (TRL's length-normalised IPO);
3. SimPO (with label smoothing) equals `trl.experimental.cpo.CPOTrainer` with loss_type
   "simpo" and cpo_alpha=0;
   ORPO's odds-ratio term equals `trl.experimental.orpo.ORPOTrainer`'s. Its NLL term is
   taken over the chosen reply's tokens (as TRL's DPOTrainer loss_type "sft" takes it),
   where TRL's ORPOTrainer takes it over the whole chosen sequence, prompt included: our
   ORPO loss equals TRL's odds-ratio term plus TRL's "sft" NLL;
4. the reward model's Bradley–Terry loss equals `RewardTrainer`'s on a Hugging Face
   sequence classifier (num_labels=1): the exported reward model, whose score is our head "reward",
   with and without a margin.
Each TRL loss is computed by TRL's own dataset preparation, collator and loss code on the
batch of all pairs, in float32; the per-pair log-probabilities and rewards are compared too.

The reference is the base run; the policy is the base run after a few steps of our DPO loss
(so that it differs from the reference and the DPO loss is not ln 2).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import pair_file, pref_config

from lm.config import MeshConfig, PreferenceConfig

torch = pytest.importorskip("torch", reason="torch not installed (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")
pytest.importorskip("trl", minversion="1.16", reason="trl>=1.16 not installed (CI installs it)")
datasets = pytest.importorskip("datasets", reason="datasets not installed (comes with trl)")

QUIET = dict(log=lambda *_: None)
TOL = 1e-4
pytestmark = pytest.mark.slow  # peer parity: run by .ci/run after make test

# Pairs with longer prompts (a system prompt, several turns) and replies of unequal lengths, added
# to the arithmetic pairs of helpers.pair_file.
EXTRA_PAIRS = [
    {"prompt": [{"role": "system", "content": "You reverse words."},
                {"role": "user", "content": "reverse: quick fox"}],
     "chosen": "fox quick", "rejected": "the lazy dog jumps over a brown fox"},
    {"prompt": [{"role": "user", "content": "reverse: seven wizards"},
                {"role": "assistant", "content": "wizards seven"},
                {"role": "user", "content": "reverse: a lazy dog"}],
     "chosen": "dog lazy a", "rejected": "a"},
]


@pytest.fixture(scope="module")
def setup(base_run, tmp_path_factory):
    """The reference (the base run), a policy, a reward model (the policy's trunk and a head
    "reward"), all three exported to Hugging Face; the pairs and our batch of them."""
    from flax import nnx

    from data_pipeline import preferences as P
    from lm.interop.hf import export_llama, load_safetensors
    from lm.train.run import load_run

    d = tmp_path_factory.mktemp("pref_parity")
    path = pair_file(d / "p.jsonl", n=6, seed=3)
    pairs = [P.to_pair(json.loads(line)) for line in open(path)] + EXTRA_PAIRS
    base = load_run(base_run["run"], **QUIET)
    tok, mcfg, seq_len = base.tokenizer, base.cfg.model, base.cfg.model.max_seq_len
    examples = [P.render_pair(tok, p, seq_len) for p in pairs]
    assert not any(cut for _, cut in examples)
    batch = {k: np.stack([e[k] for e, _ in examples]) for k in examples[0][0]}

    # the policy: the reference after a few sign-gradient steps of our DPO loss on these pairs
    reference = base.params
    engine, _ = _objective(base_run, path, "dpo", beta=0.3)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    grad = jax.grad(lambda p: engine.loss_fn(p, b, {"reference": reference})[0])
    step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 5e-4 * jnp.sign(g), p, grad(p)))
    policy = reference
    for _ in range(3):
        policy = step(policy)
    # the reward model: the policy's trunk and a random head "reward" (rewards of a few units, so
    # that the Bradley-Terry loss of the pairs is well away from ln 2)
    rm_engine, _ = _objective(base_run, path, "reward")
    head = np.random.default_rng(2).standard_normal(mcfg.d_model).astype(np.float32) * 30 / mcfg.d_model ** 0.5
    reward = rm_engine.abstract_params()
    nnx.replace_by_pure_dict(reward, dict(policy.to_pure_dict(), scalar_heads={"reward": jnp.asarray(head)}))

    hf = {}
    for name, params in [("reference", reference), ("policy", policy), ("reward", reward)]:
        hf[name] = export_llama(rm_engine.cfg.model if name == "reward" else mcfg, jax.device_get(params),
                                str(d / name), tok.path)
    # a reward model exports as a sequence classifier: the trunk, and the head "reward" as `score`
    rm_weights = load_safetensors(str(d / "reward" / "model.safetensors"))
    assert set(rm_weights) == set(load_safetensors(str(d / "policy" / "model.safetensors"))) - {"lm_head.weight"} \
        | {"score.weight"}
    np.testing.assert_array_equal(rm_weights["score.weight"], head[None])
    return {"dir": d, "path": path, "pairs": pairs, "batch": batch, "tokenizer": tok, "run": base_run,
            "params": {"reference": reference, "policy": policy, "reward": reward}, "head": head, "hf": hf}


# ---------------------------------------------------------------------------------------
# Ours


def _objective(run, path, stage: str, **pref):
    from lm.model.sharding import make_mesh
    from lm.objectives.preference import PreferenceObjective, RewardObjective
    from lm.train.engine import make_engine

    cfg = pref_config(run, stage, path, pref=PreferenceConfig(**pref), mesh=MeshConfig(data=1))
    objective = (RewardObjective if stage == "reward" else PreferenceObjective)(cfg)
    return make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), objective), objective


def _our_loss(setup, **pref) -> dict:
    """Our loss on the batch of all pairs, and per pair the reply's summed log-probability and
    token count under the policy and the reference."""
    from lm.objectives.preference import reply_logps

    engine, objective = _objective(setup["run"], setup["path"], "dpo", **pref)
    params, batch = setup["params"], {k: jnp.asarray(v) for k, v in setup["batch"].items()}

    @jax.jit
    def run(policy, reference):
        frozen = {"reference": reference} if objective.frozen else {}
        loss, _ = engine.loss_fn(policy, batch, frozen)
        return loss, reply_logps(engine.model(policy), batch)[:2], reply_logps(engine.model(reference), batch)[0]

    loss, (pol, n), ref = run(params["policy"], params["reference"])
    return {"loss": float(loss), "logp": np.asarray(pol), "ref": np.asarray(ref), "n": np.asarray(n)}


# ---------------------------------------------------------------------------------------
# TRL


def _tokenizer(setup, eos: str | None = None):
    tok = transformers.AutoTokenizer.from_pretrained(setup["hf"]["policy"])
    if eos is not None:
        tok.eos_token = eos
    return tok


def _lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


def _conversational(pairs) -> list[dict]:
    """TRL's conversational preference layout (prompt messages; chosen/rejected: one assistant message)."""
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def _common_args(out_dir, n: int) -> dict:
    """TRL's configs default to bf16 mixed precision: compare in float32."""
    return dict(output_dir=str(out_dir), per_device_train_batch_size=n, report_to="none", use_cpu=True, bf16=False,
                save_strategy="no", logging_strategy="no", disable_tqdm=True)


def _our_ids(setup):
    """Per pair: (prompt ids, chosen reply ids, rejected reply ids) of our rendered rows."""
    from data_pipeline.chat import generation_prompt

    b, out = setup["batch"], []
    for i, p in enumerate(setup["pairs"]):
        prompt = generation_prompt(setup["tokenizer"], p["prompt"])
        rows = [b["inputs"][i, r][b["segment_ids"][i, r] > 0].tolist() for r in range(2)]
        assert all(row[:len(prompt)] == prompt for row in rows)
        out.append((prompt, rows[0][len(prompt):], rows[1][len(prompt):]))
    return out


def _trl_dpo(setup, out_dir, **config) -> dict:
    """TRL's DPOTrainer on all pairs (one batch): its loss, and per pair its summed completion
    log-probabilities under the policy and the reference."""
    from trl import DPOConfig, DPOTrainer

    pairs = setup["pairs"]
    args = DPOConfig(max_length=None, precompute_ref_log_probs=False, **_common_args(out_dir, len(pairs)), **config)
    trainer = DPOTrainer(model=_lm(setup["hf"]["policy"]), ref_model=_lm(setup["hf"]["reference"]), args=args,
                         train_dataset=datasets.Dataset.from_list(_conversational(pairs)),
                         processing_class=_tokenizer(setup))
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    # TRL tokenised the pairs with the exported chat template to our ids: the prompt with its
    # generation prompt, and each completion the reply and its <|end|>
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == _our_ids(setup)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        pol = trainer.compute_ref_log_probs(trainer.model, dict(batch))
        ref = trainer.compute_ref_log_probs(trainer.ref_model, dict(batch))
    return {"loss": loss, "logp": torch.stack(pol, 1).numpy(), "ref": torch.stack(ref, 1).numpy(),
            "n": torch.stack(batch["completion_mask"].sum(1).chunk(2), 1).numpy()}


def _check_logps(ours, theirs):
    np.testing.assert_array_equal(ours["n"], theirs["n"])
    np.testing.assert_allclose(ours["logp"], theirs["logp"], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["ref"], theirs["ref"], rtol=0, atol=TOL)


def test_dpo_loss_matches_trl_sigmoid(setup, tmp_path):
    ours = _our_loss(setup, loss="dpo", beta=0.3)
    theirs = _trl_dpo(setup, tmp_path, loss_type=["sigmoid"], beta=0.3)
    _check_logps(ours, theirs)
    assert ours["loss"] < np.log(2) - 0.1  # the policy is not the reference: the loss is not ln 2
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=0, atol=TOL)


def test_ipo_loss_matches_trl_ipo(setup, tmp_path):
    ours = _our_loss(setup, loss="ipo", beta=0.5)
    theirs = _trl_dpo(setup, tmp_path, loss_type=["ipo"], beta=0.5)
    _check_logps(ours, theirs)
    assert (ours["n"][:, 0] != ours["n"][:, 1]).any()  # the length normalisation matters
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=0, atol=TOL)


def _legacy_args(setup, out_dir) -> dict:
    return dict(max_length=setup["batch"]["inputs"].shape[-1], remove_unused_columns=False,
                **_common_args(out_dir, len(setup["pairs"])))


def _trl_legacy(setup, trainer_cls, args):
    """CPOTrainer / ORPOTrainer (TRL's older preference code, which tokenises the templated text):
    the trainer and its collated batch of all pairs. The exported tokenizer's EOS is set to
    <|end|>, the end of a reply, so that TRL does not append </s> to the replies."""
    pairs = setup["pairs"]
    trainer = trainer_cls(model=_lm(setup["hf"]["policy"]), args=args,
                          train_dataset=datasets.Dataset.from_list(_conversational(pairs)),
                          processing_class=_tokenizer(setup, eos="<|end|>"))
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    for row, (prompt, chosen, rejected) in zip(rows, _our_ids(setup)):
        assert row["prompt_input_ids"] == prompt
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            assert row[f"{key}_input_ids"] == prompt + reply
            assert row[f"{key}_labels"] == [-100] * len(prompt) + reply
    return trainer, trainer.data_collator(rows)


def test_simpo_loss_matches_trl_cpo_simpo(setup, tmp_path):
    cpo = pytest.importorskip("trl.experimental.cpo", reason="trl.experimental.cpo is not in this TRL")
    ours = _our_loss(setup, loss="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1)
    # SimPO: CPO with loss_type "simpo" and no behaviour-cloning (NLL) term
    args = cpo.CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7, label_smoothing=0.1,
                         **_legacy_args(setup, tmp_path))
    trainer, batch = _trl_legacy(setup, cpo.CPOTrainer, args)
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(trainer.model, batch)[:2]  # token-mean log-probabilities
        loss = float(trainer.compute_loss(trainer.model, batch))
    np.testing.assert_allclose(ours["logp"] / ours["n"], torch.stack([chosen, rejected], 1).numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(ours["loss"], loss, rtol=0, atol=TOL)


def test_orpo_odds_ratio_term_matches_trl_orpo(setup, tmp_path):
    orpo = pytest.importorskip("trl.experimental.orpo", reason="trl.experimental.orpo is not in this TRL")
    lam = 0.3
    ours = _our_loss(setup, loss="orpo", orpo_lambda=lam)
    args = orpo.ORPOConfig(beta=lam, **_legacy_args(setup, tmp_path / "orpo"))
    trainer, batch = _trl_legacy(setup, orpo.ORPOTrainer, args)
    with torch.no_grad():
        chosen, rejected, _, _, nll_full = trainer.concatenated_forward(trainer.model, batch)
        loss = float(trainer.compute_loss(trainer.model, batch))
    np.testing.assert_allclose(ours["logp"] / ours["n"], torch.stack([chosen, rejected], 1).numpy(), rtol=0, atol=TOL)
    odds_term = loss - float(nll_full)  # TRL: NLL(chosen sequence) - lambda mean(log sigmoid(log odds ratio))
    # our NLL: the token mean over the chosen replies, = TRL DPOTrainer's loss_type "sft"
    nll_reply = _trl_dpo(setup, tmp_path / "sft", loss_type=["sft"])["loss"]
    np.testing.assert_allclose(-ours["logp"][:, 0].sum() / ours["n"][:, 0].sum(), nll_reply, rtol=0, atol=TOL)
    assert abs(float(nll_full) - nll_reply) > 1e-2  # TRL's ORPO NLL also covers the prompt's tokens
    np.testing.assert_allclose(ours["loss"], nll_reply + odds_term, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------
# 4. The reward model


def test_reward_model_loss_matches_trl_reward_trainer(setup, tmp_path):
    from trl import RewardConfig, RewardTrainer

    pairs, margin = setup["pairs"], 0.25
    # TRL's side: the exported sequence classifier (its score is our head "reward")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(setup["hf"]["reward"], num_labels=1)
    model = model.float().eval()
    tok = _tokenizer(setup)
    args = RewardConfig(max_length=None, **_common_args(tmp_path, len(pairs)))
    data = [dict(p, margin=margin) for p in _conversational(pairs)]
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                            processing_class=tok)
    assert model.config.pad_token_id == tok.pad_token_id == 0  # the classifier reads the last non-pad token
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    assert [(r["chosen_ids"], r["rejected_ids"]) for r in rows] == [(p + c, p + r) for p, c, r in _our_ids(setup)]
    batch = trainer.data_collator(rows)
    # padded on the right with the pad id, which no real token has
    real = batch["attention_mask"] == 1
    assert (batch["input_ids"][real] != 0).all() and (batch["input_ids"][~real] == 0).all()
    assert real[:, 0].all() and (real[:, :-1] >= real[:, 1:]).all()
    with torch.no_grad():
        loss_margin = float(trainer.compute_loss(model, dict(batch)))
        no_margin = {k: v for k, v in batch.items() if k != "margin"}
        loss = float(trainer.compute_loss(model, dict(no_margin)))
        rewards = model(**no_margin).logits[:, 0].reshape(2, -1).T.numpy()

    b = {k: jnp.asarray(v) for k, v in setup["batch"].items()}
    (e0, o0), (e1, _) = (_objective(setup["run"], setup["path"], "reward", margin=m) for m in (0.0, margin))
    ours, our_loss, our_loss_margin = jax.jit(lambda p: (o0.rewards(e0.model(p), b), e0.loss_fn(p, b)[0],
                                                         e1.loss_fn(p, b)[0]))(setup["params"]["reward"])
    ours = np.asarray(ours)
    np.testing.assert_allclose(ours, rewards, rtol=0, atol=TOL)
    # a case that can tell losses apart: reward differences that vary, a loss away from ln 2
    assert np.ptp(ours[:, 0] - ours[:, 1]) > 0.1 and abs(loss - np.log(2)) > 0.03
    np.testing.assert_allclose(float(our_loss), loss, rtol=0, atol=TOL)
    np.testing.assert_allclose(float(our_loss_margin), loss_margin, rtol=0, atol=TOL)
    assert loss_margin > loss + 0.05
