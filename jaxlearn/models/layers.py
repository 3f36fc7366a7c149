"""Building blocks of the Llama-family decoder: the linear seam, RMSNorm, RoPE, attention.

`linear` is the only function in jaxlearn that multiplies activations by a weight matrix.
PEFT methods (LoRA, IA3, ...) and Pallas kernels hook in here, so they apply to every
projection of every model, including the tied LM head.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxlearn.config import RopeScalingConfig
from jaxlearn.models.lora_linear import LORA_T_NAME, augmented_wins, lora_linear
from jaxlearn.sharding import ShardingContext, logical_to_spec, target_platform

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def linear(x: jax.Array, w: jax.Array, n_in: int = 1, w_transposed: bool = False) -> jax.Array:
    """The linear seam: contract the last `n_in` axes of `x` with the first `n_in` of `w`.

    With `w_transposed`, `w` is [out, in] (the tied embedding used as the LM head) and the
    last axis of `x` contracts with `w`'s last axis, with no transposed copy made.

    >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    return _linear(x, w.astype(x.dtype), n_in, w_transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear(x, w, n_in, w_transposed):
    if w_transposed:
        dims = (((x.ndim - 1,), (w.ndim - 1,)), ((), ()))
    else:
        dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims)


def _linear_fwd(x, w, n_in, w_transposed):
    return _linear(x, w, n_in, w_transposed), (x, w)


def _linear_bwd(n_in, w_transposed, res, dy):
    """Both gradients as single 2-D matmuls over the flattened tokens, in the operand layouts
    they already have. (Autodiff's own rule makes XLA:CPU copy a transposed [out, tokens]
    gradient first, fused with its elementwise producers, which costs more than the matmul.)"""
    x, w = res
    k = math.prod(x.shape[x.ndim - (1 if w_transposed else n_in):])
    x_mk = x.reshape(-1, k)
    dy_mn = dy.reshape(x_mk.shape[0], -1)
    contract_rows = (((0,), (0,)), ((), ()))
    if w_transposed:  # w [N, K]
        dx_mk = dy_mn @ w.reshape(-1, k)
        dw = jax.lax.dot_general(dy_mn, x_mk, contract_rows)  # [N, K]
    else:  # w [K, N]
        dx_mk = jax.lax.dot_general(dy_mn, w.reshape(k, -1), (((1,), (1,)), ((), ())))
        dw = jax.lax.dot_general(x_mk, dy_mn, contract_rows)  # [K, N]
    return dx_mk.reshape(x.shape), dw.reshape(w.shape)


_linear.defvjp(_linear_fwd, _linear_bwd)


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
    kernels: str = "auto"  # ModelConfig.kernels: auto | pallas | xla (jaxlearn/kernels/dispatch.py)
    # The mesh the program is compiled for. `kernels` resolves for its platform, not the host's
    # backend (the TPU fit check traces on a CPU for TPU devices), and on more than one device the
    # Pallas kernels run per device under shard_map (XLA cannot partition a Pallas call).
    # None: one device of the host's backend.
    shard: ShardingContext | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in:]
        # Normal(std) over the fan-in regardless of how many axes it is split into.
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), tuple(self.axes))
        params = self.variables.get("params", {})
        if "kernel_q" in params:  # a quantized frozen base (peft.quantize, jaxlearn/peft/quantize.py)
            shape = tuple(in_shape) + tuple(self.features)
            kernel = quantized_kernel(params["kernel_q"], params["kernel_scale"], shape, len(in_shape))
        else:
            kernel = self.param("kernel", init, tuple(in_shape) + tuple(self.features), self.param_dtype)
        # PEFT attaches adapter leaves beside `kernel` (jaxlearn/peft/attach.py); apply them here.
        adapters = {k: v for k, v in params.items() if k not in ("kernel", "kernel_q", "kernel_scale")}
        # LoRA dropout only when the caller supplies a 'dropout' rng (training); evaluation and
        # generation pass none and are deterministic.
        rng = self.make_rng("dropout") if "lora_dropout" in adapters and self.has_rng("dropout") else None
        # LoRA as one fused Pallas kernel where `kernels` resolves to one (TPU/GPU by default);
        # with dropout, A sees another x than W, so that case stays on the XLA path.
        from jaxlearn.kernels.dispatch import resolve
        impl, interpret = resolve(self.kernels, target_platform(self.shard))
        if impl != "xla" and "lora_a" in adapters and rng is None:
            y = fused_on_mesh(self.shard, x.astype(self.dtype), kernel, adapters, self.n_in, impl, interpret)
        else:
            y = adapted_linear(x.astype(self.dtype), kernel, adapters, self.n_in, dropout_rng=rng)
        # The seam's products are custom_vjp calls, which remat policies cannot see into; the
        # name lets the `dots` policies keep projection outputs (REMAT_POLICIES below).
        return checkpoint_name(y, PROJ_NAME)


