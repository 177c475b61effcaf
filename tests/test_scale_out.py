"""Post-training split over the devices: a rollout's rows are decoded by every device of the
mesh (each its share), not repeated on each, whatever the parameters' sharding (data
parallel, FSDP, tensor parallel), and sample what one device samples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import Config, DataConfig, MeshConfig, ModelConfig
from lm.model.sharding import make_mesh
from lm.sampling.sampler import rollout, rows_sharding
from lm.train.engine import make_engine

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                  init_std=0.2)


def _prompts(p: int):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, p).astype(np.int32)
    tokens = np.zeros((p, 8), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = rng.integers(3, CFG.vocab_size, n)
    return tokens, lengths


@pytest.mark.parametrize("mesh", [MeshConfig(data=8, fsdp=1, tensor=1), MeshConfig(data=1, fsdp=8, tensor=1),
                                  MeshConfig(data=4, fsdp=1, tensor=2)], ids=["data8", "fsdp8", "data4-tensor2"])
def test_each_device_decodes_an_eighth_of_a_rollout(mesh):
    """16 prompts x 2 samples on 8 devices: the outputs come back as 8 shards of 4 rows, one per
    device (each device's program decodes its 4 rows: the compiled loop's shapes are local);
    the parameters stay sharded as the run lays them out; the rows equal one device's."""
    cfg = _config(mesh)
    m = make_mesh(cfg.mesh)
    engine = make_engine(cfg, m)
    params = jax.device_put(_params(engine), engine.param_sharding)
    if mesh.fsdp == 8:  # FSDP: each device holds an eighth of the large matrices
        wq = params["blocks"]["attn"]["wq"][...]
        assert wq.addressable_shards[0].data.size * 8 == wq.size
    tokens, lengths = _prompts(16)
    rows = rows_sharding(m)
    put = lambda a: jax.device_put(np.repeat(a, 2, axis=0), rows)  # noqa: E731
    key = jax.random.PRNGKey(7)
    out, count, logps = rollout(engine.graphdef, params, put(tokens), put(lengths), key, max_new=12, mesh=m)
    for a in (out, count, logps):
        shards = a.addressable_shards
        assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {4}, a.sharding
        assert len({s.device for s in shards}) == 8 and len({s.index[0].start for s in shards}) == 8
    single = rollout(engine.graphdef, jax.device_get(params), jnp.asarray(np.repeat(tokens, 2, 0)),
                     jnp.asarray(np.repeat(lengths, 2)), key, max_new=12)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(single[0]))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(single[1]))
    np.testing.assert_allclose(np.asarray(logps), np.asarray(single[2]), atol=2e-5)
    assert len({tuple(r) for r in np.asarray(out).tolist()}) > 8  # rows differ: sampled, not one row copied


def _config(mesh):
    return dataclasses.replace(Config(), model=CFG, mesh=mesh, data=DataConfig(seq_len=64, batch_size=8))


def _params(engine):
    from lm.model.transformer import Transformer

    return nnx.state(Transformer(engine.cfg.model, nnx.Rngs(0)), nnx.Param)


def test_prompts_that_do_not_split_are_refused_and_rollouts_pad_them():
    from lm.stages import rollouts

    m = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    engine = make_engine(_config(MeshConfig(data=8, fsdp=1, tensor=1)), m)
    params = _params(engine)
    tokens, lengths = _prompts(6)
    with pytest.raises(ValueError, match="6 prompts do not split over 8 devices"):
        rollout(engine.graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                max_new=4, mesh=m)

    class Tok:  # prompts given as token ids already
        eos_id = 2

    sampler = rollouts.Sampler.__new__(rollouts.Sampler)
    sampler.ids = [list(t[:n]) for t, n in zip(tokens, lengths)]
    sampler.width, sampler.stops, sampler.max_new = 8, [2], 5
    sampler.response_width, sampler.max_tool_calls = 5, 0
    s = rollouts.sample(engine.graphdef, params, sampler, [0, 1, 2, 3, 4, 5], jax.random.PRNGKey(0), 1.0, m)
    alone = rollouts.sample(engine.graphdef, params, sampler, [0, 1, 2, 3, 4, 5], jax.random.PRNGKey(0), 1.0)
    assert s.out.shape == (6, 5) and s.local.all()
    np.testing.assert_array_equal(s.out, alone.out)


# -- the decode engine split over tensor-parallel devices -----------------------------------

TP_CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, d_ff=128, max_seq_len=64,
                     init_std=0.2)
TP_PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("tensor", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
def test_split_decoding_is_token_for_token_one_devices(tensor):
    """Greedy batches (generate), token streams (stream) and the server's batcher with the
    weights split over 2, 4 and 8 devices give one device's tokens; each device holds 1/N of
    the attention and MLP matrices and 1/N of the cache."""
    from lm.model.transformer import Transformer
    from lm.sampling import decode
    from lm.sampling.sampler import generate, stream
    from lm.serve.batching import Batcher, Request

    graphdef, params = nnx.split(Transformer(TP_CFG, nnx.Rngs(0)), nnx.Param)
    one = generate(graphdef, params, TP_PROMPTS, 12, 64, temperature=0.0)
    w = decode.prepare(graphdef, params, tensor=tensor)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        a = w.layers[0][name]
        assert len(a.addressable_shards) == tensor and a.addressable_shards[0].data.size * tensor == a.size
    assert generate(graphdef, params, TP_PROMPTS, 12, 64, temperature=0.0, weights=w) == one
    assert list(stream(graphdef, params, TP_PROMPTS[2], 12, 64, temperature=0.0, weights=w)) == one[2]
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    assert (generate(graphdef, params, TP_PROMPTS, 12, 64, weights=w, **sampled)
            == generate(graphdef, params, TP_PROMPTS, 12, 64, **sampled))
    cache = decode.new_cache(w, 4, 64)
    assert cache[0]["k"].addressable_shards[0].data.shape[0] * tensor == 4 * TP_CFG.n_kv_heads
    got = {}
    batcher = Batcher(w, lambda prompt, ids: " ".join(map(str, ids)), slots=4, max_len=64, log=lambda *_: None)
    batcher.start(warm=False)
    try:
        done = []
        for i, p in enumerate(TP_PROMPTS):
            batcher.submit(Request(p, 12, stream=False), lambda ev, i=i: ev.finish and (got.setdefault(i, ev.tokens),
                                                                                      done.append(i)))
        import time

        deadline = time.monotonic() + 120
        while len(done) < len(TP_PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        batcher.close()
    assert [got[i] for i in range(len(TP_PROMPTS))] == one


def test_split_decoding_refuses_heads_that_do_not_divide():
    from lm.model.transformer import Transformer
    from lm.sampling import decode

    graphdef, params = nnx.split(Transformer(TP_CFG, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="^model.n_kv_heads=8 must divide by the 16 tensor-parallel devices"):
        decode.prepare(graphdef, params, tensor=16)


@pytest.mark.slow
def test_lm_sample_with_tensor_parallel_weights_writes_what_one_device_writes(base_run, capsys):
    from lm.cli import main

    outs = []
    for tensor in ("1", "2"):
        assert main(["sample", base_run["run"], "--prompt", "def read(path):", "--temperature", "0", "--max-new", "24",
                     "--tensor", tensor]) == 0
        outs.append(capsys.readouterr())
    text = [[line for line in o.out.splitlines() if not line.startswith("decode weights")] for o in outs]
    assert text[0] == text[1] and len("".join(text[0])) >= len("def read(path):")
    assert "decode weights split over 2 devices" in outs[1].out + outs[1].err
