"""A LoRA/DoRA adapter exported in the Hugging Face PEFT format loads into `peft` on the exported
base and gives our logits (float32; tolerance 1e-4, as for the base model reference tests)."""

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from jaxlearn.config import ModelConfig, PeftConfig
from jaxlearn.models.hf import load_hf, save_hf
from jaxlearn.models.transformer import Transformer, abstract_params
from jaxlearn.peft.attach import attach, find_sites
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.hf_peft import export_peft
from jaxlearn.peft.merge import base_leaves

from hf_helpers import TOL, _save_hf_model, hf_logits, logits


@pytest.mark.parametrize("method,scan,rope", [("lora", True, "rotate_half"), ("lora", False, "interleaved"),
                                              ("dora", True, "rotate_half")])
def test_exported_adapter_loads_in_peft(tmp_path, method, scan, rope):
    path = tmp_path / "base-src"
    _save_hf_model("llama", path, tie_word_embeddings=False)
    imp = load_hf(path, ModelConfig(scan_layers=scan, rope_style=rope))
    cfg = imp.cfg
    abstract, logical = abstract_params(Transformer(cfg))
    pc = PeftConfig(type=method, rank=4, alpha=8.0)
    params = attach(imp.params, pc, find_sites(abstract, logical, pc), jax.random.key(0))
    flat = flat_paths(params)
    for i, k in enumerate(sorted(flat)):  # as after training: B (and the magnitude) non-trivial
        if k.endswith(("lora_b", "dora_m")):
            flat[k] = flat[k] + 0.05 * jax.random.normal(jax.random.key(i), flat[k].shape)
    params = unflatten_paths(flat)

    base_dir = save_hf(base_leaves(params), cfg, tmp_path / "base")
    adapter_dir = export_peft(params, cfg, pc, tmp_path / "adapter", base_name=str(base_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["use_dora"] == (method == "dora")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    hf = peft.PeftModel.from_pretrained(hf_base, str(adapter_dir)).eval()
    ours = logits(cfg, params)
    assert np.abs(ours - logits(cfg, base_leaves(params))).max() > 1e-2  # the adapter matters
    diff = np.abs(ours - hf_logits(hf)).max()
    print(f"{method} scan={scan} rope={rope}: max |logit diff| vs PEFT = {diff:.2e}")
    assert diff < TOL
