"""Hugging Face safetensors checkpoints in and out, for Llama-family models.

Supported: `LlamaForCausalLM` (Llama 2/3/3.1+, SmolLM2), `MistralForCausalLM` (GQA; a sliding
window caps `max_seq_len` at the window, where full attention equals it), `Qwen2ForCausalLM`
(q/k/v biases, `model.qkv_bias`) and `Qwen3ForCausalLM` (per-head q/k RMSNorm, `model.qk_norm`).
RoPE scaling (`rope_scaling` in config.json) of type linear, llama3 or yarn becomes
`model.rope_scaling` and is written back on export. Example::

    imp = load_hf("path/to/hf_dir", mesh=mesh, rules=rules)   # params land in their shardings
    imp.cfg, imp.params, imp.report.summary()
    save_hf(imp.params, imp.cfg, "out_dir", tokenizer=tok)    # config.json + model.safetensors

How a jaxlearn leaf relates to a Hugging Face tensor W (stored [out, in]):

    embed/embedding          [vocab, embed]        = model.embed_tokens.weight
    attn/{q,k,v}/kernel      [embed, heads, hd]    = W.T reshaped; q/k rows permuted for
                                                     interleaved RoPE (see `rope_permutation`)
    attn/o/kernel            [heads, hd, embed]    = W.T reshaped
    attn/{q,k,v}_bias        [heads, hd]           = b reshaped (Qwen2)
    attn/{q,k}_norm/scale    [hd]                  = w; rows permuted like q/k's (Qwen3)
    mlp/{gate,up,down}/kernel, lm_head/kernel      = W.T
    *_norm/scale, final_norm/scale                 = w

Every leaf is built with `jax.make_array_from_callback`: each device's callback reads only its
own slice (safetensors are memory-mapped and sliced), so no device ever holds an unsharded
copy, and each host reads only what its devices need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import traverse_util

from jaxlearn.config import ConfigError, ModelConfig, RopeScalingConfig
from jaxlearn.models.transformer import Transformer, abstract_params
from jaxlearn.sharding import Rules, tree_shardings


class CheckpointImportError(ValueError):
    """A checkpoint does not fit the model: the message names every tensor that is wrong."""


@dataclasses.dataclass
class ImportReport:
    """What an import read: tensors used, unused (present but not needed), missing, and time."""

    source: str
    used: list[str]
    unused: list[str]
    missing: list[str]
    seconds: float

    def summary(self) -> str:
        text = f"imported {len(self.used)} tensors from {self.source} in {self.seconds:.1f} s"
        if self.unused:
            text += f"; unused: {', '.join(self.unused)}"
        if self.missing:
            text += f"; missing: {', '.join(self.missing)}"
        return text


@dataclasses.dataclass
class Imported:
    """An imported checkpoint: the model config it implies, its parameters, and the report."""

    cfg: ModelConfig
    params: Any
    report: ImportReport


class TensorSource(Protocol):
    """Named tensors in Hugging Face layout, read lazily by slice."""

    name: str
    rope_layout: str  # how q/k rows are stored: "rotate_half" (HF) or "interleaved" (GGUF)

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Naming and layout

# Per-layer tensors: (jaxlearn path under the layer, HF name under `model.layers.{i}.`, kind).
_LAYER_TENSORS = (
    (("attn_norm", "scale"), "input_layernorm.weight", "vector"),
    (("attn", "q", "kernel"), "self_attn.q_proj.weight", "heads_in"),
    (("attn", "k", "kernel"), "self_attn.k_proj.weight", "heads_in"),
    (("attn", "v", "kernel"), "self_attn.v_proj.weight", "heads_in"),
    (("attn", "o", "kernel"), "self_attn.o_proj.weight", "heads_out"),
    (("attn", "q_bias"), "self_attn.q_proj.bias", "heads_vector"),
    (("attn", "k_bias"), "self_attn.k_proj.bias", "heads_vector"),
    (("attn", "v_bias"), "self_attn.v_proj.bias", "heads_vector"),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "head_dim_vector"),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "head_dim_vector"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector"),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", "dense"),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", "dense"),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", "dense"),
)
_GLOBAL_TENSORS = (
    (("embed", "embedding"), "model.embed_tokens.weight", "vector"),
    (("final_norm", "scale"), "model.norm.weight", "vector"),
    (("lm_head", "kernel"), "lm_head.weight", "dense"),
)
# Present in some checkpoints, never needed (RoPE tables are recomputed).
_BENIGN_UNUSED = re.compile(r".*rotary_emb\.inv_freq$")
# q and k (and their biases, and the per-head norm scales that multiply them) carry RoPE
# pairs, so their rows follow the RoPE layout.
_ROPE_ROWS = {("attn", "q", "kernel"), ("attn", "k", "kernel"), ("attn", "q_bias"), ("attn", "k_bias"),
              ("attn", "q_norm", "scale"), ("attn", "k_norm", "scale")}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One jaxlearn leaf: where it comes from and how it is laid out."""

    path: tuple[str, ...]  # the full path in the parameter tree
    hf: str | tuple[str, ...]  # one HF name, or one per layer (stacked leaf, layers first)
    kind: str  # vector | dense | heads_in | heads_out | heads_vector | head_dim_vector
    rope_rows: bool  # q/k rows: permuted when source and target RoPE layouts differ