def quantized_kernel(q: jax.Array, scale: jax.Array, kernel_shape: tuple[int, ...], n_in: int):
    """The QuantizedWeight of a linear layer's `kernel_q`/`kernel_scale` leaves (format from the
    code dtype: int8 -> int8, uint8 -> nf4, whose packing group follows from d_in and the padded
    row count: d_in is zero-padded to whole groups, e.g. 576 -> 640 in 128-row or 1024 in
    512-row groups, see jaxlearn/peft/quantize.py)."""
    from jaxlearn.kernels.quant import QuantizedWeight
    from jaxlearn.peft.quantize import nf4_group_of

    d_in = math.prod(kernel_shape[:n_in])
    if q.dtype == jnp.int8:
        return QuantizedWeight(q, scale, "int8", d_in, 0, kernel_shape)
    return QuantizedWeight(q, scale, "nf4", d_in, nf4_group_of(d_in, 2 * q.shape[0]), kernel_shape)


def adapted_linear(x: jax.Array, kernel, adapters: dict, n_in: int = 1,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
    """`linear` plus whatever adapters sit beside the kernel (no adapters: exactly `linear`).

    LoRA adds scale * (x A) B without forming A B; DoRA rescales each output column by
    m / ||W + scale A B|| (the norm is not differentiated, as in the DoRA paper); IA3 scales
    inputs or outputs; a bottleneck adapter adds up(silu(down(y))) to the output. With
    `dropout_rng` and a `lora_dropout` rate leaf, LoRA's input is dropped (inverted dropout);
    the base path never is.

    This is the plain XLA path (and the reference of `fused_adapted_linear`). `kernel` may be a
    QuantizedWeight (QLoRA): it is dequantised whole first, the same math as the kernels' tiles.

    >>> adapted_linear(jnp.ones((2, 3)), jnp.ones((3, 4)), {}).shape
    (2, 4)
    """
    if not isinstance(kernel, jax.Array):  # QuantizedWeight on the XLA path
        from jaxlearn.kernels.quant import dequantize_kernel
        kernel = dequantize_kernel(kernel, x.dtype)
    if not adapters:
        return linear(x, kernel, n_in)
    if "ia3_in" in adapters:
        x = x * adapters["ia3_in"].astype(x.dtype)
    y = _base_and_lora(x, kernel, adapters, n_in, dropout_rng)
    return _output_adapters(_dora_rescale(y, kernel, adapters, n_in), adapters)


def _dora_rescale(y, dense_kernel, adapters, n_in):
    """DoRA: each output column times m / ||W + s A B|| (norm not differentiated); else y."""
    if "dora_m" not in adapters or adapters["lora_a"].ndim != n_in + 1:
        return y
    a, b = adapters["lora_a"].astype(jnp.float32), adapters["lora_b"].astype(jnp.float32)
    w = dense_kernel.astype(jnp.float32) + linear(a, b) * adapters["lora_scale"].astype(jnp.float32)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in)))))
    return y * (adapters["dora_m"].astype(jnp.float32) / norm).astype(y.dtype)


def _base_and_lora(x, kernel, adapters, n_in, dropout_rng):
    """x W plus the LoRA delta s (x A) B when the adapters hold one (the XLA path)."""
    if "lora_a" not in adapters:
        return linear(x, kernel, n_in)
    a, b = adapters["lora_a"], adapters["lora_b"]
    if a.ndim == n_in + 2:
        # Multi-adapter batch (jaxlearn/peft/multi.py): example b uses its own A[b], B[b], scale[b]
        # (gather-by-index, as in Punica's BGMV), so one batch serves many adapters.
        scale = adapters["lora_scale"].astype(x.dtype)
        delta = jax.vmap(lambda xb, ab, bb: linear(linear(xb, ab, n_in), bb))(x, a, b)
        return linear(x, kernel, n_in) + delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))
    # The scale goes into B ([r, d_out], tiny) instead of onto a [tokens, d_out] product.
    b_scaled = (b * adapters["lora_scale"].astype(b.dtype)).astype(x.dtype)
    a = a.astype(x.dtype)
    dropout = dropout_rng is not None and "lora_dropout" in adapters
    d_in = math.prod(x.shape[x.ndim - n_in:])
    if not dropout and augmented_wins(x.size // d_in, d_in, kernel.size // d_in):
        # A and B ride along the GEMMs of the frozen base (jaxlearn/models/lora_linear.py).
        return lora_linear(x, kernel.astype(x.dtype), a, b_scaled, n_in)
    x_lora = x
    if dropout:  # A sees a dropped x while W sees x, so the delta is a separate product
        rate = adapters["lora_dropout"].astype(jnp.float32)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, x.shape)
        x_lora = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    return linear(x, kernel, n_in) + linear(linear(x_lora, a, n_in), b_scaled)


