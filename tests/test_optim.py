"""Optimisers: Muon's matrices, learning rates and weight decay; Muon on 1 and 8 devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib._muon import orthogonalize_via_newton_schulz

from data_pipeline.pipeline import global_batch, synthetic_batches
from lm.config import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    apply_overrides,
)
from lm.model.sharding import logical_to_spec, make_mesh
from lm.train.engine import make_trainer
from lm.train.optim import NEWTON_SCHULZ, POLAR_EXPRESS, make_optimizer, muon_dims, polar_express_coefficients

MODEL = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                    attention_block=16, qk_norm=True)
MUON = OptimConfig(name="muon", lr=1e-2, muon_lr=0.05, warmup_steps=0, schedule="constant", weight_decay=0.1,
                   clip_norm=0.0)
ONE = MeshConfig(data=1, fsdp=1, tensor=1)


def newton_schulz(g, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    """An independent reference: Keller Jordan's quintic Newton-Schulz orthogonalisation of a
    matrix (float64 numpy), scaled to unit Frobenius norm first."""
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    a, b, c = coeffs
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


def engine(optim=MUON, mesh=ONE, devices=None, model=MODEL):
    cfg = Config(model=model, mesh=mesh, optim=optim, data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8),
                 trainer=TrainerConfig(steps=10))
    return make_trainer(cfg, make_mesh(mesh, devices or jax.devices()[:1]))


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def params_and_random_grads(seed: int):
    """The test model's initial parameters, standard normal gradients like them, and the generator."""
    params = jax.jit(engine()._init_params, static_argnums=0)(0)
    rng = np.random.default_rng(seed)
    return params, jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params), rng


def test_muon_takes_the_kernels_layer_by_layer_and_adamw_the_rest():
    tr = engine()
    dims = nnx.to_pure_dict(muon_dims(jax.eval_shape(lambda: tr._init_params(0))))
    attn, mlp = dims["blocks"]["attn"], dims["blocks"]["mlp"]
    # the layer axis 0 is neither side: a batch axis, each layer's matrix on its own
    assert (attn["wq"].reduction_axis, attn["wq"].output_axis) == (1, (2, 3))  # (L, D, N, H): D x N*H
    assert (attn["wo"].reduction_axis, attn["wo"].output_axis) == ((1, 2), 3)  # (L, N, H, D): N*H x D
    assert (mlp["w_down"].reduction_axis, mlp["w_down"].output_axis) == (1, (2,))
    assert dims["embed"] is None and dims["head"] is None and dims["final_norm"]["scale"] is None
    assert attn["q_norm"]["scale"] is None and dims["blocks"]["mlp_norm"]["scale"] is None


def test_muon_update_orthogonalises_each_layer_and_routes_the_learning_rates():
    params, grads, rng = params_and_random_grads(0)
    opt = make_optimizer(dataclasses.replace(MUON, weight_decay=0.0), params, 10)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    u, g = flat(updates), flat(grads)
    key = "['blocks']['mlp']['w_gate'].value"  # (L, D, F) = (2, 64, 96): width scale sqrt(96/64)
    for layer in range(2):
        want = newton_schulz(g[key][layer])
        np.testing.assert_allclose(u[key][layer], -0.05 * np.sqrt(96 / 64) * want, atol=1e-4)
        s = np.linalg.svd(np.asarray(u[key][layer]) / (0.05 * np.sqrt(96 / 64)), compute_uv=False)
        assert 0.5 < s.min() and s.max() < 1.3  # about orthogonal
    # not the stacked tensor orthogonalised as one (L*D, F) matrix
    whole = newton_schulz(g[key].reshape(-1, 96))
    assert not np.allclose(u[key].reshape(-1, 96), -0.05 * np.sqrt(96 / 64) * whole, atol=1e-3)
    # wo (L, N, H, D): each layer's (N*H, D) matrix
    wo = "['blocks']['attn']['wo'].value"
    want = newton_schulz(g[wo][1].reshape(64, 64))
    np.testing.assert_allclose(u[wo][1].reshape(64, 64), -0.05 * want, atol=1e-4)
    # AdamW's first step is lr * sign(g) on the embeddings, norms and head
    for name in ("['embed'].value", "['head'].value", "['final_norm']['scale'].value"):
        np.testing.assert_allclose(u[name], -1e-2 * np.sign(g[name]), rtol=1e-3)  # (eps)


