"""The speedrun levers (model.logit_softcap, model.zero_init_out): what each computes, in the
training forward pass, the chunked loss, the decode engine and the Hugging Face export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ConfigError, ModelConfig
from lm.model.transformer import Transformer, softcap
from lm.objectives.losses import chunked_cross_entropy, cross_entropy
from lm.sampling import decode
from lm.sampling.sampler import generate

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  init_std=0.5)  # large weights: logits of tens, where capping at 5 bites


def test_softcap_squashes_logits_everywhere_the_model_makes_them():
    capped = dataclasses.replace(CFG, logit_softcap=5.0)
    raw_model, model = Transformer(CFG, nnx.Rngs(0)), Transformer(capped, nnx.Rngs(0))  # same weights
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    raw, out = raw_model(tokens), model(tokens)
    assert float(jnp.abs(raw).max()) > 10 and float(jnp.abs(out).max()) < 5.0
    np.testing.assert_allclose(out, 5.0 * np.tanh(np.asarray(raw) / 5.0), rtol=1e-5, atol=1e-5)
    assert softcap(raw, 0.0) is raw
    # the decode engine: the same logits (its held-out loss equals the model's)
    graphdef, params = nnx.split(model, nnx.Param)
    w = decode.prepare(graphdef, params)
    mask = jnp.ones((2, 11), jnp.float32)
    want = -jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1], -1), tokens[:, 1:, None], -1).mean()
    assert float(decode.next_token_nll(w, tokens, mask)) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_cross_entropy_with_softcap_equals_plain(z_loss):
    rng = np.random.default_rng(0)
    b, t, d, v, cap = 2, 16, 8, 11, 3.0
    h = jnp.asarray(rng.normal(size=(b * t, d)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b * t,)), jnp.int32)
    mask = jnp.asarray(rng.random(b * t) > 0.3, jnp.float32)

    def plain(h, w):
        loss, ce, _ = cross_entropy(softcap(h @ w, cap), targets, mask, z_loss)
        return loss + 0.5 * ce

    def chunked(h, w):
        loss, ce, _ = chunked_cross_entropy(h, w, targets, mask, z_loss, b, 4, softcap=cap)
        return loss + 0.5 * ce

    np.testing.assert_allclose(chunked(h, w), plain(h, w), rtol=1e-6)
    for a, c in zip(jax.grad(plain, (0, 1))(h, w), jax.grad(chunked, (0, 1))(h, w)):
        np.testing.assert_allclose(c, a, atol=1e-5)
    uncapped = chunked_cross_entropy(h, w, targets, mask, z_loss, b, 4)[1]
    assert abs(float(uncapped) - float(chunked(h, w))) > 1e-3  # (the cap changes the loss here)


def test_zero_init_out_starts_every_block_as_the_identity_and_still_learns():
    cfg = dataclasses.replace(CFG, zero_init_out=True, init_std=0.02)
    model = Transformer(cfg, nnx.Rngs(0))
    assert not np.any(np.asarray(model.blocks.attn.wo[...])) and not np.any(np.asarray(model.blocks.mlp.w_down[...]))
    assert np.any(np.asarray(model.blocks.attn.wq[...])) and np.any(np.asarray(model.blocks.mlp.w_up[...]))
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
    x = jnp.take(model.embed[...], tokens.reshape(-1), axis=0)
    np.testing.assert_allclose(model.hidden(tokens), model.final_norm(x), rtol=1e-6)  # the blocks add nothing
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return -jax.nn.log_softmax(logits[0, :-1], -1)[jnp.arange(5), tokens[0, 1:]].mean()

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["blocks"]["attn"]["wo"][...]).max()) > 0  # the zero matrices get a gradient
    assert float(jnp.abs(grads["blocks"]["mlp"]["w_down"][...]).max()) > 0
    default = Transformer(CFG, nnx.Rngs(0))
    assert np.any(np.asarray(default.blocks.attn.wo[...]))  # off by default


def test_levers_are_validated_and_refused_where_llama_cannot_carry_them(tmp_path):
    from lm.interop.hf import export_llama

    with pytest.raises(ConfigError, match="logit_softcap=-1.0 must be >= 0"):
        dataclasses.replace(CFG, logit_softcap=-1.0).validate()
    capped = dataclasses.replace(CFG, logit_softcap=30.0)
    _, params = nnx.split(Transformer(capped, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ConfigError, match="LLaMA has no logit soft-capping"):
        export_llama(capped, params, str(tmp_path / "hf"))
    zero = dataclasses.replace(CFG, zero_init_out=True)
    _, params = nnx.split(Transformer(zero, nnx.Rngs(0)), nnx.Param)
    assert export_llama(zero, params, str(tmp_path / "hf0"))  # an initialisation only: the format carries it


def test_relu2_mlp_computes_relu_squared_with_two_matrices_in_the_model_and_the_decode_engine():
    from lm.model.transformer import MLP, expected_param_count, param_count

    cfg = dataclasses.replace(CFG, mlp="relu2", init_std=0.1)
    mlp = MLP(cfg, nnx.Rngs(0))
    assert not hasattr(mlp, "w_gate")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 32)), jnp.float32)
    want = np.maximum(np.asarray(x) @ np.asarray(mlp.w_up[...]), 0) ** 2 @ np.asarray(mlp.w_down[...])
    np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-6)
    assert param_count(cfg) == expected_param_count(cfg) == param_count(CFG) - 2 * 32 * 64
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    logits = model(tokens)
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None], -1).mean()
    graphdef, params = nnx.split(model, nnx.Param)
    mask = jnp.ones((2, 11), jnp.float32)
    assert float(decode.next_token_nll(decode.prepare(graphdef, params), tokens, mask)) == pytest.approx(
        float(want), rel=1e-5)
    # (split over 2 devices, with the other levers: the slow test at the end of this file)


def test_relu2_is_refused_by_the_llama_export_and_a_bad_mlp_name_is_one_line(tmp_path):
    from lm.interop.hf import export_llama

    cfg = dataclasses.replace(CFG, mlp="relu2")
    _, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ConfigError, match="LLaMA's MLP is SwiGLU"):
        export_llama(cfg, params, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="model.mlp='gelu' is not 'swiglu' or 'relu2'"):
        dataclasses.replace(CFG, mlp="gelu").validate()


def assert_decode_nll_is_the_models(model, tokens):
    """The decode engine's log-likelihood of `tokens` (B, T) equals the model's forward pass's."""
    logits = model(tokens)
    want = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None], -1).mean()
    graphdef, params = nnx.split(model, nnx.Param)
    mask = jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)
    got = decode.next_token_nll(decode.prepare(graphdef, params), tokens, mask)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def _mtp_batch(rng, b=2, t=12, v=96):
    tokens = rng.integers(0, v, (b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[0, 7:] = 2  # row 0 holds two documents: nothing is predicted across the boundary
    mask = np.ones((b, t), np.float32)
    mask[1, :3] = 0  # (a prompt, as in SFT)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(np.tile(np.arange(t), (b, 1)), jnp.int32),
            "loss_mask": jnp.asarray(mask)}


def test_multi_token_prediction_adds_the_loss_of_the_tokens_further_ahead_by_hand():
    from lm.config import Config, TrainerConfig
    from lm.model.transformer import expected_param_count, param_count
    from lm.objectives.next_token import NextToken

    cfg = dataclasses.replace(CFG, init_std=0.1, mtp_tokens=2, mtp_weight=0.5)
    model = Transformer(cfg, nnx.Rngs(0))
    batch = _mtp_batch(np.random.default_rng(0))
    loss, aux = NextToken(Config(model=cfg)).loss(model, batch, {})
    # the next-token part is the model's without the lever
    plain = Transformer(dataclasses.replace(cfg, mtp_tokens=0), nnx.Rngs(0))
    nnx.update(plain, nnx.state(model, nnx.Param).filter(lambda path, _: path[0] != "mtp" and path[0] != "mtp_norm"))
    _, plain_aux = NextToken(Config(model=dataclasses.replace(cfg, mtp_tokens=0))).loss(plain, batch, {})
    np.testing.assert_allclose(aux["loss"], plain_aux["loss"], rtol=1e-6)
    # by hand: position i predicts targets[i + j - 1], if in the row, the document and the mask
    h = np.asarray(model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    w_out = np.asarray(model.output_weights(), np.float64)
    tg, seg, m = (np.asarray(batch[k]) for k in ("targets", "segment_ids", "loss_mask"))
    n_next = m.sum()
    extra = 0.0
    for j in (2, 3):
        z = h @ np.asarray(model.mtp[...][j - 2], np.float64)
        z = z / np.sqrt((z * z).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(model.mtp_norm[...][j - 2])
        logp = z @ w_out
        top = logp.max(-1, keepdims=True)
        logp = (logp - top - np.log(np.exp(logp - top).sum(-1, keepdims=True))).reshape(2, 12, -1)
        for r in range(2):
            for i in range(12 - (j - 1)):
                if seg[r, i] == seg[r, i + j - 1] and m[r, i + j - 1]:
                    extra -= logp[r, i, tg[r, i + j - 1]]
    extra /= 2 * n_next
    assert float(aux["mtp_loss"]) == pytest.approx(extra, rel=1e-4)
    assert float(loss) == pytest.approx(float(aux["loss"]) + 0.5 * extra, rel=1e-4)
    # chunked loss: the same value
    chunked = NextToken(Config(model=cfg, trainer=TrainerConfig(loss_chunks=4)))
    assert float(chunked.loss(model, batch, {})[0]) == pytest.approx(float(loss), rel=1e-5)
    from lm.config import DataConfig
    with pytest.raises(ConfigError, match="model.mtp_tokens=16 must be less than data.seq_len=16"):
        Config(model=dataclasses.replace(cfg, mtp_tokens=16), data=DataConfig(seq_len=16)).validate()
    assert param_count(cfg) == expected_param_count(cfg) == param_count(CFG) + 2 * (32 * 32 + 32)


def test_multi_token_prediction_is_training_only_decoding_and_export_use_the_next_token_head(tmp_path):
    from lm.interop.hf import export_llama

    cfg = dataclasses.replace(CFG, mtp_tokens=1)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    assert_decode_nll_is_the_models(model, tokens)
    out = export_llama(cfg, params, str(tmp_path / "hf"))
    from lm.interop.hf import load_safetensors
    names = load_safetensors(f"{out}/model.safetensors").keys() if isinstance(out, str) else ()
    assert names and not any("mtp" in name for name in names)
    with pytest.raises(ConfigError, match="mtp_tokens"):
        dataclasses.replace(CFG, mtp_tokens=-1).validate()


@pytest.mark.slow  # about 7 s; CI's slow phase runs it (make test stays under 5 minutes)
def test_unet_skips_add_the_first_layers_outputs_to_the_last_layers_inputs_in_training_and_decoding(tmp_path):
    from lm.interop.hf import export_llama
    from lm.model.transformer import attention_mask, expected_param_count, param_count, rope_tables

    cfg = dataclasses.replace(CFG, n_layers=5, unet_skips=True, init_std=0.1)  # skips 0->4, 1->3; layer 2 alone
    model = Transformer(cfg, nnx.Rngs(0))
    model.unet_skip[...] = jnp.asarray([0.7, -1.3])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    # by hand, block by block
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(12), (2, 12)), cfg.head_size, cfg.rope_theta)
    mask = attention_mask(None, 2, 12)
    graphdef, stacked = nnx.split(model.blocks)
    x = jnp.take(model.embed[...], tokens.reshape(-1), axis=0)
    outs = []
    for i in range(5):
        if i == 3:
            x = x + 0.7 * outs[1]
        if i == 4:
            x = x - 1.3 * outs[0]
        x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))(x, cos, sin, mask, 2)
        outs.append(x)
    want = model.final_norm(x)
    np.testing.assert_allclose(model.hidden(tokens), want, rtol=1e-5, atol=1e-5)
    unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False), nnx.Rngs(0))
    nnx.update(unrolled, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(unrolled.hidden(tokens), want, rtol=1e-5, atol=1e-5)
    assert param_count(cfg) == expected_param_count(cfg) == param_count(dataclasses.replace(cfg, unet_skips=False)) + 2
    gd, params = nnx.split(model, nnx.Param)
    assert_decode_nll_is_the_models(model, tokens)
    with pytest.raises(ConfigError, match="no skip connections"):
        export_llama(cfg, params, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="needs at least 2 layers"):
        dataclasses.replace(CFG, n_layers=1, unet_skips=True).validate()


def test_value_embeddings_add_each_layers_table_row_of_the_input_token_to_its_values(tmp_path):
    from lm.interop.hf import export_llama
    from lm.model.transformer import Attention, expected_param_count, param_count, rope_tables

    cfg = dataclasses.replace(CFG, value_embeds=True, init_std=0.1)
    attn = Attention(cfg, nnx.Rngs(0))
    assert attn.ve[...].shape == (96, 2, 8)  # (V, K, H)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (2, 12)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(24, 32)), jnp.float32)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(12), (2, 12)), cfg.head_size, cfg.rope_theta)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((12, 12), bool)), (2, 12, 12))
    got = attn(x, cos, sin, causal, 2, tokens)
    # the same attention with the embeddings' rows folded into the values by hand: a block whose
    # values are x W_v + ve[token] equals one whose W_v is applied to [x, onehot(token)] @ [[W_v], [ve]]
    plain_cfg = dataclasses.replace(cfg, value_embeds=False, d_model=32 + 96, head_dim=8)
    plain = Attention(plain_cfg, nnx.Rngs(1))
    pad = lambda w: jnp.concatenate([w, jnp.zeros((96,) + w.shape[1:])], 0)  # noqa: E731
    plain.wq[...], plain.wk[...] = pad(attn.wq[...]), pad(attn.wk[...])
    plain.wv[...] = jnp.concatenate([attn.wv[...], attn.ve[...]], 0)
    plain.wo[...] = jnp.concatenate([attn.wo[...], jnp.zeros((4, 8, 96))], 2)
    wide = jnp.concatenate([x, jax.nn.one_hot(tokens.reshape(-1), 96)], 1)
    np.testing.assert_allclose(got, plain(wide, cos, sin, causal, 2)[:, :32], rtol=1e-5, atol=1e-5)
    assert param_count(cfg) == expected_param_count(cfg) == param_count(CFG) + 2 * 96 * 2 * 8
    model = Transformer(cfg, nnx.Rngs(0))
    gd, params = nnx.split(model, nnx.Param)
    assert_decode_nll_is_the_models(model, tokens)
    with pytest.raises(ConfigError, match="no value embeddings"):
        export_llama(cfg, params, str(tmp_path / "hf"))
    # on a training mesh the (L, V, K, H) tables split like the embedding: rows over fsdp, heads over tensor
    from lm.config import MeshConfig
    from lm.model.sharding import make_mesh, state_shardings
    from lm.train.optim import decay_mask

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices())
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    assert tuple(state_shardings(abstract, mesh)["blocks"]["attn"]["ve"].get_value().spec) == (
        None, "fsdp", "tensor", None)
    from lm.config import OptimConfig
    assert not decay_mask(abstract, OptimConfig())["blocks"]["attn"]["ve"].get_value()  # an embedding: no decay