def _output_adapters(y, adapters):
    if "ia3_out" in adapters:
        y = y * adapters["ia3_out"].astype(y.dtype)
    if "adapter_down" in adapters:
        n_out = adapters["adapter_down"].ndim - 1
        y = y + linear(nn.silu(linear(y, adapters["adapter_down"], n_out)), adapters["adapter_up"])
    return y


def fused_adapted_linear(x: jax.Array, kernel, adapters: dict, n_in: int, impl: str,
                         interpret: bool = False) -> jax.Array:
    """`adapted_linear` with LoRA's x W + s (x A) B as one fused Pallas kernel (impl "tpu" or
    "gpu", jaxlearn/kernels/lora.py) over 2-D views: the kernel's input dims flatten to d_in,
    its output dims to d_out. DoRA, IA3 and bottleneck adapters apply around it as in the XLA
    path; multi-adapter batches (3-D lora_a) use the per-example kernel. No LoRA dropout.

    >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    >>> ad = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.zeros((1, 4)), "lora_scale": jnp.float32(2)}
    >>> fused_adapted_linear(x, w, ad, 1, "tpu", interpret=True).shape
    (2, 4)
    """
    from jaxlearn.kernels.lora import lora_matmul
    from jaxlearn.kernels.multi_lora import multi_lora_matmul
    from jaxlearn.kernels.quant import QuantizedWeight, dequantize_kernel

    if "ia3_in" in adapters:
        x = x * adapters["ia3_in"].astype(x.dtype)
    in_shape = x.shape[x.ndim - n_in:]
    d_in = math.prod(in_shape)
    quantized = isinstance(kernel, QuantizedWeight)
    if quantized and impl == "tpu":
        # The TPU kernels take NF4 in 512-row groups only; a weight stored in smaller groups (the
        # least-padding layout, e.g. d_in 576 -> 640 rows) is repacked, zero-padded to 1024 rows.
        # Exact: the same codes and scales, re-laid out; padding rows decode to 0.
        from jaxlearn.peft.quantize import repack_nf4
        kernel = repack_nf4(kernel)
    out_shape = kernel.kernel_shape[n_in:] if quantized else kernel.shape[n_in:]
    w2 = kernel if quantized else kernel.reshape(d_in, -1).astype(x.dtype)
    a, b = adapters["lora_a"], adapters["lora_b"]
    r = a.shape[-1]
    if a.ndim == n_in + 2:  # multi-adapter batch: example i uses A[i], B[i] (multi.py layout)
        n = a.shape[0]
        y = multi_lora_matmul(x.reshape(n, -1, d_in), w2, a.reshape(n, d_in, r), b.reshape(n, r, -1),
                              adapters["lora_scale"], jnp.arange(n, dtype=jnp.int32), impl=impl, interpret=interpret)
    else:
        y = lora_matmul(x.reshape(-1, d_in), w2, a.reshape(d_in, r), b.reshape(r, -1), adapters["lora_scale"],
                        impl=impl, interpret=interpret)
    y = y.reshape(x.shape[:x.ndim - n_in] + tuple(out_shape))
    if "dora_m" in adapters:
        y = _dora_rescale(y, dequantize_kernel(kernel, jnp.float32) if quantized else kernel, adapters, n_in)
    return _output_adapters(y, adapters)


def _dividing_axes(shard: ShardingContext, logical: str, size: int):
    """The mesh axes the logical axis `logical` maps to, for a shard_map spec of a dimension of
    `size`; None (whole on every device) when it maps to none or they do not divide `size`."""
    spec = logical_to_spec((logical,), shard.rules)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return spec if names and size % math.prod(shard.mesh.shape[a] for a in names) == 0 else None


