"""The KV-cache sampler: cached decoding equals a full forward pass, and sampling options."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.sampling import filter_logits, generate, stream

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


@pytest.mark.parametrize("batch,prompt_lengths,kv", [(1, [5], 2), (3, [1, 7, 4], 2), (4, [6, 6, 2, 9], 1),
                                                      (2, [3, 8], 4)])
def test_cached_decoding_equals_full_forward(batch, prompt_lengths, kv):
    cfg = dataclasses.replace(CFG, n_kv_heads=kv)
    model = Transformer(cfg, nnx.Rngs(0))
    total = 12
    x = jnp.asarray(np.random.default_rng(batch).integers(0, 97, (batch, total)), jnp.int32)
    full = np.asarray(model(x))  # (B, T, V)

    # prefill prompts of different lengths, packed into one padded batch
    lengths = np.asarray(prompt_lengths)
    width = int(lengths.max())
    prompt = np.where(np.arange(width)[None] < lengths[:, None], np.asarray(x[:, :width]), 0)
    cache = model.init_cache(batch, total)
    pos = jnp.broadcast_to(jnp.arange(width), (batch, width))
    logits, cache = model.decode(jnp.asarray(prompt), pos, cache)
    for b in range(batch):
        np.testing.assert_allclose(logits[b, : lengths[b]], full[b, : lengths[b]], atol=2e-5)
    # then one token per step, each sequence from its own length (teacher forcing)
    for i in range(total - width):
        p = lengths + i
        tok = jnp.asarray(np.asarray(x)[np.arange(batch), p])[:, None]
        step_logits, cache = model.decode(tok, jnp.asarray(p)[:, None], cache)
        np.testing.assert_allclose(step_logits[:, 0], full[np.arange(batch), p], atol=2e-5)


def test_greedy_generation_equals_repeated_full_forward():
    model = Transformer(CFG, nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    out = generate(graphdef, params, prompts, max_new=6, max_len=64, temperature=0.0)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(6):
            seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])))
        assert o == seq[len(p):]
    # streaming gives the same tokens
    assert list(stream(graphdef, params, prompts[2], max_new=6, max_len=64, temperature=0.0)) == out[2]


def test_stop_tokens_and_sampling_options():
    model = Transformer(CFG, nnx.Rngs(2))
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = [[3, 4], [8, 9, 10]]
    greedy = generate(graphdef, params, prompts, max_new=8, max_len=64, temperature=0.0)
    # stopping at the greedy path's third token: it is produced, nothing after it
    stop = greedy[0][2]
    stopped = generate(graphdef, params, prompts, max_new=8, max_len=64, temperature=0.0, stop_ids=[stop])
    assert stopped[0] == greedy[0][: greedy[0].index(stop) + 1]
    # top-k=1 and a tiny top-p are greedy whatever the temperature
    assert generate(graphdef, params, prompts, 8, 64, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(graphdef, params, prompts, 8, 64, temperature=1.5, top_p=1e-6, seed=3) == greedy
    # sampling depends on the seed and is reproducible
    a = generate(graphdef, params, prompts, 8, 64, temperature=1.0, seed=1)
    assert a == generate(graphdef, params, prompts, 8, 64, temperature=1.0, seed=1)
    assert a != generate(graphdef, params, prompts, 8, 64, temperature=1.0, seed=2)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda f: np.isfinite(np.asarray(f))[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, 2, 1.0)) == [True, True, False, False]
    assert keep(filter_logits(logits, 0, 0.75)) == [True, True, False, False]  # 0.5 < 0.75 <= 0.8
    assert keep(filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert keep(filter_logits(logits, 0, 1.0)) == [True, True, True, True]


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sampling_with_parameters_sharded_by_the_training_rules(data, fsdp, tensor):
    """The sampler runs on parameters laid out by the training mesh rules, with the same result."""
    import jax

    from lm.config import Config, DataConfig, MeshConfig
    from lm.sharding import make_mesh, use_mesh
    from lm.engine import make_trainer

    cfg = Config(model=dataclasses.replace(CFG, n_heads=8, n_kv_heads=4, d_model=64),
                 mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor), data=DataConfig(seq_len=64))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    state, _ = trainer.init_state(0)
    assert not state.params["blocks"]["attn"]["wq"].get_value().sharding.is_fully_replicated
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4], [8, 8]]
    with use_mesh(trainer.mesh):
        sharded = generate(trainer.graphdef, state.params, prompts, 10, 64, temperature=0.0)
    single = generate(trainer.graphdef, jax.device_get(state.params), prompts, 10, 64, temperature=0.0)
    assert sharded == single
