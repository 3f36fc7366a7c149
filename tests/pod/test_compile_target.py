"""Pod checks compile what would run: backend-dependent choices resolve for the compile target.

`jaxlearn compile --topology v5e:2x4` traces on this CPU for TPU devices. The model's
`kernels: auto` (fused Pallas LoRA kernels on TPU/GPU) and `attention: auto` resolve for the
mesh's platform (`ShardingContext.platform`), not for `jax.default_backend()`, so the TPU program
holds the Mosaic kernels (per device, under shard_map: XLA cannot partition a Pallas call) and
the TPU attention, never the CPU one. `attend` names its implementation in a named scope
(`attention_xla`, `attention_splash`), which the programs' text shows.

Also here, the eval program: with `objective.loss_chunk` the held-out loss never builds the
[tokens, vocab] logits, and equals the whole-logits loss.

Compiling for TPU takes a while on 2 cores: that test is `slow`; the fast ones cover the same
path (the resolution, the TPU *lowering* of the same step, and the shard_map'd kernel on CPU).
"""

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, DataConfig, MeshConfig, PeftConfig
from jaxlearn.kernels.dispatch import resolve
from jaxlearn.models.layers import resolve_attention
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.objectives.lm import LMConfig, make_objective
from jaxlearn.peft.attach import attach, find_sites
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.pod import compile as pod_compile
from jaxlearn.pod.compile import fit_check, lower_step, seams
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import make_evaluator
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_eval_step

# see tests/kernels/test_tpu_compile.py: compile-only use needs no exclusive TPU lock
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TPU_MARK, CPU_MARK = "attention_splash", "attention_xla"


@pytest.fixture(autouse=True)
def _own_compiles(fresh_compile):  # the checks read the programs' text
    with fresh_compile():
        yield


def _lora_recipe(**model) -> Config:
    """A tiny LoRA recipe for v5e:2x4 (8 chips, fsdp 8), with `kernels` and `attention` on auto.
    Three adapted projections (one input dim: q, up; two: o) keep the Mosaic lowering short."""
    m = dataclasses.replace(tiny_model_config(vocab_size=256, d_model=128, d_ff=256, n_layers=1, **model),
                            compute_dtype="bfloat16")
    return Config(model=m, data=DataConfig(seq_len=128, batch_size=8), mesh=MeshConfig(preset="fsdp"),
                  peft=PeftConfig(type="lora", rank=8, targets=(r"attn/(q|o)$", r"mlp/up$")))


# --------------------------------------------------------------------------------------------
# Resolution for the target


def test_each_seam_resolves_for_the_target_not_the_host():
    assert jax.default_backend() == "cpu"
    assert resolve("auto", "tpu") == ("tpu", False) and resolve("auto", "cpu") == ("xla", False)
    assert resolve_attention("auto", "tpu") == "splash" and resolve_attention("auto", "cpu") == "xla"
    assert resolve_attention("auto", "gpu") == "flash_gpu"
    assert resolve_attention("xla", "tpu") == "xla"  # an explicit choice stays
    lora = _lora_recipe()
    assert seams(lora, "tpu") == {"kernels": "pallas-tpu (Mosaic)", "attention": "splash"}
    assert seams(lora, "cpu") == {"kernels": "xla", "attention": "xla"}
    assert "unused" in seams(dataclasses.replace(lora, peft=PeftConfig()), "tpu")["kernels"]
    assert seams(dataclasses.replace(lora, peft=PeftConfig(type="lora", dropout=0.1)), "tpu")["kernels"].startswith("xla")


def test_the_mesh_names_the_target_platform():
    from jaxlearn.pod.topologies import topology_devices

    cpu = ShardingContext(make_mesh(MeshConfig(preset="fsdp")), rules_for(MeshConfig(preset="fsdp")))
    tpu = ShardingContext(make_mesh(MeshConfig(preset="fsdp"), topology_devices("v5e:2x4")),
                          rules_for(MeshConfig(preset="fsdp")))
    assert (cpu.platform, tpu.platform) == ("cpu", "tpu")


def test_the_attention_scope_marks_the_cpu_path():
    """The marker the TPU checks look for absent is really there in a CPU program."""
    cfg = tiny_model_config(n_layers=1)
    model = Transformer(cfg)
    params = abstract_params(model)[0]
    b = random_batch(2, 8, cfg.vocab_size)
    text = jax.jit(model.apply).lower({"params": params}, b["inputs"], b["positions"],
                                      b["segment_ids"]).as_text(debug_info=True)
    assert CPU_MARK in text and TPU_MARK not in text


def test_the_lowered_tpu_step_holds_mosaic_kernels_and_the_tpu_attention():
    """Fast cover of the slow compile below: the trainer's own step, lowered (not compiled) for
    v5e by the fit check's `lower_step`, already holds the Mosaic calls and the TPU attention."""
    step = lower_step(_lora_recipe(), "v5e:2x4")
    assert step.shard.platform == "tpu"
    text = step.lowered.as_text(debug_info=True)
    assert text.count("tpu_custom_call") >= 6  # 3 LoRA projections, forward and dx kernels
    assert TPU_MARK in text and CPU_MARK not in text
    calls = [line for line in text.splitlines() if "@tpu_custom_call" in line]
    names = [re.search(r'kernel_name = "([^"]+)"', line).group(1) for line in calls]
    # splash attention's forward and both backward kernels (dq, dk/dv), segment ids on
    assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
            "splash_mha_dkv_segmented_no_residuals"} <= set(names)
    # the project's own kernels tell XLA their FLOPs (else the fit check's FLOPs per step would
    # count them as 0); JAX's splash kernels do not, and the fit check adds attention itself
    lora = [line for line, name in zip(calls, names) if name.startswith("lora")]
    assert lora and all(re.search(r"\\22flops\\22:[1-9]", line) for line in lora)


