"""The reference policy of preference and RL objectives: with PEFT it is the base with adapters
off and costs no second copy of the weights; with full fine-tuning it is a frozen extra equal to
the policy's starting weights. Either way the KL to it is exactly 0 at step 0."""

import jax
import numpy as np

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.lm import LMConfig
from jaxlearn.objectives.registry import build_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step
from tests.objectives_for_tests import KLConfig


def _steps(peft: PeftConfig, objective_cfg, n: int = 3):
    mc = MeshConfig(preset="fsdp")
    cfg = Config(model=tiny_model_config(), mesh=mc, peft=peft, objective=objective_cfg,
                 optim=OptimConfig(lr=1e-2, warmup_steps=0))
    shard = ShardingContext(make_mesh(mc), rules_for(mc))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=10, objective=objective)
    extras = build_extras(objective.extras(), shard)
    state = setup.state
    first = place_batch(objective, shard, random_batch(8, 32, 128, seed=0), state)
    step = compile_train_step(objective, setup, shard.batch_shardings(first), 1, extras.shardings)
    compiled = step.lower(state, first, extras.values).compile()
    start = jax.device_get((state.params, state.frozen))
    metrics = []
    for i in range(n):
        batch = place_batch(objective, shard, random_batch(8, 32, 128, seed=i), state)
        state, m = compiled(state, batch, extras.values)
        metrics.append(jax.device_get(m))
    return metrics, extras, compiled, start, state


def test_peft_reference_is_the_base_with_adapters_off_at_no_extra_copy():
    lora = PeftConfig(type="lora", rank=4)
    metrics, extras, compiled, (_, frozen0), state = _steps(lora, KLConfig())
    assert extras.values == {}  # no reference weights are loaded
    # LoRA is the identity at attach: policy == reference up to float32 rounding of the fused
    # LoRA matmul (a KL summed over 256 tokens, each log-prob ~ -5)
    assert abs(metrics[0]["kl"]) < 1e-6
    assert abs(metrics[-1]["kl"]) > 1e-4  # the adapters moved the policy away from it
    for p, a in flat_paths(jax.device_get(state.frozen)).items():  # the base (the reference) is untouched
        np.testing.assert_array_equal(a, flat_paths(frozen0)[p], err_msg=p)
    # the step's arguments are exactly those of the plain LM step: the reference costs no copy
    _, _, plain, _, _ = _steps(lora, LMConfig(), n=1)
    assert compiled.memory_analysis().argument_size_in_bytes == plain.memory_analysis().argument_size_in_bytes


def test_full_finetuning_reference_is_a_frozen_copy_of_the_start():
    metrics, extras, _, (params0, _), state = _steps(PeftConfig(), KLConfig())
    assert set(extras.values) == {"reference"}
    ref = flat_paths(jax.device_get(extras.values["reference"]))
    for p, a in flat_paths(params0).items():  # bit-identical to the policy's initial weights
        np.testing.assert_array_equal(a, ref[p], err_msg=p)
    # so the KL is 0 up to the float32 rounding of two differently fused forward passes
    assert abs(metrics[0]["kl"]) < 1e-6
    assert abs(metrics[-1]["kl"]) > 1e-4
    moved = flat_paths(jax.device_get(state.trainable))["layers/attn/q/kernel"]
    assert not np.array_equal(moved, ref["layers/attn/q/kernel"])  # the policy trained; the reference did not follow
