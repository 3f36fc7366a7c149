"""GGUF (llama.cpp) checkpoints of Llama, Qwen2 and Qwen3 models, dequantized into jaxlearn params.

Supported `general.architecture` values: `llama` (Llama, SmolLM2, Mistral), `qwen2` (q/k/v
biases, `model.qkv_bias`) and `qwen3` (per-head q/k RMSNorm, `model.qk_norm`); any other is
refused by name. The `gguf` package reads the file through a memory map; each tensor is
dequantized to float32 (rows at a time: quantization blocks run along a row) when a device's
callback asks for it. Example::

    imp = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", mesh=mesh, rules=rules)
    imp.cfg.n_layers, imp.report.summary()

RoPE layout of the stored q/k rows depends on the architecture, because llama.cpp's converter
(convert_hf_to_gguf.py) treats them differently:

* `llama`: `LlamaModel.modify_tensors` reorders the q/k rows (and biases) of each head with
  `LlamaModel.permute`, so that llama.cpp's interleaved ("normal") RoPE (pairs 2i, 2i+1) matches
  Hugging Face's rotate-half RoPE (pairs i, i+hd/2). The file is in the interleaved layout.
* `qwen2`, `qwen3`: `Qwen2Model` (and `Qwen3Model(Qwen2Model)`) derive from `TextModel`, not
  `LlamaModel`, and write every tensor unpermuted; llama.cpp runs these architectures with
  NEOX-style RoPE (`LLAMA_ROPE_TYPE_NEOX`), which is rotate-half. The file is in the Hugging
  Face layout, q/k biases and q/k norm scales included.

By default (`rope_style="rotate_half"`) the rows end up in the Hugging Face order (llama files
are un-permuted, qwen files are taken as they are), so the params equal a Hugging Face import
of the same model and export to safetensors unchanged. With `rope_style="interleaved"` the
model uses interleaved RoPE and the rows are put in that order (llama files as stored, qwen
files permuted, biases and norm scales with their rows); both give the same logits.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlearn.config import ModelConfig, RopeScalingConfig
from jaxlearn.models.hf import CheckpointImportError, Imported, import_params, param_shardings
from jaxlearn.sharding import Rules

# GGUF tensor names (llama.cpp's `gguf.MODEL_TENSORS`, shared by llama, qwen2 and qwen3) ->
# Hugging Face names. Biases and q/k norms exist only in some architectures; a tensor that the
# model config does not need is reported as unused by the import.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama/qwen2/qwen3 GGUF tensor (None: no counterpart).

    >>> hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What jaxlearn needs to know about one GGUF architecture beyond its `{arch}.*` metadata."""

    rope_layout: str  # how the converter stored q/k rows: "interleaved" (permuted) or "rotate_half"
    qkv_bias: bool
    qk_norm: bool
    models: str  # for messages


# See the module docstring for why the layouts differ (LlamaModel.permute vs Qwen2Model).
ARCHITECTURES = {
    "llama": _Arch("interleaved", qkv_bias=False, qk_norm=False, models="Llama, SmolLM2, Mistral"),
    "qwen2": _Arch("rotate_half", qkv_bias=True, qk_norm=False, models="Qwen2, Qwen2.5"),
    "qwen3": _Arch("rotate_half", qkv_bias=False, qk_norm=True, models="Qwen3"),
}


def _arch(f: GGUFFile) -> _Arch:
    """The supported architecture of `f`, or a CheckpointImportError naming it and the supported ones."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        supported = ", ".join(f"{k!r} ({a.models})" for k, a in ARCHITECTURES.items())
        raise CheckpointImportError(f"{f.path}: GGUF architecture {arch!r} is not supported; jaxlearn imports "
                                    f"GGUF files of the architectures {supported}.")
    return ARCHITECTURES[arch]


class GGUFFile:
    """An open GGUF file: metadata values by key and tensors by name (memory-mapped).

    >>> f = GGUFFile("model.gguf")                                  # doctest: +SKIP
    >>> f.get("llama.block_count")                                  # doctest: +SKIP
    30
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} not found.")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise CheckpointImportError(f"{self.path} is not a readable GGUF file ({e}).") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointImportError(f"{self.path} has no metadata key {key!r}.")
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")