def fused_on_mesh(shard: ShardingContext | None, x: jax.Array, kernel, adapters: dict, n_in: int, impl: str,
                  interpret: bool = False) -> jax.Array:
    """`fused_adapted_linear`, run per device under `shard_map` when `shard`'s mesh has more than
    one device: XLA's partitioner cannot split a Pallas call (Mosaic refuses outright), so each
    device runs the kernel on its own rows of the batch, with the weight and the adapters whole
    on every device (FSDP gathers a layer's weights for its matmuls anyway; under a `tensor` axis
    the projection's weights are gathered too, and the rows repeat over it). The backward sums
    the weight-side gradients over the batch axes (shard_map's transpose of a replicated input).
    A batch the batch axes do not divide (generation, batch 1) is run whole on every device.

    >>> fused_on_mesh(None, jnp.ones((2, 3)), jnp.ones((3, 4)), {"lora_a": jnp.ones((3, 1)),
    ...               "lora_b": jnp.zeros((1, 4)), "lora_scale": jnp.float32(2)}, 1, "tpu", True).shape
    (2, 4)
    """
    fused = functools.partial(fused_adapted_linear, n_in=n_in, impl=impl, interpret=interpret)
    if shard is None or shard.mesh.size == 1:
        return fused(x, kernel, adapters)
    rows = _dividing_axes(shard, "act_batch", x.shape[0])
    x_spec = P(rows)
    # A multi-adapter batch (jaxlearn/peft/multi.py) holds one adapter per example: its leading
    # dim goes with the batch rows; every other leaf is whole on each device.
    per_example = adapters["lora_a"].ndim == n_in + 2
    ad_specs = {k: P(rows) if per_example and k in ("lora_a", "lora_b", "lora_scale") and v.ndim else P()
                for k, v in adapters.items()}
    # check_vma off: the kernels' pallas_calls declare no varying-axes types for their outputs.
    # Gradients stay exact (the whole-weight inputs' cotangents are still summed over devices;
    # tests/pod/test_compile_target.py compares them with the XLA path's).
    return jax.shard_map(fused, mesh=shard.mesh, in_specs=(x_spec, P(), ad_specs), out_specs=x_spec,
                         check_vma=False)(x, kernel, adapters)


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


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None,
                     max_seq_len: int = 0) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] float32, cos/sin scale) of RoPE with `scaling`, the same
    numbers transformers' `ROPE_INIT_FUNCTIONS` give (`_compute_{linear_scaling,llama3,yarn}_parameters`).
    `max_seq_len` stands in for `original_max_position_embeddings` when that is 0.

    Computed on the host in NumPy: the config is static, so the table is a constant of the
    compiled program, not work done every step.

    >>> inv, scale = rope_frequencies(4, 10000.0, RopeScalingConfig(type="linear", factor=2.0))
    >>> inv.tolist(), scale
    ([0.5, 0.004999999888241291], 1.0)
    """
    # float32 as transformers computes it, so the exact-match tests see the same rounding.
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    inv_freq = inv_freq.astype(np.float32)
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return inv_freq, 1.0
    factor = scaling.factor
    if kind == "linear":  # position interpolation: positions / factor, i.e. frequencies / factor
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    original = scaling.original_max_position_embeddings or max_seq_len
    if original <= 0:
        raise ValueError(f"rope_scaling {kind!r} needs original_max_position_embeddings (or max_seq_len) > 0.")
    if kind == "llama3":
        # Wavelengths shorter than original/high_freq_factor are kept (local detail), longer than
        # original/low_freq_factor are stretched by `factor` (they never completed a turn in
        # pretraining); in between, a linear blend in 1/wavelength.
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        out = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        return np.where(medium, smoothed, out).astype(np.float32), 1.0
    if kind == "yarn":
        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = scaling.attention_factor
        if attn is None:  # transformers: the mscale ratio only when both are set, else from factor
            if scaling.mscale and scaling.mscale_all_dim:
                attn = get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim)
            else:
                attn = get_mscale(factor)

        def correction_dim(rotations):  # the dimension that turns `rotations` times in `original` tokens
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001  # as transformers: avoid a zero-width ramp
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
        pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
        extrapolation = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate (slow dims)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv.astype(np.float32), float(attn)
    raise ValueError(f"unknown rope_scaling type {kind!r}; use none, linear, llama3 or yarn.")


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float, style: str,
         scaling: RopeScalingConfig | None = None, max_seq_len: int = 0) -> jax.Array:
    """Rotary position embedding.

    `rotate_half` (Hugging Face Llama layout) rotates the pair (i, i + H/2); `interleaved`
    (the original RoFormer / GGUF layout) rotates the pair (2i, 2i + 1). `scaling` (see
    `rope_frequencies`) changes the frequencies and may scale cos/sin.

    >>> rope(jnp.ones((1, 3, 2, 8)), jnp.arange(3)[None], 10000.0, "rotate_half").shape
    (1, 3, 2, 8)
    """
    h = x_btnh.shape[-1]
    if scaling is None or scaling.type == "none":
        inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
        attn_scale = 1.0
    else:
        inv_np, attn_scale = rope_frequencies(h, theta, scaling, max_seq_len)
        inv_freq = jnp.asarray(inv_np)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    if attn_scale != 1.0:  # YaRN: transformers scales cos and sin, so q.k grows by attn_scale**2
        sin, cos = sin * attn_scale, cos * attn_scale
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


def resolve_attention(impl: str, platform: str | None = None) -> str:
    """The attention implementation `impl` means on `platform`, the platform the program is
    compiled for (None: the host's backend). `auto` is the memory-efficient kernel of each
    platform: Pallas splash attention on TPU, the Pallas (Triton) flash kernel on GPU, and the
    blocked XLA path on CPU.

    >>> resolve_attention("auto", "tpu"), resolve_attention("auto", "cpu"), resolve_attention("auto", "gpu")
    ('splash', 'xla', 'flash_gpu')
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention: {impl!r} is not one of {ATTENTION_IMPLS}.")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "xla"
    return "splash" if platform == "tpu" else "flash_gpu"


# xla: `grouped_attention` (blocked, recomputing; the reference and the CPU path);
# dot_product_attention: `jax.nn.dot_product_attention` with the mask (XLA materialises the
# [heads, T, S] scores on TPU); splash: Pallas splash attention (TPU, Mosaic); flash_gpu: the
# Pallas Triton flash kernel (GPU); cudnn: cuDNN's fused attention through jax.nn (GPU).
ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "splash", "flash_gpu", "cudnn")

