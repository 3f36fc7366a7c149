"""Ahead-of-time fit checks on real TPU topologies (libtpu describes them; no TPU needed).

The per-device numbers are checked against what the shardings imply: FSDP over N devices puts
about 1/N of the weights and optimizer state on each, XLA's argument bytes are the sum of the
state and batch shards, and XLA's FLOPs per step are within a stated factor of 6 N tokens
(+ attention). The full-size compiles take minutes on 2 cores: they are `slow` (CI runs them).
Every test here compiles for itself (no persistent compilation cache): the numbers are read off
the compiled executables.
"""

import dataclasses
import math

import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, DataConfig, MeshConfig, PeftConfig, load_config
from jaxlearn.pod import compile as pod_compile
from jaxlearn.pod.compile import _required_temp_bytes, fit_check
from cli_runner import REPO, run_cli
from tests.objectives_for_tests import L2Config

POD = REPO / "configs" / "pod"


@pytest.fixture(autouse=True)
def _own_compiles(fresh_compile):
    with fresh_compile():
        yield


@pytest.fixture
def compiles(monkeypatch):
    """The layer counts of the steps `fit_check` compiles, in order."""
    seen = []
    real = pod_compile._compile_report

    def spy(cfg, *args, **kwargs):
        seen.append(cfg.model.n_layers)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(pod_compile, "_compile_report", spy)
    return seen


def _state_bytes_total(cfg: Config, trainable_share: float = 1.0) -> tuple[float, float]:
    """(params, AdamW moments) bytes of the whole model, unsharded."""
    item = 4 if cfg.model.param_dtype == "float32" else 2
    n = cfg.model.param_count()
    return n * item, 2 * n * trainable_share * item


def _check_consistency(r, cfg, pad: float = 1.05):
    """XLA's arguments are our state + batch shards, plus TPU layout padding: the two minor
    dimensions are tiled (8, 128), so tiny test models (4 heads of 32) pad a lot, real sizes
    (head_dim 128, 8 KV heads) almost nothing."""
    ours = r.trainable_bytes + r.frozen_bytes + r.opt_state_bytes + r.batch_bytes + r.extra_model_bytes
    assert ours <= r.argument_bytes <= pad * ours + (1 << 20)
    # donated state: outputs alias the inputs, so the total is arguments + temporaries
    assert r.output_bytes - r.alias_bytes < 0.01 * r.argument_bytes + (1 << 20)
    assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes


def test_tiny_model_on_v5e_fsdp_per_device_bytes_and_flops(compiles):
    cfg = Config(model=dataclasses.replace(tiny_model_config(vocab_size=1024, d_model=256, d_ff=512, n_layers=2),
                                           compute_dtype="bfloat16"),
                 data=DataConfig(seq_len=128, batch_size=8), mesh=MeshConfig(preset="fsdp"))
    r = fit_check(cfg, "v5e:2x2")
    assert compiles == [2, 1, 2]  # the step itself, then 1 and 2 unrolled layers for the FLOPs
    assert r.n_devices == 4 and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and r.fits
    _check_consistency(r, cfg, pad=2.0)
    params, moments = _state_bytes_total(cfg)
    # every weight matrix splits 4 ways on `embed`; only the small norm scales are replicated
    assert params / 4 <= r.trainable_bytes <= params / 4 * 1.05
    assert moments / 4 <= r.opt_state_bytes <= moments / 4 * 1.05 + 64
    # XLA's FLOPs (all layers, via the 1/2-layer extrapolation) vs 6N + attention, no remat:
    # the matmuls are all of it up to elementwise work (norms, softmax, optimizer).
    assert 0.95 <= r.flops_ratio <= 1.3, r.flops_ratio


def test_objective_extras_and_heads_are_counted_per_chip(compiles):
    """The recipe's objective brings a frozen teacher of another depth, a buffer and a trainable
    head (tests/objectives_for_tests.py): the fit check compiles the trainer's own step with
    them as sharded arguments and counts them per chip."""
    student = dataclasses.replace(tiny_model_config(vocab_size=1024, d_model=128, d_ff=256), compute_dtype="bfloat16")
    cfg = Config(model=student, data=DataConfig(seq_len=64, batch_size=8))
    with_teacher = dataclasses.replace(cfg, objective=L2Config(teacher_layers=3))
    plain = fit_check(cfg, "v5e:2x2", count_flops=False)
    r = fit_check(with_teacher, "v5e:2x2", count_flops=False)
    t_bytes = dataclasses.replace(student, n_layers=3).param_count() * 4 + student.d_model * 4
    assert t_bytes / 4 <= r.extra_model_bytes <= t_bytes / 4 * 1.05  # sharded 4 ways like the student
    _check_consistency(r, with_teacher, pad=2.0)
    assert r.argument_bytes - plain.argument_bytes >= r.extra_model_bytes  # the teacher is an argument
    head = student.d_model ** 2 * 4
    assert r.trainable_bytes - plain.trainable_bytes == pytest.approx(head / 4, rel=0.01)  # the head trains
    assert compiles == [2, 2] and math.isnan(r.xla_flops)  # count_flops=False: no FLOP compiles, FLOPs unknown
    assert "frozen extra models" in r.text()


