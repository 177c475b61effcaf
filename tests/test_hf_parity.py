"""Logits parity with transformers' LlamaForCausalLM (skipped when torch/transformers are
absent; CI installs them)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import SHAPE_IDS, SHAPES, random_model, random_tokens

from lm.interop.hf import export_llama, import_llama, load_model

torch = pytest.importorskip("torch", reason="torch not installed (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")


def _hf_logits(path, tokens):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


# one shape in `make test`, the other two in CI's slow phase (as test_hf's round trips)
@pytest.mark.parametrize("cfg", [SHAPES[0]] + [pytest.param(c, marks=pytest.mark.slow) for c in SHAPES[1:]],
                         ids=SHAPE_IDS)
def test_exported_model_matches_transformers(cfg, tmp_path):
    model = random_model(cfg, seed=3)
    export_llama(cfg, nnx.state(model, nnx.Param), str(tmp_path))
    x = random_tokens(cfg)
    np.testing.assert_allclose(_hf_logits(str(tmp_path), x), np.asarray(model(x)), atol=1e-4)


@pytest.mark.parametrize("kv,tied,theta", [(2, False, 10000.0), (4, True, 250000.0)] + [
    pytest.param(*c, marks=pytest.mark.slow)
    for c in ((1, False, 500000.0), (4, False, 250000.0), (4, True, 10000.0), (2, False, 250000.0))])
def test_imported_transformers_model_matches(kv, tied, theta, tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv, rope_theta=theta,
                                      rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():  # non-trivial norms
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = import_llama(str(tmp_path))
    x = np.random.default_rng(1).integers(0, 89, (2, 10))
    np.testing.assert_allclose(np.asarray(load_model(cfg, params)(jnp.asarray(x))), _hf_logits(str(tmp_path), x),
                               atol=1e-4)


def test_tokenizer_and_greedy_continuation_match_transformers(tmp_path):
    from data_pipeline.tokenizer import train_tokenizer
    from lm.sampling.sampler import generate

    rng = np.random.default_rng(0)
    words = "def return self import class value name the of and for in if else".split()
    texts = [" ".join(rng.choice(words, 60)) + "\n    x = 1\n" for _ in range(100)]
    tok = train_tokenizer(texts, 320, str(tmp_path / "sp"))
    cfg = SHAPES[0].__class__(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                              max_seq_len=64)
    model = random_model(cfg, seed=5)
    out = tmp_path / "hf"
    export_llama(cfg, nnx.state(model, nnx.Param), str(out), tokenizer_model=tok.path)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ["def name(self):\n    return value", "import the class of  values 12", "import x\n\nclass y"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    prompt = tok.encode("def name", bos=True)
    graphdef, params = nnx.split(model, nnx.Param)
    ours = generate(graphdef, params, [prompt], max_new=12, max_len=64, temperature=0.0)[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_post_trained_models_export_with_their_heads(tmp_path):
    """A PPO policy (with its training-only value head) exports as a causal LM with the same
    logits; a reward model exports as LlamaForSequenceClassification whose score, read by
    transformers at each row's last non-padding token, equals our reward head there."""
    import dataclasses

    base = dataclasses.replace(SHAPES[0], vocab_size=89)
    policy = random_model(dataclasses.replace(base, scalar_heads=("value",)), seed=7)
    export_llama(policy.cfg, nnx.state(policy, nnx.Param), str(tmp_path / "policy"))
    x = jnp.asarray(np.random.default_rng(2).integers(1, 89, (3, 12)), jnp.int32)
    np.testing.assert_allclose(_hf_logits(str(tmp_path / "policy"), x), np.asarray(policy(x)), atol=1e-4)

    rm = random_model(dataclasses.replace(base, scalar_heads=("reward",)), seed=8)
    export_llama(rm.cfg, nnx.state(rm, nnx.Param), str(tmp_path / "rm"), pad_id=0)
    lengths = np.array([12, 7, 3])
    x = np.asarray(x).copy()
    for r, n in enumerate(lengths):
        x[r, n:] = 0  # right padding
    seg = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), x.shape)
    h = rm.hidden(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)).reshape(3, 12, -1)
    ours = np.asarray(rm.scalar(h[jnp.arange(3), lengths - 1], "reward"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"),
                                                                         torch_dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        theirs = hf(torch.tensor(x, dtype=torch.long)).logits.numpy()[:, 0]
    assert np.abs(ours).max() > 1e-3  # a head that reads something
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
