"""The continual objective through the ordinary compiled step: only the method's trainable leaves
change; the base, Share's bases and the frozen extras are bit-identical after a step."""

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.continual.state import after_task, save_state
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.continual import CONTINUAL_TRAINABLE, ContinualConfig, ContinualObjective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

TARGETS = (r"attn/(q|v)$",)


def _setup(method, state_path="", task=0, compile=True, **kw):
    obj_cfg = ContinualConfig(method=method, rank=2, share_k=3, targets=TARGETS, task=task, state=state_path, **kw)
    cfg = Config(model=tiny_model_config(), mesh=MeshConfig(preset="dp"), objective=obj_cfg,
                 peft=PeftConfig(type="none", trainable=(CONTINUAL_TRAINABLE,)), optim=OptimConfig(warmup_steps=0))
    mesh, rules = make_mesh(cfg.mesh, jax.devices()[:1]), rules_for(cfg.mesh)
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    obj = ContinualObjective(model, obj_cfg, cfg)
    setup = build_state(model, cfg, mesh, rules, total_steps=10, objective=obj)
    if not compile:
        return obj, setup, None, None
    extras = build_extras(obj.extras(), shard)
    step = compile_train_step(obj, setup, shard.batch_sharding(), 1, extras.shardings)
    return obj, setup, extras, step


def _one_step(obj, setup, extras, step):
    before = jax.device_get((setup.state.trainable, setup.state.frozen, extras.values))
    state, metrics = step(setup.state, random_batch(4, 16, 128), extras.values)
    return before, jax.device_get((state.trainable, state.frozen)), jax.device_get(extras.values), metrics


def _task0_state(tmp_path, method):
    """A sequence state after a first task with a non-zero adapter (B filled in)."""
    obj, setup, _, _ = _setup(method, compile=False)
    heads = jax.device_get(setup.state.params["heads"]["continual"])
    heads = jax.tree.map(lambda x: x + 0.05 * np.random.RandomState(0).standard_normal(x.shape).astype(x.dtype), heads)
    return str(save_state(after_task(obj.cfg, obj.sites, {}, heads, 0), tmp_path / "state_00.npz"))


@pytest.mark.parametrize("method", ["share", "ella"])
def test_a_step_trains_only_the_methods_leaves(tmp_path, method):
    state_path = _task0_state(tmp_path, method)
    obj, setup, extras, step = _setup(method, state_path, task=1, share_extra_rank=1)
    (tr0, fr0, ex0), (tr1, fr1), ex1, metrics = _one_step(obj, setup, extras, step)
    trainable, frozen = flat_paths(tr0), flat_paths(fr0)
    if method == "share":
        assert {k.rsplit("/", 1)[1] for k in trainable if k.startswith("heads/")} == {"alpha", "beta", "extra_a",
                                                                                        "extra_b"}
        assert any(k.endswith("/basis_a") for k in frozen) and any(k.endswith("/basis_b") for k in frozen)
        # 2 sites x 2 layers-stacked: coefficients and extra rank only (the bases have no optimizer state)
    else:
        assert {k.rsplit("/", 1)[1] for k in trainable} == {"a", "b"}
        assert float(metrics["penalty"]) == 0.0  # B starts at zero: dW_t = 0
    assert all(k.startswith("heads/continual/") for k in trainable)
    # frozen leaves (the base and Share's bases) and the extras (ELLA's W_past): bit-identical
    for k, v in flat_paths(fr1).items():
        np.testing.assert_array_equal(v, frozen[k], err_msg=k)
    for k in ex0:
        np.testing.assert_array_equal(ex1[k], ex0[k], err_msg=k)
    changed = [k for k, v in flat_paths(tr1).items() if not np.array_equal(v, trainable[k])]
    assert changed, "nothing trained"
    assert np.isfinite(float(metrics["loss"]))


def test_ella_penalty_reaches_the_step_and_olora_reads_past_a(tmp_path):
    state_path = _task0_state(tmp_path, "ella")
    obj, setup, extras, step = _setup("ella", state_path, task=1, ella_lambda=10.0)
    assert any(np.any(np.asarray(v)) for v in jax.device_get(extras.values).values())  # W_past loaded
    state = setup.state
    for _ in range(2):  # after one step B != 0, so the penalty is positive
        state, metrics = step(state, random_batch(4, 16, 128), extras.values)
    assert float(metrics["penalty"]) > 0.0
    state_path = _task0_state(tmp_path, "olora")
    obj, setup, extras, step = _setup("olora", state_path, task=1)
    shapes = {k: v.shape for k, v in extras.values.items() if k.startswith("past_a/")}
    assert all(s[-1] == 2 for s in shapes.values())  # the first task's rank-2 A's
    _, metrics = step(setup.state, random_batch(4, 16, 128), extras.values)
    assert float(metrics["penalty"]) > 0.0  # fresh A's are not orthogonal to the past ones
