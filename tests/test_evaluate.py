"""Task scoring: hand-made models whose right answers are known by construction, and the
lm-evaluation-harness conventions with the project's real SentencePiece tokenizer."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import corpus_tokenizer, write_task_files

from data_pipeline.config import SHARED_DATA
from lm.eval.evaluate import (
    GEN_TASKS,
    TASKS,
    encode_pair,
    load_generation_task,
    load_task,
    loglikelihood_rolling,
    loglikelihood_texts,
    loglikelihoods,
    rolling_requests,
    score_lambada,
    score_multiple_choice,
)

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
    assert r == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3,
                 "chance": pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)}


def test_acc_norm_divides_by_the_characters_of_the_choice():
    """Per character of the choice text (the harness's), not per UTF-8 byte nor counting the
    " " before it: here only per character does the first choice win."""
    from lm.eval.evaluate import multiple_choice_metrics

    item = {"contexts": ["Q:"], "continuations": [" ab", " é"], "choices": ["ab", "é"], "gold": 0}
    lls = [-4.0, -2.5]  # per character -2.0 vs -2.5; per byte -2.0 vs -1.25; with the " " -1.33 vs -1.25
    assert multiple_choice_metrics([item], lls) == {"acc": 0.0, "acc_norm": 1.0, "chance": 0.5, "n": 1}
    # without "choices", the continuations less their leading " " are the choices
    del item["choices"]
    assert multiple_choice_metrics([item], lls)["acc_norm"] == 1.0
    with pytest.raises(ValueError, match="3 log-likelihoods"):
        multiple_choice_metrics([item], lls + [0.0])


def test_partial_scoring_with_several_contexts_and_lambada():
    tok = CharTokenizer()
    wino = [{"contexts": ["xab", "xax"], "continuations": ["c"], "gold": 0},
            {"contexts": ["mno", "mnk"], "continuations": ["l"], "gold": 1}]
    assert score_multiple_choice(successor, None, tok, wino, 64)["acc"] == 1.0
    lambada = [{"contexts": ["abc"], "continuations": ["de"], "gold": 0},
               {"contexts": ["abc"], "continuations": ["dz"], "gold": 0}]
    r = score_lambada(successor, None, tok, lambada, 64)
    assert r["acc"] == 0.5 and r["n"] == 2
    # perplexity per item (the harness's): exp(-mean log-likelihood of the word)
    ll = [v for v, _ in loglikelihoods(successor, None, [(tok.encode("abc", True), tok.encode(c))
                                                         for c in ("de", "dz")], 64)]
    assert r["perplexity"] == pytest.approx(np.exp(-np.mean(ll)))


SHARED = SHARED_DATA  # optional (LM_DATA, else ../shared/data beside the repository)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="optional: needs ../shared/data")
@pytest.mark.parametrize("task", [t for t in TASKS if t not in ("heldout",) + GEN_TASKS])
def test_task_files_load(task):
    items = load_task(task, SHARED)
    assert len(items) > 1000
    for it in items[:50]:
        assert 0 <= it["gold"] < max(len(it["contexts"]), len(it["continuations"]))
        assert all(isinstance(c, str) and c for c in it["contexts"] + it["continuations"])


def test_gsm8k_answer_extraction_and_scoring():
    from lm.eval.evaluate import final_number, score_gsm8k

    assert final_number("She pays 3 * 2 = 6 dollars.\n#### 1,234") == "1234"
    assert final_number("so the answer is 18.") == "18"
    assert final_number("no number here") is None
    assert final_number("#### 7.0") == "7"
    refs = ["... #### 18", "... #### 3", "... #### 40"]
    assert score_gsm8k(["The answer is 18", "#### 4", "40 apples, #### 40"], refs)["exact_match"] == pytest.approx(2 / 3)


def test_translation_scoring_wires_bleu_and_chrf():
    from lm.eval.evaluate import score_translation

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
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lm.config import MeshConfig
    from lm.model.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    tok = CharTokenizer()
    reqs = [(tok.encode("q" * (i % 5 + 1), True), tok.encode("ab"[: i % 2 + 1])) for i in range(11)]
    plain = loglikelihoods(successor, None, reqs, 64, batch_size=8)
    sharded = loglikelihoods(successor, None, reqs, 64, batch_size=8,
                             batch_sharding=NamedSharding(mesh, P("data", None)))
    assert [g for _, g in plain] == [g for _, g in sharded]
    np.testing.assert_allclose([v for v, _ in plain], [v for v, _ in sharded], atol=1e-5)


# ---------------------------------------------------------------------------------------
# lm-evaluation-harness conventions with the real SentencePiece tokenizer

PAIRS = [
    ("Roof shingle removal: A man is sitting on a roof. he", " is using wrap to wrap a pair of skis."),
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("The trophy doesn't fit into the suitcase because the suitcase", " is too small."),
    ("def f(x):\n   ", " return x  # two spaces"),  # trailing spaces of the context move over
    ("Answer: ", "yes"),
    ("Café au lait", " ☕ et croissant 日本"),  # byte fallback
    ("\n\nclass A:", "\n    pass"),
    ("tabs\t", "\tand more"),
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return corpus_tokenizer(tmp_path_factory.mktemp("tok"))


def _text(tok, ids):  # the text of ids, without SentencePiece's removal of a leading space
    return b"".join(bytes([int(tok.piece(i)[3:5], 16)]) if tok.sp.is_byte(i)
                    else tok.piece(i).replace("\u2581", " ").encode() for i in ids).decode()


def test_continuation_tokens_are_those_of_the_whole_text(sp_tok):
    tok = sp_tok
    # encoded alone, " is using" starts with a double-space piece: the text a separate
    # encoding would score has one space too many
    assert tok.piece(tok.encode(" is using")[0]).startswith("\u2581\u2581")
    for ctx, cont in PAIRS:
        c, k = encode_pair(tok, ctx, cont)
        assert c + k == tok.encode(ctx + cont, bos=True)
        moved = ctx[len(ctx.rstrip()):]
        assert c == tok.encode(ctx.rstrip(), bos=True)
        assert _text(tok, k) == moved + cont  # exactly the continuation's text, with the moved spaces
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    assert encode_pair(tok, "", "hello world") == ([tok.bos_id], tok.encode("hello world"))


def test_encode_pair_equals_the_harness(sp_tok):
    """Our encode_pair against lm-evaluation-harness's own TemplateLM.loglikelihood, given
    the same tokenizer contract (BOS + SentencePiece ids)."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (optional)")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    tok = sp_tok
    seen = []

    class Recorder(TemplateLM):
        eot_token_id = tok.eos_id
        prefix_token_id = tok.bos_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tok.encode(string, bos=add_special_tokens is not False)

        def _loglikelihood_tokens(self, requests, **kwargs):
            seen.extend((list(c), list(k)) for _, c, k in requests)
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    pairs = PAIRS + [("", " a continuation alone"), ("  ", "x")]
    Recorder().loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    assert seen == [encode_pair(tok, c, k) for c, k in pairs]