# The platform each fused kernel is written for: elsewhere it runs in Pallas interpret mode.
_KERNEL_PLATFORM = {"splash": ("tpu",), "flash_gpu": ("gpu", "cuda", "rocm")}

# Fused kernels tile the sequence; a length they cannot tile falls back to the XLA reference.
FUSED_BLOCK = 128


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array,
           impl: str = "auto", causal: bool = False, platform: str | None = None,
           segments: tuple[jax.Array, jax.Array] | None = None,
           shard: ShardingContext | None = None) -> jax.Array:
    """Grouped-query attention. The seam where fused kernels plug in.

    `impl` (see ATTENTION_IMPLS) resolves for `platform`, the compile target
    (`resolve_attention`; None: the host's backend). `causal` is the caller's promise that the
    mask hides every key after slot i + S - T from query i (true in training, where there is no
    KV cache; a prefix of always-visible keys is fine): `xla` then skips the key blocks above
    the diagonal. The mask is applied either way.

    The fused kernels (splash, flash_gpu) never build the mask or the [heads, T, S] scores:
    they take `segments` = (query segment ids [B, T], key segment ids [B, S]) and apply
    "same segment and causal" themselves, so the caller passes `segments` only where that is
    the whole mask (self-attention, no KV cache, no prefix; T = S). Without `segments`, or at a
    length the kernels cannot tile (T % 128), they fall back to `dot_product_attention`.
    On a mesh (`shard`) they run per device under shard_map (XLA cannot partition a Pallas
    call), on the device's rows of the batch and its heads.

    >>> q, kv = jnp.ones((1, 4, 8, 16)), jnp.ones((1, 4, 2, 16))
    >>> attend(q, kv, kv, jnp.ones((1, 1, 4, 4), bool), "xla").shape
    (1, 4, 8, 16)
    """
    impl = resolve_attention(impl, platform)
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    if impl in _KERNEL_PLATFORM and (segments is None or t != s or t % FUSED_BLOCK):
        impl = "dot_product_attention"
    # The scope names the implementation in the compiled program's op metadata, so a check can
    # read which one a program holds (tests/pod/test_compile_target.py).
    with jax.named_scope(f"attention_{impl}"):
        scale = q_btnh.shape[-1] ** -0.5
        if impl in _KERNEL_PLATFORM:
            interpret = (platform or jax.default_backend()) not in _KERNEL_PLATFORM[impl]
            return fused_attention_on_mesh(shard, q_btnh, k_bskh, v_bskh, *segments, impl=impl, interpret=interpret)
        if impl == "cudnn":
            # cuDNN turns the boolean mask into a bias; `is_causal` lets it skip the blocks
            # above the diagonal.
            return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale,
                                                is_causal=causal and t == s, implementation="cudnn")
        if impl == "dot_product_attention":
            return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
        n_blocks = t // CAUSAL_BLOCK if causal and t % CAUSAL_BLOCK == 0 else 1
        return grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, n_blocks)