def test_sliding_window_layers_see_only_the_last_tokens_in_training_and_every_decoding_path(tmp_path):
    from lm.interop.hf import export_llama
    from lm.model.transformer import layer_windows, rope_tables

    cfg = dataclasses.replace(CFG, n_layers=3, window=3, window_global_every=3, init_std=0.2)
    assert layer_windows(cfg) == (3, 3, 0)
    assert layer_windows(dataclasses.replace(cfg, window_global_every=0)) == (3, 3, 3)
    assert layer_windows(CFG) == (0, 0)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    # by hand: the local layers' masks are bands of width 3 below the diagonal
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(12), (2, 12)), cfg.head_size, cfg.rope_theta)
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    band = jnp.asarray(np.broadcast_to((j <= i) & (i - j < 3), (2, 12, 12)))
    causal = jnp.asarray(np.broadcast_to(j <= i, (2, 12, 12)))
    graphdef, stacked = nnx.split(model.blocks)
    x = jnp.take(model.embed[...], tokens.reshape(-1), axis=0)
    for layer, mask in enumerate((band, band, causal)):
        x = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], stacked))(x, cos, sin, mask, 2)
    np.testing.assert_allclose(model.hidden(tokens), model.final_norm(x), rtol=1e-5, atol=1e-5)
    plain = Transformer(dataclasses.replace(cfg, window=0), nnx.Rngs(0))
    assert not np.allclose(plain.hidden(tokens), model.hidden(tokens), atol=1e-3)
    gd, params = nnx.split(model, nnx.Param)
    assert_decode_nll_is_the_models(model, tokens)
    with pytest.raises(ConfigError, match="model.window=3 cannot be exported"):
        export_llama(cfg, params, str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="model.window=8 needs model.attention"):
        dataclasses.replace(CFG, window=8, attention="splash").validate()


