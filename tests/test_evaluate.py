"""Task scoring on hand-made models whose right answers are known by construction."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.evaluate import GEN_TASKS, TASKS, load_generation_task, load_task, loglikelihoods, score_lambada, score_multiple_choice

V = 128


class CharTokenizer:
    """One token per ASCII character; BOS is 1."""

    bos_id = 1

    def encode(self, text, bos=False, eos=False):
        return ([1] if bos else []) + [ord(c) % V for c in text]


def likes_a(params, tokens):
    """Predicts 'a' everywhere: p(a) = e^10 / (e^10 + 127)."""
    return jnp.broadcast_to(10.0 * jax.nn.one_hot(ord("a"), V), tokens.shape + (V,))


def successor(params, tokens):
    """Predicts the next character code: 'b' after 'a', 'd' after 'c', ..."""
    return 10.0 * jax.nn.one_hot((tokens + 1) % V, V)


LOGP_A = 10.0 - np.log(np.exp(10.0) + 127)  # log p of the preferred token
LOGP_OTHER = -np.log(np.exp(10.0) + 127)


def test_loglikelihood_hand_computed():
    tok = CharTokenizer()
    (ll, greedy), (ll2, greedy2) = loglikelihoods(likes_a, None, [(tok.encode("q", True), tok.encode("aa")),
                                                               (tok.encode("q", True), tok.encode("ab"))], 64)
    np.testing.assert_allclose(ll, 2 * LOGP_A, atol=1e-5)
    np.testing.assert_allclose(ll2, LOGP_A + LOGP_OTHER, atol=1e-5)
    assert greedy and not greedy2


def test_multiple_choice_raw_and_length_normalised():
    tok = CharTokenizer()
    items = [
        {"contexts": ["Q:"], "continuations": [" bbb", " aaa", " bab"], "gold": 1},  # both metrics right
        # raw prefers the short " a"; per byte the long answer wins
        {"contexts": ["Q:"], "continuations": [" a", " aaaaaaaa"], "gold": 1},
        {"contexts": ["Q:"], "continuations": [" aaa", " xyz"], "gold": 1},  # both wrong
    ]
    r = score_multiple_choice(likes_a, None, tok, items, 64, batch_size=4)
    assert r == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}


def test_partial_scoring_with_several_contexts_and_lambada():
    tok = CharTokenizer()
    wino = [{"contexts": ["xab", "xax"], "continuations": ["c"], "gold": 0},
            {"contexts": ["mno", "mnk"], "continuations": ["l"], "gold": 1}]
    assert score_multiple_choice(successor, None, tok, wino, 64)["acc"] == 1.0
    lambada = [{"contexts": ["abc"], "continuations": ["de"], "gold": 0},
               {"contexts": ["abc"], "continuations": ["dz"], "gold": 0}]
    r = score_lambada(successor, None, tok, lambada, 64)
    assert r["acc"] == 0.5 and r["n"] == 2


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="optional: needs ../shared/data")
@pytest.mark.parametrize("task", [t for t in TASKS if t not in ("heldout",) + GEN_TASKS])
def test_task_files_load(task):
    items = load_task(task, SHARED)
    assert len(items) > 1000
    for it in items[:50]:
        assert 0 <= it["gold"] < max(len(it["contexts"]), len(it["continuations"]))
        assert all(isinstance(c, str) and c for c in it["contexts"] + it["continuations"])


def test_gsm8k_answer_extraction_and_scoring():
    from lm.evaluate import final_number, score_gsm8k

    assert final_number("She pays 3 * 2 = 6 dollars.\n#### 1,234") == "1234"
    assert final_number("so the answer is 18.") == "18"
    assert final_number("no number here") is None
    assert final_number("#### 7.0") == "7"
    refs = ["... #### 18", "... #### 3", "... #### 40"]
    assert score_gsm8k(["The answer is 18", "#### 4", "40 apples, #### 40"], refs)["exact_match"] == pytest.approx(2 / 3)


def test_translation_scoring_wires_bleu_and_chrf():
    from lm.evaluate import score_translation

    perfect = score_translation(["Ein Hund läuft."], ["Ein Hund läuft."])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert score_translation(["xyz"], ["Ein Hund läuft."])["bleu"] == 0.0


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="optional: needs ../shared/data")
@pytest.mark.parametrize("task", GEN_TASKS)
def test_generation_task_files_load(task):
    items = load_generation_task(task, SHARED)
    assert len(items) > 900 and all(it["prompt"] and it["reference"] for it in items[:50])


def test_missing_task_folder_is_a_clear_error(tmp_path, capsys):
    from lm.cli import main

    assert main(["eval", str(tmp_path), "--tasks", "piqa", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_scoring_with_the_batch_sharded_over_devices():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lm.config import MeshConfig
    from lm.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    tok = CharTokenizer()
    reqs = [(tok.encode("q" * (i % 5 + 1), True), tok.encode("ab"[: i % 2 + 1])) for i in range(11)]
    plain = loglikelihoods(successor, None, reqs, 64, batch_size=8)
    sharded = loglikelihoods(successor, None, reqs, 64, batch_size=8,
                             batch_sharding=NamedSharding(mesh, P("data", None)))
    assert [g for _, g in plain] == [g for _, g in sharded]
    np.testing.assert_allclose([v for v, _ in plain], [v for v, _ in sharded], atol=1e-5)
