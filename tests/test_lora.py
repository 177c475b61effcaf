"""LoRA adapters (lm/lora.py): exact at init, the right reshape per target, gradients
only for the adapters, config errors, and untouched non-target weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm.config import ConfigError, LoraConfig, MeshConfig, ModelConfig
from lm.model import lora
from lm.model import transformer as M
from lm.model.sharding import RULES, make_mesh

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
LORA = LoraConfig(rank=4, alpha=8.0)
SCALE = LORA.alpha / LORA.rank


@pytest.fixture(scope="module")
def model():
    graphdef, params, rest = nnx.split(M.Transformer(CFG, nnx.Rngs(0)), nnx.Param, ...)
    # one compiled forward for every test: (params State, tokens) -> logits
    forward = jax.jit(lambda params, toks: nnx.merge(graphdef, params, rest)(toks))
    return forward, params


def tokens(b=2, t=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def logits(model, params, toks):
    """Logits of the Transformer with `params` (an nnx.State) on tokens (B, T)."""
    forward, _ = model
    return forward(params, toks)


def random_b(adapters, seed=1):
    """Adapters with B ~ N(0, 0.1) instead of zeros, so the update is non-zero."""
    def b(name, shape):  # seeded per target: jax may reorder the dict's keys
        rng = np.random.default_rng([seed, list(lora.TARGETS).index(name)])
        return jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32)
    return {n: {"a": ab["a"], "b": b(n, ab["b"].shape)} for n, ab in adapters.items()}


def get(params, path):
    for k in path:
        params = params[k]
    return np.asarray(params[...] if isinstance(params, nnx.Variable) else params)


def test_init_is_exactly_the_base(model):
    _, params = model
    adapters = lora.init_adapters(params, LORA, seed=0)
    merged = lora.merge(params, adapters, LORA)
    assert isinstance(merged, nnx.State)  # variables keep their metadata (sharding axes)
    wq = merged["blocks"]["attn"]["wq"]
    assert isinstance(wq, nnx.Param) and wq.get_metadata()["axes"] == ("embed", "heads", "head_dim")
    toks = tokens()
    np.testing.assert_array_equal(logits(model, merged, toks), logits(model, params, toks))
    # shapes (L, I, r) / (L, r, O), float32, A non-zero and kaiming-uniform bounded, B zero
    d, n, k, h, f = CFG.d_model, CFG.n_heads, CFG.n_kv_heads, CFG.head_size, CFG.d_ff
    io = {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}
    for name, (i, o) in io.items():
        a, b = adapters[name]["a"], adapters[name]["b"]
        assert a.shape == (2, i, 4) and b.shape == (2, 4, o) and a.dtype == b.dtype == jnp.float32
        assert 0 < np.abs(a).max() <= 1 / math.sqrt(i) and not np.any(b)
    assert lora.count(adapters) == sum(2 * 4 * (i + o) for i, o in io.values())
    # the same seed gives the same adapters; a target's A does not depend on the others
    only_q = lora.init_adapters(params, LoraConfig(rank=4, targets=("q",)), seed=0)
    np.testing.assert_array_equal(only_q["q"]["a"], adapters["q"]["a"])


def test_abstract_params_and_jit(model):
    _, params = model
    abstract = nnx.state(nnx.eval_shape(lambda: M.Transformer(CFG, nnx.Rngs(0))), nnx.Param)
    shapes = jax.eval_shape(lambda p: lora.init_adapters(p, LORA, 0), abstract)
    concrete = lora.init_adapters(params, LORA, 0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), concrete)
    merged_shapes = jax.eval_shape(lambda p, a: lora.merge(p, a, LORA), abstract, shapes)
    assert jax.tree.map(lambda x: x.shape, merged_shapes) == jax.tree.map(lambda x: x.shape, abstract)
    # pure dict in -> pure dict out, and jit gives the same as eager
    adapters = random_b(concrete)
    pure = nnx.to_pure_dict(params)
    out = jax.jit(lambda p, a: lora.merge(p, a, LORA))(pure, adapters)
    assert type(out) is dict
    eager = nnx.to_pure_dict(lora.merge(params, adapters, LORA))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), out, eager)


def test_merged_weights_match_numpy(model):
    """For each target: W + scale * A @ B with A, B reshaped to W's input/output dims."""
    _, params = model
    adapters = random_b(lora.init_adapters(params, LORA, 0))
    merged = lora.merge(params, adapters, LORA)
    n_in = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
    for name, path in lora.TARGETS.items():
        w = get(params, path)
        ins, outs = w.shape[1:1 + n_in[name]], w.shape[1 + n_in[name]:]
        a = np.asarray(adapters[name]["a"]).reshape(w.shape[0], *ins, -1)  # (L, ins..., r)
        b = np.asarray(adapters[name]["b"]).reshape(w.shape[0], -1, *outs)  # (L, r, outs...)
        expected = w + SCALE * np.stack([np.tensordot(a[l], b[l], axes=1) for l in range(w.shape[0])])
        assert not np.allclose(expected, w)
        np.testing.assert_allclose(get(merged, path), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_merged_logits_match_unmerged_projection(model):
    """The merged model equals the base model plus the LoRA branch x @ A @ B on q: the
    reshape convention is the one the model's matmuls use."""
    _, params = model
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q",))
    adapters = random_b(lora.init_adapters(params, cfg, 0))
    x = np.random.default_rng(2).normal(size=(5, CFG.d_model)).astype(np.float32)
    layer = 1
    w = get(params, lora.TARGETS["q"])[layer].reshape(CFG.d_model, -1)
    a, b = np.asarray(adapters["q"]["a"][layer]), np.asarray(adapters["q"]["b"][layer])
    branch = x @ w + SCALE * (x @ a) @ b
    wm = get(lora.merge(params, adapters, cfg), lora.TARGETS["q"])[layer].reshape(CFG.d_model, -1)
    np.testing.assert_allclose(x @ wm, branch, rtol=1e-5, atol=1e-6)
    # and the whole model sees the change
    toks = tokens()
    assert not np.allclose(logits(model, lora.merge(params, adapters, cfg), toks), logits(model, params, toks))


def loss_fn(model, params, toks):
    def loss(adapters):
        out = logits(model, lora.merge(params, adapters, LORA), toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(out, toks[:, 1:]).mean()
    return loss


def test_gradients_only_for_adapters(model):
    _, params = model
    toks = tokens()
    loss = loss_fn(model, params, toks)  # the base is closed over: a constant, not an argument
    adapters = lora.init_adapters(params, LORA, 0)
    # the optimiser only ever sees the adapters: adamw's mu and nu are adapter-shaped
    opt = optax.adamw(1e-2)
    state = opt.init(adapters)
    sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(sizes) == 2 * lora.count(adapters)
    assert lora.count(adapters) < sum(x.size for x in jax.tree.leaves(params)) / 4

    @jax.jit
    def step(adapters, state):
        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = opt.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value, grads

    grads = step(adapters, state)[3]
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    for name, g in grads.items():  # B = 0 at init: dL/dA = (dL/dW') B^T = 0, dL/dB != 0
        assert not np.any(g["a"]) and np.any(g["b"]), name
    grads = step(random_b(adapters), state)[3]
    for name, g in grads.items():
        assert np.any(g["a"]) and np.any(g["b"]), name

    # a few steps reduce the loss and leave the base untouched
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    values = []
    for _ in range(5):
        adapters, state, value, _ = step(adapters, state)
        values.append(float(value))
    assert values[-1] < values[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=-1), r"lora\.rank=-1 must be >= 0"),
    (dict(rank=4, targets=("q", "qkv")), r"unknown \['qkv'\]; valid targets are q, k, v, o, gate, up, down"),
    (dict(rank=4, targets=()), r"lora\.targets is empty with lora\.rank=4"),
    (dict(rank=4, alpha=0.0), r"lora\.alpha=0\.0 must be > 0"),
    (dict(rank=4, alpha=-1.0), r"lora\.alpha=-1\.0 must be > 0"),
    (dict(rank=4, dropout=0.1), r"lora\.dropout>0 is not supported yet.*set lora\.dropout=0"),
])
def test_check_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        lora.check(LoraConfig(**kwargs))
    assert "\n" not in str(err.value)


