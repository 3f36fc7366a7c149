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
        # PEFT attaches adapter leaves beside `kernel` (jaxlearn/peft/attach.py); apply them here.
        adapters = {k: v for k, v in self.variables.get("params", {}).items() if k != "kernel"}
        return adapted_linear(x.astype(self.dtype), kernel, adapters, self.n_in)


def adapted_linear(x: jax.Array, kernel: jax.Array, adapters: dict, n_in: int = 1) -> jax.Array:
    """`linear` plus whatever adapters sit beside the kernel (no adapters: exactly `linear`).

    LoRA adds scale * (x A) B without forming A B; DoRA rescales each output column by
    m / ||W + scale A B|| (the norm is not differentiated, as in the DoRA paper); IA3 scales
    inputs or outputs; a bottleneck adapter adds up(silu(down(y))) to the output.

    >>> adapted_linear(jnp.ones((2, 3)), jnp.ones((3, 4)), {}).shape
    (2, 4)
    """
    if not adapters:
        return linear(x, kernel, n_in)
    if "ia3_in" in adapters:
        x = x * adapters["ia3_in"].astype(x.dtype)
    y = linear(x, kernel, n_in)
    if "lora_a" in adapters and adapters["lora_a"].ndim == n_in + 2:
        # Multi-adapter batch (jaxlearn/peft/multi.py): example b uses its own A[b], B[b], scale[b]
        # (gather-by-index, as in Punica's BGMV), so one batch serves many adapters.
        a, b_, scale = adapters["lora_a"], adapters["lora_b"], adapters["lora_scale"].astype(x.dtype)
        delta = jax.vmap(lambda xb, ab, bb: linear(linear(xb, ab, n_in), bb))(x, a, b_)
        y = y + delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))
    elif "lora_a" in adapters:
        scale = adapters["lora_scale"].astype(x.dtype)
        y = y + linear(linear(x, adapters["lora_a"], n_in), adapters["lora_b"]) * scale
        if "dora_m" in adapters:
            w = kernel.astype(jnp.float32) + linear(adapters["lora_a"].astype(jnp.float32),
                                                    adapters["lora_b"].astype(jnp.float32)) * scale
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in)))))
            y = y * (adapters["dora_m"].astype(jnp.float32) / norm).astype(y.dtype)
    if "ia3_out" in adapters:
        y = y * adapters["ia3_out"].astype(y.dtype)
    if "adapter_down" in adapters:
        n_out = adapters["adapter_down"].ndim - 1
        y = y + linear(nn.silu(linear(y, adapters["adapter_down"], n_out)), adapters["adapter_up"])
    return y


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
    the backend has them); `xla` is `grouped_attention` below, which is faster on CPU.

    >>> q, kv = jnp.ones((1, 4, 8, 16)), jnp.ones((1, 4, 2, 16))
    >>> attend(q, kv, kv, jnp.ones((1, 1, 4, 4), bool), "xla").shape
    (1, 4, 8, 16)
    """
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "dot_product_attention"
    if impl == "dot_product_attention":
        scale = q_btnh.shape[-1] ** -0.5
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
    return grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts)


# Added to masked logits. exp() of it underflows to exactly 0 next to any unmasked logit, and
# unlike finfo.min it cannot overflow to -inf when added, so a row with no visible key (which
# attention_mask never makes) would still give a uniform softmax rather than NaNs.
_MASKED_LOGIT = -1e30


def _grouped_layouts(q_btnh, k_bskh, v_bskh):
    """Queries grouped under their KV head: q [B, K, R=G*T, H] (pre-scaled), k and v [B, K, S, H].

    With rows (g, t) every attention product is one plain [R, H] x [H, S] or [R, S] x [S, H]
    GEMM per (batch, KV head): no K/V copies per query head, and the [R, S] logits are never
    transposed.
    """
    b, t, n, h = q_btnh.shape
    kvh = k_bskh.shape[2]
    q = (q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype)).reshape(b, t, kvh, n // kvh, h)
    q_bkrh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kvh, t * (n // kvh), h)
    return q_bkrh, jnp.transpose(k_bskh, (0, 2, 1, 3)), jnp.transpose(v_bskh, (0, 2, 1, 3))


def _masked_logits(q_bkrh, k_bksh, mask_b1ts):
    """float32 logits [B, K, G, T, S] with the mask applied as an additive bias (one add, fused)."""
    b, kvh, r, _ = q_bkrh.shape
    t, s = mask_b1ts.shape[2], mask_b1ts.shape[3]
    logits = jnp.einsum("bkrh,bksh->bkrs", q_bkrh, k_bksh, preferred_element_type=jnp.float32)
    bias_b11ts = jnp.where(mask_b1ts, 0.0, _MASKED_LOGIT).astype(jnp.float32)[:, :, None]
    return logits.reshape(b, kvh, r // t, t, s) + bias_b11ts


def _grouped_attention_fwd(q_btnh, k_bskh, v_bskh, mask_b1ts):
    b, t, n, h = q_btnh.shape
    q_bkrh, k_bksh, v_bksh = _grouped_layouts(q_btnh, k_bskh, v_bskh)
    kvh, r, s = k_bksh.shape[1], q_bkrh.shape[2], k_bksh.shape[2]
    logits = _masked_logits(q_bkrh, k_bksh, mask_b1ts)  # [B, K, G, T, S]
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Normalise the [R, H] output rather than the [R, S] probabilities: one pass fewer.
    o_bkrh = jnp.einsum("bkrs,bksh->bkrh", p.reshape(b, kvh, r, s).astype(v_bksh.dtype), v_bksh,
                        preferred_element_type=jnp.float32) / l.reshape(b, kvh, r, 1)
    out = jnp.transpose(o_bkrh.reshape(b, kvh, n // kvh, t, h), (0, 3, 1, 2, 4)).reshape(b, t, n, h)
    out = out.astype(q_btnh.dtype)
    lse = m + jnp.log(l)  # [B, K, G, T, 1] log-partition, all the backward needs of the softmax
    return out, (q_bkrh, k_bksh, v_bksh, mask_b1ts, out, lse)


def _grouped_attention_bwd(res, dout_btnh):
    q_bkrh, k_bksh, v_bksh, mask_b1ts, out_btnh, lse = res
    b, t, n, h = dout_btnh.shape
    kvh, r, s = k_bksh.shape[1], q_bkrh.shape[2], k_bksh.shape[2]
    g = n // kvh
    # softmax backward: dlogits = p * (dp - delta), delta = rowsum(dout * out)
    delta_btn = jnp.sum(dout_btnh.astype(jnp.float32) * out_btnh.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta_btn.reshape(b, t, kvh, g), (0, 2, 3, 1))[..., None]  # [B, K, G, T, 1]
    do_bkrh = jnp.transpose(dout_btnh.reshape(b, t, kvh, g, h), (0, 2, 3, 1, 4)).reshape(b, kvh, r, h)
    # Recompute the probabilities from the saved log-partition instead of keeping [B, N, T, S]
    # of them per layer: a GEMM is cheaper here than writing and re-reading them.
    p = jnp.exp(_masked_logits(q_bkrh, k_bksh, mask_b1ts) - lse)
    dp = jnp.einsum("bkrh,bksh->bkrs", do_bkrh, v_bksh, preferred_element_type=jnp.float32)
    ds_bkrs = (p * (dp.reshape(p.shape) - delta)).reshape(b, kvh, r, s).astype(q_bkrh.dtype)
    p_bkrs = p.reshape(b, kvh, r, s).astype(do_bkrh.dtype)
    dq = jnp.einsum("bkrs,bksh->bkrh", ds_bkrs, k_bksh) * jnp.asarray(h ** -0.5, ds_bkrs.dtype)
    dk = jnp.einsum("bkrs,bkrh->bksh", ds_bkrs, q_bkrh)
    dv = jnp.einsum("bkrs,bkrh->bksh", p_bkrs, do_bkrh)
    dq = jnp.transpose(dq.reshape(b, kvh, g, t, h), (0, 3, 1, 2, 4)).reshape(b, t, n, h)
    return (dq.astype(dout_btnh.dtype), jnp.transpose(dk, (0, 2, 1, 3)).astype(k_bksh.dtype),
            jnp.transpose(dv, (0, 2, 1, 3)).astype(v_bksh.dtype), None)


@jax.custom_vjp
def grouped_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
    """Exact softmax attention, GQA, any boolean mask [B, 1, T, S] (causal, packing, KV cache).

    Written for CPU: the forward keeps only the log-partition of the softmax, and the backward
    recomputes the probabilities from it (as flash attention does, but untiled), so no
    [B, N, T, S] tensor is stored between the passes.

    >>> q, kv = jnp.ones((1, 4, 8, 16)), jnp.ones((1, 4, 2, 16))
    >>> grouped_attention(q, kv, kv, jnp.tril(jnp.ones((4, 4), bool))[None, None]).shape
    (1, 4, 8, 16)
    """
    return _grouped_attention_fwd(q_btnh, k_bskh, v_bskh, mask_b1ts)[0]


grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
