"""GGUF import of the `qwen2` and `qwen3` architectures (issue #21), on tiny random transformers
models that the test writes to GGUF itself, the way llama.cpp's convert_hf_to_gguf.py does for
`Qwen2Model`/`Qwen3Model`: every tensor unpermuted (unlike `LlamaModel`, which permutes q/k for
interleaved RoPE), named by gguf's own `TensorNameMap`, float32. The imported logits must match
transformers', in both RoPE layouts; an unsupported architecture is a clear error.

No network, no real checkpoint: the real-file path (a 4-bit `llama` GGUF) is tests/models/test_smollm2.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from hf_helpers import TOL, hf_logits, logits

from jaxlearn.config import ModelConfig
from jaxlearn.models import gguf as jl_gguf
from jaxlearn.models.gguf import GGUFFile, config_from_gguf, load_gguf
from jaxlearn.models.hf import CheckpointImportError

TOKENS = np.random.RandomState(2).randint(0, 96, (2, 13))
ROPE_THETA = 1000.0


def _hf_model(kind: str, **kw):
    """A tiny random Qwen2/Qwen3 model with non-trivial biases (Qwen2) or q/k norm scales (Qwen3),
    so that a missing or misordered one changes the logits."""
    torch.manual_seed(0)
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=ROPE_THETA, initializer_range=0.2,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    conf, cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    model = cls(conf(**base)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            if kind == "qwen2":
                for proj in (a.q_proj, a.k_proj, a.v_proj):
                    proj.bias.normal_(0.0, 0.5)
            else:
                a.q_norm.weight.normal_(1.0, 0.5)
                a.k_norm.weight.normal_(1.0, 0.5)
    return model


def write_gguf(model, path, arch: str, *, skip=()) -> None:
    """Write `model` as llama.cpp's converter writes a Qwen2/Qwen3 checkpoint (float32).

    Metadata: `TextModel.set_gguf_parameters` (plus `key_length`/`value_length` when config.json
    has `head_dim`, as Qwen3's does). Tensors: `Qwen2Model.modify_tensors` only renames them
    (gguf's TensorNameMap), with no q/k permutation; a tied `lm_head` is absent from the
    safetensors, so no `output.weight` is written. No tokenizer metadata: the loader sizes the
    vocabulary from `token_embd.weight`.
    """
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if (name == "lm_head.weight" and c.tie_word_embeddings) or any(s in name for s in skip):
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {  # name: (architecture, transformers config extras, jaxlearn base config, rope_style)
    # Tied embeddings (as Qwen2-0.5B), scanned layers, the file's own (rotate-half) layout.
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, ModelConfig(), "rotate_half"),
    # Interleaved RoPE: q/k rows *and their biases* are permuted on import; unrolled layers.
    "qwen2_interleaved": ("qwen2", {}, ModelConfig(scan_layers=False), "interleaved"),
    # head_dim 12 != 32/4 (Qwen3 writes key_length); the q/k norm scales follow the permutation.
    "qwen3_interleaved": ("qwen3", {"head_dim": 12}, ModelConfig(), "interleaved"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, extra, base, rope_style = CASES[case]
    model = _hf_model(arch, **extra)
    write_gguf(model, tmp_path / "m.gguf", arch)
    imp = load_gguf(tmp_path / "m.gguf", base, rope_style=rope_style)
    cfg = imp.cfg
    assert imp.report.unused == [] and imp.report.missing == []
    assert (cfg.qkv_bias, cfg.qk_norm) == (arch == "qwen2", arch == "qwen3")
    assert cfg.vocab_size == 96 and cfg.n_layers == 2 and cfg.n_kv_heads == 2 and cfg.rope_theta == ROPE_THETA
    assert cfg.tie_embeddings == bool(extra.get("tie_word_embeddings"))
    assert cfg.resolved_head_dim == extra.get("head_dim", 8)
    ref = hf_logits(model, TOKENS)
    diff = np.abs(logits(cfg, imp.params, TOKENS) - ref).max()
    print(f"{case}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < TOL


def test_llama_layout_would_be_wrong_for_qwen2(tmp_path, monkeypatch):
    """The match above is not vacuous: reading the same qwen2 file as if its q/k rows were permuted
    the llama way (LlamaModel.permute) gives other logits, so the layout choice is what is tested."""
    model = _hf_model("qwen2", tie_word_embeddings=True)
    write_gguf(model, tmp_path / "m.gguf", "qwen2")
    wrong = jl_gguf._Arch("interleaved", qkv_bias=True, qk_norm=False, models="Qwen2")
    monkeypatch.setitem(jl_gguf.ARCHITECTURES, "qwen2", wrong)
    imp = load_gguf(tmp_path / "m.gguf", ModelConfig())  # same cfg as case "qwen2": no new compile
    assert np.abs(logits(imp.cfg, imp.params, TOKENS) - hf_logits(model, TOKENS)).max() > 100 * TOL


def test_qwen2_without_biases_is_explained(tmp_path):
    """A qwen2 file must carry the q/k/v biases; their absence is named, not silently zero."""
    write_gguf(_hf_model("qwen2"), tmp_path / "m.gguf", "qwen2", skip=(".bias",))
    with pytest.raises(CheckpointImportError, match=r"missing tensors: .*self_attn\.q_proj\.bias"):
        load_gguf(tmp_path / "m.gguf")


def test_unsupported_architecture_is_explained(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((96, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for call in (lambda: load_gguf(path), lambda: config_from_gguf(GGUFFile(path))):
        with pytest.raises(CheckpointImportError) as e:
            call()
        msg = str(e.value)
        assert "'gpt2' is not supported" in msg
        assert all(f"'{a}'" in msg for a in ("llama", "qwen2", "qwen3")), msg
