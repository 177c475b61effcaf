"""Post-training split over the devices: a rollout's rows are decoded by every device of the
mesh (each its share), not repeated on each, whatever the parameters' sharding (data
parallel, FSDP, tensor parallel), and sample what one device samples."""

import dataclasses
import math
from functools import partial

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


@pytest.mark.parametrize("mesh", [MeshConfig(data=8, fsdp=1, tensor=1),
                                  pytest.param(MeshConfig(data=1, fsdp=8, tensor=1), marks=pytest.mark.slow),
                                  pytest.param(MeshConfig(data=4, fsdp=1, tensor=2), marks=pytest.mark.slow)],
                         ids=["data8", "fsdp8", "data4-tensor2"])
def test_each_device_decodes_an_eighth_of_a_rollout(mesh):
    """16 prompts x 2 samples on 8 devices: each device's program decodes its share (the
    compiled loop's shapes are local): with data or FSDP parallelism 4 of the 32 rows, with
    tensor=2 the 8 rows of its pair of devices with half of the heads and MLP width each (the
    outputs come back as 4 blocks of 8 rows, each on both devices of a pair); the weights
    are read sharded as the run lays them out; the rows equal one device's."""
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
    per_device, blocks = (8, 4) if mesh.tensor == 2 else (4, 8)
    for a in (out, count, logps):
        shards = a.addressable_shards
        assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {per_device}, a.sharding
        assert len({s.device for s in shards}) == 8 and len({s.index[0].start for s in shards}) == blocks
    single = rollout(engine.graphdef, jax.device_get(params), jnp.asarray(np.repeat(tokens, 2, 0)),
                     jnp.asarray(np.repeat(lengths, 2)), key, max_new=12)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(single[0]))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(single[1]))
    np.testing.assert_allclose(np.asarray(logps), np.asarray(single[2]), atol=2e-5)
    assert len({tuple(r) for r in np.asarray(out).tolist()}) > 8  # rows differ: sampled, not one row copied


@pytest.mark.parametrize("mesh,split", [pytest.param(MeshConfig(data=1, fsdp=8, tensor=1), 8, marks=pytest.mark.slow),
                                        pytest.param(MeshConfig(data=4, fsdp=1, tensor=2), 2, marks=pytest.mark.slow),
                                        (MeshConfig(data=2, fsdp=2, tensor=2), 4)],
                         ids=["fsdp8", "data4-tensor2", "data2-fsdp2-tensor2"])
def test_rollouts_decode_with_the_weights_sharded_as_the_run_lays_them_out(mesh, split):
    """The weights the rollout sampler decodes with (lm.stages.rollouts.sample, RL's) are laid
    out on the run's mesh: each device holds 1/split of every layer's matrices (over fsdp along
    the model width, over tensor by heads and MLP columns) and its program reads that share
    as it lies, not a whole copy gathered on entry: the shard_map's weights are local shapes."""
    from lm.sampling import decode, sampler
    from lm.stages import rollouts

    cfg = _config(mesh)
    m = make_mesh(cfg.mesh)
    engine = make_engine(cfg, m)
    params = jax.device_put(_params(engine), engine.param_sharding)
    seen = []
    prepare = decode.prepare

    def spy(*args, **kwargs):
        seen.append(prepare(*args, **kwargs))
        return seen[-1]

    s = _sampler(16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "prepare", spy)
        got = rollouts.sample(engine.graphdef, params, s, list(range(16)), jax.random.PRNGKey(0), 1.0, m)
    (w,) = seen
    assert w.mesh is m
    for layer in w.layers:
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            a = layer[name]
            assert {sh.data.size * split for sh in a.addressable_shards} == {a.size}, (name, a.sharding)
    # what each device's program holds: the shard_map's weights at their local shapes
    tokens, lengths = s.arrays(list(range(16)))
    args = (w, jnp.asarray(tokens), jnp.asarray(lengths), sampler._bases(jax.random.PRNGKey(0), 16), jnp.float32(1),
            jnp.float32(1), jnp.asarray([2]))
    inner = _shard_map(jax.make_jaxpr(partial(sampler._generate_split, max_new=4, top_k=0, samples=1))(*args).jaxpr)
    local = jax.tree.unflatten(jax.tree.structure(w), [v.aval for v in inner.invars[: len(jax.tree.leaves(w))]])
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        assert math.prod(local.layers[0][name].shape) * split == w.layers[0][name].size, name
    alone = rollouts.sample(engine.graphdef, jax.device_get(params), s, list(range(16)), jax.random.PRNGKey(0), 1.0)
    np.testing.assert_array_equal(got.out, alone.out)


