"""The model: shapes, packing isolation, scan == unrolled, RoPE layouts, attention paths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.models.layers import attend, attention_mask, rope
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.peft.filter import flat_paths

from helpers import logits_of, tiny_model_config


def _apply(model, params, tokens, positions=None, seg=None):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
    seg = jnp.ones((b, t), jnp.int32) if seg is None else seg
    return logits_of(model, params, tokens, positions, seg)


def test_shapes_and_param_count():
    cfg = tiny_model_config(tie_embeddings=False)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.param_count()
    logits = _apply(model, params, jnp.ones((2, 10), jnp.int32))
    assert logits.shape == (2, 10, cfg.vocab_size) and logits.dtype == jnp.float32


def test_every_weight_has_logical_axes():
    _, logical = abstract_params(Transformer(tiny_model_config()))
    abstract, _ = abstract_params(Transformer(tiny_model_config()))
    for (path, axes), shape in zip(flat_paths(logical).items(), flat_paths(abstract).values()):
        assert len(axes) == len(shape.shape) and all(isinstance(a, str) for a in axes), path


def test_packed_documents_do_not_see_each_other():
    """Logits of document B inside a packed row == logits of B alone (positions restart)."""
    cfg = tiny_model_config(init_std=0.3)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(1))
    rs = np.random.RandomState(0)
    a, b = rs.randint(1, 128, 7), rs.randint(1, 128, 9)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 7 + [2] * 9 + [0, 0]])
    pos = jnp.asarray([list(range(7)) + list(range(9)) + [0, 0]])
    out = _apply(model, params, packed, pos, seg)
    alone_a = _apply(model, params, jnp.asarray(a[None], jnp.int32))
    alone_b = _apply(model, params, jnp.asarray(b[None], jnp.int32))
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:16], alone_b[0], atol=1e-5)
    # and a change in document A cannot move document B's logits
    packed2 = packed.at[0, 3].set((packed[0, 3] + 5) % 128)
    out2 = _apply(model, params, packed2, pos, seg)
    np.testing.assert_array_equal(np.asarray(out[0, 7:16]), np.asarray(out2[0, 7:16]))
    assert not np.allclose(out[0, 3:7], out2[0, 3:7])


def test_scan_equals_unrolled():
    cfg = tiny_model_config(init_std=0.3)
    scanned, unrolled = Transformer(cfg), Transformer(dataclasses.replace(cfg, scan_layers=False))
    p = init_params(scanned, jax.random.key(2))
    layers = p["layers"]
    p2 = {k: v for k, v in p.items() if k != "layers"}
    for i in range(cfg.n_layers):
        p2[f"layers_{i}"] = jax.tree.map(lambda x: x[i], layers)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)
    np.testing.assert_allclose(_apply(scanned, p, tokens), _apply(unrolled, p2, tokens), atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_gives_same_gradients(remat):
    cfg = tiny_model_config()
    base, rm = Transformer(cfg), Transformer(dataclasses.replace(cfg, remat=remat))
    p = init_params(base, jax.random.key(3))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 8)), jnp.int32)
    loss = lambda m: lambda q: jnp.mean(_apply(m, q, tokens) ** 2)  # noqa: E731
    g1, g2 = jax.jit(jax.grad(loss(base)))(p), jax.jit(jax.grad(loss(rm)))(p)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_rope_interleaved_is_a_permutation_of_rotate_half():
    """Interleaved RoPE on x == rotate-half RoPE on the de-interleaved x, re-interleaved."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # evens then odds
    inv = np.argsort(perm)
    a = rope(x, pos, 10000.0, "interleaved")
    b = rope(x[..., perm], pos, 10000.0, "rotate_half")[..., inv]
    np.testing.assert_allclose(a, b, atol=1e-6)
    # position 0 is the identity, and rotations preserve the norm
    np.testing.assert_allclose(a[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_attention_paths_agree():
    """The einsum path equals jax.nn.dot_product_attention, with GQA and segment masks."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 6, 4, 8))
    k = jax.random.normal(ks[1], (2, 6, 2, 8))
    v = jax.random.normal(ks[2], (2, 6, 2, 8))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = attention_mask(seg, jnp.broadcast_to(jnp.arange(6), (2, 6)), seg)
    np.testing.assert_allclose(attend(q, k, v, mask, "xla"), attend(q, k, v, mask, "dot_product_attention"), atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
    cfg = tiny_model_config()
    p = init_params(Transformer(cfg), jax.random.key(4))
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 16)), jnp.int32)
    f32 = _apply(Transformer(cfg), p, tokens)
    bf16 = _apply(Transformer(dataclasses.replace(cfg, compute_dtype="bfloat16")), p, tokens)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05
