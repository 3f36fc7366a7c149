"""Multi-adapter batches: many LoRA adapters over one base, one adapter per example.

`stack_adapters` stacks several LoRA adapter trees (same targets and rank) on a new leading
axis; `select_adapters` gathers, for a batch, each example's adapter by index and places the
result beside the base weights. The linear seam sees per-example A/B (one more leading dim)
and applies them with a batched matmul, so evaluation or serving of N adapters costs one pass
over the base, not N. Example::

    bank = stack_adapters([adapter_leaves(p1), adapter_leaves(p2)])
    params = select_adapters(base, bank, jnp.array([0, 1, 1, 0]))   # batch of 4
    logits, _ = model.apply({"params": params}, tokens, positions, segment_ids)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.merge import ADAPTER_LEAF

_LORA = ("lora_a", "lora_b", "lora_scale")


def stack_adapters(adapters: list[dict]) -> dict:
    """Stack LoRA adapter trees (paths and shapes must agree) on a new leading axis."""
    flats = [flat_paths(a) for a in adapters]
    keys = set(flats[0])
    for i, f in enumerate(flats[1:], 1):
        if set(f) != keys:
            raise ValueError(f"adapter {i} has different leaves than adapter 0: "
                             f"{sorted(set(f) ^ keys)[:6]}; stack adapters with the same targets.")
    # Dropout is a training-time leaf; batches of many adapters are for evaluation and serving.
    keys = {k for k in keys if not k.endswith("/lora_dropout")}
    bad = [k for k in keys if k.rsplit("/", 1)[-1] not in _LORA]
    if bad:
        raise ValueError(f"multi-adapter batches support LoRA only; found {sorted(bad)[:4]}.")
    return unflatten_paths({k: jnp.stack([f[k] for f in flats]) for k in keys})


def select_adapters(base: dict, bank: dict, ids: jax.Array) -> dict:
    """`base` (adapters removed) with, at every LoRA site, the adapter `ids[b]` for example b.

    With scanned layers the per-example axis goes after `layers`, so each layer's slice is
    [batch, ...]; without, it leads.
    """
    flat = {p: v for p, v in flat_paths(base).items() if not ADAPTER_LEAF.search(p)}
    for path, stacked in flat_paths(bank).items():
        per_example = jnp.take(stacked, ids, axis=0)  # [B, (layers,) ...]
        if path.startswith("layers/"):  # scanned layout: [layers, B, ...]
            per_example = jnp.moveaxis(per_example, 0, 1)
        flat[path] = per_example
    return unflatten_paths(flat)
