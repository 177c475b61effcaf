"""The decode engine and the sampler: cached decoding equals a full forward pass, sampling options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sampling import decode
from lm.sampling.sampler import filter_logits, generate, rollout, stream

prefill = jax.jit(decode.prefill)
step = jax.jit(decode.step, static_argnames="span")
pick = jax.jit(decode.pick, static_argnames="top_k")
CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


@pytest.mark.parametrize("batch,prompt_lengths,kv,extra", [(1, [5], 2, {}), (3, [1, 7, 4], 2, {}),
                                                            (4, [6, 6, 2, 9], 1, {"qk_norm": True}),
                                                            (2, [3, 8], 4, {"tie_embeddings": True})])
def test_cached_decoding_equals_full_forward(batch, prompt_lengths, kv, extra):
    """The decode engine (prefill, then one token per step from each row's own length, the
    cache read in spans shorter than itself) gives the logits of a full forward pass."""
    cfg = dataclasses.replace(CFG, n_kv_heads=kv, **extra)
    model = Transformer(cfg, nnx.Rngs(0))
    w = decode.prepare(*nnx.split(model, nnx.Param))
    total = 12
    x = np.random.default_rng(batch).integers(0, 97, (batch, total))
    full = np.asarray(model(jnp.asarray(x, jnp.int32)))  # (B, T, V)

    lengths = np.asarray(prompt_lengths)
    width = int(lengths.max())
    prompt = np.where(np.arange(width)[None] < lengths[:, None], x[:, :width], 0)
    last, kvs = prefill(w, jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths, jnp.int32))
    np.testing.assert_allclose(last, full[np.arange(batch), lengths - 1], atol=2e-5)
    # the prefill into a cache of 16 slots, then teacher forcing, attending over spans of 8
    # slots while every position is below 8, then over all 16
    cache = decode.write_prefill(cfg, decode.init_cache(cfg, batch, 16), kvs, 0)
    for i in range(total - width):
        p = lengths + i
        span = decode.span_for(int(p.max()) + 1, 16, bucket=8)
        logits, cache = step(w, jnp.asarray(x[np.arange(batch), p], jnp.int32), jnp.asarray(p, jnp.int32),
                                    cache, span)
        np.testing.assert_allclose(logits, full[np.arange(batch), p], atol=2e-5)


def test_prefill_into_a_slot_of_a_used_cache():
    """A server slot is reused: a new prompt prefilled into row 1 of a cache whose rows hold
    other sequences' keys/values decodes as if alone, and leaves the other rows untouched."""
    model = Transformer(CFG, nnx.Rngs(4))
    w = decode.prepare(*nnx.split(model, nnx.Param))
    rng = np.random.default_rng(0)
    cache = [{n: jnp.asarray(rng.normal(size=c[n].shape), jnp.float32) for n in c}
             for c in decode.init_cache(CFG, 3, 20)]  # stale values everywhere
    before = [np.asarray(c["k"]) for c in cache]
    seq = rng.integers(1, 97, 9)
    full = np.asarray(model(jnp.asarray(seq[None], jnp.int32)))[0]
    last, kvs = prefill(w, jnp.asarray(np.pad(seq[:4], (0, 4))[None], jnp.int32), jnp.asarray([4]))
    cache = decode.write_prefill(CFG, cache, kvs, 1)
    np.testing.assert_allclose(last[0], full[3], atol=2e-5)
    for p in range(4, 9):  # rows 0 and 2 step too, at their own (arbitrary) positions
        tokens = jnp.asarray([5, seq[p], 7], jnp.int32)
        logits, cache = step(w, tokens, jnp.asarray([15, p, 2], jnp.int32), cache, 20)
        np.testing.assert_allclose(logits[1], full[p], atol=2e-5)
    k = CFG.n_kv_heads
    after = np.asarray(cache[0]["k"])
    untouched = np.ones(after.shape[:2], bool)
    untouched[:k, 15] = untouched[2 * k:, 2:9] = False  # what rows 0 and 2 wrote
    untouched[k: 2 * k] = False  # row 1: the new sequence
    np.testing.assert_array_equal(after[untouched], before[0][untouched])


def test_pick_per_row_options():
    """One batch, each row with its own temperature, top-p and key: greedy rows are the
    argmax, a row's draw depends on its own key only, top-p keeps the nucleus."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
    keys = decode.seed_keys(jnp.asarray([1, 2, 3, 4]), jnp.asarray([0, 0, 0, 0]))
    t = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    p = jnp.asarray([1.0, 1.0, 1e-6, 0.5])
    nxt, logps = pick(logits, keys, t, p)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    assert nxt[0] == argmax[0] and nxt[3] == argmax[3] and nxt[2] == argmax[2]  # top-p 1e-6: the top token
    np.testing.assert_allclose(logps, decode.token_logps(logits, nxt, t[:, None]), atol=1e-6)
    # row 1 alone, or beside different rows, draws the same token
    alone, _ = pick(logits[1:2], keys[1:2], t[1:2], p[1:2])
    assert alone[0] == nxt[1]
    draws = {int(pick(logits[1:2], decode.seed_keys(jnp.asarray([s]), jnp.asarray([0])), t[1:2], p[1:2])[0][0])
             for s in range(40)}
    assert len(draws) > 3  # it does sample
    assert decode.argmax(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]))[0] == 1  # the first maximum, as jnp.argmax


def test_rollout_samples_share_a_prefill():
    """rollout(P prompts, samples=G) equals rollout of the P*G rows spelled out (each row's
    draws depend on its key and row index only)."""
    model = Transformer(CFG, nnx.Rngs(5))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = np.zeros((2, 6), np.int32)
    tokens[0, :3], tokens[1, :6] = [4, 5, 6], [7, 8, 9, 10, 11, 12]
    lengths = np.asarray([3, 6], np.int32)
    key = jax.random.PRNGKey(3)
    a = rollout(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), key, max_new=7, samples=3)
    b = rollout(graphdef, params, jnp.asarray(np.repeat(tokens, 3, 0)), jnp.asarray(np.repeat(lengths, 3)), key,
                max_new=7)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert len({tuple(r) for r in np.asarray(a[0])[:3].tolist()}) > 1  # the samples of a prompt differ


def test_greedy_generation_equals_repeated_full_forward():
    model = Transformer(CFG, nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    out = generate(graphdef, params, prompts, max_new=6, max_len=64, temperature=0.0)
    # the full forward of each sequence so far, padded to 16 tokens (one compiled program;
    # causal attention: the padding after position n - 1 does not change its logits)
    forward = jax.jit(lambda x: model(x))
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(6):
            logits = forward(jnp.asarray([seq + [0] * (16 - len(seq))], jnp.int32))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
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


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 8, 1), (2, 2, 2), pytest.param(1, 2, 4, marks=pytest.mark.slow)])
def test_sampling_with_parameters_sharded_by_the_training_rules(data, fsdp, tensor):
    """The sampler runs on parameters laid out by the training mesh rules, with the same result."""
    import jax

    from lm.config import Config, DataConfig, MeshConfig
    from lm.model.sharding import make_mesh, use_mesh
    from lm.train.engine import make_trainer

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
