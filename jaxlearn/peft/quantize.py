"""QLoRA: store the frozen base weights of the adapted layers quantized (int8 or NF4).

At attach time each adapted layer's `kernel` is replaced by `kernel_q` (codes) and
`kernel_scale` (scales) over its 2-D view [d_in, d_out] (input dims flattened, output dims
flattened; per layer when scanned). The linear seam rebuilds a QuantizedWeight from them and
the LoRA kernels dequantise it tile by tile (jaxlearn/kernels/quant.py); the XLA path
dequantises it whole. Both leaves are frozen (no gradient, no optimizer state). Example::

    flat = quantize_flat(flat_paths(params), sites, "nf4")

Quantized leaves are replicated across the mesh (only the `layers` axis keeps its name): the
padded, packed layouts do not split along the model's logical axes.
"""

from __future__ import annotations

import math

import jax

from jaxlearn.kernels.quant import nf4_group, quantize


def _quantize_2d(w, fmt: str):
    d_in = w.shape[0]
    qw = quantize(w, fmt, group=nf4_group(d_in) if fmt == "nf4" else 512)
    return qw.q, qw.scale


def quantize_flat(flat: dict, sites, fmt: str) -> dict:
    """Replace `{site}/kernel` by `{site}/kernel_q` and `{site}/kernel_scale` (in place on a
    flat path dict; sites already quantized are left alone)."""
    for site in sites:
        key = f"{site.path}/kernel"
        if key not in flat:
            continue
        kernel = flat.pop(key)
        lead = site.lead
        core = kernel.shape[len(lead):]
        d_in, d_out = math.prod(core[:site.n_in]), math.prod(core[site.n_in:])
        w2 = kernel.reshape(lead + (d_in, d_out))
        fn = lambda w: _quantize_2d(w, fmt)  # noqa: E731
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
