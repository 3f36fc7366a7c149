"""Every mesh preset on 8 CPU devices gives the single-device loss and updated params;
the PartitionSpecs of each preset are pinned by a golden snapshot; no recompilation."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.objectives.lm import LMConfig
from jaxlearn.models.transformer import Transformer, abstract_params
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.attach import SEAM_METHODS, attach_axes, find_sites
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, logical_to_spec, make_mesh, rules_for
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

from helpers import random_batch, tiny_model_config

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"
PRESETS = {"dp": MeshConfig(preset="dp"), "fsdp": MeshConfig(preset="fsdp"),
           "fsdp_tp": MeshConfig(preset="fsdp_tp", tensor=2)}
# Tolerances: the sharded step reorders float32 reductions (all-reduce over devices), so the
# loss agrees to float32 rounding and Adam's normalised updates to about 1e-5 after 3 steps.
LOSS_RTOL, PARAM_ATOL = 1e-6, 5e-5


def _run(mesh_cfg: MeshConfig, n_devices: int, steps: int = 3, grad_accum: int = 1, loss_chunk: int = 0):
    cfg = Config(model=tiny_model_config(), mesh=mesh_cfg, optim=OptimConfig(warmup_steps=0, grad_accum=grad_accum),
                 objective=LMConfig(loss_chunk=loss_chunk))
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    rules = rules_for(mesh_cfg)
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, rules, total_steps=10)
    step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding(), grad_accum)
    state, losses = setup.state, []
    for i in range(steps):
        local = random_batch(16, 32, cfg.model.vocab_size, seed=i, n_docs=2)
        batch = {k: jax.make_array_from_process_local_data(shard.batch_sharding(), v) for k, v in local.items()}
        state, m = step(state, batch, {})
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state, step


@pytest.fixture(scope="module")
def single_device():
    return _run(MeshConfig(preset="dp"), 1)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_matches_single_device(preset, single_device):
    assert len(jax.devices()) == 8
    losses, params, state, step = _run(PRESETS[preset], 8)
    np.testing.assert_allclose(losses, single_device[0], rtol=LOSS_RTOL)
    for path, a in flat_paths(params).items():
        np.testing.assert_allclose(a, flat_paths(single_device[1])[path], atol=PARAM_ATOL, err_msg=path)
    # parameters live in their shardings (initialised there, kept there by the step)
    q = state.trainable["layers"]["attn"]["q"]["kernel"]
    expected = {"dp": (None, None, None, None), "fsdp": (None, "fsdp", None, None),
                "fsdp_tp": (None, "fsdp", "tensor", None)}[preset]
    assert tuple(q.sharding.spec) == expected
    assert step._cache_size() == 1  # three calls, one compilation


@pytest.mark.parametrize("preset", [pytest.param("fsdp", marks=pytest.mark.slow), "fsdp_tp"])
def test_chunked_loss_sharded_matches_single_device(preset, single_device):
    """objective.loss_chunk (LM head + loss fused in chunks of 48 tokens, a ragged last chunk)
    on 8 devices, with the head sharded, gives the whole-logits single-device run. (fsdp_tp
    shards the head over both axes; fsdp alone, a sweep: `slow`.)"""
    losses, params, _, _ = _run(PRESETS[preset], 8, loss_chunk=48)
    np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
    for path, a in flat_paths(params).items():
        np.testing.assert_allclose(a, flat_paths(single_device[1])[path], atol=PARAM_ATOL, err_msg=path)


def test_grad_accumulation_matches_full_batch(single_device):
    losses, params, _, _ = _run(PRESETS["fsdp"], 8, grad_accum=2)
    np.testing.assert_allclose(losses, single_device[0], rtol=LOSS_RTOL)
    for path, a in flat_paths(params).items():
        np.testing.assert_allclose(a, flat_paths(single_device[1])[path], atol=PARAM_ATOL, err_msg=path)


def _specs_snapshot() -> dict:
    """Every preset's PartitionSpecs for the base model, and with LoRA and prefix adapters
    attached (adapters must inherit the axes, hence the sharding, of the weight they adapt)."""
    cfg = tiny_model_config()
    abstract, logical = abstract_params(Transformer(cfg))
    trees = {"": logical}
    for method in ("lora", "ia3", "prefix"):
        pc = PeftConfig(type=method, rank=4)
        sites = find_sites(abstract, logical, pc) if method in SEAM_METHODS else []
        trees[f"+{method}"] = attach_axes(logical, pc, sites)
    snap = {}
    for name, mc in PRESETS.items():
        rules = rules_for(mc)
        for suffix, tree in trees.items():
            snap[name + suffix] = {path: str(logical_to_spec(axes, rules)) for path, axes in sorted(flat_paths(tree).items())}
        snap[name + "+objective"] = _objective_specs(mc, cfg)
    return snap


def _objective_specs(mesh_cfg: MeshConfig, model_cfg) -> dict:
    """An objective's own leaves (tests/objectives_for_tests.py): its head, its frozen extras (a
    teacher of another depth, a buffer) and its batch (token rows, a per-row scalar), by the
    same rules as the model."""
    from jaxlearn.objectives.registry import build_objective
    from jaxlearn.train.extras import build_extras
    from tests.objectives_for_tests import L2Config

    cfg = Config(model=model_cfg, mesh=mesh_cfg, objective=L2Config())
    shard = ShardingContext(make_mesh(mesh_cfg), rules_for(mesh_cfg))
    objective = build_objective(Transformer(model_cfg, shard), cfg)
    out = {f"heads/{p}": str(logical_to_spec(a, shard.rules)) for p, a in flat_paths(objective.head_axes()).items()}
    extras = build_extras(objective.extras(), shard, abstract=True)
    out.update({f"extras/{p}": str(s.spec) for p, s in flat_paths(extras.shardings).items()})
    batch = shard.batch_shardings(objective.abstract_batch(16, 32))
    out.update({f"batch/{k}": str(s.spec) for k, s in batch.items()})
    return dict(sorted(out.items()))


def test_partition_specs_golden():
    """Regenerate deliberately with JAXLEARN_UPDATE_GOLDEN=1 and review the diff."""
    snap = _specs_snapshot()
    if os.environ.get("JAXLEARN_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    assert GOLDEN.exists(), "golden file missing: run once with JAXLEARN_UPDATE_GOLDEN=1"
    assert snap == json.loads(GOLDEN.read_text())
