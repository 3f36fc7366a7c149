"""LoRA factors shard under `fsdp` like their base weights, where their sizes allow.

A factor carries its base weight's axis names plus `lora_rank`: lora_a [*in, r], lora_b [r, *out].
FSDP shards only `embed`, so by names alone half the factors (q's B [r, heads, head_dim], o's A,
the MLP's ...) would sit whole on every device, with their optimizer moments. The `lora_side`
rule (jaxlearn/sharding.py) puts the fsdp axis on a dim of the factor's in/out side that it
divides; never the rank, never `layers`. Checked here: the golden snapshot, the size fitting, and
that a LoRA step on 8 devices still equals the one-device step.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, logical_to_spec, make_mesh, rules_for
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"  # as tests/test_sharding.py
FSDP = rules_for(MeshConfig(preset="fsdp"))
LORA = ("lora_a", "lora_b")


def _is_factor(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in LORA


def test_golden_snapshot_shards_every_lora_factor_under_fsdp():
    """The snapshot tests/test_sharding.py pins: under fsdp every factor is split on fsdp (on a
    non-rank dim), its base weight too; under dp everything is replicated."""
    snap = json.loads(GOLDEN.read_text())
    factors = {p: s for p, s in snap["fsdp+lora"].items() if _is_factor(p)}
    assert len(factors) == 14  # q k v o gate up down, A and B
    for path, spec in factors.items():
        assert "'fsdp'" in spec, (path, spec)
        base = snap["fsdp+lora"][path.rsplit("/", 1)[0] + "/kernel"]
        assert "'fsdp'" in base, (path, base)
    # the rank dim stays whole: A's last dim, B's first after `layers`
    assert snap["fsdp+lora"]["layers/attn/q/lora_a"] == "P(None, 'fsdp', None)"
    assert snap["fsdp+lora"]["layers/attn/q/lora_b"] == "P(None, None, 'fsdp', None)"
    assert all(set(s) <= set("P(None, )") for p, s in snap["dp+lora"].items() if _is_factor(p))


def test_lora_side_fits_the_sizes_and_leaves_the_rest_alone():
    q_b = ("layers", "lora_rank", "heads", "head_dim")
    # by names alone: the first dim of B's output side
    assert logical_to_spec(q_b, FSDP) == P(None, None, "fsdp", None)
    # 4 heads do not split 8 ways: head_dim (16) does
    assert logical_to_spec(q_b, FSDP, (2, 4, 4, 16), {"fsdp": 8}) == P(None, None, None, "fsdp")
    # nothing on the side divides: replicated (never the rank, never `layers`, though they would)
    assert logical_to_spec(q_b, FSDP, (8, 8, 3, 5), {"fsdp": 8}) == P(None, None, None, None)
    # a side that `embed` already puts on fsdp keeps it (one mesh axis per spec)
    assert logical_to_spec(("layers", "embed", "lora_rank"), FSDP, (2, 64, 8), {"fsdp": 8}) == P(None, "fsdp", None)
    # base weights and other adapters are untouched
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), FSDP) == P(None, "fsdp", None, None)
    assert logical_to_spec(("layers", "heads", "head_dim"), FSDP) == P(None, None, None)
    # dp shards no weight; fsdp_tp keeps its tensor split of the factors (heads, mlp on `tensor`)
    assert logical_to_spec(q_b, rules_for(MeshConfig(preset="dp"))) == P(None, None, None, None)
    assert logical_to_spec(q_b, rules_for(MeshConfig(preset="fsdp_tp"))) == P(None, None, "tensor", None)
    # a recipe can turn it off
    off = rules_for(MeshConfig(preset="fsdp", rules=(("lora_side", None),)))
    assert logical_to_spec(q_b, off) == P(None, None, None, None)


def _lora_run(mesh_cfg: MeshConfig, n_devices: int, steps: int = 2):
    """`steps` LoRA steps on one batch (so the loss must fall) over `n_devices` devices."""
    cfg = Config(model=tiny_model_config(n_layers=1), mesh=mesh_cfg, peft=PeftConfig(type="lora", rank=4),
                 optim=OptimConfig(warmup_steps=0, lr=1e-2))
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    shard = ShardingContext(mesh, rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, shard.rules, total_steps=10)
    step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
    local = random_batch(8, 16, cfg.model.vocab_size)
    batch = {k: jax.make_array_from_process_local_data(shard.batch_sharding(), v) for k, v in local.items()}
    state, losses = setup.state, []
    for _ in range(steps):
        state, m = step(state, batch, {})
        losses.append(float(m["loss"]))
    return losses, state


def test_lora_step_on_8_devices_keeps_the_factors_sharded_and_trains():
    losses, state = _lora_run(MeshConfig(preset="fsdp"), 8)
    trainable = flat_paths(state.trainable)
    assert trainable and all(_is_factor(p) for p in trainable)
    for path, a in trainable.items():
        spec = tuple(a.sharding.spec)
        assert "fsdp" in spec, (path, spec)  # not replicated, after the step too
        rank_dim = a.ndim - 1 if path.endswith("lora_a") else 1  # [layers, *in, r] / [layers, r, *out]
        assert spec[rank_dim] is None and spec[0] is None, (path, spec)
        # each device holds 1/8 of the factor (the size fitting chose a dim 8 divides)
        assert a.addressable_shards[0].data.size * 8 == a.size, path
    # the optimizer's moments live where their factor does (every trainable leaf is a factor here)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len(trainable) and all("fsdp" in tuple(x.sharding.spec) for x in moments)
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


@pytest.mark.slow  # two more step compiles; the fast cover: the test above (and tests/test_sharding.py)
def test_lora_step_on_8_devices_matches_one_device():
    losses, state = _lora_run(MeshConfig(preset="fsdp"), 8)
    losses1, state1 = _lora_run(MeshConfig(preset="dp"), 1)
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    one = flat_paths(jax.device_get(state1.trainable))
    for path, a in flat_paths(jax.device_get(state.trainable)).items():
        np.testing.assert_allclose(a, one[path], atol=5e-5, err_msg=path)