def _leaves(cfg: ModelConfig, paths: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], _Leaf]:
    """Map every parameter path of the model to its HF tensor(s); unknown paths are errors."""
    by_suffix = {suffix: (name, kind) for suffix, name, kind in _LAYER_TENSORS}
    by_global = {suffix: (name, kind) for suffix, name, kind in _GLOBAL_TENSORS}
    out = {}
    for path in paths:
        head, rest = path[0], tuple(path[1:])
        if head.startswith("layers") and rest not in by_suffix:
            raise CheckpointImportError(
                f"parameter {'/'.join(path)} has no Hugging Face counterpart. Adapter leaves (LoRA, IA3, ...) "
                f"must be merged into the base weights first (jaxlearn.peft.merge.merge).")
        if head == "layers" and cfg.scan_layers:
            name, kind = by_suffix[rest]
            hf = tuple(f"model.layers.{i}.{name}" for i in range(cfg.n_layers))
        elif m := re.fullmatch(r"layers_(\d+)", head):
            name, kind = by_suffix[rest]
            hf = f"model.layers.{m.group(1)}.{name}"
        elif path in by_global:
            rest = path
            hf, kind = by_global[path]
        else:
            raise CheckpointImportError(f"parameter {'/'.join(path)} has no Hugging Face counterpart.")
        out[path] = _Leaf(path, hf, kind, rest in _ROPE_ROWS)
    return out