@pytest.mark.slow
def test_fsdp_rollouts_hold_about_one_layer_whole_at_a_time():
    """With mesh.fsdp=8 each device holds an eighth of the weights, and the compiled rollout
    gathers a layer's matrices only while that layer runs: the program's arguments and
    temporaries per device stay well below one whole copy of the weights (which XLA would
    hold if it gathered every layer at the start of each step, or on entry)."""
    from lm.sampling import decode, sampler

    model = dataclasses.replace(CFG, n_layers=4, d_model=128, d_ff=512)
    cfg = dataclasses.replace(_config(MeshConfig(data=1, fsdp=8, tensor=1)), model=model)
    m = make_mesh(cfg.mesh)
    engine = make_engine(cfg, m)
    params = jax.jit(engine._init_params, static_argnums=0, out_shardings=engine.param_sharding)(0)
    w = decode.prepare(engine.graphdef, params, mesh=m)
    per_device, whole = decode.weight_bytes(w)
    layers = whole - sum(a.size * a.dtype.itemsize for a in (w.embed, w.out, w.final_norm))
    rows = rows_sharding(m)
    tokens, lengths = _prompts(16)
    compiled = sampler._generate_split.lower(
        w, jax.device_put(tokens, rows), jax.device_put(lengths, rows), sampler._bases(jax.random.PRNGKey(0), 16),
        jnp.float32(1), jnp.float32(1), jnp.asarray([2]), max_new=8, top_k=0, samples=1).compile()
    mem = compiled.memory_analysis()
    held = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    assert per_device < whole / 4 and held < per_device + 3 * layers / model.n_layers, (per_device, whole, held)


@pytest.mark.slow
def test_fsdp_devices_whose_rows_are_done_wait_for_the_others():
    """Under FSDP each step gathers the weights across devices that decode different rows: a
    device whose rows are all done (here row 0's, stopped by its first greedy token) keeps
    stepping with the others until they are done too (alone it would leave them waiting in
    the gather), and every row is one device's."""
    cfg = _config(MeshConfig(data=1, fsdp=8, tensor=1))
    m = make_mesh(cfg.mesh)
    engine = make_engine(cfg, m)
    params = jax.jit(engine._init_params, static_argnums=0, out_shardings=engine.param_sharding)(0)
    tokens, lengths = _prompts(8)
    key = jax.random.PRNGKey(0)
    alone = rollout(engine.graphdef, jax.device_get(params), jnp.asarray(tokens), jnp.asarray(lengths), key,
                    max_new=12, temperature=0.0)
    stop = int(alone[0][0, 0])
    single = [np.asarray(a) for a in rollout(engine.graphdef, jax.device_get(params), jnp.asarray(tokens),
                                             jnp.asarray(lengths), key, max_new=12, temperature=0.0, stop_ids=[stop])]
    assert single[1][0] == 1 and single[1].max() > 1  # row 0 stops at once, some other row goes on
    rows = rows_sharding(m)
    split = rollout(engine.graphdef, params, jax.device_put(tokens, rows), jax.device_put(lengths, rows), key,
                    max_new=12, temperature=0.0, stop_ids=[stop], mesh=m)
    np.testing.assert_array_equal(np.asarray(split[0]), single[0])
    np.testing.assert_array_equal(np.asarray(split[1]), single[1])


def _sampler(p: int):
    from lm.stages import rollouts

    tokens, lengths = _prompts(p)  # given as token ids already
    s = rollouts.Sampler.__new__(rollouts.Sampler)
    s.ids = [list(t[:n]) for t, n in zip(tokens, lengths)]
    s.width, s.stops, s.max_new = 8, [2], 5
    s.response_width, s.max_tool_calls = 5, 0
    return s


def _shard_map(jaxpr):
    """The first shard_map's inner jaxpr in `jaxpr` (searched through nested calls)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            return eqn.params["jaxpr"]
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            found = inner is not None and _shard_map(inner)
            if found:
                return found
    return None


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

    sampler = _sampler(6)
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
