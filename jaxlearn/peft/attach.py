"""PEFT as a transform of the parameter tree.

`attach` adds adapter leaves next to the kernels of the linear layers whose module paths match
the recipe's `peft.targets` regexes; the linear seam (`jaxlearn.models.layers.Linear`) applies
whatever adapter leaves it finds beside its kernel. One trainable filter (`trainable_patterns`)
then decides what trains, what has optimizer state, what an adapter file holds and what
`merge` folds into the base. Adapters carry the logical axes of the weight they adapt, so they
shard like it with no special case. Example::

    sites = find_sites(abstract, logical, PeftConfig(type="lora", rank=8))
    params = attach(params, PeftConfig(type="lora", rank=8), sites, jax.random.key(0))
    logical = attach_axes(logical, PeftConfig(type="lora", rank=8), sites)

Leaf names inside a linear module (beside `kernel`):

    lora_a [*in, r], lora_b [r, *out], lora_scale []      LoRA: y += scale * (x A) B
    lora_dropout []                                       LoRA dropout rate (only if > 0)
    dora_m [*out]                                         DoRA magnitude (with lora_*)
    ia3_out [*out] / ia3_in [*in]                         IA3: scale outputs / inputs
    adapter_down [*out, b], adapter_up [b, *out]          bottleneck: y += up(silu(down(y)))

With scanned layers every leaf has the leading `layers` axis of its kernel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxlearn.config import ModelConfig, PeftConfig
from jaxlearn.models.layers import linear
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.quantize import quantize_axes_flat, quantize_flat

DEFAULT_TARGETS = {
    "lora": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"),
    "dora": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"),
    "ia3": (r"attn/(k|v)$", r"mlp/down$"),
    "adapter": (r"attn/o$", r"mlp/down$"),
}

# Which leaves each method trains (regexes over parameter paths).
METHOD_LEAVES = {
    "lora": (r"/lora_(a|b)$",),
    "dora": (r"/lora_(a|b)$", r"/dora_m$"),
    "ia3": (r"/ia3_(in|out)$",),
    "adapter": (r"/adapter_(down|up)$",),
    "prefix": (r"^prefix/",),
    "prompt": (r"^prompt/",),
}

# Methods that live beside linear-layer kernels (the rest add top-level leaves).
SEAM_METHODS = ("lora", "dora", "ia3", "adapter")


@dataclasses.dataclass(frozen=True)
class Site:
    """One linear layer an adapter attaches to."""

    path: str  # module path, e.g. "layers/attn/q"
    shape: tuple[int, ...]  # kernel shape, leading layers axis included when stacked
    axes: tuple[str, ...]  # kernel logical axes
    n_in: int  # leading kernel dims (after `layers`) that contract with the input

    @property
    def stacked(self) -> bool:
        return bool(self.axes) and self.axes[0] == "layers"

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[:1] if self.stacked else ()

    @property
    def lead_axes(self) -> tuple[str, ...]:
        return self.axes[:1] if self.stacked else ()

    def split(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
        """(in_shape, out_shape, in_axes, out_axes) of the kernel, without the layers axis."""
        k = len(self.lead)
        shape, axes = self.shape[k:], self.axes[k:]
        return shape[:self.n_in], shape[self.n_in:], axes[:self.n_in], axes[self.n_in:]


def kernel_in_dims(axes: tuple[str, ...]) -> int:
    """How many leading kernel axes are inputs. jaxlearn's convention: the attention output
    projection contracts (heads, head_dim); every other projection contracts one axis."""
    core = axes[1:] if axes and axes[0] == "layers" else axes
    return 2 if core and core[0] == "heads" else 1


def find_sites(abstract_params: Any, logical: Any, cfg: PeftConfig) -> list[Site]:
    """The linear layers matched by `cfg.targets` (or the method default).

    A pattern that matches no module is an error listing the module paths available.
    """
    shapes = flat_paths(abstract_params)
    axes = flat_paths(logical)
    modules = {p.rsplit("/", 1)[0]: p for p in shapes if p.endswith("/kernel")}
    patterns = cfg.targets or DEFAULT_TARGETS[cfg.type]
    chosen: dict[str, Site] = {}
    for pat in patterns:
        rx = re.compile(pat)
        hits = [m for m in modules if rx.search(m)]
        if not hits:
            raise ValueError(f"peft.targets pattern {pat!r} matches no linear layer. Available: "
                             f"{', '.join(sorted(modules))}.")
        for m in hits:
            kp = modules[m]
            chosen[m] = Site(m, tuple(shapes[kp].shape), tuple(axes[kp]), kernel_in_dims(tuple(axes[kp])))
    return [chosen[m] for m in sorted(chosen)]


def trainable_patterns(cfg: PeftConfig) -> list[str]:
    """The one trainable filter of a recipe: adapter leaves plus `cfg.trainable` extras."""
    if cfg.type == "none":
        return list(cfg.trainable) or [".*"]
    return list(METHOD_LEAVES[cfg.type]) + list(cfg.trainable)


def lora_scale(cfg: PeftConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


def _site_leaves(site: Site, cfg: PeftConfig, kernel: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    in_shape, out_shape, _, _ = site.split()
    lead = site.lead
    dtype = kernel.dtype
    fan_in = math.prod(in_shape)
    if cfg.type in ("lora", "dora"):
        # A random (Kaiming-uniform-like, as in the LoRA paper's reference), B zero: the
        # adapter starts as an exact identity.
        bound = 1.0 / math.sqrt(fan_in)
        leaves = {
            "lora_a": jax.random.uniform(key, lead + in_shape + (cfg.rank,), dtype, -bound, bound),
            "lora_b": jnp.zeros(lead + (cfg.rank,) + out_shape, dtype),
            "lora_scale": jnp.full(lead, lora_scale(cfg), jnp.float32),
        }
        if cfg.dropout:
            # A frozen leaf like the scale, so the rate travels with the adapter file and the
            # seam needs no side channel; absent when 0, so nothing changes for plain LoRA.
            leaves["lora_dropout"] = jnp.full(lead, cfg.dropout, jnp.float32)
        if cfg.type == "dora":
            in_axes = tuple(range(len(lead), len(lead) + site.n_in))
            leaves["dora_m"] = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=in_axes)).astype(dtype)
        return leaves
    if cfg.type == "ia3":
        # Keys/values scale their outputs; the FFN scales the input of its down projection
        # (the inner activation). Ones: identity at attach.
        if site.path.endswith("mlp/down"):
            return {"ia3_in": jnp.ones(lead + in_shape, dtype)}
        return {"ia3_out": jnp.ones(lead + out_shape, dtype)}
    if cfg.type == "adapter":
        width = math.prod(out_shape)
        bound = 1.0 / math.sqrt(width)
        return {
            "adapter_down": jax.random.uniform(key, lead + out_shape + (cfg.bottleneck,), dtype, -bound, bound),
            "adapter_up": jnp.zeros(lead + (cfg.bottleneck,) + out_shape, dtype),  # identity at attach
        }
    raise ValueError(f"peft.type {cfg.type!r} attaches nothing.")


def _site_axes(site: Site, cfg: PeftConfig) -> dict[str, tuple]:
    _, _, in_axes, out_axes = site.split()
    lead = site.lead_axes
    if cfg.type in ("lora", "dora"):
        axes = {"lora_a": lead + in_axes + ("lora_rank",), "lora_b": lead + ("lora_rank",) + out_axes,
                "lora_scale": lead}
        if cfg.dropout:
            axes["lora_dropout"] = lead
        if cfg.type == "dora":
            axes["dora_m"] = lead + out_axes
        return axes
    if cfg.type == "ia3":
        return {"ia3_in": lead + in_axes} if site.path.endswith("mlp/down") else {"ia3_out": lead + out_axes}
    return {"adapter_down": lead + out_axes + ("adapter_dim",), "adapter_up": lead + ("adapter_dim",) + out_axes}


def attach(params: dict, cfg: PeftConfig, sites: list[Site], key: jax.Array,
           init_ids: jax.Array | None = None) -> dict:
    """Add adapter leaves (pure; jit it with out_shardings to place them).

    `init_ids` (prompt tuning) are the token ids whose embeddings start the soft prompt,
    repeated or cut to `num_virtual_tokens`; by default random real vocabulary tokens.
    Leaves that already exist (a tree restored with its adapters) are kept as they are.
    """
    if cfg.type == "none":
        return params
    flat = flat_paths(params)
    if cfg.type in ("prefix", "prompt"):
        leaves = _global_leaves(flat, cfg, key, init_ids)
    else:
        leaves = {}
        for i, site in enumerate(sites):
            kernel = flat[f"{site.path}/kernel"]
            for name, leaf in _site_leaves(site, cfg, kernel, jax.random.fold_in(key, i)).items():
                leaves[f"{site.path}/{name}"] = leaf
    for path, leaf in leaves.items():
        flat.setdefault(path, leaf)  # idempotent: existing adapters are kept
    if cfg.quantize != "none":  # QLoRA: the adapted layers' frozen kernels stored quantized
        flat = quantize_flat(flat, sites, cfg.quantize)
    return unflatten_paths(flat)


def _global_leaves(flat: dict, cfg: PeftConfig, key: jax.Array, init_ids) -> dict[str, jax.Array]:
    emb = flat["embed/embedding"]  # [vocab, D]
    vocab, d = emb.shape
    n = cfg.num_virtual_tokens
    if init_ids is None:
        init_ids = jax.random.randint(key, (n,), 0, vocab)
    else:
        init_ids = jnp.resize(jnp.asarray(init_ids, jnp.int32), (n,))
    start = emb[init_ids]  # [P, D]: real token embeddings, so training starts in-distribution
    if cfg.type == "prompt":
        return {"prompt/embedding": start}
    # Prefix tuning's reparametrisation (Li & Liang): P embeddings -> tanh MLP -> every layer's
    # keys and values. Small random output init: the prefixes start near zero.
    k1, k2 = jax.random.split(key)
    out_width = _prefix_width(flat)
    return {
        "prefix/embedding": start,
        "prefix/mlp_in": jax.random.normal(k1, (d, cfg.prefix_hidden), emb.dtype) / math.sqrt(d),
        "prefix/mlp_out": jax.random.normal(k2, (cfg.prefix_hidden, out_width), emb.dtype) * 0.02,
    }


def _prefix_width(flat: dict) -> int:
    """layers * 2 * kv_heads * head_dim, read off the k projection's kernel."""
    if "layers/attn/k/kernel" in flat:
        n_layers, _, kvh, hd = flat["layers/attn/k/kernel"].shape
    else:
        n_layers = len({p.split("/")[0] for p in flat if p.startswith("layers_")})
        _, kvh, hd = flat["layers_0/attn/k/kernel"].shape
    return n_layers * 2 * kvh * hd