def test_check_accepts_valid_and_rank_zero_is_off(model):
    _, params = model
    lora.check(LORA)
    lora.check(LoraConfig(rank=0))
    lora.check(LoraConfig(rank=0, targets=()))
    off = LoraConfig(rank=0)
    assert lora.init_adapters(params, off, 0) == {} and lora.count({}) == 0
    assert lora.merge(params, {}, off) is params


def test_subset_of_targets_leaves_the_rest_bit_identical(model):
    _, params = model
    cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
    adapters = random_b(lora.init_adapters(params, cfg, 0))
    assert set(adapters) == {"q", "v"}
    merged = lora.merge(params, adapters, cfg)
    changed = {lora.TARGETS["q"], lora.TARGETS["v"]}
    flat_base = {lora._names(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    flat_merged = {lora._names(p): x for p, x in jax.tree_util.tree_leaves_with_path(merged)}
    assert flat_base.keys() == flat_merged.keys()
    for path, x in flat_base.items():
        if path in changed:
            assert not np.array_equal(flat_merged[path], x), path
        else:
            np.testing.assert_array_equal(flat_merged[path], x, err_msg=str(path))
            assert flat_merged[path].dtype == x.dtype


def test_bfloat16_weights_keep_their_dtype(model):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model[1])  # all weights bf16
    adapters = random_b(lora.init_adapters(params, LORA, 0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    merged = lora.merge(params, adapters, LORA)
    for path in lora.TARGETS.values():
        assert get(merged, path).dtype == jnp.bfloat16


def test_adapter_axes_and_shardings(model):
    _, params = model
    adapters = lora.init_adapters(params, LORA, 0)
    axes = lora.adapter_axes(adapters)
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_tuple) == jax.tree.structure(
        jax.tree.map(lambda _: (), adapters), is_leaf=is_tuple)
    for name, ab in adapters.items():
        for k in ("a", "b"):
            assert len(axes[name][k]) == ab[k].ndim
            assert all(n is None or n in RULES for n in axes[name][k])
    assert axes["q"] == {"a": ("layers", "embed", None), "b": ("layers", None, "heads")}
    assert axes["o"] == {"a": ("layers", "heads", None), "b": ("layers", None, "embed")}

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    shardings = lora.adapter_shardings(adapters, mesh)
    placed = jax.device_put(adapters, shardings)
    assert tuple(shardings["q"]["a"].spec) == (None, "fsdp", None)
    assert tuple(shardings["q"]["b"].spec) == (None, None, "tensor")
    assert tuple(shardings["down"]["a"].spec) == (None, "tensor", None)
    # the merge of sharded adapters into the base is the same as unsharded
    toks = tokens()
    a = logits(model, lora.merge(params, random_b(placed), LORA), toks)
    b = logits(model, lora.merge(params, random_b(adapters), LORA), toks)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
