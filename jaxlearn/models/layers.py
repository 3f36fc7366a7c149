"""Building blocks of the Llama-family decoder: the linear seam, RMSNorm, RoPE, attention.

`linear` is the only function in jaxlearn that multiplies activations by a weight matrix.
PEFT methods (LoRA, IA3, ...) and Pallas kernels hook in here, so they apply to every
projection of every model, including the tied LM head.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def linear(x: jax.Array, w: jax.Array, n_in: int = 1, w_transposed: bool = False) -> jax.Array:
    """The linear seam: contract the last `n_in` axes of `x` with the first `n_in` of `w`.

    With `w_transposed`, `w` is [out, in] (the tied embedding used as the LM head) and the
    last axis of `x` contracts with `w`'s last axis, with no transposed copy made.

    >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    w = w.astype(x.dtype)
    if w_transposed:
        dims = (((x.ndim - 1,), (w.ndim - 1,)), ((), ()))
    else:
        dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims)


class Linear(nn.Module):
    """A bias-free projection whose kernel carries logical axis names.

    `features` are the output dims; `axes` names the kernel's dims (inputs first).
    """

    features: Sequence[int]
    axes: Sequence[str]
    n_in: int = 1
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in:]
        # Normal(std) over the fan-in regardless of how many axes it is split into.
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), tuple(self.axes))
        kernel = self.param("kernel", init, tuple(in_shape) + tuple(self.features), self.param_dtype)
        return linear(x.astype(self.dtype), kernel, self.n_in)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float, style: str) -> jax.Array:
    """Rotary position embedding.

    `rotate_half` (Hugging Face Llama layout) rotates the pair (i, i + H/2); `interleaved`
    (the original RoFormer / GGUF layout) rotates the pair (2i, 2i + 1).
    """
    h = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    if style == "rotate_half":
        x1, x2 = x[..., : h // 2], x[..., h // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"unknown rope style {style!r}; use 'rotate_half' or 'interleaved'.")
    return out.astype(x_btnh.dtype)


def attention_mask(q_seg_bt: jax.Array, q_idx_bt: jax.Array, kv_seg_bs: jax.Array) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment and causal (key slot <= query slot).

    Segment ids keep packed documents apart; padding (segment 0) only sees padding, so no
    row is ever fully masked (no NaNs).
    """
    kv_idx = jnp.arange(kv_seg_bs.shape[1])
    same = q_seg_bt[:, :, None] == kv_seg_bs[:, None, :]
    causal = kv_idx[None, None, :] <= q_idx_bt[:, :, None]
    return (same & causal)[:, None, :, :]


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array,
           impl: str = "auto") -> jax.Array:
    """Grouped-query attention. The seam where fused kernels plug in.

    `dot_product_attention` calls `jax.nn.dot_product_attention` (cuDNN/TPU fused paths where
    the backend has them); `xla` is an explicit einsum formulation with the KV heads broadcast
    over their query groups (no repeated K/V copies), which is faster on CPU.
    """
    b, t, n, h = q_btnh.shape
    kvh = k_bskh.shape[2]
    scale = h ** -0.5
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "dot_product_attention"
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
    g = n // kvh
    q = q_btnh.reshape(b, t, kvh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * scale
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask_b1ts[:, :, None, :, :], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
