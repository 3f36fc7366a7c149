"""LoRA / DoRA adapters in the Hugging Face PEFT format.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained` loads onto the base exported with
`jaxlearn.models.hf.save_hf`. Layouts: our `lora_a` is [*in, r] and `lora_b` [r, *out]
(heads and head_dim kept apart); PEFT's `lora_A.weight` is [r, in] and `lora_B.weight`
[out, r], with q/k rows in the rotate-half order Hugging Face Llama code expects. Example::

    save_hf(merge_free_base, cfg, "out/base")
    export_peft(params, cfg, peft_cfg, "out/adapter", base_name="out/base")

QLoRA (an int8 / NF4 base): PEFT's LoRA layers sit over a float base, so the base is exported
dequantised (`jaxlearn.peft.quantize.dequantize_tree`), the weights the adapter was trained
against; the adapter tensors are the same as for plain LoRA. `peft_logit_diff` measures how
far the PEFT model is from ours::

    dense = dequantize_tree(params)
    save_hf(base_leaves(dense), cfg, "out/base")
    export_peft(dense, cfg, peft_cfg, "out/adapter", base_name="out/base")
    peft_logit_diff(model, params, "out/base", "out/adapter")   # ~1e-5 in float32
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np

from jaxlearn.config import ModelConfig, PeftConfig
from jaxlearn.models.hf import rope_permutation
from jaxlearn.peft.filter import flat_paths

HF_MODULES = {
    "attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj",
}
_ROPE_MODULES = ("attn/q", "attn/k")


def _layers(path: str, arr: np.ndarray, scanned: bool) -> list[tuple[int, np.ndarray]]:
    if scanned:
        return list(enumerate(arr))
    return [(int(re.match(r"layers_(\d+)/", path).group(1)), arr)]


def _out_rows(module: str, b_out: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Apply the RoPE row order to an output-side array whose last dims are [heads, head_dim]."""
    perm = rope_permutation(cfg.resolved_head_dim, cfg.rope_style, "rotate_half") if module in _ROPE_MODULES else None
    return b_out if perm is None else b_out[..., perm]


def peft_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} for every LoRA (and DoRA magnitude) leaf."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat_paths(params).items():
        m = re.match(r"(layers(?:_\d+)?)/(attn/[qkvo]|mlp/(?:gate|up|down))/(lora_a|lora_b|dora_m)$", path)
        if not m:
            continue
        scanned = m.group(1) == "layers"
        module, kind = m.group(2), m.group(3)
        for layer, arr in _layers(path, np.asarray(jax.device_get(leaf), np.float32), scanned):
            prefix = f"base_model.model.model.layers.{layer}.{HF_MODULES[module]}"
            if kind == "lora_a":  # [*in, r] -> [r, in]
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]).T)
            elif kind == "lora_b":  # [r, *out] -> [out, r]
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                    _out_rows(module, arr, cfg).reshape(arr.shape[0], -1).T)
            else:  # dora_m [*out] -> [out]
                out[f"{prefix}.lora_magnitude_vector"] = np.ascontiguousarray(_out_rows(module, arr, cfg).reshape(-1))
    return out


def export_peft(params: dict, cfg: ModelConfig, peft_cfg: PeftConfig, out_dir: str | os.PathLike, *,
                base_name: str = "") -> Path:
    """Write a PEFT adapter directory for a LoRA/DoRA tree (adapters beside the base weights)."""
    if peft_cfg.type not in ("lora", "dora"):
        raise ValueError(f"Hugging Face PEFT export covers lora and dora, not {peft_cfg.type!r}.")
    from safetensors.numpy import save_file

    tensors = peft_tensors(params, cfg)
    if not tensors:
        raise ValueError("no LoRA leaves found in these parameters; attach or load an adapter first.")
    targets = sorted({name.split(".")[-3] for name in tensors if name.endswith("lora_A.weight")})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": peft_cfg.rank,
        "lora_alpha": peft_cfg.alpha,
        "use_rslora": peft_cfg.rslora,
        "use_dora": peft_cfg.type == "dora",
        "target_modules": targets,
        "lora_dropout": peft_cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "adapter_model.safetensors")
    cfg_tmp = out / ".adapter_config.json.tmp"
    cfg_tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(cfg_tmp, out / "adapter_config.json")
    return out


def peft_logit_diff(model, params: dict, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                    tokens: np.ndarray | None = None) -> float:
    """max |our logits - PEFT's| on a few token rows: `model` (a jaxlearn Transformer) with
    `params` (QLoRA trees run quantized, as trained) against `peft.PeftModel.from_pretrained`
    of the adapter over the exported base, both float32. Needs torch, transformers and peft.

    >>> peft_logit_diff(run.model, run.params, "out/base", "out/adapter") < 1e-4   # doctest: +SKIP
    True
    """
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    if tokens is None:  # fixed, in-vocabulary ids: the check is about weights, not about text
        tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, 16))
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    ours = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(tokens), pos, jnp.ones((b, t), jnp.int32))[0])(params)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        hf = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    return float(np.abs(np.asarray(ours, np.float32) - theirs).max())
