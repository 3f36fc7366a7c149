"""SmolLM2-135M-Instruct (4-bit-quantized weights, dequantized) from GGUF, checked against
transformers' own GGUF loader on the same file: identical dequantized weights, logits within
1e-3 (float32), the same 32 greedy tokens through our KV cache, an export that transformers
loads with identical logits, and the chat answer the model is known for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jaxlearn.cli import main
from jaxlearn.config import MeshConfig, ModelConfig
from jaxlearn.data.chat import encode_prompt
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.models.gguf import load_gguf
from jaxlearn.models.hf import load_hf, params_to_hf, save_hf
from jaxlearn.models.transformer import Transformer
from jaxlearn.sharding import make_mesh, rules_for

from cli_runner import cli_env, run_cli

LOGIT_TOL = 1e-3  # float32; measured max |diff| 1.4e-4 on logits up to 41.5

PROMPTS = [
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog. In 1984, 12345 people",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Shall I compare thee to a summer's day? Thou art more lovely",
]


@pytest.fixture(scope="module")
def batch(smollm2_tokenizer):
    """A right-padded batch (causal attention: padding after a token never changes its logits)."""
    tok = smollm2_tokenizer
    rows = [encode_prompt(tok, [{"role": "user", "content": PROMPTS[0]}])] + [tok.encode(p) for p in PROMPTS[1:]]
    t = max(map(len, rows))
    tokens = np.full((len(rows), t), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, [len(r) for r in rows]


@pytest.fixture(scope="module")
def forward():
    fns = {}

    def run(cfg, params, tokens):
        if cfg not in fns:
            model = Transformer(cfg)
            fns[cfg] = jax.jit(lambda p, t: model.apply(
                {"params": p}, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), jnp.ones(t.shape, jnp.int32))[0])
        return np.asarray(fns[cfg](params, jnp.asarray(tokens)))

    return run


@pytest.fixture(scope="module")
def hf_batch_logits(hf_smollm2, batch):
    tokens, _ = batch
    with torch.no_grad():
        return hf_smollm2(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def max_diff(ours, ref, lengths):
    return max(float(np.abs(ours[i, :n] - ref[i, :n]).max()) for i, n in enumerate(lengths))


def test_config_from_gguf_metadata(smollm2):
    cfg = smollm2.cfg
    shape = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff)
    assert shape == (49152, 576, 30, 9, 3, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.resolved_head_dim == 64
    assert cfg.param_count() == 134_515_008
    assert len(smollm2.report.used) == 272 and smollm2.report.unused == []


def test_dequantized_weights_equal_transformers(smollm2, hf_smollm2):
    """Same dequantization and the same q/k un-permutation as transformers, bit for bit."""
    ref = hf_smollm2.state_dict()
    names = set()
    for name, arr in params_to_hf(smollm2.params, smollm2.cfg):
        names.add(name)
        np.testing.assert_array_equal(arr, ref[name].numpy(), err_msg=name)
    assert names == set(ref) - {"lm_head.weight"}  # tied: transformers' lm_head is the embedding


def test_logits_match_transformers(smollm2, hf_batch_logits, batch, forward):
    tokens, lengths = batch
    diff = max_diff(forward(smollm2.cfg, smollm2.params, tokens), hf_batch_logits, lengths)
    scale = max(float(np.abs(hf_batch_logits[i, :n]).max()) for i, n in enumerate(lengths))
    print(f"SmolLM2 (4-bit-quantized weights, dequantized), {len(lengths)} prompts, {sum(lengths)} positions: "
          f"max |logit diff| vs transformers = {diff:.2e} (logits up to {scale:.1f})")
    assert diff <= LOGIT_TOL


def test_interleaved_and_unrolled_layouts_give_the_same_logits(smollm2_file, hf_batch_logits, batch, forward):
    """GGUF layout kept (interleaved RoPE) and layers unrolled: same model, same logits."""
    tokens, lengths = batch
    imp = load_gguf(smollm2_file, ModelConfig(scan_layers=False), rope_style="interleaved")
    assert "layers_29" in imp.params and imp.cfg.rope_style == "interleaved"
    diff = max_diff(forward(imp.cfg, imp.params, tokens), hf_batch_logits, lengths)
    print(f"SmolLM2 interleaved RoPE, unrolled layers: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_sharded_import_equals_single_device(smollm2_file, smollm2):
    mc = MeshConfig(preset="fsdp")
    imp = load_gguf(smollm2_file, ModelConfig(), mesh=make_mesh(mc), rules=rules_for(mc))
    emb = imp.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert emb.addressable_shards[0].data.shape == (49152, 576 // 8)
    a, b = traverse_util.flatten_dict(imp.params), traverse_util.flatten_dict(smollm2.params)
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_greedy_generation_matches_transformers(smollm2, smollm2_tokenizer, hf_smollm2):
    """32 greedy tokens through our KV cache (two prompts, left-padded into one batch) equal
    transformers' greedy generate on each prompt alone. No stop token: all 32 are compared."""
    tok = smollm2_tokenizer
    prompts = [encode_prompt(tok, [{"role": "user", "content": PROMPTS[0]}]), tok.encode(PROMPTS[3])]
    ours = generate(Transformer(smollm2.cfg), smollm2.params, prompts,
                    SamplingConfig(max_new_tokens=32, pad_id=tok.pad_id))
    for prompt, got in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                      pad_token_id=tok.pad_id)
        want = out[0, len(prompt):].tolist()
        assert len(want) == 32
        assert got == want, (tok.decode(got, skip_special=False), tok.decode(want, skip_special=False))
    assert tok.decode(ours.tokens[0]).startswith("The capital of France is Paris.")