def _tiny_model(vocab, seed=0, max_len=128):
    from flax import nnx

    from lm.config import ModelConfig
    from lm.eval.evaluate import model_logits
    from lm.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=max_len)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(seed)), nnx.Param)
    from functools import partial

    return partial(model_logits, graphdef), params


def test_pair_loglikelihood_is_the_difference_of_text_loglikelihoods(sp_tok):
    """log p(cont | ctx) = log p(ctx + cont) - log p(ctx) for a real model and tokenizer: the
    continuation scored is exactly the rest of the text, nothing more."""
    logits_fn, params = _tiny_model(sp_tok.vocab_size, max_len=64)  # one window each
    pairs = PAIRS[:4]
    pair_ll = [v for v, _ in loglikelihood_texts(logits_fn, params, sp_tok, pairs, 64, batch_size=4)]
    whole = loglikelihood_rolling(logits_fn, params, sp_tok, [c + k for c, k in pairs], 64, batch_size=4)
    ctx = loglikelihood_rolling(logits_fn, params, sp_tok, [c.rstrip() for c, _ in pairs], 64, batch_size=4)
    np.testing.assert_allclose(pair_ll, np.subtract(whole, ctx), atol=2e-4)


def test_rolling_windows_predict_every_token_once_with_full_context():
    for n, max_len in [(1, 4), (4, 4), (5, 4), (10, 4), (23, 8), (3, 1)]:
        tokens = list(range(100, 100 + n))
        windows = rolling_requests(tokens, 7, max_len)
        assert [t for _, cont in windows for t in cont] == tokens
        full = [7] + tokens
        for ctx, cont in windows:
            seq = ctx + cont
            assert len(seq) <= max_len + 1 and len(cont) <= max_len
            start = full.index(seq[0]) if seq[0] != 7 else 0
            assert full[start: start + len(seq)] == seq  # contiguous in prefix + text
        if n > max_len:  # later windows see a full context
            assert all(len(c) + len(k) == max_len + 1 for c, k in windows[1:])
    assert rolling_requests([], 7, 4) == []


def test_rolling_windows_equal_the_harness():
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval not installed (optional)")
    for n, max_len in [(1, 4), (4, 4), (5, 4), (10, 4), (23, 8), (100, 16)]:
        tokens = list(range(100, 100 + n))
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 7, max_len, 1)]
        assert rolling_requests(tokens, 7, max_len) == [(list(a), list(b)) for a, b in theirs]


