"""The step's seams without any method in the library: a frozen extra model of another depth,
a frozen buffer, an objective-owned head and a per-row scalar feature (tests/objectives_for_tests.py).

Sharded (8 CPU devices) == unsharded; the extras are never donated or changed; the teacher gets
no gradient while the head trains; held-out evaluation reports the objective's own metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.registry import build_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import make_evaluator, place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step
from tests.objectives_for_tests import L2Config

STEPS = 3


def _build(mesh_cfg: MeshConfig, n_devices: int):
    cfg = Config(model=tiny_model_config(), mesh=mesh_cfg, optim=OptimConfig(warmup_steps=0),
                 objective=L2Config(teacher_layers=1))
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    shard = ShardingContext(mesh, rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, mesh, shard.rules, total_steps=10, objective=objective)
    extras = build_extras(objective.extras(), shard)
    return cfg, shard, objective, setup, extras


def _batch(i):
    b = random_batch(16, 32, 128, seed=i, n_docs=2)
    b["loss_mask"][i, :] = 0.0  # one row without scored tokens: its per-row weight is 0
    return b


def _train(mesh_cfg, n_devices):
    cfg, shard, objective, setup, extras = _build(mesh_cfg, n_devices)
    state = setup.state
    first = place_batch(objective, shard, _batch(0), state)
    step = compile_train_step(objective, setup, shard.batch_shardings(first), 1, extras.shardings)
    metrics = []
    for i in range(STEPS):
        batch = first if i == 0 else place_batch(objective, shard, _batch(i), state, shard.batch_shardings(first))
        state, m = step(state, batch, extras.values)
        metrics.append(jax.device_get(m))
    return state, metrics, extras, step, first, (shard, objective, setup)


@pytest.fixture(scope="module")
def single():
    return _train(MeshConfig(preset="dp"), 1)


def test_heads_train_teacher_frozen_and_extras_not_donated(single):
    state, metrics, extras, step, first, (shard, objective, setup) = single
    assert "heads/proj/kernel" in flat_paths(state.trainable)  # objective-owned, trainable
    assert not any(p.startswith("heads") for p in flat_paths(state.frozen))
    # the initial state was donated to the step: compare with a fresh (deterministic) build
    _, _, _, fresh, fresh_extras = _build(MeshConfig(preset="dp"), 1)
    assert not np.array_equal(np.asarray(state.trainable["heads"]["proj"]["kernel"]),
                              np.asarray(fresh.state.trainable["heads"]["proj"]["kernel"]))
    # the extras survive every call bit-identical (not donated, not updated), and a reload
    # (what a resumed run does) gives the same values
    for (p, a), b in zip(flat_paths(jax.device_get(extras.values)).items(),
                         jax.tree.leaves(jax.device_get(fresh_extras.values))):
        np.testing.assert_array_equal(a, b, err_msg=p)
    # the teacher has another depth than the student
    assert extras.values["teacher"]["layers"]["attn"]["q"]["kernel"].shape[0] == 1
    assert state.trainable["layers"]["attn"]["q"]["kernel"].shape[0] == 2
    assert metrics[-1]["l2"] < metrics[0]["l2"] and np.isfinite([m["loss"] for m in metrics]).all()
    assert step._cache_size() == 1  # three calls, one compilation


def test_per_row_feature_and_extras_reach_the_loss(single):
    """The step's l2 metric at step 0 equals an independent recomputation from the same teacher
    weights, buffer, head and per-row weights (row 0 has no scored tokens: weight 0)."""
    _, metrics, extras, _, first, (shard, objective, _) = single
    assert first["row_weight"].shape == (16,) and float(first["row_weight"][0]) == 0.0
    _, _, _, fresh, _ = _build(MeshConfig(preset="dp"), 1)
    params = fresh.state.params
    b = {k: jnp.asarray(v) for k, v in _batch(0).items()}
    s = objective.model.apply({"params": {k: v for k, v in params.items() if k != "heads"}}, b["inputs"],
                              b["positions"], b["segment_ids"], return_hidden=True)[0] @ params["heads"]["proj"]["kernel"]
    t = objective.teacher.apply({"params": extras.values["teacher"]}, b["inputs"], b["positions"], b["segment_ids"],
                                return_hidden=True)[0]
    sq = np.mean(np.square(np.asarray(s - t)) * np.asarray(extras.values["width_scale"]), -1)
    row_w = np.asarray(b["loss_mask"]).mean(-1)
    want = np.sum(row_w[:, None] * sq * np.asarray(b["loss_mask"])) / float(b["loss_mask"].sum())
    np.testing.assert_allclose(metrics[0]["l2"], want, rtol=1e-5)


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_sharded_step_with_extras_matches_single_device(preset, single):
    mesh_cfg = MeshConfig(preset="fsdp") if preset == "fsdp" else MeshConfig(preset="fsdp_tp", tensor=2)
    state, metrics, extras, _, first, _ = _train(mesh_cfg, 8)
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in single[1]], rtol=1e-5)
    np.testing.assert_allclose([m["l2"] for m in metrics], [m["l2"] for m in single[1]], rtol=1e-5)
    for path, a in flat_paths(jax.device_get(state.params)).items():
        np.testing.assert_allclose(a, flat_paths(jax.device_get(single[0].params))[path], atol=5e-5, err_msg=path)
    # the extras and the per-row feature are laid out by the same rules as the model and batch
    q = extras.values["teacher"]["layers"]["attn"]["q"]["kernel"]
    assert tuple(q.sharding.spec)[:2] == (None, "fsdp")
    assert tuple(first["row_weight"].sharding.spec) == (("data", "fsdp"),)
    assert tuple(extras.values["width_scale"].sharding.spec) == ("fsdp",)


def test_evaluation_reports_the_objective_metrics(single):
    state, _, extras, _, _, (shard, objective, setup) = single
    evaluate = make_evaluator(objective, setup, shard, extras, [_batch(5), _batch(6)])
    ev = evaluate(state)
    assert set(ev) == {"loss", "ce", "l2", "weight"} and ev["l2"] > 0  # no perplexity: not a pure LM loss
    assert ev["weight"] == float(_batch(5)["loss_mask"].sum() + _batch(6)["loss_mask"].sum())
