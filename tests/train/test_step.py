"""The step: masked tokens do not move the loss; frozen weights stay bit-identical, get no
gradient and no optimizer state; learning-rate schedule; a bad pattern is an error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.lm import make_objective, token_cross_entropy
from jaxlearn.peft.filter import flat_paths, split_params
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.optim import make_schedule
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

from helpers import random_batch, tiny_model_config


def _setup(trainable=(".*",)):
    mc = MeshConfig(preset="dp")
    cfg = Config(model=tiny_model_config(), mesh=mc, peft=PeftConfig(trainable=tuple(trainable)),
                 optim=OptimConfig(warmup_steps=0))
    mesh = make_mesh(mc, jax.devices()[:1])
    shard = ShardingContext(mesh, rules_for(mc))
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, rules_for(mc), total_steps=10)
    return cfg, model, setup, shard


def test_masked_tokens_do_not_change_the_loss():
    cfg, model, setup, _ = _setup()
    objective = make_objective(model, cfg.objective)
    batch = random_batch(2, 16, 128, seed=0)
    batch["loss_mask"][:, :6] = 0.0
    other = {k: v.copy() for k, v in batch.items()}
    other["targets"][:, :6] = (other["targets"][:, :6] + 7) % 128  # change only masked targets
    a = objective(setup.state.params, batch, None)
    b = objective(setup.state.params, other, None)
    assert float(a[0]) == float(b[0]) and float(a[1]) == 2 * 10


def test_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
    targets = jnp.asarray([[1, 2, 3], [4, 5, 10]])
    ce, log_z = token_cross_entropy(logits, targets)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: token_cross_entropy(x, targets)[0].sum())(logits)
    g_ref = jax.nn.softmax(logits) - jax.nn.one_hot(targets, 11)
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


def test_frozen_weights_bit_identical_and_without_optimizer_state():
    cfg, model, setup, shard = _setup(trainable=["final_norm", r"layers/mlp/"])
    frozen_before = jax.device_get(setup.state.frozen)
    assert set(flat_paths(setup.state.trainable)) == {
        "final_norm/scale", "layers/mlp/gate/kernel", "layers/mlp/up/kernel", "layers/mlp/down/kernel"}
    # the optimizer state only mirrors trainable leaves
    n_train = sum(x.size for x in jax.tree.leaves(setup.state.trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(setup.state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_train  # Adam's two moments, nothing for frozen weights
    step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
    state = setup.state
    trained_before = jax.device_get(state.trainable)
    for i in range(3):
        state, m = step(state, random_batch(4, 16, 128, seed=i), {})
    for path, a in flat_paths(jax.device_get(state.frozen)).items():
        np.testing.assert_array_equal(a, flat_paths(frozen_before)[path], err_msg=path)
    moved = [not np.array_equal(a, flat_paths(trained_before)[p]) for p, a in flat_paths(jax.device_get(state.trainable)).items()]
    assert all(moved)


def test_frozen_weights_get_no_gradient_computation(step_flops):
    """Freezing everything but the final norm must remove the weight-gradient matmuls:
    the compiled step's FLOP count drops by roughly the backward-weight share."""
    flops = {"full": step_flops(PeftConfig()), "norm_only": step_flops(PeftConfig(trainable=("final_norm",)))}
    # forward ~1/3 of a full step's matmul FLOPs; dW ~1/3. Freezing nearly everything drops dW.
    assert flops["norm_only"] < 0.8 * flops["full"], flops


def test_unknown_trainable_pattern_lists_paths():
    params = {"a": {"kernel": np.zeros(2)}, "b": {"scale": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"matches no parameter. Available paths:\n  a/kernel\n  b/scale"):
        split_params(params, ["lm_head"])


def test_schedule_warmup_then_cosine():
    sched = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(110)) == pytest.approx(0.1, abs=1e-6) and float(sched(60)) == pytest.approx(0.55, abs=1e-2)