def test_tasks_from_files_with_the_real_tokenizer(sp_tok, tmp_path):
    """Every log-likelihood task end to end on made-up task files (no ../shared/data needed)."""
    from lm.eval.evaluate import TASK_METRICS, format_table, score_task

    data = write_task_files(tmp_path, n=6)
    logits_fn, params = _tiny_model(sp_tok.vocab_size)
    results = {}
    for task in TASK_METRICS:
        r = score_task(task, logits_fn, params, sp_tok, 128, data, batch_size=8)
        assert set(r) == set(TASK_METRICS[task]) | {"chance", "n", "version"} and r["n"] == 6
        assert all(0.0 <= r[m] <= 1.0 for m in TASK_METRICS[task] if m.startswith("acc"))
        results[task] = r
    assert results["hellaswag"]["chance"] == 0.25 and results["piqa"]["chance"] == 0.5
    assert results["lambada"]["perplexity"] > 1.0
    table = format_table(results)
    assert "| hellaswag | acc_norm |" in table and "| 0.2500 | 6 |" in table


@pytest.mark.slow  # make test time; CI's slow phase runs it
def test_trainer_eval_tasks_are_logged_with_the_evaluation(tmp_path):
    """trainer.eval_tasks: a small downstream eval beside the held-out loss in metrics.jsonl."""
    import json

    from data_pipeline.tokenizer import train_tokenizer
    from lm.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig
    from lm.stages.runner import train

    words = "the cat river bread lamp garden opens eats paints carries".split()
    texts = [" ".join(words[(i * 7 + j * 3) % 10] for j in range(20)) for i in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(texts, 300, str(tmp_path / "sp"))
    data = write_task_files(tmp_path, n=4)
    cfg = Config(model=ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                                   max_seq_len=64),
                 optim=OptimConfig(lr=1e-3, warmup_steps=1),
                 data=DataConfig(corpus="sources", seq_len=32, batch_size=8, tokenizer=tok.path,
                                 sources=(SourceConfig(name="a", kind="jsonl", paths=(str(tmp_path / "a.jsonl"),)),)),
                 trainer=TrainerConfig(steps=1, log_every=1, eval_every=1, eval_batches=1, num_samples=0,
                                       eval_tasks=("piqa", "winogrande"), eval_task_items=3, eval_data_dir=data))
    train(cfg, str(tmp_path / "run"), log=lambda *_: None, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 1
    for r in evals:
        assert {"task/piqa/acc", "task/piqa/acc_norm", "task/winogrande/acc"} <= set(r)
        assert r["task/piqa/acc"] in (0.0, 1 / 3, 2 / 3, 1.0) and "task/winogrande/acc_norm" not in r
    from lm.stages.common import check_tasks

    with pytest.raises(ConfigError, match="unknown task.*hellaswagg"):  # checked by lm train before any work
        check_tasks(Config(trainer=TrainerConfig(eval_tasks=("hellaswagg",))))
    from lm.config import from_dict, to_dict

    assert from_dict(to_dict(cfg)).trainer.eval_tasks == ("piqa", "winogrande")  # JSON lists come back as tuples


def test_lm_eval_cli_writes_versions_counts_and_chance(sp_tok, tmp_path, capsys):
    """`lm eval RUN --tasks ... --data-dir ...` on a run directory (imported from a Hugging
    Face export): a table with a chance column, eval.json with item counts and versions."""
    import json

    from flax import nnx

    from lm.cli import main
    from lm.config import ModelConfig
    from lm.eval.evaluate import TASK_VERSIONS
    from lm.interop.hf import export_llama
    from lm.model.transformer import Transformer
    from lm.tools.hf_runs import import_run

    cfg = ModelConfig(vocab_size=sp_tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128)
    export_llama(cfg, nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param), str(tmp_path / "hf"),
                 tokenizer_model=sp_tok.path)
    run = str(tmp_path / "run")
    import_run(str(tmp_path / "hf"), run, log=lambda *_: None)
    data = write_task_files(tmp_path, n=5)
    assert main(["eval", run, "--tasks", "piqa,lambada", "--data-dir", data, "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | value | chance | n |" in out and "| piqa | acc_norm |" in out and "| 0.5000 | 5 |" in out
    saved = json.load(open(tmp_path / "run" / "eval.json"))
    assert saved["piqa"]["n"] == 5 and saved["piqa"]["version"] == TASK_VERSIONS["piqa"] == 2
    assert saved["piqa"]["chance"] == 0.5 and saved["piqa"]["step"] == 0
    assert set(saved["lambada"]) == {"acc", "perplexity", "chance", "n", "version", "step"}
    assert main(["eval", run, "--tasks", "piqa,nope", "--data-dir", data]) == 2
