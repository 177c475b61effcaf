"""`lm plan`: the train step compiled ahead of time for N devices, and its accounting."""

import dataclasses

import pytest

from lm import experiment
from lm.config import MeshConfig
from lm.tools import plan


def tiny(**mesh):
    cfg = experiment.load("pretrain_tiny")
    model = dataclasses.replace(cfg.model, vocab_size=512, d_model=64, n_layers=2, d_ff=128, max_seq_len=64)
    return dataclasses.replace(cfg, model=model, mesh=MeshConfig(**mesh), optim=dataclasses.replace(cfg.optim, name="adamw"),
                               data=dataclasses.replace(cfg.data, batch_size=8, seq_len=64))


def state_bytes(cfg):
    from lm.model.transformer import param_count

    return param_count(cfg.model) * 4 * 3  # float32 parameters + two Adam moments


def test_fsdp_over_8_devices_holds_an_eighth_of_the_state_each():
    cfg = tiny(data=1, fsdp=8, tensor=1)
    r = plan.plan(cfg, 8, hbm_gib=80)
    per_device = r["param_bytes"] + r["opt_bytes"]
    assert per_device == pytest.approx(state_bytes(cfg) / 8, rel=0.10)
    assert r["temp_bytes"] > 0 and r["fits"] and not r["advice"]
    assert r["flops_xla"] > r["flops_analytic"] > 0  # XLA also counts recomputation (remat=full) and the optimiser
    assert "fits" in plan.report(r)


def test_data_parallel_replicates_the_state_and_a_config_that_cannot_fit_says_so():
    cfg = tiny(data=8, fsdp=1, tensor=1)
    r = plan.plan(cfg, 8, hbm_gib=0.001)
    assert r["param_bytes"] + r["opt_bytes"] == pytest.approx(state_bytes(cfg), rel=0.01)
    assert not r["fits"]
    text = plan.report(r)
    assert "DOES NOT FIT" in text and "shard them" in text


def test_advice_when_activations_do_not_fit():
    cfg = tiny(data=1, fsdp=8, tensor=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="none"))
    r = plan.plan(cfg, 8, hbm_gib=80)
    state = r["param_bytes"] + r["opt_bytes"] + r["batch_bytes"]
    r2 = dict(r, hbm_bytes=state + r["temp_bytes"] // 3, fits=False)
    advice = plan.advice(r2, cfg)
    assert any("model.remat=full" in a for a in advice)
    assert any("trainer.microbatches=4" in a for a in advice)  # a quarter of the temporaries fits a third


def test_three_devices_name_the_divisibility_and_the_fsdp_that_shards_nothing():
    """`lm plan --devices 3`: a batch that does not divide is named as such (not "smaller"), and
    FSDP over 3 devices, which no dimension of the model divides by, says that it shards nothing."""
    cfg = tiny(data=1, fsdp=-1, tensor=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=16))
    logged = []
    r = plan.plan(cfg, 3, hbm_gib=80, log=logged.append)
    text = "\n".join(logged)
    assert "does not divide over 3 data-parallel devices" in text and "smaller" not in text, text
    assert "data.batch_size=18" in text
    assert "mesh.fsdp=3 shards none of the parameters" in text, text
    assert r["param_bytes"] == plan.param_count(cfg.model) * 4  # whole on each device, as the note says
    _, notes = plan.fit_batch(cfg, 32)
    assert "smaller than the 32 data-parallel devices" in notes[0]


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_serve_plan_of_base_against_a_hand_computation(devices):
    """`lm plan --serve`: base (D 2048, L 22, N 16, K 8, H 128, F 5632, V 32000, bfloat16, untied)
    with 8 slots of 4096 tokens. Weights: the embedding and the output projection whole on
    every device (V*D each), per layer q/k/v (D*(N+2K)*H), the output projection (N*H*D) and
    the MLP (3*D*F) split N ways, two norms whole; the final norm in float32. Cache: keys and
    values per layer, slot, token and key/value head, split N ways."""
    cfg = experiment.load("pretrain_base")
    m = cfg.model
    d, layers, n, k, h, f, v = 2048, 22, 16, 8, 128, 5632, 32000
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_size, m.d_ff, m.vocab_size) == (d, layers, n, k, h,
                                                                                                   f, v)
    split = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    weights = 2 * (2 * v * d + layers * (split // devices + 2 * d)) + 4 * d
    cache = 2 * layers * 8 * (k // devices) * 4096 * h * 2
    r = plan.serve_plan(m, devices, slots=8, max_len=4096)
    assert r["weight_bytes"] == weights and r["cache_bytes"] == cache
    assert r["logits_bytes"] == 8 * v * 4 and r["fits"]
    if devices == 1:  # 88 KiB of cache per token: 22 layers x 8 heads x 128 x (key, value) x 2 bytes
        assert r["weight_bytes_all"] == weights and cache == 8 * 4096 * 88 * 1024
    assert "--tensor %d" % devices in plan.serve_report(r)


def test_serve_plan_refuses_a_split_that_cuts_heads():
    cfg = experiment.load("pretrain_base")
    with pytest.raises(ValueError, match="model.n_kv_heads=8 must divide by the 16"):
        plan.serve_plan(cfg.model, 16)


@pytest.mark.slow
def test_serve_plan_counts_what_the_split_engine_holds():
    """The plan's per-device weights and cache are what `lm serve --tensor N` allocates on 1, 2
    and 8 devices: the decode weights split over N devices (decode.weight_bytes of the real
    arrays) and a cache of 4 slots x 64 tokens (each device's shard of the real cache)."""
    import math

    from flax import nnx

    from lm.config import ModelConfig
    from lm.model.transformer import Transformer
    from lm.sampling import decode

    model = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, d_ff=128, max_seq_len=64,
                        compute_dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(model, nnx.Rngs(0)), nnx.Param)
    one = decode.prepare(graphdef, params)
    shard = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize  # noqa: E731
    for devices in (1, 2, 8):
        w = one if devices == 1 else decode.split(one, devices)
        cache = decode.new_cache(w, 4, 64)
        r = plan.serve_plan(model, devices, slots=4, max_len=64)
        assert (r["weight_bytes"], r["weight_bytes_all"]) == decode.weight_bytes(w), devices
        assert r["cache_bytes"] == sum(shard(a) for layer in cache for a in layer.values()), devices
        assert len(cache[0]["k"].addressable_shards) == devices
