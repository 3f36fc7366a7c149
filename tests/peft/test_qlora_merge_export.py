"""QLoRA to the end: adapters trained over an int8 / NF4 base merge into a float model with the
QLoRA model's logits; `jaxlearn adapters merge|export` of a QLoRA run dequantise the base and say
so, and the exported adapter loads in `peft` over the dequantised base with our logits (float32,
within 1e-4); NF4 widths that do not split into packing groups (SmolLM2's 576 in the TPU
kernels' 512-row groups) are zero-padded, exact against the padded matrix.

The fast tests use tiny random models; the CLI commands run in-process on an in-memory run (a
trained run through `jaxlearn train` is the `slow` test at the end)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from hf_helpers import TOL, TOKENS, hf_logits, logits
from jaxlearn.config import Config, PeftConfig
from jaxlearn.kernels.lora import make_plan
from jaxlearn.kernels.quant import NF4_LEVELS, dequantize, quantize
from jaxlearn.models.hf import params_to_hf
from jaxlearn.models.layers import adapted_linear, fused_adapted_linear, quantized_kernel
from jaxlearn.models.transformer import Transformer, abstract_params
from jaxlearn.peft.attach import attach, find_sites
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.merge import base_leaves, merge
from jaxlearn.peft.quantize import dequantize_tree, quantize_flat, quantized_format, repack_nf4

TINY_TOKENS = TOKENS % 128  # tests/helpers.py's tiny model has 128 tokens (the HF one 256)


def _adapted(scan=True, method="lora"):
    """(cfg, float base, flat LoRA/DoRA tree, sites) of the tiny model, HF-exportable (untied
    head; init_std 0.2 so that int8/NF4 error shows in the logits); B (and the magnitude) moved
    off their identity init with host noise, as after training, so the adapters change the logits."""
    cfg = tiny_model_config(n_layers=2 if scan else 1, scan_layers=scan, init_std=0.2, tie_embeddings=False)
    abstract, logical = abstract_params(Transformer(cfg))
    # random weights drawn on the host from the model's shapes (norm scales 1): the same as an
    # init for these tests, without compiling the init program
    rs = np.random.RandomState(0)
    base = unflatten_paths({k: np.ones(v.shape, np.float32) if k.endswith("/scale") else
                            (rs.standard_normal(v.shape) * cfg.init_std).astype(np.float32)
                            for k, v in sorted(flat_paths(abstract).items())})
    pc = PeftConfig(type=method, rank=4, alpha=8.0)
    sites = find_sites(abstract, logical, pc)
    flat = dict(flat_paths(jax.jit(lambda b: attach(b, pc, sites, jax.random.key(1)))(base)))
    rs = np.random.RandomState(0)
    for k in sorted(flat):
        if k.endswith(("lora_b", "dora_m")):
            flat[k] = flat[k] + 0.05 * rs.standard_normal(flat[k].shape).astype(np.float32)
    return cfg, base, flat, sites


def _quantized(flat, sites, fmt, method="lora", group=None):
    """(tree, peft config): `flat` with the adapted kernels stored int8/NF4 (NF4 in packing groups
    of `group` rows; default: the least-padding ones), as `peft.quantize` stores them. One
    jitted program: op by op, quantization compiles dozens of small programs."""
    kernels = {f"{s.path}/kernel": flat[f"{s.path}/kernel"] for s in sites}
    q = jax.jit(lambda k: quantize_flat(dict(k), sites, fmt, group=group))(kernels)
    out = {k: v for k, v in flat.items() if k not in kernels}
    out.update(q)
    return unflatten_paths(out), PeftConfig(type=method, rank=4, alpha=8.0, quantize=fmt)


@pytest.fixture(scope="module")
def tiny_lora():
    return _adapted()


_merge = jax.jit(merge, static_argnames="dtype")


def _no_quantized_leaves(tree):
    return not any(k.endswith(("/kernel_q", "/kernel_scale")) for k in flat_paths(tree))


# ----------------------------------------------------------------------------- merge


def _check_merge(cfg, base, q, fmt, layer):
    assert quantized_format(q) == fmt
    merged = _merge(q)
    assert _no_quantized_leaves(merged) and quantized_format(merged) is None
    flat = flat_paths(merged)
    assert set(flat) == set(flat_paths(base))  # the plain base layout: kernels back, adapters gone
    assert all(v.dtype == jnp.float32 and v.shape == flat_paths(base)[k].shape for k, v in flat.items())
    want = logits(cfg, q, TINY_TOKENS)  # the QLoRA model, run quantized
    np.testing.assert_allclose(logits(cfg, merged, TINY_TOKENS), want, rtol=0, atol=2e-5)
    # the adapters were folded in, not dropped: with B = 0 the merged model is far off
    no_b = unflatten_paths({k: jnp.zeros_like(v) if k.endswith("lora_b") else v for k, v in flat_paths(q).items()})
    assert np.abs(logits(cfg, _merge(no_b), TINY_TOKENS) - want).max() > 1e-2
    # asking for bfloat16 gives bfloat16 kernels (traced only: the dtypes are what is checked)
    bf16 = flat_paths(jax.eval_shape(lambda p: merge(p, dtype="bfloat16"), q))
    assert bf16[f"{layer}/attn/q/kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_of_a_qlora_model_is_a_float_model_with_its_logits(tiny_lora, fmt):
    cfg, base, flat, sites = tiny_lora
    _check_merge(cfg, base, _quantized(flat, sites, fmt)[0], fmt, "layers")


@pytest.mark.slow  # the same merge code as the fast test above, on the unrolled layout and DoRA
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_of_an_unrolled_qdora_model(fmt):
    cfg, base, flat, sites = _adapted(scan=False, method="dora")
    _check_merge(cfg, base, _quantized(flat, sites, fmt, "dora")[0], fmt, "layers_0")


# ----------------------------------------------------------------------------- the CLI on an in-memory run


@pytest.fixture(scope="module")
def nf4_run(tiny_lora):
    """(cfg, peft cfg, NF4 QLoRA params, float base) of the tiny model (scanned layers)."""
    cfg, base, flat, sites = tiny_lora
    q, pc = _quantized(flat, sites, "nf4")
    return cfg, pc, q, base


@pytest.fixture
def fake_run(monkeypatch, nf4_run):
    """`jaxlearn.run.open_run` answering with the in-memory QLoRA run (the CLI reads it from there)."""
    from jaxlearn import run as run_mod

    cfg, pc, q, _ = nf4_run
    opened = run_mod.OpenRun(Config(model=cfg, peft=pc), Transformer(cfg), q, None, 7)
    monkeypatch.setattr(run_mod, "open_run", lambda run_dir, overrides=(): opened)
    return opened


def test_cli_export_of_a_qlora_run_loads_in_peft_over_the_dequantised_base(fake_run, nf4_run, tmp_path, capsys):
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file

    from jaxlearn.cli import main

    cfg, _, q, float_base = nf4_run
    assert main(["adapters", "export", "runs/qlora", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dequantised from nf4 to float32" in out, out
    reported = float(out.split("over the dequantised base: ")[1].split()[0])
    assert reported < TOL, out
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    hf = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
    ours = logits(cfg, q, TINY_TOKENS)
    diff = np.abs(ours - hf_logits(hf, TINY_TOKENS)).max()
    print(f"QLoRA (nf4) export: max |logit diff| vs PEFT = {diff:.2e} (CLI reported {reported:.2e})")
    assert diff < TOL
    # the base went out dequantised (what the adapter was trained over), not as the float
    # weights before quantization (which differ by NF4's error)
    saved = load_file(str(tmp_path / "base" / "model.safetensors"))
    deq = dict(params_to_hf(base_leaves(dequantize_tree(q)), cfg))
    assert saved.keys() == deq.keys() and all(np.array_equal(saved[k], deq[k]) for k in saved)
    orig = dict(params_to_hf(float_base, cfg))
    assert np.abs(saved["model.layers.0.self_attn.q_proj.weight"] - orig["model.layers.0.self_attn.q_proj.weight"]).max() > 1e-3
    # and the adapter is a trained-looking one (B off zero), so matching PEFT's logits tests it
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert min(np.abs(v).max() for k, v in adapter.items() if "lora_B" in k) > 1e-2


def test_cli_merge_of_a_qlora_run_says_it_dequantised(fake_run, nf4_run, tmp_path, capsys):
    import torch
    import transformers

    from jaxlearn.cli import main

    cfg, _, q, _ = nf4_run
    assert main(["adapters", "merge", "runs/qlora", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dequantised from nf4 to float32" in out and "merged weights are float32 (float), not nf4" in out, out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert np.abs(logits(cfg, q, TINY_TOKENS) - hf_logits(merged, TINY_TOKENS)).max() < TOL


# ----------------------------------------------------------------------------- NF4 padding


_quantize = jax.jit(quantize, static_argnums=(1, 2))  # jitted: op by op, each op compiles per shape
_dequantize = jax.jit(dequantize)


def _normal(shape, seed, std=1.0):
    """Host noise: test inputs need no compiled PRNG programs."""
    return (np.random.RandomState(seed).standard_normal(shape) * std).astype(np.float32)


def test_nf4_width_576_in_512_row_groups_is_padded_and_exact():
    """576 rows in the TPU kernels' 512-row groups: zero-padded to 1024 rows, within NF4's error
    of the float weight, the same codes and scales as quantizing the zero-padded matrix itself,
    and the same products."""
    w = _normal((576, 96), 0, 0.05)
    qw = _quantize(w, "nf4", 512)
    assert qw.q.shape == (512, 96) and qw.scale.shape == (16, 96)  # 1024 rows: 2 groups of 512
    deq = np.asarray(_dequantize(qw))
    assert deq.shape == (576, 96)
    # NF4's error: at most half the widest gap between levels, times the row's 64-row block absmax
    bound = float(np.max(np.diff(NF4_LEVELS))) / 2 * np.repeat(np.asarray(qw.scale), 64, axis=0)[:576]
    err = np.abs(deq - w)
    assert np.all(err <= bound + 1e-7) and 0 < err.mean() < 0.1 * np.abs(w).mean()
    # the reference: the padded matrix, which splits into whole groups
    ref = _quantize(np.pad(w, ((0, 1024 - 576), (0, 0))), "nf4", 512)
    np.testing.assert_array_equal(qw.q, ref.q)
    np.testing.assert_array_equal(qw.scale, ref.scale)
    ref_deq = np.asarray(_dequantize(ref))
    np.testing.assert_array_equal(ref_deq[576:], 0)  # padding rows decode to exact zeros
    np.testing.assert_array_equal(deq, ref_deq[:576])
    x = _normal((5, 576), 1)
    x_pad = np.pad(x, ((0, 0), (0, 1024 - 576)))
    np.testing.assert_allclose(x @ deq, x_pad @ ref_deq, rtol=0, atol=1e-5)  # summation order only
    # the least-padding layout (128-row groups, 640 rows), repacked for TPU, is that same layout
    small = _quantize(w, "nf4", 128)
    assert small.q.shape == (320, 96)
    packed = jax.jit(repack_nf4)(small)
    assert packed.group == 512
    np.testing.assert_array_equal(packed.q, ref.q)
    np.testing.assert_array_equal(packed.scale, ref.scale)
    # and the layer reads each layout's group back off the stored rows
    for stored in (small, qw):
        got = quantized_kernel(stored.q, stored.scale, (576, 96), 1)
        assert got.group == stored.group
        np.testing.assert_array_equal(_dequantize(got), deq)


def test_tpu_seam_repacks_576_wide_nf4_instead_of_refusing(monkeypatch):
    """The TPU kernels refuse NF4 groups under 512 rows; the seam hands them the padded 512-row
    layout instead. Run in Pallas interpret mode (the TPU kernel's semantics on CPU) against the
    XLA path."""
    from jaxlearn.kernels import lora

    qw = _quantize(_normal((576, 128), 0, 0.05), "nf4", 128)  # as stored: 640 rows
    with pytest.raises(ValueError, match="TPU needs"):  # what a real TPU run met before
        make_plan("tpu", 8, 576, 128, jnp.float32, qw)
    make_plan("tpu", 8, 576, 128, jnp.float32, repack_nf4(qw))  # the padded layout plans
    seen = []
    real = lora.lora_matmul
    monkeypatch.setattr(lora, "lora_matmul", lambda x, w, *a, **k: seen.append(w) or real(x, w, *a, **k))
    ad = {"lora_a": _normal((576, 4), 1, 0.1), "lora_b": _normal((4, 128), 2, 0.1), "lora_scale": np.float32(2.0)}
    x = _normal((8, 576), 3)

    def seam(impl, x, q, s, ad):
        kernel = quantized_kernel(q, s, (576, 128), 1)
        return fused_adapted_linear(x, kernel, ad, 1, "tpu", interpret=True) if impl else adapted_linear(x, kernel, ad)

    got = jax.jit(seam, static_argnums=0)("tpu", x, qw.q, qw.scale, ad)
    assert [w.group for w in seen] == [512] and seen[0].q.shape == (512, 128)
    want = jax.jit(seam, static_argnums=0)(None, x, qw.q, qw.scale, ad)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_stored_in_512_row_groups_runs_and_dequantises(tiny_lora, nf4_run):
    """A whole model whose NF4 base is stored in the TPU layout (d_model 64 padded to 512 rows):
    the layers read the group back (logits of the least-padding layout), and so does dequantize_tree."""
    cfg, _, flat, sites = tiny_lora
    q128 = nf4_run[2]
    q512, _ = _quantized(flat, sites, "nf4", group=512)
    assert flat_paths(q512)["layers/attn/q/kernel_q"].shape == (2, 256, 64)  # 512 rows
    assert flat_paths(q128)["layers/attn/q/kernel_q"].shape == (2, 64, 64)  # 128 rows
    np.testing.assert_allclose(logits(cfg, q512, TINY_TOKENS), logits(cfg, q128, TINY_TOKENS), rtol=0, atol=2e-5)
    d512, d128 = flat_paths(dequantize_tree(q512)), flat_paths(dequantize_tree(q128))
    for k in (f"{s.path}/kernel" for s in sites):
        np.testing.assert_array_equal(d512[k], d128[k], err_msg=k)


# ----------------------------------------------------------------------------- slow: the real things


@pytest.mark.slow  # covered fast by test_tpu_seam_repacks_576_wide_nf4_instead_of_refusing (interpret mode)
def test_576_wide_nf4_seam_compiles_for_tpu():
    """The seam with a SmolLM2-width NF4 base as stored (640 rows) compiles to the Mosaic kernels
    for a real TPU topology (v5e, described by libtpu on this CPU machine)."""
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    sh = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",)), jax.sharding.PartitionSpec())
    d, n, r, dt = 576, 1536, 8, jnp.bfloat16
    qw = jax.eval_shape(lambda w: quantize(w, "nf4", group=128), jax.ShapeDtypeStruct((d, n), jnp.float32))

    def loss(x, q, s, a, b):
        ad = {"lora_a": a, "lora_b": b, "lora_scale": jnp.float32(2.0)}
        return jnp.sum(fused_adapted_linear(x, quantized_kernel(q, s, (d, n), 1), ad, 1, "tpu").astype(jnp.float32))

    args = [jax.ShapeDtypeStruct(s, t, sharding=sh) for s, t in
            [((256, d), dt), (qw.q.shape, qw.q.dtype), (qw.scale.shape, qw.scale.dtype), ((d, r), dt), ((r, n), dt)]]
    hlo = jax.jit(jax.grad(loss, argnums=(0, 3, 4))).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 2


@pytest.mark.slow  # covered fast by the in-memory CLI tests above (same commands, same functions)
def test_qlora_run_trained_through_the_cli_merges_and_exports(tmp_path, shakespeare_tokenizer, capsys):
    from cli_runner import REPO, TINY

    from jaxlearn.cli import main

    run_dir = tmp_path / "qlora"
    assert main(["train", str(REPO / "configs" / "pretrain_shakespeare.yaml"), *TINY,
                 f"data.tokenizer={shakespeare_tokenizer}", f"train.run_dir={run_dir}", "train.eval_every=0",
                 "train.sample_prompts=[]", "train.async_checkpoint=false", "model.tie_embeddings=false",
                 "peft.type=lora", "peft.rank=4", "peft.quantize=nf4", "optim.lr=0.02", "train.steps=4"]) == 0
    capsys.readouterr()
    assert main(["adapters", "merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert "dequantised from nf4" in capsys.readouterr().out
    assert main(["adapters", "export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    out = capsys.readouterr().out
    assert float(out.split("over the dequantised base: ")[1].split()[0]) < TOL, out