def config_from_gguf(f: GGUFFile, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig that a llama/qwen2/qwen3 GGUF file describes (other fields from `base`).

    The architecture's hyperparameters are read under its own prefix (`qwen2.block_count`, ...),
    the names llama.cpp's `gguf.Keys` give them for every architecture.
    """
    base = base or ModelConfig()
    spec = _arch(f)
    arch = f.architecture

    def get(key: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{key}", default)

    def require(key: str) -> Any:
        return f.require(f"{arch}.{key}")

    d_model = int(require("embedding_length"))
    heads = int(require("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise CheckpointImportError(f"{f.path}: value heads of {value_dim} dims differ from key heads of "
                                    f"{head_dim}; jaxlearn's attention needs them equal.")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointImportError(f"{f.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported.")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointImportError(f"{f.path}: rope scaling {scaling!r} is not supported.")
    vocab = get("vocab_size")
    if vocab is None and "token_embd.weight" in f.tensors:
        # The embedding's rows are what the import checks against. Converters do not always
        # write `{arch}.vocab_size`, and the tokenizer's list can be shorter than a padded
        # embedding (Qwen2's 151936 rows), so the tensor is the safer second choice.
        vocab = int(f.tensors["token_embd.weight"].shape[-1])  # GGUF dims innermost first: [d_model, vocab]
    if vocab is None:
        vocab = len(f.require("tokenizer.ggml.tokens"))
    return dataclasses.replace(
        base,
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(require("block_count")),
        n_heads=heads,
        n_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=None if head_dim == d_model // heads else head_dim,
        d_ff=int(require("feed_forward_length")),
        max_seq_len=int(get("context_length", base.max_seq_len)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in f.tensors,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        rope_scaling=RopeScalingConfig(),  # not a recipe's: scaled GGUF files are refused above
    )


class GGUFSource:
    """The tensors of a GGUF file under their Hugging Face names, dequantized on demand.

    Quantization blocks run along rows, so a read dequantizes whole rows and then cuts the
    columns. Dequantized rows are kept in a small cache until `release()` (called after each
    leaf), so the devices that need different columns of the same rows pay for them once.
    """

    def __init__(self, f: GGUFFile):
        self.file = f
        # How q/k rows are stored: permuted for interleaved RoPE (llama) or as in Hugging Face
        # (qwen2, qwen3); import_params permutes the rows (and biases, norm scales) to cfg.rope_style.
        self.rope_layout = _arch(f).rope_layout
        self.name = str(f.path)
        self._by_hf = {}
        self.unmapped = []
        for name, t in f.tensors.items():
            hf = hf_name(name)
            if hf is None:
                self.unmapped.append(name)
            else:
                self._by_hf[hf] = t
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def keys(self) -> list[str]:
        # Unmapped GGUF tensors are listed under their own names, so an import reports them.
        return list(self._by_hf) + self.unmapped

    def shape(self, key: str) -> tuple[int, ...]:
        t = self._by_hf[key]
        return tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        import gguf

        t = self._by_hf[key]
        rows = index[0]
        ck = (key, rows.start, rows.stop)
        block = self._cache.get(ck)
        if block is None:
            block = gguf.quants.dequantize(t.data[rows], t.tensor_type)
            block = block.reshape((rows.stop - rows.start,) + self.shape(key)[1:]).astype(np.float32, copy=False)
            self._cache[ck] = block
        return block[(slice(None),) + tuple(index[1:])]

    def release(self) -> None:
        self._cache.clear()


def load_gguf(path: str | os.PathLike | GGUFFile, base: ModelConfig | None = None, *,
              mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
              rope_style: str = "rotate_half", strict: bool = True) -> Imported:
    """Import a llama, qwen2 or qwen3 GGUF file (any quantization the `gguf` package dequantizes).

    `base` gives the non-architecture fields (scan_layers, param_dtype, ...); `rope_style`
    picks the layout (see the module docstring). With `mesh` and `rules`, each leaf is created
    directly in its sharding.

    >>> imp = load_gguf(fetch_smollm2())                           # doctest: +SKIP
    >>> imp.cfg.n_layers, imp.cfg.n_kv_heads                        # doctest: +SKIP
    (30, 3)
    """
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    base = dataclasses.replace(base or ModelConfig(), rope_style=rope_style)
    cfg = config_from_gguf(f, base)
    shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
    return import_params(GGUFSource(f), cfg, shardings, strict=strict)
