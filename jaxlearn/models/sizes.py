"""Architectures of real model sizes, as `ModelConfig` fields (weights are not part of this).

The pod recipes in configs/pod/ spell these out in their `model:` block (a test checks they
agree), so a recipe stays readable on its own. `params_published` is the parameter count the
model's authors state; `ModelConfig.param_count()` must reproduce it (tests/pod/test_sizes.py).
Example::

    cfg = model_config("llama3-8b", scan_layers=True, remat="full")
    cfg.param_count()   # 8_030_261_248

Sources: the `config.json` of each model on the Hugging Face hub (meta-llama/Meta-Llama-3-8B,
meta-llama/Meta-Llama-3-70B, HuggingFaceTB/SmolLM2-{135M,360M,1.7B}, Qwen/Qwen2.5-{0.5B,7B}).
"""

from __future__ import annotations

import dataclasses

from jaxlearn.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelSize:
    name: str
    arch: dict  # ModelConfig fields
    params_published: float  # as stated by the authors (rounded)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=8192)
_SMOLLM2 = dict(vocab_size=49152, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)
_QWEN25 = dict(rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, max_seq_len=32768)

SIZES: dict[str, ModelSize] = {s.name: s for s in [
    ModelSize("llama3-8b", dict(_LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336), 8.03e9),
    ModelSize("llama3-70b", dict(_LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672), 70.6e9),
    ModelSize("smollm2-135m", dict(_SMOLLM2, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                                   rope_theta=100000.0), 134.5e6),
    ModelSize("smollm2-360m", dict(_SMOLLM2, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560,
                                   rope_theta=100000.0), 361.8e6),
    ModelSize("smollm2-1.7b", dict(_SMOLLM2, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, d_ff=8192,
                                   rope_theta=130000.0), 1.71e9),
    ModelSize("qwen2.5-0.5b", dict(_QWEN25, vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                   d_ff=4864, tie_embeddings=True), 494e6),
    ModelSize("qwen2.5-7b", dict(_QWEN25, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                 d_ff=18944, tie_embeddings=False), 7.62e9),
]}


def model_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named size; `overrides` set numerics/memory fields (dtype, remat, ...).

    >>> model_config("smollm2-135m").n_layers
    30
    """
    if name not in SIZES:
        raise ConfigError(f"unknown model size {name!r}; known: {', '.join(SIZES)}.")
    return ModelConfig(**{**SIZES[name].arch, **overrides})
