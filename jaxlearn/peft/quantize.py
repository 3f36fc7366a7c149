"""QLoRA: store the frozen base weights of the adapted layers quantized (int8 or NF4).

At attach time each adapted layer's `kernel` is replaced by `kernel_q` (codes) and
`kernel_scale` (scales) over its 2-D view [d_in, d_out] (input dims flattened, output dims
flattened; per layer when scanned). The linear seam rebuilds a QuantizedWeight from them and
the LoRA kernels dequantise it tile by tile (jaxlearn/kernels/quant.py); the XLA path
dequantises it whole. Both leaves are frozen (no gradient, no optimizer state). Example::

    flat = quantize_flat(flat_paths(params), sites, "nf4")
    dense = dequantize_tree(params)            # back to float `kernel` leaves (merge, export)

NF4 widths that do not split into packing groups (SmolLM2's 576 in 512-row groups) are zero
padded along d_in to whole groups: a padded row's codes decode to an exact 0, so the padded
rows add nothing to x W and the dequantised weight is cut back to d_in rows. The group is not
stored: `nf4_group_of` reads it back off the padded row count. The TPU kernels need 512-row
groups; a weight stored with a smaller group is repacked to 512 at the TPU seam
(`repack_nf4`, exact: the codes and scales are the same numbers, only re-laid out).

Quantized leaves are replicated across the mesh (only the `layers` axis keeps its name): the
padded, packed layouts do not split along the model's logical axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.kernels.quant import NF4_BLOCK, NF4_LEVELS, QuantizedWeight, dequantize_kernel, nf4_group, quantize
from jaxlearn.models.layers import quantized_kernel
from jaxlearn.peft.filter import flat_paths, unflatten_paths

TPU_NF4_GROUP = 512  # the TPU kernels' NF4 k tile: group/64 = 8 scale rows, an (8, 128)-aligned tile
_GROUPS = (512, 256, 128)  # the packing groups jaxlearn's layouts use (nf4_group's choices)
NF4_ZERO_CODE = int(np.argmin(np.abs(NF4_LEVELS)))  # the code of the exact 0 level (padding rows)


def _quantize_2d(w, fmt: str, group: int | None):
    d_in = w.shape[0]
    qw = quantize(w, fmt, group=(group or nf4_group(d_in)) if fmt == "nf4" else 512)
    return qw.q, qw.scale


def quantize_flat(flat: dict, sites, fmt: str, group: int | None = None) -> dict:
    """Replace `{site}/kernel` by `{site}/kernel_q` and `{site}/kernel_scale` (in place on a
    flat path dict; sites already quantized are left alone).

    `group` (NF4 only): the packing group; by default `nf4_group(d_in)`, the one that pads
    least (the layout every backend stores, so a checkpoint opens anywhere). `group=512` stores
    the TPU kernels' layout directly (no repacking at the seam), padding d_in to a multiple of 512.
    No other: the layers read the group back off the padded row count (`nf4_group_of`), which
    only these two choices determine.

    >>> flat = quantize_flat(flat_paths(params), sites, "nf4", group=512)   # doctest: +SKIP
    >>> flat["layers/attn/q/kernel_q"].shape       # [layers, 1024 / 2, d_out] for d_in 576   # doctest: +SKIP
    """
    if group not in (None, TPU_NF4_GROUP):
        raise ValueError(f"nf4 group {group}: pass None (least padding) or {TPU_NF4_GROUP} (the TPU kernels' "
                         "layout); the layers read the group back off the padded rows, which other groups leave ambiguous.")
    for site in sites:
        key = f"{site.path}/kernel"
        if key not in flat:
            continue
        kernel = flat.pop(key)
        lead = site.lead
        core = kernel.shape[len(lead):]
        d_in, d_out = math.prod(core[:site.n_in]), math.prod(core[site.n_in:])
        w2 = kernel.reshape(lead + (d_in, d_out))
        fn = lambda w: _quantize_2d(w, fmt, group)  # noqa: E731
        q, scale = jax.vmap(fn)(w2) if lead else fn(w2)
        flat[f"{site.path}/kernel_q"] = q
        flat[f"{site.path}/kernel_scale"] = scale
    return flat


def quantize_axes_flat(flat_axes: dict, sites) -> dict:
    """The logical axes of the quantized leaves (replicated but for `layers`)."""
    for site in sites:
        flat_axes.pop(f"{site.path}/kernel", None)
        flat_axes[f"{site.path}/kernel_q"] = site.lead_axes + (None, None)
        flat_axes[f"{site.path}/kernel_scale"] = site.lead_axes + (None, None)
    return flat_axes


def base_bytes(flat: dict) -> dict[str, int]:
    """Bytes of the frozen base weights: quantized codes + scales vs the dense kernels left."""
    out = {"quantized": 0, "dense_kernels": 0}
    for path, leaf in flat.items():
        n = int(leaf.size) * leaf.dtype.itemsize
        if path.endswith(("/kernel_q", "/kernel_scale")):
            out["quantized"] += n
        elif path.endswith("/kernel"):
            out["dense_kernels"] += n
    return out


# ----------------------------------------------------------------------------- NF4 padding


def nf4_group_of(d_in: int, padded_rows: int) -> int:
    """The packing group of an NF4 weight with `d_in` true rows stored as `padded_rows` rows
    (2 x its code rows): the largest group whose padding of d_in gives that count.

    Unambiguous for the layouts written here: `nf4_group` pads least and takes the largest
    group on ties, and 512 is the largest group there is. Older trees (always `nf4_group`) read
    back as they were written.

    >>> nf4_group_of(576, 640), nf4_group_of(576, 1024), nf4_group_of(2048, 2048)
    (128, 512, 512)
    """
    for g in _GROUPS:
        if -(-d_in // g) * g == padded_rows:
            return g
    raise ValueError(f"an NF4 weight of {d_in} rows stored as {padded_rows} padded rows fits none of the packing "
                     f"groups {_GROUPS}; was it quantized with another group?")


def nf4_codes(qw: QuantizedWeight) -> jax.Array:
    """The 4-bit codes of an NF4 weight as uint8 rows in order: [padded rows, d_out].

    >>> qw = quantize(jnp.zeros((128, 2)), "nf4", group=128)
    >>> nf4_codes(qw).shape, int(nf4_codes(qw)[0, 0]) == NF4_ZERO_CODE
    ((128, 2), True)
    """
    g, d_out = qw.group, qw.q.shape[1]
    p = qw.q.reshape(-1, 1, g // 2, d_out)  # [groups, 1, g/2, d_out]: byte row i holds rows i and i + g/2
    return jnp.concatenate([p & 15, p >> 4], axis=1).reshape(-1, d_out)


def repack_nf4(qw: QuantizedWeight, group: int = TPU_NF4_GROUP) -> QuantizedWeight:
    """The same NF4 weight laid out in packing groups of `group` rows (d_in zero-padded to a
    multiple of it): bit for bit what `quantize(w, "nf4", group)` gives, since the 64-row
    scale blocks start at row 0 in every layout and padding rows are code 0 with scale 1.

    Why: the TPU kernels take 512-row groups only; the stored layout pads least (576 -> 640
    rows, not 1024), so the TPU seam repacks (integer shuffles on the codes, no rounding).

    >>> w = jax.random.normal(jax.random.key(0), (576, 8))
    >>> bool(jnp.all(repack_nf4(quantize(w, "nf4", 128)).q == quantize(w, "nf4", 512).q))
    True
    """
    if qw.fmt != "nf4" or qw.group == group:
        return qw
    if group % (2 * NF4_BLOCK):
        raise ValueError(f"nf4 group {group} must be a multiple of {2 * NF4_BLOCK}.")
    codes = nf4_codes(qw)[:qw.d_in]  # [d_in, d_out]: the true rows
    rows = -(-qw.d_in // group) * group
    codes = jnp.pad(codes, ((0, rows - qw.d_in), (0, 0)), constant_values=NF4_ZERO_CODE)
    # A block straddling d_in keeps its scale; whole padding blocks get quantize's 1.0 (absmax 0).
    n_blocks = -(-qw.d_in // NF4_BLOCK)
    scale = jnp.pad(qw.scale[:n_blocks], ((0, rows // NF4_BLOCK - n_blocks), (0, 0)), constant_values=1.0)
    c = codes.reshape(-1, 2, group // 2, codes.shape[1])  # [groups, lo/hi, g/2, d_out], as `quantize` packs
    packed = (c[:, 0] | (c[:, 1] << 4)).reshape(-1, codes.shape[1])
    return QuantizedWeight(packed, scale, "nf4", qw.d_in, group, qw.kernel_shape)


# ----------------------------------------------------------------------------- back to float


def quantized_format(params: dict) -> str | None:
    """"int8" or "nf4" when the tree holds a quantized frozen base (QLoRA), else None.

    >>> quantized_format({"q": {"kernel_q": jnp.zeros((2, 2), jnp.uint8)}})
    'nf4'
    """
    for path, leaf in flat_paths(params).items():
        if path.endswith("/kernel_q"):
            return "int8" if leaf.dtype == jnp.int8 else "nf4"
    return None


def _kernel_layout(flat: dict, site: str, n_lead: int, q) -> tuple[tuple[int, ...], int]:
    """(kernel shape without the layers axis, number of input dims) of a quantized site, read
    off its LoRA leaves: lora_a is [*lead, *in, r] and lora_b [*lead, r, *out] (jaxlearn's
    layout keeps heads and head_dim apart, which the 2-D codes have flattened)."""
    a, b = flat.get(f"{site}/lora_a"), flat.get(f"{site}/lora_b")
    if a is None or b is None:
        raise ValueError(f"{site}: a quantized kernel without lora_a/lora_b beside it; its shape is not recorded "
                         "anywhere else. Dequantise the tree before removing the adapter leaves.")
    core = tuple(a.shape[n_lead:-1]) + tuple(b.shape[n_lead + 1:])
    n_in = a.ndim - 1 - n_lead
    if math.prod(core[n_in:]) != q.shape[-1]:
        raise ValueError(f"{site}: lora_b's output shape {core[n_in:]} does not match the quantized kernel "
                         f"({q.shape[-1]} columns).")
    return core, n_in


def dequantize_flat(flat: dict, dtype=jnp.float32) -> dict:
    """A flat path dict with every `{site}/kernel_q` + `{site}/kernel_scale` pair replaced by a
    dense `{site}/kernel` in `dtype` (the layer's own shape, layers axis kept). A new dict.

    >>> dense = dequantize_flat(flat_paths(qlora_params))        # doctest: +SKIP
    >>> dense["layers/attn/q/kernel"].shape                       # [layers, d, heads, head_dim]  # doctest: +SKIP
    """
    out = dict(flat)
    for key in [k for k in flat if k.endswith("/kernel_q")]:
        site = key[: -len("/kernel_q")]
        q, scale = out.pop(key), out.pop(f"{site}/kernel_scale")
        n_lead = q.ndim - 2  # the scanned layers axis, if any
        core, n_in = _kernel_layout(flat, site, n_lead, q)
        out[f"{site}/kernel"] = _dequantize_site(q, scale, core, n_in, n_lead, jnp.dtype(dtype))
    return out


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize_site(q, scale, core: tuple[int, ...], n_in: int, n_lead: int, dtype):
    """One site's dense kernel, vmapped over the layers axis. Jitted: op by op, each of the
    dozen small ops would compile on its own for every site shape."""
    fn = lambda a, s: dequantize_kernel(quantized_kernel(a, s, core, n_in), dtype)  # noqa: E731
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn(q, scale)


def dequantize_tree(params: dict, dtype=jnp.float32) -> dict:
    """`params` with the quantized frozen base (QLoRA) dequantised back to dense float kernels;
    everything else (adapters included) untouched. The forward is unchanged: the model
    dequantises the same way before each matmul on the XLA path.

    Call it before removing adapter leaves: the kernel's multi-dim shape ([d, heads, head_dim])
    is read off lora_a / lora_b.

    >>> dense = dequantize_tree(qlora_params)          # doctest: +SKIP
    >>> save_hf(base_leaves(dense), cfg, "out/base")   # doctest: +SKIP
    """
    return unflatten_paths(dequantize_flat(flat_paths(params), dtype))
