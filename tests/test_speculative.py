"""Speculative decoding (lm/sampling/speculative.py): greedy output equal to the target's,
sampled output distributed as the target's, and `decode.extend` equal to one step at a time."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sampling import decode, sampler, speculative

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                  init_std=0.2)


def _weights(cfg, seed, noise=0.0):
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(seed)), nnx.Param)
    if noise:  # the target's weights, perturbed: a draft that agrees with it often, not always
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(99), len(leaves))
        params = jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape, x.dtype)
                                           for x, k in zip(leaves, keys)])
    return graphdef, params, decode.prepare(graphdef, params)


def test_extend_equals_one_step_at_a_time():
    _, _, w = _weights(CFG, 0)
    tokens = jnp.asarray([[3, 17, 5, 9, 44, 2, 0, 0]], jnp.int32)
    _, kvs = decode.prefill(w, tokens[:, :3], jnp.asarray([3]))
    cache = sampler._grow(kvs, 16)
    logits, ext_cache = decode.extend(w, tokens[:, 3:6], jnp.asarray([3]), cache, 16)
    step_cache = cache
    for i in range(3):
        step_logits, step_cache = decode.step(w, tokens[:, 3 + i], jnp.asarray([3 + i]), step_cache, 16)
        np.testing.assert_allclose(np.asarray(logits[:, i]), np.asarray(step_logits), atol=2e-5)
    for a, b in zip(ext_cache, step_cache):
        np.testing.assert_allclose(np.asarray(a["k"][:, :6]), np.asarray(b["k"][:, :6]), atol=1e-5)


@pytest.mark.parametrize("ks", [pytest.param(range(1, 9), marks=pytest.mark.slow, id="k1-8")])
def test_greedy_output_is_the_targets_token_for_token(ks):
    graphdef, params, target = _weights(CFG, 0)
    _, _, draft = _weights(CFG, 0, noise=0.02)
    prompt = [4] * 20
    ref = sampler.generate(graphdef, params, [prompt], 40, 64, temperature=0.0)[0]
    partial_rounds = 0
    for k in ks:
        r = speculative.generate(target, draft, prompt, 40, 64, k=k)
        assert r.tokens == ref, k
        partial_rounds += 0 < r.accepted < r.drafted
    assert partial_rounds == len(ks)  # the draft is neither always right nor always wrong: both paths ran
    stop = ref[25]  # a stop token ends the output where the target's own output ends
    ref = sampler.generate(graphdef, params, [prompt], 40, 64, temperature=0.0, stop_ids=[stop])[0]
    assert ref[-1] == stop and len(ref) < 40
    for k in ks[-1:]:
        assert speculative.generate(target, draft, prompt, 40, 64, k=k, stop_ids=[stop]).tokens == ref
    prompts = [[1, 5, 9, 33, 7]]
    # a draft of another model (rarely right) and a draft that is the target (always right)
    _, _, stranger = _weights(dataclasses.replace(CFG, n_layers=1, d_model=32, d_ff=64), 5)
    ref = sampler.generate(graphdef, params, [prompts[0]], 30, 64, temperature=0.0)[0]
    assert speculative.generate(target, stranger, prompts[0], 30, 64, k=3).tokens == ref
    same = speculative.generate(target, target, prompts[0], 30, 64, k=4)
    assert same.tokens == ref and same.accepted == same.drafted




@pytest.mark.slow  # (13 s; the rule alone is tested below in the fast suite)
def test_sampled_output_follows_the_targets_distribution():
    """20,000 draws of three new tokens (k=2, temperature 1) from a draft that disagrees: the
    empirical joint of tokens 2 and 3 (the first comes from the prefill) against the exact
    one under the target, by chi-square over the 64 cells; the same counts are far from the
    draft's own distribution (the test can tell them apart)."""
    v = 8
    cfg = ModelConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32,
                      init_std=0.5)
    _, _, target = _weights(cfg, 0)
    _, _, draft = _weights(dataclasses.replace(cfg, d_model=16, n_layers=1, d_ff=32), 1)
    prompt = [1, 2, 3]
    seqs = np.asarray([prompt + list(s) for s in itertools.product(range(v), repeat=3)], np.int32)

    def joint(w):  # exact P(token 2, token 3) under `w`, token 1 summed out
        lp, _, _ = decode.prompt_logprobs(w, jnp.asarray(seqs))
        return np.exp(np.asarray(lp)[:, -3:].sum(1)).reshape(v, v, v).sum(0).reshape(-1)

    n = 20_000
    tokens = jnp.zeros((1, 16), jnp.int32).at[0, :3].set(jnp.asarray(prompt))
    bases = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 0))(jnp.arange(n))
    out, count, rounds, kept = jax.vmap(lambda b: speculative._speculate(
        target, draft, tokens, jnp.asarray([3]), b, jnp.float32(1.0), jnp.float32(1.0), jnp.asarray([-1]),
        k=2, max_new=3, top_k=0, greedy=False))(bases)
    out = np.asarray(out)
    assert np.all(np.asarray(count) == 3)
    assert 0.1 < np.asarray(kept).sum() / (2 * np.asarray(rounds).sum()) < 0.9  # some drafts kept, some not
    counts = np.bincount(out[:, 1] * v + out[:, 2], minlength=v * v)

    def chi2(p):
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    # 63 degrees of freedom: chi2 > 110 has probability < 1e-4 under the target's distribution
    assert chi2(joint(target)) < 110
    assert chi2(joint(draft)) > 1000


def test_accept_rule_in_isolation():
    """The sampled rule on fixed distributions: the first emitted token is distributed as p[0]
    whatever q is (here q puts most mass where p puts little)."""
    p = jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.25] * 4])
    q = jnp.asarray([[0.05, 0.15, 0.3, 0.5]])
    keys = jax.random.split(jax.random.PRNGKey(0), 40_000)

    def first(key):
        dk, ak = jax.random.split(key)
        d = jax.random.categorical(dk, jnp.log(q[0]))[None].astype(jnp.int32)
        n, tok = speculative.accept(p, q, d, ak, greedy=False)
        return jnp.where(n > 0, d[0], tok)

    freq = np.bincount(np.asarray(jax.vmap(first)(keys)), minlength=4) / 40_000
    np.testing.assert_allclose(freq, np.asarray(p[0]), atol=0.01)


def test_a_draft_of_another_vocabulary_or_k_0_is_refused():
    _, _, target = _weights(CFG, 0)
    _, _, other = _weights(dataclasses.replace(CFG, vocab_size=64), 1)
    with pytest.raises(ValueError, match="draft's vocabulary has 64 tokens, the target's 128"):
        speculative.generate(target, other, [1, 2], 4, 64)
    with pytest.raises(ValueError, match="k=0"):
        speculative.generate(target, target, [1, 2], 4, 64, k=0)