def finalize_prefix(params: dict, model_cfg: ModelConfig) -> dict:
    """Replace prefix tuning's training-time MLP by the per-layer prefixes it produces.

    The forward is unchanged; only `prefix/kv` [layers, 2, P, kv_heads, head_dim] remains.
    Works on a full tree or on the trainable subtree alone.
    """
    flat = flat_paths(params)
    if "prefix/mlp_out" not in flat:
        return params
    emb, w_in, w_out = flat.pop("prefix/embedding"), flat.pop("prefix/mlp_in"), flat.pop("prefix/mlp_out")
    kv = linear(jnp.tanh(linear(emb, w_in)), w_out)  # [P, layers*2*kv_heads*head_dim]
    c = model_cfg
    flat["prefix/kv"] = kv.reshape(emb.shape[0], c.n_layers, 2, c.n_kv_heads, c.resolved_head_dim).transpose(1, 2, 0, 3, 4)
    return unflatten_paths(flat)


def attach_axes(logical: dict, cfg: PeftConfig, sites: list[Site]) -> dict:
    """The logical axes of `attach`'s new leaves, merged into the base's axes tree."""
    if cfg.type == "none":
        return logical
    flat = flat_paths(logical)
    if cfg.type == "prompt":
        flat["prompt/embedding"] = (None, "embed")
    elif cfg.type == "prefix":
        flat.update({"prefix/embedding": (None, "embed"), "prefix/mlp_in": ("embed", None),
                     "prefix/mlp_out": (None, None)})
    for site in sites:
        for name, axes in _site_axes(site, cfg).items():
            flat[f"{site.path}/{name}"] = axes
    if cfg.quantize != "none":
        flat = quantize_axes_flat(flat, sites)
    return unflatten_paths(flat)
