"""The fused attention (`jax.nn.dot_product_attention`) against the einsum one: outputs and
gradients under every mask the models build, alone and inside whole GPT-2 and Llama models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsftdpo.errors import UserError
from jaxsftdpo.models import gpt2, layers, llama
from jaxsftdpo.models.layers import (attention, attention_mask_for, default_position_ids,
                                     einsum_attention, fused_attention)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
RIGHT_PADDED = [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
LEFT_PADDED = [[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]


def qkv(heads: int, kv_heads: int, queries: int, keys: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (2, heads, queries, 16))
    k, v = (jax.random.normal(key, (2, kv_heads, keys, 16)) for key in ks[1:])
    return q, k, v


def outputs_and_gradients(fn, q, k, v, mask):
    """`fn`'s output and the gradients of a random projection of it w.r.t. q, k and v."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, scale=0.25), q, k, v)
    cotangent = jax.random.normal(jax.random.key(1), out.shape)
    return (out, *vjp(cotangent))


CASES = {  # name: (query heads, key/value heads, valid key slots, queries, offset, window)
    "causal, right padding": (4, 4, RIGHT_PADDED, 8, 0, None),
    "causal, left padding": (4, 4, LEFT_PADDED, 8, 0, None),
    "grouped queries (4 / 2 heads), left padding": (4, 2, LEFT_PADDED, 8, 0, None),
    "sliding window of 3": (4, 2, RIGHT_PADDED, 8, 0, 3),
    "decode: 1 query at cache slot 6 of 8": (4, 2, LEFT_PADDED, 1, 6, None),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_attention_equals_einsum_attention(case):
    heads, kv_heads, valid, queries, offset, window = CASES[case]
    valid = jnp.asarray(valid, bool)
    mask = attention_mask_for(valid, queries, offset, window)
    q, k, v = qkv(heads, kv_heads, queries, valid.shape[1])
    fused = outputs_and_gradients(fused_attention, q, k, v, mask)
    einsum = outputs_and_gradients(einsum_attention, q, k, v, mask)
    for name, ours, theirs in zip(("output", "dq", "dk", "dv"), fused, einsum):
        assert np.isfinite(ours).all(), name  # padding queries attend to nothing: no NaN
        np.testing.assert_allclose(ours, theirs, **TOLERANCE, err_msg=name)


def test_attention_setting_picks_the_implementation():
    """On CPU "auto" is the einsum path; attention dropout, which only that path has, takes it
    whatever the setting."""
    mask = attention_mask_for(jnp.asarray(LEFT_PADDED, bool), 8, 0)
    q, k, v = qkv(4, 2, 8, 8)
    np.testing.assert_array_equal(attention(q, k, v, mask, scale=0.25),
                                  einsum_attention(q, k, v, mask, scale=0.25))
    rng = jax.random.key(2)
    np.testing.assert_array_equal(
        attention(q, k, v, mask, scale=0.25, dropout_rate=0.5, dropout_rng=rng,
                  implementation="fused"),
        einsum_attention(q, k, v, mask, scale=0.25, dropout_rate=0.5, dropout_rng=rng))
    with pytest.raises(UserError, match="attention 'flash'"):
        gpt2.GPT2Config(attention="flash")


TINY_GPT2 = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
TINY_LLAMA = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32)


@pytest.mark.parametrize("family, config", [(gpt2, TINY_GPT2), (llama, TINY_LLAMA)],
                         ids=["gpt2", "llama"])
def test_models_agree_through_both_paths(family, config, monkeypatch):
    """Logits, parameter gradients, and a prefill + one cached decoding step."""
    fused_calls = []

    def counted_fused_attention(*args, **kwargs):
        fused_calls.append(1)
        return fused_attention(*args, **kwargs)

    monkeypatch.setattr(layers, "fused_attention", counted_fused_attention)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 8)))
    mask = jnp.asarray(LEFT_PADDED, bool)
    positions = default_position_ids(mask)

    def run(implementation):
        model = family.build(dataclasses.replace(config, attention=implementation), seed=0)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, mask)
            return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2) / 1e3, logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        _, cache = model.decode(ids, positions, mask, model.init_cache(2, 10))
        step, _ = model.decode(ids[:, :1], positions[:, -1:] + 1, jnp.ones((2, 1), bool), cache)
        return logits, grads, step

    einsum = run("einsum")
    assert not fused_calls
    fused = run("fused")
    assert len(fused_calls) == 3 * config.num_layers  # forward, prefill, decoding step
    np.testing.assert_allclose(fused[0], einsum[0], **TOLERANCE)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), fused[1], einsum[1])
    np.testing.assert_allclose(fused[2], einsum[2], **TOLERANCE)