def test_dpo_reference_model_is_counted_per_chip():
    """DPO with full fine-tuning reads a frozen copy of the starting weights (the reference): the
    fit check compiles it as a sharded argument; with LoRA the reference is the base itself."""
    from jaxlearn.objectives.preference import DPOConfig

    model = dataclasses.replace(tiny_model_config(vocab_size=1024, d_model=128, d_ff=256), compute_dtype="bfloat16")
    cfg = Config(model=model, data=DataConfig(seq_len=64, batch_size=8), objective=DPOConfig())
    r = fit_check(cfg, "v5e:2x2", count_flops=False)
    ref = model.param_count() * 4
    assert ref / 4 <= r.extra_model_bytes <= ref / 4 * 1.05
    assert r.batch_bytes >= 2 * 8 * 64 * 4 * 5 / 4  # paired rows [B, 2, T]
    lora = fit_check(dataclasses.replace(cfg, peft=PeftConfig(type="lora", rank=4)), "v5e:2x2", count_flops=False)
    assert lora.extra_model_bytes == 0


def test_out_of_memory_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(69.34G) exceeds available HBM (15.75G).")
    assert _required_temp_bytes(msg) == int(69.34 * 2**30)


@pytest.mark.slow
def test_smollm2_recipe_on_v5e_2x2_via_cli(tmp_path):
    out = tmp_path / "fit.json"
    r = run_cli("compile", POD / "smollm2_135m_pretrain.yaml", "--topology", "v5e:2x2", "--json", out, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "verdict: FITS" in r.stdout
    import json

    rep = json.loads(out.read_text())
    cfg = load_config(POD / "smollm2_135m_pretrain.yaml")
    params, moments = _state_bytes_total(cfg)
    assert params / 4 <= rep["trainable_bytes"] <= params / 4 * 1.05
    assert moments / 4 <= rep["opt_state_bytes"] <= moments / 4 * 1.05 + 64
    # remat=full recomputes the layers' forward but for mlp/down (not the LM head): under 8N/6N
    assert 1.0 <= rep["flops_ratio"] <= 1.6, rep["flops_ratio"]
    assert 0.95 <= rep["expected_ratio"] <= 1.05, rep["expected_ratio"]  # docs/pods.md, "Why XLA's FLOPs differ"


@pytest.mark.slow
def test_llama3_8b_full_ft_on_v5p_4x4x4():
    cfg = load_config(POD / "llama3_8b_full_ft.yaml")
    r = fit_check(cfg, "v5p:4x4x4", count_flops=False)  # FLOPs: the SmolLM2 test (8B: +9 min here)
    assert r.n_devices == 64 and r.mesh["fsdp"] == 64 and r.fits
    _check_consistency(r, cfg)
    params, moments = _state_bytes_total(cfg)
    assert params / 64 <= r.trainable_bytes <= params / 64 * 1.05
    assert moments / 64 <= r.opt_state_bytes <= moments / 64 * 1.05 + 64


def test_two_slices_put_the_data_axis_over_dcn():
    cfg = Config(model=dataclasses.replace(tiny_model_config(vocab_size=512), compute_dtype="bfloat16"),
                 data=DataConfig(seq_len=64, batch_size=16))
    one = fit_check(cfg, "v5e:2x2", count_flops=False)
    two = fit_check(cfg, "v5e:2x2", slices=2, count_flops=False)
    assert two.n_devices == 8 and two.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert two.accelerator == "v5litepod-4 x 2 slices"
    # weights shard within a slice only: the same per-device weight bytes as one slice
    assert two.trainable_bytes == one.trainable_bytes and two.opt_state_bytes == one.opt_state_bytes
    assert two.batch_bytes * 2 == one.batch_bytes  # the batch splits over both slices
