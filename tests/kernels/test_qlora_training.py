"""QLoRA end to end through the trainer: `peft.quantize` builds a state whose adapted kernels
are frozen int8/NF4 codes + scales (on 2 devices, FSDP), trains the adapters, and leaves the
quantized base bit-identical with no optimizer state for it."""

import jax
import numpy as np
import pytest

from jaxlearn.config import Config, ConfigError, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

from helpers import random_batch, tiny_model_config


@pytest.mark.parametrize("fmt", ["nf4"])
def test_qlora_trains_adapters_over_a_frozen_quantized_base(fmt):
    mesh_cfg = MeshConfig(preset="fsdp")
    cfg = Config(model=tiny_model_config(n_layers=1), mesh=mesh_cfg, peft=PeftConfig(type="lora", rank=4, quantize=fmt),
                 optim=OptimConfig(warmup_steps=0, lr=1e-2))
    mesh = make_mesh(mesh_cfg, jax.devices()[:2])
    shard = ShardingContext(mesh, rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, rules_for(mesh_cfg), total_steps=10)
    step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
    state = setup.state
    frozen = flat_paths(jax.device_get(state.frozen))
    assert not any(p.endswith("/kernel") and "/attn/" in p for p in frozen)
    assert frozen["layers/attn/q/kernel_q"].dtype == np.uint8
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_train
    losses = []
    for i in range(3):
        state, m = step(state, random_batch(4, 16, 128, seed=i), {})
        losses.append(float(m["loss"]))
    for k, v in flat_paths(jax.device_get(state.frozen)).items():
        np.testing.assert_array_equal(v, frozen[k], err_msg=k)
    assert losses[-1] < losses[0]


def test_quantize_needs_lora():
    with pytest.raises(ConfigError, match="peft.quantize applies to lora/dora only"):
        PeftConfig(type="ia3", quantize="int8")