@pytest.mark.slow  # the XLA TPU compile: ~15 s of CPU; fast cover: the lowering test above
def test_fit_check_compiles_mosaic_kernels_and_never_the_cpu_attention(monkeypatch):
    kept = []
    real = pod_compile.lower_step

    class Keep:  # the lowered step, remembering what its compile() returned
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            kept.append(self.lowered.compile())
            return kept[-1]

    monkeypatch.setattr(pod_compile, "lower_step",
                        lambda *a, **k: dataclasses.replace(s := real(*a, **k), lowered=Keep(s.lowered)))
    report = fit_check(_lora_recipe(), "v5e:2x4", count_flops=False)
    hlo = kept[0].as_text()
    assert hlo.count("tpu_custom_call") >= 6  # the fused LoRA kernels are in the TPU executable
    assert TPU_MARK in hlo and CPU_MARK not in hlo  # and the CPU attention is not
    # the Mosaic attention kernels themselves: forward and dq (one layer over frozen embeddings:
    # nothing upstream of k/v trains, so XLA drops the dk/dv kernel, as it should)
    assert "splash_mha_fwd" in hlo and "splash_mha_dq" in hlo
    assert report.seams == {"kernels": "pallas-tpu (Mosaic)", "attention": "splash"}
    assert "seams (v5e): kernels pallas-tpu (Mosaic), attention splash" in report.text()
    assert report.to_dict()["seams"] == report.seams  # `jaxlearn compile --json`


def test_the_kernel_runs_per_device_on_a_mesh():
    """On a multi-device mesh the Pallas LoRA kernel runs under shard_map (the TPU program's
    path; here `kernels: pallas` is the TPU kernel in interpret mode on 8 CPU devices) and gives
    the XLA path's loss and gradients (the adapters' summed over the devices' rows)."""
    mc = MeshConfig(preset="fsdp")
    shard = ShardingContext(make_mesh(mc), rules_for(mc))
    cfg = tiny_model_config(n_layers=1, init_std=0.2)
    base = init_params(Transformer(cfg), jax.random.key(0))
    abstract, logical = abstract_params(Transformer(cfg))
    pc = PeftConfig(type="lora", rank=4, targets=(r"mlp/up$",))
    flat = flat_paths(attach(base, pc, find_sites(abstract, logical, pc), jax.random.key(1)))
    flat["layers/mlp/up/lora_b"] = 0.1 * jax.random.normal(jax.random.key(2), flat["layers/mlp/up/lora_b"].shape)
    params = unflatten_paths(flat)
    b = random_batch(8, 8, cfg.vocab_size)
    args = (b["inputs"], b["positions"], b["segment_ids"])

    def loss_and_grads(kernels):
        model = Transformer(dataclasses.replace(cfg, kernels=kernels), shard)
        loss = lambda p, *a: jnp.sum(jnp.sin(model.apply({"params": p}, *a)[0]))  # noqa: E731
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params, *args)
        return lowered.compile()(params, *args), lowered.as_text()

    (fused, g_fused), text = loss_and_grads("pallas")
    (plain, g_plain), _ = loss_and_grads("xla")
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(fused, plain, rtol=1e-5)
    g_plain = flat_paths(g_plain)
    for path, g in flat_paths(g_fused).items():
        if path != "layers/mlp/up/kernel":  # the fused kernel never differentiates W (frozen under LoRA)
            np.testing.assert_allclose(g, g_plain[path], atol=1e-4, rtol=1e-4, err_msg=path)


# --------------------------------------------------------------------------------------------
# Held-out evaluation with the chunked LM head


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr makes, nested jaxprs (scan, pjit, custom_vjp ...) included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _shapes(inner)
    return out


def test_eval_with_loss_chunk_never_builds_token_by_vocab_logits():
    """`run.evaluate` (make_evaluator -> compile_eval_step -> the objective) with loss_chunk runs
    the LM head a chunk at a time: no value of the eval program has tokens x vocab elements
    (the whole-logits program has [B, T, vocab]); and the held-out loss is the same."""
    vocab, b, t, chunk = 512, 4, 32, 32
    cfg = Config(model=tiny_model_config(vocab_size=vocab, n_layers=1), mesh=MeshConfig(preset="dp"))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    shard = ShardingContext(mesh, rules_for(cfg.mesh))
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, shard.rules, total_steps=1)
    extras = build_extras({}, shard)
    local = random_batch(b, t, vocab)
    batch = jax.device_put(local, shard.batch_sharding())
    out = {}
    for lc in (0, chunk):
        objective = make_objective(model, LMConfig(loss_chunk=lc))
        step = compile_eval_step(objective, setup, shard.batch_sharding())
        big = [s for s in _shapes(step.trace(setup.state.trainable, setup.state.frozen, batch, {}).jaxpr.jaxpr)
               if s and s[-1] == vocab and math.prod(s) >= b * t * vocab]
        out[lc] = big, make_evaluator(objective, setup, shard, extras, [local])(setup.state)
    assert out[0][0], "the whole-logits eval should hold [B, T, vocab] (the check's positive control)"
    assert not out[chunk][0], out[chunk][0]
    assert out[chunk][1]["loss"] == pytest.approx(out[0][1]["loss"], rel=1e-6)
    assert out[chunk][1]["perplexity"] == pytest.approx(out[0][1]["perplexity"], rel=1e-5)
    assert out[chunk][1]["tokens"] == out[0][1]["tokens"] == b * t