def _hf_shape(leaf: _Leaf, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape (one layer) that a leaf shape (one layer) implies."""
    if leaf.kind in ("vector", "head_dim_vector"):
        return leaf_shape
    if leaf.kind == "dense":
        return leaf_shape[::-1]
    if leaf.kind == "heads_in":  # [embed, heads, hd] <- [heads*hd, embed]
        return (leaf_shape[1] * leaf_shape[2], leaf_shape[0])
    if leaf.kind == "heads_out":  # [heads, hd, embed] <- [embed, heads*hd]
        return (leaf_shape[2], leaf_shape[0] * leaf_shape[1])
    return (leaf_shape[0] * leaf_shape[1],)  # heads_vector


def rope_permutation(head_dim: int, src: str, dst: str) -> np.ndarray | None:
    """Row order that turns q/k rows of one head from RoPE layout `src` into `dst` (None: same).

    rotate_half (Hugging Face) pairs rows (i, i + hd/2); interleaved (GGUF, RoFormer) pairs
    (2i, 2i + 1). llama.cpp's converter reorders each head so interleaved row 2i + b holds
    rotate-half row b * hd/2 + i; `rows[perm]` applies or undoes that.

    >>> rope_permutation(4, "rotate_half", "interleaved").tolist()
    [0, 2, 1, 3]
    """
    if src == dst:
        return None
    half = head_dim // 2
    to_interleaved = np.asarray([b * half + i for i in range(half) for b in range(2)])
    if (src, dst) == ("rotate_half", "interleaved"):
        return to_interleaved
    if (src, dst) == ("interleaved", "rotate_half"):
        return np.argsort(to_interleaved)
    raise ValueError(f"unknown RoPE layouts {src!r} -> {dst!r}; use 'rotate_half' or 'interleaved'.")


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Callback indices with explicit bounds (make_array_from_callback passes slice(None))."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _read_layer(src: TensorSource, name: str, leaf: _Leaf, idx: tuple[slice, ...], hd: int,
                perm: np.ndarray | None) -> np.ndarray:
    """Slice `idx` of one layer's leaf, reading only the matching part of HF tensor `name`."""
    kind = leaf.kind
    if kind == "vector":
        return src.read(name, idx)
    if kind == "dense":  # leaf[i, o] = W[o, i]
        return src.read(name, (idx[1], idx[0])).T
    if kind == "head_dim_vector":  # one scale per head_dim row: read it whole (tiny), permute, cut
        w = src.read(name, (slice(0, hd),))
        return (w[perm] if perm is not None else w)[idx[0]]
    # Head-shaped tensors: read whole heads (rows h0*hd .. h1*hd), permute, then cut head_dim.
    heads = idx[0] if kind in ("heads_out", "heads_vector") else idx[1]
    rows = slice(heads.start * hd, heads.stop * hd)
    nh = heads.stop - heads.start
    if kind == "heads_in":  # leaf[e, h, d] = W[h*hd + d, e]
        w = src.read(name, (rows, idx[0])).reshape(nh, hd, -1)
        w = w[:, perm] if perm is not None else w
        return w.transpose(2, 0, 1)[:, :, idx[2]]
    if kind == "heads_out":  # leaf[h, d, e] = W[e, h*hd + d]
        w = src.read(name, (idx[2], rows))
        return w.T.reshape(nh, hd, -1)[:, idx[1], :]
    b = src.read(name, (rows,)).reshape(nh, hd)  # heads_vector
    b = b[:, perm] if perm is not None else b
    return b[:, idx[1]]


# --------------------------------------------------------------------------------------------
# Import


def import_params(src: TensorSource, cfg: ModelConfig, shardings: Any = None, *, strict: bool = True) -> Imported:
    """Build the parameter tree of `Transformer(cfg)` from `src`, leaf by leaf, in `shardings`.

    `shardings`: a tree of `jax.sharding.Sharding` matching the parameters, or None (every
    leaf on the default device). Every HF tensor's shape is checked against `cfg`; a missing
    tensor, a wrong shape, or (with `strict`) an unused tensor raises `CheckpointImportError`
    naming each one. Scanned (`scan_layers`) and unrolled layouts both come out of the same file.
    """
    t0 = time.perf_counter()
    abstract, _ = abstract_params(Transformer(cfg))
    flat = traverse_util.flatten_dict(abstract)
    leaves = _leaves(cfg, flat)
    flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    hd = cfg.resolved_head_dim
    present = set(src.keys())

    # Check every name and shape before reading any data.
    needed, missing, wrong = [], [], []
    for path, leaf in leaves.items():
        shape = flat[path].shape
        names = leaf.hf if isinstance(leaf.hf, tuple) else (leaf.hf,)
        per_layer = shape[1:] if isinstance(leaf.hf, tuple) else shape
        want = _hf_shape(leaf, per_layer)
        for name in names:
            needed.append(name)
            if name not in present:
                missing.append(name)
            elif tuple(src.shape(name)) != tuple(want):
                wrong.append(f"{name}: checkpoint {tuple(src.shape(name))}, model needs {want} "
                             f"(for {'/'.join(path)} {tuple(shape)})")
    unused = sorted(n for n in present - set(needed) if not _BENIGN_UNUSED.match(n))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if unused and strict:
        problems.append(f"unused tensors (pass strict=False to ignore them): {', '.join(unused)}")
    if problems:
        raise CheckpointImportError(f"{src.name} does not fit the model config: " + ". ".join(problems) + ".")

    out = {}
    for path, leaf in leaves.items():
        spec = flat[path]
        dtype = np.dtype(spec.dtype)
        perm = rope_permutation(hd, src.rope_layout, cfg.rope_style) if leaf.rope_rows else None
        sharding = flat_sh.get(path, default)

        def callback(index, leaf=leaf, shape=spec.shape, dtype=dtype, perm=perm):
            idx = _norm_index(index, shape)
            if isinstance(leaf.hf, str):
                return np.ascontiguousarray(_read_layer(src, leaf.hf, leaf, idx, hd, perm), dtype=dtype)
            layers = range(*idx[0].indices(shape[0]))
            block = np.empty([len(layers)] + [s.stop - s.start for s in idx[1:]], dtype)
            for j, layer in enumerate(layers):
                block[j] = _read_layer(src, leaf.hf[layer], leaf, idx[1:], hd, perm)
            return block

        out[path] = jax.make_array_from_callback(spec.shape, sharding, callback)
        if hasattr(src, "release"):  # drop any rows the source cached for this leaf
            src.release()
    params = traverse_util.unflatten_dict(out)
    report = ImportReport(src.name, sorted(set(needed)), unused, [], time.perf_counter() - t0)
    return Imported(cfg, params, report)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for every parameter of `Transformer(cfg)`, from its logical axes."""
    _, logical = abstract_params(Transformer(cfg))
    return tree_shardings(mesh, logical, rules)


# --------------------------------------------------------------------------------------------
# Hugging Face config.json

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # transformers' rope_type names jaxlearn computes


def rope_scaling_from_hf(hf: dict) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, `model.rope_scaling`) of a Hugging Face config.json dict, read as transformers
    reads it: `rope_scaling` (older files) or `rope_parameters` (transformers 5), the type under
    `rope_type` or `type`, and `original_max_position_embeddings` defaulting to the top-level
    one, else `max_position_embeddings`. Unsupported types and bad values raise
    `CheckpointImportError` naming them.

    >>> rope_scaling_from_hf({"rope_theta": 5e5, "max_position_embeddings": 131072, "rope_scaling": {
    ...     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    ...     "original_max_position_embeddings": 8192}})[1].type
    'llama3'
    """
    # transformers: `rope_scaling`, when present, replaces `rope_parameters`.
    rp = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(rp.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
                  or hf.get("rope_theta") or 10000.0)
    if any(isinstance(v, dict) for v in rp.values()):
        nested = ", ".join(k for k, v in rp.items() if isinstance(v, dict))
        raise CheckpointImportError(f"per-layer-type rope parameters ({nested}) are not supported; jaxlearn "
                                    f"uses one RoPE for every layer.")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise CheckpointImportError(f"partial_rotary_factor {partial!r} (partial RoPE) is not supported.")
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise CheckpointImportError(f"rope scaling {rope_type!r} is not supported; jaxlearn imports rope types "
                                    f"{', '.join(_ROPE_TYPES)} (rope_scaling in config.json).")
    if rope_type == "default":
        return theta, RopeScalingConfig()
    # As transformers: a top-level original_max_position_embeddings wins (Phi-3 style files).
    original = hf.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings")
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ()}[rope_type]
    missing = [k for k in required if rp.get(k) is None]
    if missing:
        raise CheckpointImportError(f"rope scaling {rope_type!r} needs {', '.join(missing)} in rope_scaling "
                                    f"(config.json); transformers cannot run it without them either.")
    if rope_type != "linear" and not original:
        raise CheckpointImportError(f"rope scaling {rope_type!r} needs original_max_position_embeddings (or "
                                    f"max_position_embeddings) in config.json.")
    try:
        if rope_type == "linear":
            kw = dict(factor=float(rp["factor"]))
        elif rope_type == "llama3":
            kw = dict(factor=float(rp["factor"]), low_freq_factor=float(rp["low_freq_factor"]),
                      high_freq_factor=float(rp["high_freq_factor"]), original_max_position_embeddings=int(original))
        else:
            factor = rp.get("factor")
            if factor is None:  # transformers (DeepSeek-V3 style): the ratio of the two context lengths
                factor = hf.get("max_position_embeddings", original) / original
            attention_factor = rp.get("attention_factor")
            # `or` as in transformers: a null or 0 means the paper's default.
            kw = dict(factor=float(factor), original_max_position_embeddings=int(original),
                      beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
                      mscale=float(rp.get("mscale") or 0.0), mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
                      attention_factor=None if attention_factor is None else float(attention_factor),
                      truncate=bool(rp.get("truncate", True)))
        return theta, RopeScalingConfig(type=rope_type, **kw)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointImportError(f"rope_scaling in config.json does not convert: {e}") from None


def rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
    """The config.json `rope_scaling` of `cfg.model.rope_scaling` (None for plain RoPE), in the
    form Llama 3.1 and Qwen files use (`rope_type`), which transformers 4.43+ and 5 both read.

    >>> rope_scaling_to_hf(ModelConfig(rope_scaling=RopeScalingConfig(type="linear", factor=2.0)))
    {'rope_type': 'linear', 'factor': 2.0}
    """
    rs = cfg.rope_scaling
    if rs.type == "none":
        return None
    out = {"rope_type": rs.type, "factor": rs.factor}
    if rs.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rs.original_max_position_embeddings or cfg.max_seq_len
    if rs.type == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    if rs.type == "yarn":
        out.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
        # Optional keys only when set, so older transformers see no key they do not know.
        if rs.mscale:
            out["mscale"] = rs.mscale
        if rs.mscale_all_dim:
            out["mscale_all_dim"] = rs.mscale_all_dim
        if rs.attention_factor is not None:
            out["attention_factor"] = rs.attention_factor
        if not rs.truncate:
            out["truncate"] = False
    return out


def config_from_hf(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json` (a dict). Numerics, layout and training
    options (scan_layers, dtypes, remat, ...) come from `base`.

    >>> config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    ...   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}).n_kv_heads
    4
    """
    base = base or ModelConfig()
    model_type = hf.get("model_type", "llama")
    if model_type not in _ARCHITECTURES:
        raise CheckpointImportError(f"model_type {model_type!r} is not supported; jaxlearn imports "
                                    f"{', '.join(sorted(_ARCHITECTURES))} checkpoints.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointImportError(f"hidden_act {act!r} is not supported (jaxlearn's MLP is SwiGLU, 'silu').")
    if hf.get("mlp_bias") or (model_type != "qwen2" and hf.get("attention_bias")):
        raise CheckpointImportError("checkpoints with mlp_bias or attention_bias (bias on o_proj too) are not "
                                    "supported; jaxlearn has q/k/v biases only (Qwen2).")
    theta, rope_scaling = rope_scaling_from_hf(hf)
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise CheckpointImportError(f"{model_type} with use_sliding_window=true is not supported.")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_len = hf.get("max_position_embeddings", base.max_seq_len)
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if window:
        # Within the window, sliding-window attention is full causal attention.
        max_len = min(max_len, int(window))
    return dataclasses.replace(
        base,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim == hf["hidden_size"] // heads else head_dim,
        d_ff=hf["intermediate_size"],
        max_seq_len=max_len,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )


def config_to_hf(cfg: ModelConfig, dtype: str = "float32", token_ids: dict | None = None) -> dict:
    """A Hugging Face `config.json` dict for `cfg`: LlamaForCausalLM, Qwen2 with q/k/v bias, or
    Qwen3 with q/k norm; `rope_scaling` from `cfg.rope_scaling`.

    >>> config_to_hf(ModelConfig(qk_norm=True))["architectures"]
    ['Qwen3ForCausalLM']
    """
    if cfg.qkv_bias and cfg.qk_norm:
        raise ValueError("model.qkv_bias and model.qk_norm together have no Hugging Face architecture "
                         "(Qwen2 has the biases, Qwen3 the norms); export one or the other.")
    model_type = "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"
    out = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if model_type == "qwen3":
        out.update(attention_bias=False)
    out.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    return out


# --------------------------------------------------------------------------------------------
# safetensors directories


class SafetensorsSource:
    """The tensors of a Hugging Face directory (one `*.safetensors` file, or a sharded set with
    `model.safetensors.index.json`), memory-mapped and read by slice."""

    rope_layout = "rotate_half"

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory).expanduser()
        self.name = str(self.directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointImportError(f"{self.directory} holds no *.safetensors file.")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise CheckpointImportError(f"{index} names {f}, which is not in {self.directory}.")
            h = safe_open(str(path), framework="numpy")
            self._handles[f] = h
            for key in h.keys():
                self._file_of[key] = f

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._handles[self._file_of[key]].get_slice(key)[index]


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory holds config.json and "
                                f"*.safetensors files.")
    return json.loads(path.read_text())


def load_hf(directory: str | os.PathLike, base: ModelConfig | None = None, *, mesh: jax.sharding.Mesh | None = None,
            rules: Rules | None = None, strict: bool = True) -> Imported:
    """Import a Hugging Face safetensors directory into jaxlearn parameters.

    The architecture comes from `config.json`; `base` supplies everything else (scan_layers,
    param_dtype, rope_style, ...). With `mesh` and `rules`, parameters are created directly in
    their shardings.

    >>> imp = load_hf("hf_dir", ModelConfig(scan_layers=False))     # doctest: +SKIP
    """
    cfg = config_from_hf(read_hf_config(directory), base)
    shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
    return import_params(SafetensorsSource(directory), cfg, shardings, strict=strict)


# --------------------------------------------------------------------------------------------
# Export


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _layer_to_hf(leaf: _Leaf, arr: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """Inverse of `_read_layer` for one whole layer: jaxlearn layout -> HF layout."""
    if leaf.kind == "vector":
        return arr
    if leaf.kind == "dense":
        return arr.T
    if leaf.kind == "head_dim_vector":
        return arr[perm] if perm is not None else arr
    if leaf.kind == "heads_in":  # [e, h, d] -> [h*d, e]
        w = arr.transpose(1, 2, 0)
        w = w[:, perm] if perm is not None else w
        return w.reshape(-1, arr.shape[0])
    if leaf.kind == "heads_out":  # [h, d, e] -> [e, h*d]
        return arr.reshape(-1, arr.shape[2]).T
    b = arr[:, perm] if perm is not None else arr
    return b.reshape(-1)


def params_to_hf(params: Any, cfg: ModelConfig) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor, one leaf on the host at a time."""
    flat = traverse_util.flatten_dict(params)
    leaves = _leaves(cfg, flat)
    hd = cfg.resolved_head_dim
    for path, leaf in leaves.items():
        host = _to_host(flat[path])
        # Back to the rotate-half layout that Hugging Face Llama code expects.
        perm = rope_permutation(hd, cfg.rope_style, "rotate_half") if leaf.rope_rows else None
        if isinstance(leaf.hf, str):
            yield leaf.hf, np.ascontiguousarray(_layer_to_hf(leaf, host, perm))
        else:
            for layer, name in enumerate(leaf.hf):
                yield name, np.ascontiguousarray(_layer_to_hf(leaf, host[layer], perm))


def save_hf(params: Any, cfg: ModelConfig, out_dir: str | os.PathLike, *, tokenizer: Any = None,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors (or shards plus
    model.safetensors.index.json above `max_shard_bytes`), and the tokenizer files when a
    `jaxlearn.data.bpe_tokenizer.BPETokenizer` is given. `dtype` ("float32"/"bfloat16")
    defaults to the parameters' own, so nothing is rounded. Only process 0 writes.

    >>> save_hf(params, cfg, "out/smollm2-hf", tokenizer=tok)     # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    out = Path(out_dir).expanduser()
    tensors = {}
    for name, arr in params_to_hf(params, cfg):
        if dtype is not None:
            arr = arr.astype(np.dtype(jax.numpy.dtype(dtype)))
        tensors[name] = arr
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    stored = dtype or str(next(iter(tensors.values())).dtype)
    token_ids = tokenizer.hf_token_ids() if tokenizer is not None else None
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, stored, token_ids), indent=2) + "\n")
    # Shards: tensors in name order, a new file once the current one would pass the limit.
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}  # transformers expects this tag on safetensors it loads
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_hf(out)
    return out
