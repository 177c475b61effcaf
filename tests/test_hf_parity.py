"""Logits parity with transformers' LlamaForCausalLM (skipped when torch/transformers are
absent; CI installs them)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.interop.hf import export_llama, import_llama, load_model
from test_hf import SHAPES, _random_model, _tokens

torch = pytest.importorskip("torch", reason="torch not installed (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")


def _hf_logits(path, tokens):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("cfg", SHAPES, ids=["gqa", "tied", "mqa-headdim"])
def test_exported_model_matches_transformers(cfg, tmp_path):
    model = _random_model(cfg, seed=3)
    export_llama(cfg, nnx.state(model, nnx.Param), str(tmp_path))
    x = _tokens(cfg)
    np.testing.assert_allclose(_hf_logits(str(tmp_path), x), np.asarray(model(x)), atol=1e-4)


@pytest.mark.parametrize("kv,tied,theta", [(2, False, 10000.0), (4, True, 250000.0), (1, False, 500000.0), (4, False, 250000.0), (4, True, 10000.0), (2, False, 250000.0)])
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
    from lm.sampling import generate

    rng = np.random.default_rng(0)
    words = "def return self import class value name the of and for in if else".split()
    texts = [" ".join(rng.choice(words, 60)) + "\n    x = 1\n" for _ in range(100)]
    tok = train_tokenizer(texts, 320, str(tmp_path / "sp"))
    cfg = SHAPES[0].__class__(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                              max_seq_len=64)
    model = _random_model(cfg, seed=5)
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
