"""Hugging Face safetensors import/export on tiny random models that transformers builds and
saves locally (no hub): logits match transformers, export loads in transformers with no
missing/unexpected weights, import(export(params)) is bit-exact, every bad checkpoint is
reported by tensor name, and sharded imports land in their shardings."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxlearn.config import MeshConfig, ModelConfig
from jaxlearn.models.hf import (CheckpointImportError, SafetensorsSource, config_from_hf, import_params, load_hf,
                                params_to_hf, rope_permutation, save_hf)
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.sharding import make_mesh, rules_for

from hf_helpers import TOKENS, TOL, _save_hf_model, hf_logits, logits, tree_equal


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model = _save_hf_model("llama", path, tie_word_embeddings=False, head_dim=24)  # head_dim != hidden/heads
    return path, model


@pytest.mark.parametrize("scan", [True, False])
def test_tiny_llama_logits_match_transformers(tiny_llama, scan):
    path, model = tiny_llama
    assert (path / "model.safetensors.index.json").is_file()
    imp = load_hf(path, ModelConfig(scan_layers=scan))
    assert imp.cfg.resolved_head_dim == 24 and not imp.cfg.tie_embeddings and imp.cfg.n_kv_heads == 2
    assert imp.report.unused == [] and len(imp.report.used) == 3 * 9 + 3
    ref = hf_logits(model)
    diff = np.abs(logits(imp.cfg, imp.params) - ref).max()
    print(f"tiny llama (scan_layers={scan}): max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < TOL


def test_scanned_and_unrolled_imports_hold_the_same_weights(tiny_llama):
    path, _ = tiny_llama
    stacked = load_hf(path, ModelConfig(scan_layers=True)).params
    unrolled = load_hf(path, ModelConfig(scan_layers=False)).params
    for i in range(3):
        assert tree_equal(jax.tree.map(lambda a: a[i], stacked["layers"]), unrolled[f"layers_{i}"])


@pytest.mark.parametrize("dtype,scan,rope", [("float32", True, "rotate_half"), ("float32", False, "interleaved"),
                                             ("bfloat16", True, "interleaved")])
def test_import_of_export_is_bit_exact(tmp_path, dtype, scan, rope):
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, scan_layers=scan,
                      rope_style=rope, param_dtype=dtype, tie_embeddings=scan, init_std=0.3)
    params = init_params(Transformer(cfg), jax.random.key(1))
    out = save_hf(params, cfg, tmp_path / "out", max_shard_bytes=20_000)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    back = load_hf(out, cfg)
    assert back.cfg == cfg
    assert tree_equal(params, back.params)


def test_export_loads_in_transformers_with_identical_logits(tiny_llama, tmp_path):
    path, model = tiny_llama
    # Interleaved RoPE on our side: export must put q/k rows back in Hugging Face order.
    imp = load_hf(path, ModelConfig(scan_layers=True, rope_style="interleaved"))
    out = save_hf(imp.params, imp.cfg, tmp_path / "export")
    again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    ref_sd, got_sd = model.state_dict(), again.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    np.testing.assert_array_equal(hf_logits(again), hf_logits(model))


def test_qwen2_biases(tmp_path):
    path = tmp_path / "qwen2"
    model = _save_hf_model("qwen2", path, tie_word_embeddings=True)
    imp = load_hf(path, ModelConfig())
    assert imp.cfg.qkv_bias and imp.cfg.tie_embeddings
    diff = np.abs(logits(imp.cfg, imp.params) - hf_logits(model)).max()
    print(f"tiny qwen2: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    out = save_hf(imp.params, imp.cfg, tmp_path / "qwen2-out")
    again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(again).__name__ == "Qwen2ForCausalLM" and not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(hf_logits(again), hf_logits(model))


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
    path = tmp_path / "mistral"
    model = _save_hf_model("mistral", path, sliding_window=32)
    imp = load_hf(path, ModelConfig())
    assert imp.cfg.max_seq_len == 32
    tokens = TOKENS[:, :16]
    assert np.abs(logits(imp.cfg, imp.params, tokens) - hf_logits(model, tokens)).max() < TOL


def test_sharded_import_lands_in_shardings(tiny_llama):
    path, _ = tiny_llama
    mc = MeshConfig(preset="fsdp_tp", tensor=2)
    mesh, rules = make_mesh(mc), rules_for(mc)
    sharded = load_hf(path, ModelConfig(), mesh=mesh, rules=rules)
    plain = load_hf(path, ModelConfig())
    q = sharded.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    # Each device holds only its slice: 1/4 of embed times 1/2 of heads.
    assert q.addressable_shards[0].data.shape == (3, 16, 2, 24)
    assert tree_equal(sharded.params, plain.params)


def test_each_device_reads_only_its_slice(tiny_llama):
    """The callback of each device asks the source for its own rows/columns, never the whole tensor."""
    path, _ = tiny_llama
    src = SafetensorsSource(path)
    reads = []
    orig = src.read
    src.read = lambda key, index: reads.append((key, index)) or orig(key, index)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), ModelConfig())
    mc = MeshConfig(preset="fsdp")
    from jaxlearn.models.hf import param_shardings

    import_params(src, cfg, param_shardings(cfg, make_mesh(mc), rules_for(mc)))
    gate = [idx for key, idx in reads if key == "model.layers.0.mlp.gate_proj.weight"]
    assert len(gate) == 8 and {(s[1].stop - s[1].start) for s in gate} == {64 // 8}  # embed split 8 ways


def test_missing_unused_and_misshapen_tensors_are_named(tiny_llama, tmp_path):
    path, _ = tiny_llama
    hf = json.loads((path / "config.json").read_text())
    # A config that disagrees with the tensors: every affected tensor is named.
    hf_bad = dict(hf, intermediate_size=80, num_hidden_layers=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(hf_bad))
    with pytest.raises(CheckpointImportError) as e:
        load_hf(bad, ModelConfig())
    msg = str(e.value)
    assert "missing tensors: " in msg and "model.layers.3.input_layernorm.weight" in msg
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint (96, 64), model needs (80, 64)" in msg
    # Tied embeddings on an untied checkpoint: lm_head.weight is unused, an error unless strict=False.
    (bad / "config.json").write_text(json.dumps(dict(hf, tie_word_embeddings=True)))
    with pytest.raises(CheckpointImportError, match=r"unused tensors .*lm_head\.weight"):
        load_hf(bad, ModelConfig())
    rep = load_hf(bad, ModelConfig(), strict=False).report
    assert rep.unused == ["lm_head.weight"] and "unused: lm_head.weight" in rep.summary()


def test_unsupported_configs_are_refused():
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(CheckpointImportError, match="rope scaling 'dynamic' is not supported; jaxlearn imports "
                                                    "rope types default, linear, llama3, yarn"):
        config_from_hf(dict(base, rope_scaling={"rope_type": "dynamic", "factor": 8.0}))
    with pytest.raises(CheckpointImportError, match="model_type 'gpt2'"):
        config_from_hf(dict(base, model_type="gpt2"))
    with pytest.raises(CheckpointImportError, match="attention_bias"):
        config_from_hf(dict(base, attention_bias=True))


def test_rope_permutations_are_inverse():
    fwd = rope_permutation(64, "rotate_half", "interleaved")
    back = rope_permutation(64, "interleaved", "rotate_half")
    assert (fwd[back] == np.arange(64)).all() and (back[fwd] == np.arange(64)).all()
    assert rope_permutation(64, "interleaved", "interleaved") is None


def test_exported_names_are_transformers_names(tiny_llama):
    path, model = tiny_llama
    imp = load_hf(path, dataclasses.replace(ModelConfig(), scan_layers=False))
    assert {name for name, _ in params_to_hf(imp.params, imp.cfg)} == set(model.state_dict())


def test_init_from_feeds_build_state(tiny_llama):
    """`model.init_from` as the training entry point would use it: params in the recipe's
    layout and shardings, accepted by build_state; a recipe that does not fit is a ConfigError."""
    from jaxlearn.config import Config, ConfigError
    from jaxlearn.models.presets import init_params as pretrained_init
    from jaxlearn.sharding import ShardingContext
    from jaxlearn.train.state import build_state

    path, _ = tiny_llama
    model_cfg = config_from_hf(json.loads((path / "config.json").read_text()),
                               ModelConfig(init_from=str(path), scan_layers=False))
    cfg = Config(model=model_cfg, mesh=MeshConfig(preset="fsdp"))
    mesh, rules = make_mesh(cfg.mesh), rules_for(cfg.mesh)
    params = pretrained_init(cfg.model, mesh, rules)
    setup = build_state(Transformer(cfg.model, ShardingContext(mesh, rules)), cfg, mesh, rules, 10, params=params)
    assert tree_equal(setup.state.params, load_hf(path, model_cfg).params)
    with pytest.raises(ConfigError, match=r"model.d_ff=96 \(recipe has 64\)"):
        pretrained_init(dataclasses.replace(model_cfg, d_ff=64), mesh, rules)