def fused_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, q_seg_bt: jax.Array,
                    kv_seg_bs: jax.Array, impl: str = "splash", interpret: bool = False) -> jax.Array:
    """Causal attention within segments by a fused Pallas kernel: `splash` (TPU: Pallas splash
    attention, grouped-query heads served from the K/V heads without copies) or `flash_gpu`
    (GPU: the Pallas Triton flash kernel, which has no grouped-query form, so K/V are repeated
    per query head: [B, S, N, H], the size of q, never the [N, T, S] scores). Both keep only the
    softmax's log-partition for the backward, as flash attention does. `interpret` runs the
    kernel in Pallas interpret mode (any platform; tests).

    >>> q, kv, seg = jnp.ones((1, 128, 4, 16)), jnp.ones((1, 128, 2, 16)), jnp.ones((1, 128), jnp.int32)
    >>> fused_attention(q, kv, kv, seg, seg, "splash", interpret=True).shape
    (1, 128, 4, 16)
    """
    _, t, n, h = q_btnh.shape
    if impl == "flash_gpu":
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        g = n // k_bskh.shape[2]
        # The Triton kernel takes one segment-id array for queries and keys (T = S here).
        return gpu_attention.mha(q_btnh, jnp.repeat(k_bskh, g, axis=2), jnp.repeat(v_bskh, g, axis=2), q_seg_bt,
                                 sm_scale=h ** -0.5, causal=True, interpret=interpret)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    kernel = _splash_kernel(n, t, k_bskh.shape[1], interpret)
    # Splash takes head-major [N, T, H] per example and does not scale: q is scaled here.
    q_bnth = jnp.transpose(q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype), (0, 2, 1, 3))
    k_bksh, v_bksh = jnp.transpose(k_bskh, (0, 2, 1, 3)), jnp.transpose(v_bskh, (0, 2, 1, 3))
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))  # noqa: E731
    return jnp.transpose(jax.vmap(one)(q_bnth, k_bksh, v_bksh, q_seg_bt, kv_seg_bs), (0, 2, 1, 3))


def _splash_kernel(n_heads: int, t: int, s: int, interpret: bool):
    """The splash kernel for causal attention of `n_heads` query heads over T x S. Blocks of
    512 (the size MaxText uses by default) where the length allows, else the largest of 256/128.
    Made per call, not cached: the kernel holds its block tables as arrays, and one made inside
    a trace would carry that trace's values into the next (the tables are host NumPy, cheap)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    blk = next(b for b in (512, 256, FUSED_BLOCK) if t % b == 0 and s % b == 0)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                              block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, s))] * n_heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def fused_attention_on_mesh(shard: ShardingContext | None, q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                            q_seg_bt: jax.Array, kv_seg_bs: jax.Array, impl: str, interpret: bool) -> jax.Array:
    """`fused_attention` per device under shard_map when `shard`'s mesh has more than one
    device: each device takes its rows of the batch (the `act_batch` axes) and, where the
    `act_heads`/`act_kv_heads` axes divide both head counts, its heads (a tensor axis); an axis
    that does not divide is whole on every device. Same pattern as `fused_on_mesh`.

    >>> q, kv, seg = jnp.ones((1, 128, 4, 16)), jnp.ones((1, 128, 2, 16)), jnp.ones((1, 128), jnp.int32)
    >>> fused_attention_on_mesh(None, q, kv, kv, seg, seg, "splash", True).shape
    (1, 128, 4, 16)
    """
    fused = functools.partial(fused_attention, impl=impl, interpret=interpret)
    if shard is None or shard.mesh.size == 1:
        return fused(q_btnh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs)

    rows = _dividing_axes(shard, "act_batch", q_btnh.shape[0])
    heads = _dividing_axes(shard, "act_heads", q_btnh.shape[2])
    kv_heads = _dividing_axes(shard, "act_kv_heads", k_bskh.shape[2])
    if heads != kv_heads:  # a device must hold whole groups of query heads with their K/V head
        heads = kv_heads = None
    qs, kvs, segs = P(rows, None, heads, None), P(rows, None, kv_heads, None), P(rows, None)
    # check_vma off: the pallas_calls declare no varying-axes types for their outputs.
    return jax.shard_map(fused, mesh=shard.mesh, in_specs=(qs, kvs, kvs, segs, segs), out_specs=qs,
                         check_vma=False)(q_btnh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs)


# Query rows per block when `causal` lets attention skip the key blocks above the diagonal. Two
# blocks of 128 at T = 256 skip a quarter of the work and measured fastest in the training step
# on the benchmark's CPU (64 and 32 skip more but make the GEMMs too small to run well).
CAUSAL_BLOCK = 128

# Added to masked logits. exp() of it underflows to exactly 0 next to any unmasked logit, and
# unlike finfo.min it cannot overflow to -inf when added, so a row with no visible key (which
# attention_mask never makes) would still give a uniform softmax rather than NaNs.
_MASKED_LOGIT = -1e30


def _query_blocks(t: int, s: int, n_blocks: int) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) per block: block j meets keys [0, S - T + its end)."""
    size = t // n_blocks
    return [(j * size, (j + 1) * size, s - t + (j + 1) * size) for j in range(n_blocks)]


