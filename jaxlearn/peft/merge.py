"""Fold adapters into the base weights (for export and adapter-free serving) and back out.

`merge` returns a plain base tree (no adapter leaves) whose forward equals the adapted model's;
`unmerge` subtracts LoRA / divides IA3 back out, given the adapter leaves. DoRA merges (the
magnitude and direction fold into one matrix) but cannot be unmerged without the original
weight, and bottleneck adapters are nonlinear, so neither folds into a weight: both are errors
that say so. Swapping adapters never needs unmerge: adapters live beside an untouched base,
so a swap replaces the adapter leaves (see `jaxlearn.peft.files`). Example::

    base_only = merge(params)                  # export / serve without adapters
    params_again = unmerge(base_only, adapter_leaves(params))

A QLoRA tree (int8 / NF4 frozen base, `peft.quantize`) merges too: its base is dequantised
first, so the merged kernels are float (float32, or the dtype asked for), not quantized. The
adapters were trained against exactly that dequantised base, so the merged model gives the
QLoRA model's outputs; re-quantizing the merged weights would not (see `merge`). `unmerge` of
such a merge gives the dequantised float base back, not the int8/NF4 codes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxlearn.models.layers import linear
from jaxlearn.peft.attach import kernel_in_dims
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.quantize import dequantize_flat

ADAPTER_LEAF = re.compile(r"/(lora_a|lora_b|lora_scale|lora_dropout|dora_m|ia3_in|ia3_out|adapter_down|adapter_up)$")


def adapter_leaves(params: dict) -> dict:
    """Only the adapter leaves of a tree (what an adapter file holds)."""
    return unflatten_paths({k: v for k, v in flat_paths(params).items() if ADAPTER_LEAF.search(k)})


def base_leaves(params: dict) -> dict:
    """The tree without adapter leaves."""
    return unflatten_paths({k: v for k, v in flat_paths(params).items() if not ADAPTER_LEAF.search(k)})


def without_adapters(params: dict) -> dict:
    """The base model's parameters: adapter leaves, prefixes/soft prompts and objective heads
    removed. A view of the same arrays (no copy): with PEFT this IS the reference policy.

    >>> sorted(without_adapters({"q": {"kernel": 1, "lora_a": 2}, "prompt": {"embedding": 3}}))
    ['q']
    """
    return {k: v for k, v in base_leaves(params).items() if k not in ("prefix", "prompt", "heads")}


def _modules(flat: dict) -> dict[str, dict[str, Any]]:
    mods: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        m = ADAPTER_LEAF.search(k)
        if m:
            mods.setdefault(k[: m.start()], {})[m.group(1)] = v
    return mods


def _lora_delta(leaves: dict, stacked: bool) -> jax.Array:
    """scale * A B with the layers axis (if any) kept as a batch axis."""
    a, b, s = leaves["lora_a"].astype(jnp.float32), leaves["lora_b"].astype(jnp.float32), leaves["lora_scale"]
    if stacked:
        ab = jax.vmap(lambda x, y: linear(x, y))(a, b)
        return ab * s.reshape((-1,) + (1,) * (ab.ndim - 1))
    return linear(a, b) * s


def _in_axes(kernel_ndim: int, n_in: int, stacked: bool) -> tuple[int, ...]:
    lead = 1 if stacked else 0
    return tuple(range(lead, lead + n_in))


def merge(params: dict, logical: dict | None = None, dtype=None) -> dict:
    """Adapters folded into their kernels; adapter leaves removed.

    `logical` (the tree's logical axes) tells stacked layers and input dims apart; without it
    they are inferred from the parameter paths (jaxlearn's own layout).

    QLoRA (a base stored int8 / NF4, `kernel_q` + `kernel_scale` leaves): the base is
    dequantised to float32, the adapters are folded in in float32, and the merged kernels come
    out in `dtype` (default: the dtype of the tree's embedding, i.e. the model's param dtype,
    else float32; kernels that were never quantized keep their own dtype). The result holds no quantized leaves: it is a float model whose forward is
    the QLoRA model's, not a quantized one (the fold is not on the int8/NF4 grid).

    >>> merged = merge(qlora_params)          # doctest: +SKIP
    >>> quantized_format(merged) is None      # doctest: +SKIP
    True
    """
    flat = flat_paths(params)
    quantized = {k[: -len("/kernel_q")] for k in flat if k.endswith("/kernel_q")}
    if quantized:
        # Dequantise before anything else: the kernel's shape is read off its LoRA leaves.
        out_dtype = jnp.dtype(dtype) if dtype is not None else _float_dtype(flat)
        flat = dequantize_flat(flat, jnp.float32)
    axes = flat_paths(logical) if logical is not None else {}
    out = {k: v for k, v in flat.items() if not ADAPTER_LEAF.search(k)}
    for mod, leaves in _modules(flat).items():
        if "adapter_down" in leaves:
            raise ValueError(f"{mod}: bottleneck adapters are nonlinear and cannot be merged into a weight; "
                             "keep them as adapters (save with jaxlearn.peft.files.save_adapter).")
        w = flat[f"{mod}/kernel"]
        stacked, n_in = _layout(mod, axes.get(f"{mod}/kernel"))
        merged = w.astype(jnp.float32)
        in_axes = _in_axes(w.ndim, n_in, stacked)
        if "ia3_in" in leaves:
            merged = merged * jnp.expand_dims(leaves["ia3_in"].astype(jnp.float32),
                                              tuple(range(in_axes[-1] + 1, w.ndim)))
        if "lora_a" in leaves:
            merged = merged + _lora_delta(leaves, stacked)
            if "dora_m" in leaves:
                norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=in_axes, keepdims=True))
                m = jnp.expand_dims(leaves["dora_m"].astype(jnp.float32), in_axes)
                merged = merged * (m / norm)
        if "ia3_out" in leaves:
            merged = merged * jnp.expand_dims(leaves["ia3_out"].astype(jnp.float32), in_axes)
        out[f"{mod}/kernel"] = merged.astype(w.dtype)
    for mod in quantized:  # dequantised float32 (also where no adapter sat): the dtype asked for
        out[f"{mod}/kernel"] = out[f"{mod}/kernel"].astype(out_dtype)
    return unflatten_paths(out)


def _float_dtype(flat: dict):
    """The model's param dtype as the tree shows it (the embedding's), else float32."""
    emb = flat.get("embed/embedding")
    return jnp.dtype(emb.dtype) if emb is not None and jnp.issubdtype(emb.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def unmerge(merged: dict, adapters: dict, logical: dict | None = None) -> dict:
    """Inverse of `merge` for LoRA and IA3: the base weights back, with the adapters beside them.

    Exact up to float rounding (subtraction/division of what merge added/multiplied).
    """
    flat = flat_paths(merged)
    axes = flat_paths(logical) if logical is not None else {}
    ad = flat_paths(adapters)
    for mod, leaves in _modules(ad).items():
        if "dora_m" in leaves or "adapter_down" in leaves:
            raise ValueError(f"{mod}: DoRA and bottleneck adapters cannot be unmerged; keep the base and "
                             "swap adapters instead of merging.")
        w = flat[f"{mod}/kernel"].astype(jnp.float32)
        stacked, n_in = _layout(mod, axes.get(f"{mod}/kernel"))
        in_axes = _in_axes(w.ndim, n_in, stacked)
        if "ia3_out" in leaves:
            w = w / jnp.expand_dims(leaves["ia3_out"].astype(jnp.float32), in_axes)
        if "lora_a" in leaves:
            w = w - _lora_delta(leaves, stacked)
        if "ia3_in" in leaves:
            w = w / jnp.expand_dims(leaves["ia3_in"].astype(jnp.float32), tuple(range(in_axes[-1] + 1, w.ndim)))
        flat[f"{mod}/kernel"] = w.astype(flat[f"{mod}/kernel"].dtype)
    flat.update(ad)
    return unflatten_paths(flat)


def _layout(mod: str, kernel_axes: tuple | None) -> tuple[bool, int]:
    """(stacked over layers?, number of input dims) of a module's kernel."""
    if kernel_axes is not None:
        return kernel_axes[0] == "layers", kernel_in_dims(tuple(kernel_axes))
    stacked = mod.startswith("layers/")  # scanned layout: `layers/...`; unrolled: `layers_3/...`
    return stacked, 2 if mod.endswith("attn/o") else 1
