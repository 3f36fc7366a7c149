"""The memory-efficient attention kernels behind the `attend` seam equal the reference.

`model.attention: auto` runs Pallas splash attention on TPU and the Pallas Triton flash kernel
on GPU. Both run here in Pallas interpret mode (the same kernel bodies, executed by the CPU) and
must give the reference's values and gradients for causal attention over packed segments with
padding, with grouped-query heads (and MQA). Also: the whole model with each kernel equals the
XLA path, on one device and under shard_map on an 8-device mesh (batch rows and heads split);
and a shape the kernels cannot tile falls back to the XLA reference, by name.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, reference_attention, tiny_model_config
from jaxlearn.config import MeshConfig
from jaxlearn.models.layers import attend, attention_mask, fused_attention
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for

KERNELS = ("splash", "flash_gpu")


def _packed(t: int) -> jax.Array:
    """Row 0: three documents and trailing padding (segment 0); row 1: one document."""
    a, b = t // 3, t // 2
    return jnp.asarray([[1] * a + [2] * b + [3] * (t - a - b - 9) + [0] * 9, [5] * t], jnp.int32)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("n,kvh", [(4, 2), (4, 1), (2, 2)])  # GQA, MQA, plain multi-head
def test_kernel_matches_reference_values_and_gradients(impl, n, kvh):
    t, h = 256, 32
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, t, n, h))
    k, v = jax.random.normal(ks[1], (2, t, kvh, h)), jax.random.normal(ks[2], (2, t, kvh, h))
    w = jax.random.normal(ks[3], q.shape)  # a cotangent that is not all ones
    seg = _packed(t)
    mask = attention_mask(seg, jnp.broadcast_to(jnp.arange(t), seg.shape), seg)

    def run(f):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)

    out, grads = run(lambda q, k, v: fused_attention(q, k, v, seg, seg, impl, interpret=True))
    ref, ref_grads = run(lambda q, k, v: reference_attention(q, k, v, mask))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")
    # the mask matters: a kernel that ignored the segments would differ from this
    unpacked = reference_attention(q, k, v, mask[1:2].repeat(2, 0))
    assert not np.allclose(out[0], unpacked[0], atol=1e-3)


def _logits_and_grads(cfg, params, batch, shard=None):
    model = Transformer(cfg, shard)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])

    def loss(p):
        logits = model.apply({"params": p}, *args)[0]
        return jnp.sum(jnp.sin(logits) * batch["loss_mask"][..., None]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("impl", KERNELS)
def test_model_with_kernel_equals_xla_path(impl):
    """A 2-layer model with packed documents: logits and every parameter's gradient."""
    cfg = tiny_model_config(max_seq_len=128)
    params = init_params(Transformer(cfg), jax.random.key(0))
    batch = random_batch(2, 128, cfg.vocab_size, n_docs=3)
    ref_logits, ref_grads = _logits_and_grads(cfg, params, batch)
    logits, grads = _logits_and_grads(dataclasses.replace(cfg, attention=impl), params, batch)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), grads, ref_grads)


@pytest.mark.parametrize("mc", [MeshConfig(preset="fsdp"), MeshConfig(preset="fsdp_tp", tensor=2)],
                         ids=["fsdp", "fsdp_tp"])
def test_splash_per_device_on_a_mesh_equals_unsharded(mc):
    """8 CPU devices: under fsdp the batch rows split 8 ways; under fsdp_tp 4 ways and the
    heads 2 ways (each device: one K/V head with its two query heads). shard_map's per-device
    kernels give the unsharded XLA path's numbers."""
    shard = ShardingContext(make_mesh(mc), rules_for(mc))
    cfg = tiny_model_config(max_seq_len=128, n_heads=4, n_kv_heads=2)
    params = init_params(Transformer(cfg), jax.random.key(0))
    batch = random_batch(8, 128, cfg.vocab_size, n_docs=2)
    ref_logits, ref_grads = _logits_and_grads(cfg, params, batch)
    logits, grads = _logits_and_grads(dataclasses.replace(cfg, attention="splash"), params, batch, shard)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), grads, ref_grads)


def test_shapes_the_kernels_cannot_tile_fall_back_by_name():
    """T = 100 (not a multiple of 128), or no segments given (KV cache, prefix): the XLA
    reference, and the program's scope says so."""
    q, kv = jnp.ones((1, 100, 4, 16)), jnp.ones((1, 100, 2, 16))
    seg = jnp.ones((1, 100), jnp.int32)
    mask = attention_mask(seg, jnp.arange(100)[None], seg)
    text = jax.jit(lambda q, k, v: attend(q, k, v, mask, "splash", True, segments=(seg, seg))).lower(
        q, kv, kv).as_text(debug_info=True)
    assert "attention_dot_product_attention" in text and "attention_splash" not in text
    q, kv, seg = jnp.ones((1, 128, 4, 16)), jnp.ones((1, 128, 2, 16)), jnp.ones((1, 128), jnp.int32)
    mask = attention_mask(seg, jnp.arange(128)[None], seg)
    with_segments = jax.jit(lambda q, k, v: attend(q, k, v, mask, "splash", True, segments=(seg, seg))).lower(
        q, kv, kv).as_text(debug_info=True)
    without = jax.jit(lambda q, k, v: attend(q, k, v, mask, "splash", True)).lower(q, kv, kv).as_text(debug_info=True)
    assert "attention_splash" in with_segments and "attention_splash" not in without