def _block_logits(q_bkrh, k_bksh, mask_b1ts, q0, q1, kv1):
    """float32 logits [B, K, Tb, G, Sb] of queries [q0, q1) against keys [0, kv1), masked by an
    additive bias (one add, fused into the softmax)."""
    b, kvh, r, _ = q_bkrh.shape
    g = r // mask_b1ts.shape[2]
    qb = q_bkrh[:, :, q0 * g:q1 * g]
    logits = jnp.einsum("bkrh,bksh->bkrs", qb, k_bksh[:, :, :kv1], preferred_element_type=jnp.float32)
    bias_b1t1s = jnp.where(mask_b1ts[:, :, q0:q1, :kv1], 0.0, _MASKED_LOGIT).astype(jnp.float32)[:, :, :, None]
    return logits.reshape(b, kvh, q1 - q0, g, kv1) + bias_b1t1s


def _attention_forward(q_bkrh, k_bksh, v_bksh, mask_b1ts, n_blocks):
    """Output [B, K, T*G, H] (float32) and log-partition [B, K, T, G, 1] of the softmax."""
    b, kvh, r, _ = q_bkrh.shape
    t, s = mask_b1ts.shape[2:]
    g = r // t
    outs, lses = [], []
    for q0, q1, kv1 in _query_blocks(t, s, n_blocks):
        logits = _block_logits(q_bkrh, k_bksh, mask_b1ts, q0, q1, kv1)  # [B, K, Tb, G, Sb]
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        rows = (q1 - q0) * g
        # Normalise the [R, H] output rather than the [R, S] probabilities: one pass fewer.
        o = jnp.einsum("bkrs,bksh->bkrh", p.reshape(b, kvh, rows, kv1).astype(v_bksh.dtype), v_bksh[:, :, :kv1],
                       preferred_element_type=jnp.float32)
        outs.append(o / l.reshape(b, kvh, rows, 1))
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _attention_backward(q_bkrh, k_bksh, v_bksh, mask_b1ts, lse, do_bkrh, delta, n_blocks):
    """dq [B, K, T*G, H] (unscaled), dk and dv [B, K, S, H]."""
    b, kvh, r, _ = q_bkrh.shape
    t, s = mask_b1ts.shape[2:]
    g = r // t
    dqs, dk, dv = [], 0.0, 0.0
    for q0, q1, kv1 in _query_blocks(t, s, n_blocks):
        rows = (q1 - q0) * g
        qb, do = q_bkrh[:, :, q0 * g:q1 * g], do_bkrh[:, :, q0 * g:q1 * g]
        # Recompute the probabilities from the saved log-partition instead of keeping
        # [B, N, T, S] of them per layer: a GEMM is cheaper here than writing and re-reading them.
        p = jnp.exp(_block_logits(q_bkrh, k_bksh, mask_b1ts, q0, q1, kv1) - lse[:, :, q0:q1])
        dp = jnp.einsum("bkrh,bksh->bkrs", do, v_bksh[:, :, :kv1], preferred_element_type=jnp.float32)
        # softmax backward: dlogits = p * (dp - delta), delta = rowsum(dout * out)
        ds = (p * (dp.reshape(p.shape) - delta[:, :, q0:q1])).reshape(b, kvh, rows, kv1).astype(q_bkrh.dtype)
        p = p.reshape(b, kvh, rows, kv1).astype(do.dtype)
        dqs.append(jnp.einsum("bkrs,bksh->bkrh", ds, k_bksh[:, :, :kv1]))
        pad = ((0, 0), (0, 0), (0, s - kv1), (0, 0))
        dk = dk + jnp.pad(jnp.einsum("bkrs,bkrh->bksh", ds, qb), pad)
        dv = dv + jnp.pad(jnp.einsum("bkrs,bkrh->bksh", p, do), pad)
    return jnp.concatenate(dqs, axis=2), dk, dv