def test_export_loads_in_transformers_with_identical_logits(smollm2, hf_smollm2, smollm2_tokenizer, batch, tmp_path,
                                                            hf_batch_logits):
    out = save_hf(smollm2.params, smollm2.cfg, tmp_path / "smollm2-hf", tokenizer=smollm2_tokenizer)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                                                    attn_implementation="eager")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    tokens, _ = batch
    with torch.no_grad():
        got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(got, hf_batch_logits)
    # And back: import(export(params)) == params, bit for bit.
    back = load_hf(out, smollm2.cfg)
    a, b = traverse_util.flatten_dict(back.params), traverse_util.flatten_dict(smollm2.params)
    assert back.cfg == smollm2.cfg and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello <|im_start|> world, 2024!"
    assert hf_tok(text, add_special_tokens=False).input_ids == smollm2_tokenizer.encode(text, allow_special=True)


def test_cli_generate_answers(smollm2_loaded_once, capsys):
    """In-process (tests/test_cli.py starts `jaxlearn generate` in a subprocess); the preset's
    load is the session's `load_pretrained("smollm2-135m-instruct")`."""
    assert main(["generate", "--model", "smollm2-135m-instruct", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "The capital of France is Paris."


def test_cli_generate_unknown_model_is_explained(capsys):
    assert main(["generate", "--model", "no-such-model", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no model at 'no-such-model'" in err and "smollm2-135m-instruct" in err and "Traceback" not in err


def test_cli_convert_gguf_to_hf(smollm2_path, tmp_path):
    out = tmp_path / "converted"
    r = run_cli("convert", str(smollm2_path), out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported 272 tensors" in r.stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["num_key_value_heads"] == 3
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}


def test_import_time_and_peak_memory(smollm2_path):
    """Import in a fresh process: report the time and the peak RSS (baseline: jax imported)."""
    # VmHWM (this process's peak RSS), not ru_maxrss: Linux carries ru_maxrss over from the
    # parent (pytest, holding two models) across fork and exec.
    code = textwrap.dedent(f"""
        import time, json
        import jax, numpy
        from jaxlearn.models.gguf import load_gguf

        def hwm_mib():
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024

        base = hwm_mib()
        t = time.perf_counter()
        imp = load_gguf({str(smollm2_path)!r})
        jax.block_until_ready(imp.params)
        took = time.perf_counter() - t
        print(json.dumps({{"seconds": took, "baseline_mib": base, "peak_mib": hwm_mib()}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    params_mib = 134_515_008 * 4 / 2**20
    print(f"SmolLM2 GGUF import (4-bit-quantized weights, dequantized to float32): {m['seconds']:.1f} s, "
          f"peak RSS {m['peak_mib']:.0f} MiB (baseline {m['baseline_mib']:.0f} MiB, params {params_mib:.0f} MiB)")
    assert m["peak_mib"] - m["baseline_mib"] < 3 * params_mib
