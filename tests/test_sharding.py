"""Every data/fsdp/tensor split of 8 CPU devices computes what one device computes."""

import dataclasses

import jax
import numpy as np
import pytest

from data_pipeline.pipeline import global_batch, synthetic_batches
from lm.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainerConfig
from lm.model.sharding import logical_to_spec, make_mesh
from lm.train.engine import make_trainer

# 8 query heads and 4 KV heads: with tensor=8 the KV heads are replicated (4 % 8 != 0).
CFG = Config(
    model=ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128,
                      max_seq_len=32, attention_block=16),
    # Adam divides by sqrt(v): with the default eps=1e-8 a gradient entry near zero turns
    # float rounding differences into sign flips of a full-size update, so eps is raised.
    optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-4),
    data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8),
    trainer=TrainerConfig(steps=2),
)
SPLITS = [(d, f, 8 // (d * f)) for d in (1, 2, 4, 8) for f in (1, 2, 4, 8) if 8 % (d * f) == 0]


def run(mesh_cfg, devices, steps=2):
    cfg = dataclasses.replace(CFG, mesh=mesh_cfg)
    mesh = make_mesh(mesh_cfg, devices)
    trainer = make_trainer(cfg, mesh)
    state, _ = trainer.init_state(0)
    step = trainer.compile_train_step()
    data = synthetic_batches(128, 32, 8, seed=3)
    losses, logits = [], None
    def logits_and_grads(params, b):  # one compiled program for both
        logits = trainer.model(params)(b["inputs"], b["positions"], b["segment_ids"])
        return logits, jax.grad(lambda p: trainer.loss_fn(p, b)[0])(params)

    for _ in range(steps):
        batch = global_batch(next(data), trainer.batch_sharding)
        if logits is None:
            logits, grads = jax.device_get(jax.jit(logits_and_grads)(state.params, batch))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, logits, grads, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
    return run(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_every_factorisation_of_8_is_a_mesh_of_all_devices():
    """The layouts tested below are every (data, fsdp, tensor) with d * f * t = 8, counted
    independently of how SPLITS is written; each is a mesh of that shape holding each of the
    8 devices once, and -1 on any axis takes the devices the other two leave."""
    every = {(d, f, t) for d in range(1, 9) for f in range(1, 9) for t in range(1, 9) if d * f * t == 8}
    assert sorted(SPLITS) == sorted(every) and len(SPLITS) == 10
    for d, f, t in SPLITS:
        mesh = make_mesh(MeshConfig(data=d, fsdp=f, tensor=t))
        assert dict(mesh.shape) == {"data": d, "fsdp": f, "tensor": t}
        assert sorted(x.id for x in mesh.devices.flat) == sorted(x.id for x in jax.devices())
        for rest in ({"data": -1, "fsdp": f, "tensor": t}, {"data": d, "fsdp": -1, "tensor": t},
                     {"data": d, "fsdp": f, "tensor": -1}):
            assert dict(make_mesh(MeshConfig(**rest)).shape) == {"data": d, "fsdp": f, "tensor": t}


# Two layouts in `make test`: all three axes mixed, and pure tensor parallelism (with its
# replicated KV heads). Every training run of the other tests is pure data parallelism over the
# 8 devices, and test_optim's Muon run pure FSDP; the other factorisations of 8 run in CI's
# slow phase.
QUICK = {(1, 1, 8)}  # (every split runs in the slow phase)


@pytest.mark.parametrize("data,fsdp,tensor", [s if s in QUICK else pytest.param(*s, marks=pytest.mark.slow)
                                              for s in SPLITS])
def test_sharded_forward_and_train_step_match_single_device(reference, data, fsdp, tensor):
    ref_losses, ref_logits, ref_grads, ref_params, _ = reference
    losses, logits, grads, params, state = run(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices())
    # Tolerance: float32 reductions are split differently across devices.
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # the state really is sharded as the rules say
    wq = state.params["blocks"]["attn"]["wq"].get_value()
    expected = logical_to_spec(("layers", "embed", "heads", "head_dim"), wq.shape, wq.sharding.mesh)
    assert wq.sharding.spec == expected
    if fsdp > 1 or tensor > 1:
        assert not wq.sharding.is_fully_replicated
    mu = jax.tree.leaves(state.opt_state)  # Adam moments follow their parameters
    assert any(x.shape == wq.shape and x.sharding.spec == expected for x in mu)


def test_logical_rules_replicate_what_does_not_divide():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4), jax.devices())
    assert tuple(logical_to_spec(("embed", "kv_heads"), (64, 4), mesh)) == ("fsdp", "tensor")
    assert tuple(logical_to_spec(("embed", "kv_heads"), (64, 2), mesh)) == ("fsdp", None)
    assert tuple(logical_to_spec(("batch", None), (8, 3), mesh)) == ("fsdp", None)


def test_mesh_rest_axis_and_errors():
    assert dict(make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