@pytest.mark.slow  # the fast tests above check each lever's forward pass and its decode log-likelihoods
@pytest.mark.parametrize("lever", [dict(unet_skips=True, n_layers=3), dict(value_embeds=True),
                                   dict(window=3, window_global_every=2, n_layers=3),
                                   dict(unet_skips=True, value_embeds=True, window=3, n_layers=4, mlp="relu2")],
                         ids=["unet", "value_embeds", "window", "all"])
def test_levers_decode_one_step_and_several_at_a_time_and_split_as_the_model_computes(lever):
    from lm.sampling import sampler

    cfg = dataclasses.replace(CFG, init_std=0.2, **lever)
    model = Transformer(cfg, nnx.Rngs(0))
    gd, params = nnx.split(model, nnx.Param)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]  # longer and shorter than the window
    out = generate(gd, params, prompts, 7, 32, temperature=0.0)
    for prompt, new in zip(prompts, out):  # greedy tokens: the model's argmax after each prefix
        row = jnp.asarray([prompt + new], jnp.int32)
        np.testing.assert_array_equal(np.argmax(np.asarray(model(row))[0, len(prompt) - 1:-1], -1), new)
    assert generate(gd, params, prompts, 7, 32, temperature=0.0, weights=decode.prepare(gd, params, tensor=2)) == out
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 12)), jnp.int32)
    w = decode.prepare(gd, params)
    _, kvs = decode.prefill(w, tokens[:, :4], jnp.asarray([4]))
    ext, _ = decode.extend(w, tokens[:, 4:10], jnp.asarray([4]), sampler._grow(kvs, 16), 16)
    np.testing.assert_allclose(ext[0], model(tokens)[0, 4:10], rtol=1e-4, atol=1e-4)
