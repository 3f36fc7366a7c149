"""Fused LoRA kernels in Pallas interpret mode against the XLA reference and an independent
naive formula, forward and every gradient (x, A, B, scale), ragged shapes, f32 and bf16.

Tolerances: f32 1e-4 relative to the output's scale (both paths accumulate in f32 on CPU,
only the summation order differs); bf16 3e-2 (inputs and outputs are rounded to bf16, 8 bits
of mantissa, while accumulation stays f32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.kernels.lora import Blocks, lora_matmul
from jaxlearn.kernels.quant import dequantize, quantize

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
# Small tiles so the grids have several steps in every axis (the reuse across j/k is exercised).
BLOCKS = {"tpu": Blocks(16, 128, 128), "gpu": Blocks(16, 32, 32)}


def _operands(t, d_in, d_out, r, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (t, d_in), jnp.float32)
    w = jax.random.normal(ks[1], (d_in, d_out), jnp.float32) / np.sqrt(d_in)
    a = jax.random.normal(ks[2], (d_in, r), jnp.float32) / np.sqrt(d_in)
    b = jax.random.normal(ks[3], (r, d_out), jnp.float32)
    return x.astype(dtype), w.astype(dtype), a.astype(dtype), b.astype(dtype)


def _value_and_grads(fn, x, a, b, scale):
    """Output and the gradients of a non-linear loss (so dy is not constant)."""
    def loss(x, a, b, s):
        y = fn(x, a, b, s)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, scale)
    return y, grads


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-6)
    assert err < tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _check(impl, w_base, x, a, b, scale, dtype, blocks=None, xa_mode="recompute"):
    ref = _value_and_grads(lambda x, a, b, s: lora_matmul(x, w_base, a, b, s, impl="xla"), x, a, b, scale)
    got = _value_and_grads(lambda x, a, b, s: lora_matmul(x, w_base, a, b, s, impl=impl, interpret=True,
                                                          blocks=blocks or BLOCKS[impl], xa_mode=xa_mode),
                           x, a, b, scale)
    for name, g, r in zip(("y", "dx", "dA", "dB", "dscale"), (got[0], *got[1]), (ref[0], *ref[1])):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        _assert_close(g, r, TOL[dtype], f"{impl} {name}")


# Every kernel and mode in f32; bf16 (the same kernels, a looser tolerance) for the TPU kernel in
# the default suite and for the GPU kernel's two modes in the `slow` sweep.
@pytest.mark.parametrize("impl,xa_mode,dtype", [
    ("tpu", "recompute", jnp.float32), ("gpu", "recompute", jnp.float32), ("gpu", "precompute", jnp.float32),
    ("tpu", "recompute", jnp.bfloat16),
    pytest.param("gpu", "recompute", jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("gpu", "precompute", jnp.bfloat16, marks=pytest.mark.slow),
])
def test_kernel_matches_reference_ragged(impl, xa_mode, dtype):
    # Nothing is a block multiple: tokens 37, d_in 200, d_out 136, rank 5.
    x, w, a, b = _operands(37, 200, 136, 5, dtype)
    _check(impl, w, x, a, b, 1.5, dtype, xa_mode=xa_mode)


def test_reference_matches_naive_merged_formula():
    """The XLA reference (and its custom VJP) against autodiff of x (W + s A B), formed naively."""
    x, w, a, b = _operands(9, 24, 20, 3, jnp.float32, seed=1)
    def naive(x, a, b, s):
        return x @ (w + s * a @ b)
    want = _value_and_grads(naive, x, a, b, 0.75)
    got = _value_and_grads(lambda x, a, b, s: lora_matmul(x, w, a, b, s), x, a, b, 0.75)
    for g, r in zip((got[0], *got[1]), (want[0], *want[1])):
        _assert_close(g, r, 1e-5, "reference vs naive")


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_quantized_kernel_matches_dequantize_then_matmul(fmt, impl):
    x, w, a, b = _operands(20, 200, 136, 4, jnp.float32, seed=2)
    qw = quantize(w, fmt, group=128)
    blocks = Blocks(8, 128, 128) if impl == "tpu" else Blocks(16, 32, 128)
    _check(impl, qw, x, a, b, 2.0, jnp.float32, blocks)
    # and the quantized reference is the dense math on the dequantized weight
    dense = dequantize(qw)
    _assert_close(lora_matmul(x, qw, a, b, 2.0), lora_matmul(x, dense, a, b, 2.0), 1e-6, "xla quantized")


def test_leading_axes_and_default_blocks():
    """[B, S, d] input, default tiles (one grid step in most axes), bf16 path via the default blocks."""
    x, w, a, b = _operands(2 * 7, 64, 48, 8, jnp.float32, seed=3)
    x3 = x.reshape(2, 7, 64)
    y = lora_matmul(x3, w, a, b, 0.5, impl="tpu", interpret=True)
    assert y.shape == (2, 7, 48)
    _assert_close(y, lora_matmul(x3, w, a, b, 0.5), 1e-5, "default blocks")


def test_w_gets_no_gradient_and_zero_b_is_identity():
    x, w, a, b = _operands(8, 32, 16, 2, jnp.float32, seed=4)
    b = jnp.zeros_like(b)
    y = lora_matmul(x, w, a, b, 3.0, impl="gpu", interpret=True, blocks=Blocks(16, 16, 16))
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)
    # dW through the op is exactly zero (W is treated as frozen, no dW matmul is run; the
    # backward rule is shared by every impl)
    dw = jax.grad(lambda w: jnp.sum(lora_matmul(x, w, a, b, 3.0)))(w)
    assert not np.any(np.asarray(dw))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("shape", [(1, 128, 128, 1), (64, 256, 384, 16), (130, 300, 260, 33)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_sweep(impl, shape, dtype):
    x, w, a, b = _operands(*shape, dtype, seed=sum(shape))
    _check(impl, w, x, a, b, 0.3, dtype)
