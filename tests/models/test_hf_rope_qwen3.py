"""RoPE scaling (linear, llama3, yarn) and Qwen3 (per-head q/k RMSNorm) through the Hugging Face
importer/exporter, on tiny random transformers models saved locally (no hub): imported logits
match transformers, the export loads back into transformers with the same weights and logits,
the frequency tables equal transformers' own, and unsupported or bad settings are clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jaxlearn.config import ConfigError, ModelConfig, RopeScalingConfig, load_config
from jaxlearn.models.hf import CheckpointImportError, config_from_hf, config_to_hf, load_hf, save_hf
from jaxlearn.models.layers import rope_frequencies
from jaxlearn.models.transformer import Transformer, abstract_params

from hf_helpers import TOL, hf_logits, logits

# Positions up to 39 against original_max_position_embeddings=32, so the scaled frequencies
# act both inside and past the "pretraining" context.
TOKENS = np.random.RandomState(1).randint(0, 256, (2, 40))

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
# mscale/mscale_all_dim give an attention factor other than the default, and no truncation.
YARN_MSCALE = dict(YARN, beta_fast=16.0, beta_slow=2.0, mscale=2.0, mscale_all_dim=1.0, truncate=False)

CASES = {  # name: (model_type, extra config, jaxlearn base config)
    "llama3": ("llama", dict(rope_scaling=LLAMA3), ModelConfig()),
    "linear": ("llama", dict(rope_scaling=LINEAR), ModelConfig(scan_layers=False)),
    "yarn": ("llama", dict(rope_scaling=YARN), ModelConfig()),
    "yarn_mscale": ("llama", dict(rope_scaling=YARN_MSCALE), ModelConfig()),
    # head_dim 24 != 64/4; unrolled layers and interleaved RoPE, so the q/k norm scales must be
    # permuted like q/k on import and back on export.
    "qwen3": ("qwen3", dict(head_dim=24), ModelConfig(scan_layers=False, rope_style="interleaved")),
}


def _hf_model(kind: str, path, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, initializer_range=0.2,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(copy.deepcopy(kw))  # transformers writes into the rope dict it is given
    conf, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                       "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    model = model_cls(conf(**base)).eval()
    if kind == "qwen3":  # random norm scales (they start at 1), so a missing or misordered one shows
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.5)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_export_round_trips(tmp_path, case):
    kind, extra, base = CASES[case]
    model = _hf_model(kind, tmp_path / "hf", **extra)
    imp = load_hf(tmp_path / "hf", base)
    assert imp.report.unused == []
    if kind == "qwen3":
        assert imp.cfg.qk_norm and not imp.cfg.qkv_bias and imp.cfg.resolved_head_dim == 24
    else:
        assert imp.cfg.rope_scaling.type == extra["rope_scaling"]["rope_type"]
    ref = hf_logits(model, TOKENS)
    ours = logits(imp.cfg, imp.params, TOKENS)
    diff = np.abs(ours - ref).max()
    print(f"{case}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < TOL

    out = save_hf(imp.params, imp.cfg, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == kind
    if kind == "llama":
        want = extra["rope_scaling"]
        assert {k: written["rope_scaling"].get(k) for k in want} == want
    again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(again) is type(model)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    ref_sd, got_sd = model.state_dict(), again.eval().state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    assert np.abs(hf_logits(again, TOKENS) - ref).max() < TOL


def test_scaling_changes_the_logits(tmp_path):
    """The match above is not vacuous: the same weights without rope scaling give other logits."""
    _hf_model("llama", tmp_path / "hf", rope_scaling=YARN)
    imp = load_hf(tmp_path / "hf", ModelConfig())
    plain = dataclasses.replace(imp.cfg, rope_scaling=RopeScalingConfig())
    assert np.abs(logits(plain, imp.params, TOKENS) - logits(imp.cfg, imp.params, TOKENS)).max() > 100 * TOL


@pytest.mark.parametrize("params", [
    LINEAR, LLAMA3, dict(LLAMA3, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0), YARN, YARN_MSCALE,
    dict(YARN, attention_factor=0.8), dict(YARN, mscale=3.0),  # mscale alone is ignored, as in transformers
    dict(YARN, factor=None), dict(YARN, original_max_position_embeddings=512, beta_fast=64.0),
])
def test_frequencies_equal_transformers(params):
    """`rope_frequencies` against transformers' own ROPE_INIT_FUNCTIONS, with no model run."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = dict(model_type="llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=256, rope_theta=50000.0, rope_scaling=dict(params))
    cfg = config_from_hf(json.loads(json.dumps(hf)))
    hf_conf = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    want_inv, want_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_conf, "cpu")
    inv, scale = rope_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    np.testing.assert_allclose(inv, want_inv.numpy(), rtol=1e-6)
    assert math.isclose(scale, want_scale, rel_tol=1e-6)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_unsupported_rope_type_is_a_clear_error(tmp_path, rope_type):
    hf = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2, rope_scaling={"rope_type": rope_type, "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointImportError, match=rf"rope scaling '{rope_type}' is not supported; .*llama3, yarn"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointImportError, match=r"rope scaling 'llama3' needs low_freq_factor, high_freq_factor"):
        config_from_hf(dict(hf, rope_scaling={"type": "llama3", "factor": 8.0}))
    with pytest.raises(CheckpointImportError, match=r"rope_scaling in config.json .*model.rope_scaling.factor"):
        config_from_hf(dict(hf, rope_scaling={"rope_type": "linear", "factor": -2.0}))


def test_rope_scaling_config_validates_and_reads_from_recipes():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.factor: -1.0 is out of range"):
        RopeScalingConfig(type="linear", factor=-1.0)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.beta_fast does not apply to rope_scaling.type 'llama3'"):
        RopeScalingConfig(type="llama3", factor=8.0, beta_fast=16.0)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.low_freq_factor"):
        RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.type: 'dynamic' is not allowed"):
        load_config(None, ["model.rope_scaling.type=dynamic"])
    cfg = load_config(None, ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.qk_norm=true"])
    assert cfg.model.rope_scaling == RopeScalingConfig(type="yarn", factor=4.0) and cfg.model.qk_norm
    # Export resolves original_max_position_embeddings=0 to max_seq_len.
    assert config_to_hf(cfg.model)["rope_scaling"]["original_max_position_embeddings"] == cfg.model.max_seq_len
    with pytest.raises(ValueError, match="qkv_bias and model.qk_norm"):
        config_to_hf(dataclasses.replace(cfg.model, qkv_bias=True))


def test_qk_norm_params_exist_only_with_the_flag():
    """Models without qk_norm keep exactly their old parameter tree (checkpoints, shardings)."""
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, head_dim=12)
    plain = traverse_util.flatten_dict(abstract_params(Transformer(base))[0])
    assert not any("q_norm" in p or "k_norm" in p for p in plain)
    normed, _ = abstract_params(Transformer(dataclasses.replace(base, qk_norm=True)))
    flat = traverse_util.flatten_dict(normed)
    assert set(flat) - set(plain) == {("layers", "attn", "q_norm", "scale"), ("layers", "attn", "k_norm", "scale")}
    assert flat["layers", "attn", "q_norm", "scale"].shape == (2, 12)
    n = sum(x.size for x in jax.tree.leaves(normed))
    assert n == dataclasses.replace(base, qk_norm=True).param_count()
