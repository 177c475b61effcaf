"""The lm-evaluation-harness adapter (lm.interop.lm_eval) with requests made in the test
(skipped without lm-eval; tests/test_harness_parity.py compares it with the harness's own
Hugging Face backend)."""

import numpy as np
import pytest
from helpers import corpus_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval not installed (optional: pip install lm-eval)")
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    import jax
    from flax import nnx

    from lm.config import Config, DataConfig, MeshConfig, ModelConfig
    from lm.eval.harness import JaxLM
    from lm.model.sharding import make_mesh
    from lm.model.transformer import Transformer
    from lm.train.engine import make_engine
    from lm.train.run import LoadedRun

    tok = corpus_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                   d_ff=64, max_seq_len=64, init_std=0.2), mesh=MeshConfig(data=-1),
                 data=DataConfig(seq_len=64))
    engine = make_engine(cfg, make_mesh(cfg.mesh))
    params = jax.device_put(nnx.state(Transformer(cfg.model, nnx.Rngs(1)), nnx.Param), engine.param_sharding)
    run = LoadedRun(cfg=cfg, trainer=engine, params=params, step=0, tokenizer=tok)
    return JaxLM(run=run, batch_size=5, max_gen_toks=8, progress=False)


def test_registered_as_lm_jax(adapter):
    from lm_eval.api.registry import get_model

    from lm.eval.harness import JaxLM

    assert get_model("lm-jax") is JaxLM
    assert adapter.batch_size == 8  # rounded up to whole rows on each of the 8 devices
    with pytest.raises(ValueError, match="run_dir"):
        JaxLM()


def test_loglikelihood_is_our_scorer(adapter):
    from lm.eval.evaluate import loglikelihood_texts

    pairs = [("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"), ("", "no context"),
             ("trailing space ", "moves"), ("x" * 300, " a context longer than the model's")]
    got = adapter.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                disable_tqdm=True)
    want = loglikelihood_texts(adapter.logits_fn, adapter.run.params, adapter.tok, pairs, 64, 8,
                               batch_sharding=adapter.sharding)
    assert got == want and all(isinstance(g, bool) for _, g in got)
    # the harness's own TemplateLM path (token requests) gives the same
    with_context = [i for i, (c, _) in enumerate(pairs) if c]
    tokens = adapter._loglikelihood_tokens([(pairs[i], *adapter._encode_pair(*pairs[i])) for i in with_context])
    np.testing.assert_allclose([v for v, _ in tokens], [want[i][0] for i in with_context], atol=1e-5)


def test_rolling_sums_windows(adapter):
    """A text longer than the context is scored in windows that add up; a short one is a
    single window from BOS."""
    text = "def f(x):\n    return x * 2\n" * 12
    assert len(adapter.tok.encode(text)) > 2 * 64
    got = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0),
                                         Instance("loglikelihood_rolling", {}, ("short",), 1)])
    ids = adapter.tok.encode("short")
    one = adapter._loglikelihood_tokens([(None, [adapter.tok.bos_id], ids)])[0][0]
    assert got[1] == pytest.approx(one, abs=1e-5) and got[0] < got[1] < 0


def test_generate_until_stops_and_groups(adapter):
    from lm.sampling.sampler import generate

    prompts = ["Once upon a time", "def f(x):", "Question: why?\nAnswer:"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6}), i)
            for i, p in enumerate(prompts)]
    reqs.append(Instance("generate_until", {}, (prompts[0], {"until": "zzz", "max_gen_toks": 3}), 3))
    out = adapter.generate_until(reqs)
    tok = adapter.tok

    def by_hand(ps, n):  # greedy decoding in a batch of the adapter's shape (no new compilation)
        ids = [tok.encode(p, bos=True) for p in ps]
        new = generate(adapter.run.graphdef, adapter.run.params, ids + [ids[-1]] * (8 - len(ids)), n, 64,
                       temperature=0.0, stop_ids=[tok.eos_id], bucket=64)
        return [adapter._continuation(i, [t for t in k if t != tok.eos_id]) for i, k in zip(ids, new)]

    assert out[:3] == [t.split("\n")[0] for t in by_hand(prompts, 6)]  # cut at the stop string
    assert out[3] == by_hand(prompts[:1], 3)[0].split("zzz")[0]
    assert not any("\n" in o for o in out[:3])
    with pytest.raises(ValueError, match="max_gen_toks=64"):
        adapter.generate_until([Instance("generate_until", {}, ("x", {"max_gen_toks": 64}), 0)])


def test_continuation_keeps_the_leading_space(adapter):
    tok = adapter.tok
    prompt, whole = tok.encode("The cat", bos=True), tok.encode("The cat sat down", bos=True)
    assert whole[: len(prompt)] == prompt
    new = whole[len(prompt):]
    assert adapter._continuation(prompt, new) == " sat down"
    assert tok.decode(new) == "sat down"  # what decoding the new ids alone gives
