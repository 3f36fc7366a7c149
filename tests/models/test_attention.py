"""The CPU attention (`grouped_attention`) equals plain softmax attention, forward and backward,
with and without the causal query blocks that skip the keys above the diagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import reference_attention
from jaxlearn.models.layers import attend, attention_mask, grouped_attention


def _qkv(t, s, n=4, kvh=2, h=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (2, t, n, h)), jax.random.normal(ks[1], (2, s, kvh, h)),
            jax.random.normal(ks[2], (2, s, kvh, h)))


def _masks():
    t = 16
    seg = jnp.asarray([[1] * 8 + [2] * 6 + [0] * 2, [1] * 16])  # packed documents + padding
    idx = jnp.broadcast_to(jnp.arange(t), (2, t))
    causal = attention_mask(seg, idx, seg)
    ones = jnp.ones((2, t), jnp.int32)
    prefix = jnp.concatenate([jnp.ones((2, 1, t, 4), bool), attention_mask(ones, idx, ones)], -1)
    return {"packed causal": (causal, True), "prefix + causal": (prefix, True),
            "not causal": (jnp.ones((2, 1, t, t), bool), False)}


# Query blocks (n_blocks > 1) are only promised for masks that hide the keys above the diagonal.
CASES = [(name, n) for name, (_, causal) in _masks().items() for n in ((1, 4) if causal else (1,))]


@pytest.mark.parametrize("name,n_blocks", CASES)
def test_grouped_attention_matchesreference_attention(name, n_blocks):
    mask, _ = _masks()[name]
    q, k, v = _qkv(16, mask.shape[-1])

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out  # a nonlinear loss so every gradient path shows

    ours = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b: grouped_attention(*b, mask, n_blocks), *a),
                              argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b: reference_attention(*b, mask), *a),
                             argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(ours[0][1], ref[0][1], atol=2e-5)
    for a, b in zip(ours[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_query_blocks_really_skip_keys():
    """With blocks, keys above the diagonal are never read: changing them changes nothing, while
    the unblocked path over a mask that shows them does change (so the test can fail)."""
    mask, _ = _masks()["packed causal"]
    q, k, v = _qkv(16, 16)
    v_hidden = v.at[:, 12:].set(100.0)  # keys 12.. are above the diagonal for queries < 12
    out = grouped_attention(q, k, v_hidden, mask, 4)
    np.testing.assert_allclose(out[:, :12], grouped_attention(q, k, v, mask, 4)[:, :12], atol=1e-6)
    full = jnp.ones((2, 1, 16, 16), bool)
    assert not np.allclose(grouped_attention(q, k, v_hidden, full, 1)[:, :12],
                           grouped_attention(q, k, v, full, 1)[:, :12])


def test_attend_causal_flag_uses_blocks_only_when_promised():
    """`attend(causal=True)` at T = 256 takes the block path; the result equals causal=False."""
    t = 256
    ones = jnp.ones((1, t), jnp.int32)
    mask = attention_mask(ones, jnp.arange(t)[None], ones)
    q, k, v = (x[:1] for x in _qkv(t, t, n=2, kvh=1, h=8))
    np.testing.assert_allclose(attend(q, k, v, mask, "xla", causal=True),
                               attend(q, k, v, mask, "xla", causal=False), atol=1e-5)
