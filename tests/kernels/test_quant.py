"""Quantized bases: the error is within the format's bound, NF4 levels are QLoRA's, the memory
is what the layout promises, and the dispatch switch resolves as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.kernels.dispatch import resolve
from jaxlearn.kernels.quant import NF4_LEVELS, dequantize, quantize


def test_nf4_levels_are_qlora_quantiles():
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1
    assert 0.0 in NF4_LEVELS and np.all(np.diff(NF4_LEVELS) > 0)
    # two published NF4 levels (bitsandbytes' table), recomputed from the definition
    np.testing.assert_allclose(NF4_LEVELS[[1, 14]], [-0.6961928, 0.7229568], atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_error_bounds_and_bytes(fmt):
    w = jax.random.normal(jax.random.key(0), (300, 136)) * 0.05  # ragged d_in: nf4 pads to the group
    qw = quantize(w, fmt, group=128)
    err = jnp.abs(dequantize(qw) - w)
    if fmt == "int8":  # round to nearest: at most half a step per output column
        assert jnp.all(err <= qw.scale / 2 + 1e-7)
        assert qw.nbytes() == 300 * 136 + 136 * 4
    else:  # at most half the widest NF4 gap times the block's absmax
        gap = float(np.max(np.diff(NF4_LEVELS))) / 2
        blk_max = jnp.repeat(qw.scale, 64, axis=0)[:300]
        assert jnp.all(err <= gap * blk_max + 1e-7)
        assert qw.q.shape == (384 // 2, 136) and qw.nbytes() == 192 * 136 + 6 * 136 * 4
    assert dequantize(qw).shape == w.shape


def test_zero_and_constant_columns_are_exact():
    w = jnp.zeros((128, 4)).at[:, 1].set(0.25)
    for fmt in ("int8", "nf4"):
        np.testing.assert_array_equal(dequantize(quantize(w, fmt, group=128)), w)


def test_bad_format_and_group_errors():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(jnp.ones((4, 4)), "int4")
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize(jnp.ones((4, 4)), "nf4", group=96)


def test_dispatch_switch():
    assert resolve("auto", "cpu") == ("xla", False)
    assert resolve("auto", "tpu") == ("tpu", False) and resolve("auto", "gpu") == ("gpu", False)
    assert resolve("pallas", "cpu") == ("tpu", True) and resolve("xla", "tpu") == ("xla", False)
    with pytest.raises(ValueError, match="model.kernels"):
        resolve("triton", "cpu")
