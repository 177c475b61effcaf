"""Inference options of the decode engine: int8 weights (per-output-channel scales)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sampling import decode

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                  init_std=0.2)


def test_int8_matrices_round_to_their_columns_scale_and_take_a_quarter_of_the_bytes():
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)), nnx.Param)
    w = decode.prepare(graphdef, params)
    q = decode.prepare(graphdef, params, int8=True)
    for name in decode.QUANTIZED:
        m, iq = np.asarray(w.layers[1][name]), q.layers[1][name]
        assert iq.q.dtype == jnp.int8 and iq.scale.shape == (m.shape[1],)
        back = np.asarray(iq.q, np.float32) * np.asarray(iq.scale)
        assert np.all(np.abs(back - m) <= np.asarray(iq.scale) / 2 + 1e-7)  # round to nearest, per column
        assert np.abs(np.asarray(iq.q)).max(axis=0).min() == 127  # each column's largest weight uses the range
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    matrices = lambda ws: [layer[n] for layer in ws.layers for n in decode.QUANTIZED] + [ws.out]  # noqa: E731
    assert size(matrices(q)) < 0.27 * size(matrices(w))
    with pytest.raises(ValueError, match="int8 weights split over several devices"):
        decode.prepare(graphdef, params, tensor=2, int8=True)


@pytest.mark.slow  # trains nothing, but scores the held-out set twice; CI's slow phase runs it
def test_int8_weights_keep_the_held_out_loss_within_one_percent(base_run):
    """On the trained base run's held-out text: the int8 engine's next-token loss is within 1%
    of the float32 engine's, which is the model's own (the training forward pass); and greedy
    continuations mostly agree."""
    from data_pipeline.tokenizer import Tokenizer
    from lm.sampling.sampler import generate
    from lm.train.run import load_run

    run = load_run(base_run["run"], log=lambda *_: None)
    tok = Tokenizer(base_run["run"] + "/tokenizer.model")
    text = open(jax.__file__.replace("__init__.py", "numpy/__init__.py")).read()  # text the run did not train on
    ids = tok.encode(text[:20000], bos=False)
    t = run.cfg.model.max_seq_len
    rows = np.asarray([ids[i: i + t] for i in range(0, len(ids) - t, t)][:32], np.int32)
    mask = np.ones((rows.shape[0], t - 1), np.float32)
    f32 = decode.prepare(run.graphdef, run.params)
    q = decode.prepare(run.graphdef, run.params, int8=True)
    nll, nll_q = (float(decode.next_token_nll(w, jnp.asarray(rows), jnp.asarray(mask))) for w in (f32, q))
    logits = nnx.merge(run.graphdef, run.params)(jnp.asarray(rows[:, :-1]))
    model_nll = float(-jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(rows[:, 1:, None]), -1).mean())
    assert nll == pytest.approx(model_nll, rel=1e-4)
    assert abs(nll_q - nll) / nll < 0.01, (nll, nll_q)
    prompts = [list(r[:8]) for r in rows[:8]]
    a = generate(run.graphdef, run.params, prompts, 16, t, temperature=0.0, weights=f32)
    b = generate(run.graphdef, run.params, prompts, 16, t, temperature=0.0, weights=q)
    assert sum(x[:4] == y[:4] for x, y in zip(a, b)) >= 6  # the first tokens agree but for near-ties


def test_lm_sample_quantize_int8(base_run, capsys):
    from lm.cli import main

    assert main(["sample", base_run["run"], "--prompt", "def f(x):", "--temperature", "0", "--max-new", "8",
                 "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert "decode weights in int8" in out.out + out.err and "def f(x):" in out.out
    assert main(["sample", base_run["run"], "--quantize", "int8", "--tensor", "2", "--prompt", "x"]) == 2
    assert "not supported yet" in capsys.readouterr().err


@pytest.mark.slow  # three CLI runs on the base run; CI's slow phase runs it
def test_lm_sample_drafts_with_its_own_int8_weights(base_run, capsys):
    """`--draft int8`: the run's own weights in int8 draft for it; greedy output is the run's own."""
    from lm.cli import main

    args = ["sample", base_run["run"], "--prompt", "def f(x):", "--temperature", "0", "--max-new", "24"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main(args + ["--draft", "int8", "--draft-k", "3", "--speedup"]) == 0
    out = capsys.readouterr()
    said = "drafting with this run's own weights in int8\n"
    assert said in out.out + out.err and out.out.replace(said, "") == alone
    assert "drafted tokens accepted" in out.err and "the target alone" in out.err
