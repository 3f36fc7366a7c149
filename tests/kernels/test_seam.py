"""The linear seam's dispatch: a tiny model with LoRA (and DoRA, multi-adapter batches,
quantized bases) gives the same logits and gradients with `kernels: pallas` (the TPU kernel in
interpret mode on CPU) as with `kernels: xla`, and `auto` on CPU is the XLA path exactly."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import PeftConfig
from jaxlearn.kernels.quant import dequantize_kernel, nf4_group
from jaxlearn.models.layers import quantized_kernel
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.peft.attach import attach, attach_axes, find_sites, trainable_patterns
from jaxlearn.peft.filter import flat_paths, merge_params, split_params, unflatten_paths
from jaxlearn.peft.merge import adapter_leaves
from jaxlearn.peft.multi import select_adapters, stack_adapters
from jaxlearn.peft.quantize import base_bytes

from helpers import logits_of, random_batch, tiny_model_config

# one layer, d_model 64: the interpret-mode kernels run every projection, so keep it small
CFG = tiny_model_config(n_layers=1, init_std=0.2)


def _apply(cfg, params, args):
    """Logits of the model under jit (eager Flax apply runs op by op: slow)."""
    return logits_of(Transformer(cfg), params, *args)


def _with_adapters(cfg, pc, seed=0):
    model = Transformer(cfg)
    base = init_params(model, jax.random.key(0))
    abstract, logical = abstract_params(model)
    p = attach(base, pc, find_sites(abstract, logical, pc), jax.random.key(seed))
    flat = flat_paths(p)
    for k in flat:  # trained-looking adapters: B non-zero
        if k.endswith("lora_b"):
            flat[k] = 0.1 * jax.random.normal(jax.random.key(len(k) + seed), flat[k].shape)
    return unflatten_paths(flat)


@pytest.mark.parametrize("ptype,targets", [
    ("lora", (r"attn/o$",)),  # two input dims (heads, head_dim) flatten to the kernel's d_in
    pytest.param("dora", (r"attn/(q|o)$", r"mlp/down$"), marks=pytest.mark.slow),
])
def test_pallas_equals_xla_through_the_model(ptype, targets):
    pc = PeftConfig(type=ptype, rank=4, targets=targets)
    params = _with_adapters(CFG, pc)
    batch = random_batch(2, 8, CFG.vocab_size, seed=1)
    got = _run("pallas", params, batch, pc)
    want = _run("xla", params, batch, pc)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    for (path, g), w in zip(flat_paths(got[1]).items(), flat_paths(want[1]).values()):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=path)
    # auto on CPU is the XLA path, bit for bit
    auto = _run("auto", params, batch, pc)
    np.testing.assert_array_equal(auto[0], want[0])


def _run(kernels, params, batch, pc):
    model = Transformer(dataclasses.replace(CFG, kernels=kernels))
    trainable, frozen = split_params(params, trainable_patterns(pc))

    def loss(tr):
        logits = model.apply({"params": merge_params(tr, frozen)}, batch["inputs"], batch["positions"],
                             batch["segment_ids"])[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return logits, grads


@pytest.mark.slow  # the kernel itself is checked against a per-example loop in test_multi_lora.py
def test_multi_adapter_batch_through_the_kernel():
    pc = PeftConfig(type="lora", rank=4, targets=(r"attn/q$",))
    adapters = [_with_adapters(CFG, pc, seed=s) for s in (1, 2)]
    base = init_params(Transformer(CFG), jax.random.key(0))
    bank = stack_adapters([adapter_leaves(a) for a in adapters])
    ids = jnp.asarray([1, 0, 1])
    batch = random_batch(3, 8, CFG.vocab_size, seed=3)
    mixed = select_adapters(base, bank, ids)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    got = _apply(dataclasses.replace(CFG, kernels="pallas"), mixed, args)
    want = _apply(dataclasses.replace(CFG, kernels="xla"), mixed, args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _quantized(fmt):
    pc = PeftConfig(type="lora", rank=4, quantize=fmt)
    model = Transformer(CFG)
    base = init_params(model, jax.random.key(0))
    abstract, logical = abstract_params(model)
    sites = find_sites(abstract, logical, pc)
    return model, base, logical, pc, sites, attach(base, pc, sites, jax.random.key(1))


def _dequantized_model_params(flat_q, flat_base, sites):
    """The reference: each quantized kernel dequantized and put back as a dense weight."""
    deq = dict(flat_q)
    for s in sites:
        shape = flat_base[f"{s.path}/kernel"].shape
        deq[f"{s.path}/kernel"] = jax.vmap(lambda a, b: dequantize_kernel(quantized_kernel(a, b, shape[1:], s.n_in)))(
            deq.pop(f"{s.path}/kernel_q"), deq.pop(f"{s.path}/kernel_scale"))
    return unflatten_paths(deq)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_base_at_attach(fmt):
    """peft.quantize replaces the adapted kernels by codes + scales: the bytes the layouts
    promise, logits equal to the model whose kernels are the dequantized weights, and close to
    the unquantized model (adapters are identities at attach)."""
    model, base, logical, pc, sites, q = _quantized(fmt)
    flat, flat_base = flat_paths(q), flat_paths(base)
    # the logical axes tree matches the parameter tree (sharding needs every leaf named)
    assert set(flat_paths(attach_axes(logical, pc, sites))) == set(flat)
    expected = 0
    for s in sites:
        layers, d_in, d_out = s.shape[0], math.prod(s.split()[0]), math.prod(s.split()[1])
        if fmt == "int8":
            expected += layers * (d_in * d_out + 4 * d_out)
        else:
            p = -(-d_in // nf4_group(d_in)) * nf4_group(d_in)
            expected += layers * (p // 2 * d_out + 4 * d_out * p // 64)
        assert f"{s.path}/kernel" not in flat and flat[f"{s.path}/kernel_q"].dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    # every projection is adapted (default targets) and the embedding is tied: no dense kernel left
    assert base_bytes(flat) == {"quantized": expected, "dense_kernels": 0}
    batch = random_batch(2, 8, CFG.vocab_size, seed=2)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    want = _apply(CFG, _dequantized_model_params(flat, flat_base, sites), args)
    got_xla = _apply(CFG, q, args)
    np.testing.assert_allclose(got_xla, want, rtol=1e-5, atol=1e-5)
    ref = _apply(CFG, base, args)
    rel = float(jnp.max(jnp.abs(got_xla - ref))) / float(jnp.max(jnp.abs(ref)))
    # random init_std=0.2 weights amplify errors through the layers; SmolLM2 numbers: benchmarks/qlora_report
    assert 0 < rel < (0.05 if fmt == "int8" else 0.75), rel


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_base_through_the_kernel(fmt):
    model, base, _, _, sites, q = _quantized(fmt)
    batch = random_batch(2, 8, CFG.vocab_size, seed=2)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    want = _apply(CFG, q, args)
    got = _apply(dataclasses.replace(CFG, kernels="pallas"), q, args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