def _grouped_attention_fwd(q_btnh, k_bskh, v_bskh, mask_b1ts, n_blocks):
    b, t, n, h = q_btnh.shape
    kvh = k_bskh.shape[2]
    g = n // kvh
    # Rows (t, g): the query heads of a KV head side by side, so each product is one plain
    # [Tb*G, H] x [H, S] or [Tb*G, S] x [S, H] GEMM per (batch, KV head), with no K/V copies per
    # query head, the [R, S] logits never transposed, and a query block a contiguous row range.
    q_bkrh = jnp.transpose((q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype)).reshape(b, t, kvh, g, h),
                           (0, 2, 1, 3, 4)).reshape(b, kvh, t * g, h)
    k_bksh = jnp.transpose(k_bskh, (0, 2, 1, 3))
    v_bksh = jnp.transpose(v_bskh, (0, 2, 1, 3))
    o_bkrh, lse = _attention_forward(q_bkrh, k_bksh, v_bksh, mask_b1ts, n_blocks)
    out = jnp.transpose(o_bkrh.reshape(b, kvh, t, g, h), (0, 2, 1, 3, 4)).reshape(b, t, n, h).astype(q_btnh.dtype)
    return out, (q_bkrh, k_bksh, v_bksh, mask_b1ts, out, lse)


def _grouped_attention_bwd(n_blocks, res, dout_btnh):
    q_bkrh, k_bksh, v_bksh, mask_b1ts, out_btnh, lse = res
    b, t, n, h = dout_btnh.shape
    kvh = k_bksh.shape[1]
    g = n // kvh
    delta_btn = jnp.sum(dout_btnh.astype(jnp.float32) * out_btnh.astype(jnp.float32), axis=-1)
    delta = delta_btn.reshape(b, t, kvh, g).transpose(0, 2, 1, 3)[..., None]  # [B, K, T, G, 1]
    do_bkrh = jnp.transpose(dout_btnh.reshape(b, t, kvh, g, h), (0, 2, 1, 3, 4)).reshape(b, kvh, t * g, h)
    dq, dk, dv = _attention_backward(q_bkrh, k_bksh, v_bksh, mask_b1ts, lse, do_bkrh, delta, n_blocks)
    dq = jnp.transpose(dq.reshape(b, kvh, t, g, h), (0, 2, 1, 3, 4)).reshape(b, t, n, h)
    dq = dq * jnp.asarray(h ** -0.5, dq.dtype)
    return (dq.astype(dout_btnh.dtype), jnp.transpose(dk, (0, 2, 1, 3)).astype(k_bksh.dtype),
            jnp.transpose(dv, (0, 2, 1, 3)).astype(v_bksh.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array,
                      n_blocks: int = 1) -> jax.Array:
    """Exact softmax attention, GQA, any boolean mask [B, 1, T, S] (causal, packing, KV cache).

    Written for CPU: the forward keeps only the log-partition of the softmax, and the backward
    recomputes the probabilities from it (as flash attention does, but untiled), so no
    [B, N, T, S] tensor is stored between the passes. With `n_blocks` > 1 the queries are
    split into that many blocks and block j only meets keys [0, S - T + its end): that much
    less work, and exact when the mask hides every other key (causal; the caller's promise).

    >>> q, kv = jnp.ones((1, 4, 8, 16)), jnp.ones((1, 4, 2, 16))
    >>> grouped_attention(q, kv, kv, jnp.tril(jnp.ones((4, 4), bool))[None, None], 2).shape
    (1, 4, 8, 16)
    """
    return _grouped_attention_fwd(q_btnh, k_bskh, v_bskh, mask_b1ts, n_blocks)[0]


grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


# Name of every Linear module's output (the projections q, k, v, o, gate, up, down).
PROJ_NAME = "proj"

# ModelConfig.remat -> what the backward may reuse instead of recomputing. The linear seam and
# the CPU attention are custom_vjp calls, opaque to JAX's dot-based policies (which would then
# save nothing from them), so the `dots` policies also save the named projection outputs and
# LoRA's tiny x A (jaxlearn/models/lora_linear.py) by name.
_SAVED_NAMES = jax.checkpoint_policies.save_only_these_names(PROJ_NAME, LORA_T_NAME)
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _SAVED_NAMES),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVED_NAMES),
}