def test_muon_weight_decay_is_decoupled_scaled_by_its_learning_rate_and_spares_the_rest():
    tr = engine()
    params = jax.jit(tr._init_params, static_argnums=0)(0)
    zero = jax.tree.map(jnp.zeros_like, params)
    cfg = dataclasses.replace(MUON, muon_weight_decay=0.5, schedule="cosine", warmup_steps=4, min_lr_ratio=0.0)
    opt = make_optimizer(cfg, params, 10)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(6):  # zero gradients: only weight decay moves the weights
        updates, state = update(zero, state, params)
        lr = float(optax.warmup_cosine_decay_schedule(0.0, 0.05, 4, 10, 0.0)(step))
        u, p = flat(updates), flat(params)
        for name in ("['blocks']['attn']['wq'].value", "['blocks']['mlp']['w_down'].value"):
            np.testing.assert_allclose(u[name], -lr * 0.5 * p[name], rtol=1e-5, atol=1e-9)
        for name in ("['embed'].value", "['head'].value", "['blocks']['attn_norm']['scale'].value"):
            assert not np.asarray(u[name]).any(), name  # no decay, AdamW's weight_decay=0.1 included


def test_unknown_optimiser_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="optim.name"):
        apply_overrides(Config(), ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="unknown optimiser"):
        Config(optim=OptimConfig(name="sgd")).validate()


def run_steps(mesh_cfg, devices, steps=2, **levers):
    # AdamW (embeddings, head) with eps raised, as in test_sharding: near-zero gradients would
    # turn float rounding differences between layouts into sign flips of a whole update
    tr = engine(mesh=mesh_cfg, devices=devices, optim=dataclasses.replace(MUON, clip_norm=1.0, eps=1e-4, **levers))
    state, _ = tr.init_state(0)
    step = tr.compile_train_step()
    losses = []
    for batch in [b for b, _ in zip(synthetic_batches(128, 32, 8, seed=3), range(steps))]:
        state, metrics = step(state, global_batch(batch, tr.batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def one_device():
    return run_steps(ONE, jax.devices()[:1])


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 8, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow)])
def test_muon_with_fsdp_on_eight_devices_matches_one_device(one_device, data, fsdp, tensor):
    ref_losses, ref = one_device
    losses, state = run_steps(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref.params))):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # the parameters and Muon's momentum are sharded as the rules say
    wq = state.params["blocks"]["attn"]["wq"].get_value()
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), wq.shape, wq.sharding.mesh)
    assert wq.sharding.spec == spec and not wq.sharding.is_fully_replicated
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == wq.shape]
    assert moments and all(x.sharding.spec == spec for x in moments)


def test_polar_express_coefficients_are_the_minimax_quintics_and_orthogonalise_closer_than_newton_schulz():
    coeffs, (lo, hi) = polar_express_coefficients(5)
    np.testing.assert_allclose(coeffs, POLAR_EXPRESS, atol=1e-5)  # the table is the derivation's
    assert 0.88 < lo and hi < 1.12
    # a 64 x 96 matrix whose singular values, after the Frobenius normalisation, span [1e-3, 0.44]
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    v, _ = np.linalg.qr(rng.normal(size=(96, 96)))
    sv = np.geomspace(1e-3, 1, 64)
    sv = np.maximum(sv / np.linalg.norm(sv), 1e-3)
    x = (u * sv) @ v[:64]
    for table, worst in ((NEWTON_SCHULZ, (0.45, 0.6)), (POLAR_EXPRESS, (0.10, 0.12))):
        want = newton_schulz(x, 5, table) if table is NEWTON_SCHULZ else x / np.linalg.norm(x)
        if table is POLAR_EXPRESS:  # the reference iteration with one quintic per step
            for a, b, c in table:
                m = want @ want.T
                want = a * want + (b * m + c * m @ m) @ want
        got = orthogonalize_via_newton_schulz(jnp.asarray(x, jnp.float32), jnp.asarray(table, jnp.float32), 5)
        np.testing.assert_allclose(got, want, atol=2e-4)
        err = np.abs(np.linalg.svd(want, compute_uv=False) - 1).max()
        assert worst[0] < err < worst[1], (table, err)  # Newton-Schulz: 0.53; Polar Express: 0.113


def test_polar_express_is_what_muon_applies():
    params, grads, rng = params_and_random_grads(1)
    opt = make_optimizer(dataclasses.replace(MUON, weight_decay=0.0, muon_ns="polar_express"), params, 10)
    u = flat(jax.jit(opt.update)(grads, opt.init(params), params)[0])
    key = "['blocks']['attn']['wq'].value"  # (L, D, N, H): each layer D x N*H, square here
    want = np.asarray(flat(grads)[key][0], np.float64).reshape(64, 64)
    want = want / np.linalg.norm(want)
    for a, b, c in POLAR_EXPRESS:
        m = want @ want.T
        want = a * want + (b * m + c * m @ m) @ want
    np.testing.assert_allclose(u[key][0].reshape(64, 64), -0.05 * want, atol=1e-4)


@pytest.mark.slow  # about 7 s; CI's slow phase runs it (make test stays under 5 minutes)
def test_normuon_gives_every_neuron_the_same_rms_and_keeps_each_matrix_norm():
    params, grads, rng = params_and_random_grads(2)
    plain = make_optimizer(dataclasses.replace(MUON, weight_decay=0.0), params, 10)
    normed = make_optimizer(dataclasses.replace(MUON, weight_decay=0.0, muon_normalize=True, muon_beta2=0.9),
                            params, 10)
    state = normed.init(params)
    u0 = flat(jax.jit(plain.update)(grads, plain.init(params), params)[0])
    u1, state = jax.jit(normed.update)(grads, state, params)
    u1 = flat(u1)
    key = "['blocks']['mlp']['w_up'].value"  # (L, D, F): neuron f is column f, its RMS over D
    for layer in range(2):
        a, b = np.asarray(u0[key][layer], np.float64), np.asarray(u1[key][layer], np.float64)
        rms = np.sqrt((b * b).mean(axis=0))
        np.testing.assert_allclose(rms, rms.mean(), rtol=1e-4)  # first step: every neuron alike
        np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a), rtol=1e-4)
        np.testing.assert_allclose(b, a / np.sqrt((a * a).mean(axis=0)) * (np.linalg.norm(a) / np.linalg.norm(
            a / np.sqrt((a * a).mean(axis=0)))), rtol=1e-3, atol=1e-6)
    # the embeddings and head are AdamW's, untouched by the lever
    for name in ("['embed'].value", "['head'].value"):
        np.testing.assert_allclose(u1[name], u0[name], rtol=1e-6)
    # the running mean is kept per neuron, (L, 1, F), and the second step divides by it
    nu = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (2, 1, 96)]
    assert len(nu) == 2  # w_gate and w_up
    grads2 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    plain_state = plain.update(grads, plain.init(params), params)[1]
    a2 = np.asarray(flat(jax.jit(plain.update)(grads2, plain_state, params)[0])[key], np.float64)
    b2 = np.asarray(flat(jax.jit(normed.update)(grads2, state, params)[0])[key], np.float64)
    a1 = np.asarray(u0[key], np.float64) / -0.05 / np.sqrt(96 / 64)  # step 1's orthogonal update
    o2 = a2 / -0.05 / np.sqrt(96 / 64)
    v = (0.9 * 0.1 * (a1 * a1).mean(axis=1, keepdims=True) + 0.1 * (o2 * o2).mean(axis=1, keepdims=True)) / (1 - 0.81)
    want = o2 / np.sqrt(v + 1e-8)
    want *= np.linalg.norm(o2, axis=(1, 2), keepdims=True) / np.linalg.norm(want, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(b2, -0.05 * np.sqrt(96 / 64) * want, rtol=1e-3, atol=1e-6)
    with pytest.raises(ConfigError, match="Muon's levers"):
        Config(optim=OptimConfig(name="adamw", muon_normalize=True)).validate()


def test_normuon_running_means_are_laid_out_on_the_mesh_where_they_split():
    # NorMuon's running mean of wq is (L, 1, N, H): wq's mesh axis on its width (fsdp) cannot
    # split a dimension of size 1, so the engine leaves that dimension whole and keeps the rest
    optim = dataclasses.replace(MUON, muon_normalize=True)
    tr = engine(mesh=MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices(), optim=optim)
    wq = tr.state_sharding.params["blocks"]["attn"]["wq"].get_value().spec
    assert wq[1] is not None and wq[2] is not None  # (layers, embed: fsdp, heads: tensor, head_dim)
    abstract = jax.eval_shape(lambda: tr.init_state(0)[0].opt_state)
    found = 0
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(tr.state_sharding.opt_state)):
        if "nu" in jax.tree_util.keystr(path) and "wq" in jax.tree_util.keystr(path):
            assert leaf.shape == (2, 1, 4, 16) and sh.spec[1] is None and sh.spec[2] == wq[2]
            sh.shard_shape(leaf.shape)  # a valid layout
            found += 1
    assert found == 1


@pytest.mark.slow  # two compilations; the layout itself is checked by the test above
def test_muon_levers_with_fsdp_and_tensor_on_eight_devices_match_one_device():
    levers = dict(muon_ns="polar_express", muon_normalize=True)
    ref_losses, ref = run_steps(ONE, jax.devices()[:1], **levers)
    losses, state = run_steps(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices(), **levers)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref.params))):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # make test trains the default job, which uses Muon (test_train); CI's slow phase runs this
def test_muon_run_learns(tmp_path):
    import json

    from lm.stages.runner import train

    cfg = Config(model=MODEL, optim=dataclasses.replace(MUON, warmup_steps=5, schedule="cosine", clip_norm=1.0),
                 data=DataConfig(corpus="synthetic", seq_len=32, batch_size=8),
                 trainer=TrainerConfig(steps=40, log_every=10, eval_batches=2))
    summary = train(cfg, str(tmp_path), log=lambda *_: None, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert summary["heldout_loss"] < summary["heldout_unigram_entropy"]
