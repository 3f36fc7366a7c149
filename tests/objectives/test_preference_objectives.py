"""The preference objectives on a tiny model: DPO = ln 2 with zero margins at initialisation,
the reward model's loss = ln 2 with equal rewards, stored == on-the-fly reference log-probs, the
PEFT reference is the adapter-free base, and a sharded DPO step == the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.preference import DPOConfig, ORPOConfig, SimPOConfig, reference_logps
from jaxlearn.objectives.registry import build_objective
from jaxlearn.objectives.reward import RewardConfig
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.merge import without_adapters
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

LN2 = float(np.log(2.0))


def pair_batch(b=8, t=24, vocab=128, seed=0):
    """Random pairs: a shared 8-token prompt, replies of different lengths, one padding pair."""
    rs = np.random.RandomState(seed)
    out = {k: np.zeros((b, 2, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((b, 2, t), np.float32)
    prompt = rs.randint(1, vocab, (b, 8))
    for i in range(b):
        for j in range(2):
            n = 8 + rs.randint(3, t - 8)
            ids = np.concatenate([prompt[i], rs.randint(1, vocab, n - 8 + 1)])
            out["inputs"][i, j, :n], out["targets"][i, j, :n] = ids[:n], ids[1:n + 1]
            out["segment_ids"][i, j, :n], out["positions"][i, j, :n] = 1, np.arange(n)
            out["loss_mask"][i, j, 7:n] = 1.0  # the reply's targets
    out["pair_mask"] = np.ones(b, np.float32)
    out["pair_mask"][-1] = 0.0
    out["loss_mask"][-1] = 0.0
    out["ref_logps"] = np.zeros((b, 2), np.float32)
    return out


def _setup(objective_cfg, peft=PeftConfig(), mesh_cfg=MeshConfig(preset="dp"), n_devices=1, lr=5e-3):
    cfg = Config(model=tiny_model_config(), mesh=mesh_cfg, peft=peft, objective=objective_cfg,
                 optim=OptimConfig(lr=lr, warmup_steps=0))
    shard = ShardingContext(make_mesh(mesh_cfg, jax.devices()[:n_devices]), rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=10, objective=objective)
    return cfg, shard, objective, setup, build_extras(objective.extras(), shard)


@pytest.mark.parametrize("peft", [PeftConfig(), PeftConfig(type="lora", rank=4)], ids=["full", "lora"])
def test_dpo_is_ln2_with_zero_margins_at_initialisation(peft):
    _, _, objective, setup, extras = _setup(DPOConfig(beta=0.1), peft)
    loss, n, m = objective(setup.state.params, {k: jnp.asarray(v) for k, v in pair_batch().items()}, None,
                           extras.values)
    assert float(n) == 7.0  # the padding pair does not count
    np.testing.assert_allclose(float(loss) / 7, LN2, rtol=1e-6)
    for k in ("reward_chosen", "reward_rejected", "margin", "kl"):
        assert abs(float(m[k])) < 1e-5, (k, m[k])


def test_reward_model_loss_is_ln2_for_equal_rewards_and_its_head_trains():
    cfg, shard, objective, setup, extras = _setup(RewardConfig(), PeftConfig(type="lora", rank=4))
    assert "heads/reward/kernel" in flat_paths(setup.state.trainable)
    batch = {k: jnp.asarray(v) for k, v in pair_batch().items()}
    loss, n, m = objective(setup.state.params, batch, None, extras.values)
    np.testing.assert_allclose(float(loss) / float(n), LN2, rtol=1e-6)
    step = compile_train_step(objective, setup, shard.batch_shardings(batch), 1, extras.shardings)
    state = setup.state
    for _ in range(5):
        state, metrics = step(state, batch, extras.values)
    assert float(metrics["loss"]) < LN2 and float(metrics["accuracy"]) > 0.5
    assert np.any(np.asarray(state.trainable["heads"]["reward"]["kernel"]) != 0)


def test_stored_reference_logps_equal_on_the_fly():
    _, _, objective, setup, extras = _setup(DPOConfig(), PeftConfig(type="lora", rank=4))
    params = setup.state.params
    # move the policy away from the reference, so the reference matters
    flat = flat_paths(params)
    flat = {k: (v + 0.05 if k.endswith("lora_b") else v) for k, v in flat.items()}
    params = unflatten_paths(flat)
    batch = pair_batch()
    stored = dict(batch, ref_logps=reference_logps(objective.model, without_adapters(params), [batch])[0])
    _, _, stored_obj, _, _ = _setup(DPOConfig(reference="stored"), PeftConfig(type="lora", rank=4))
    on_the_fly = objective(params, {k: jnp.asarray(v) for k, v in batch.items()}, None, extras.values)
    from_data = stored_obj(params, {k: jnp.asarray(v) for k, v in stored.items()}, None, {})
    np.testing.assert_allclose(float(from_data[0]), float(on_the_fly[0]), rtol=1e-6)
    for k in on_the_fly[2]:
        np.testing.assert_allclose(float(from_data[2][k]), float(on_the_fly[2][k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_peft_reference_ignores_the_adapter():
    _, _, objective, setup, extras = _setup(DPOConfig(), PeftConfig(type="lora", rank=4))
    batch = {k: jnp.asarray(v) for k, v in pair_batch().items()}
    params = setup.state.params
    changed = unflatten_paths({k: (v + 0.1 if k.endswith("lora_b") else v) for k, v in flat_paths(params).items()})
    ref_a = objective.reference_logps(params, batch, extras.values)
    ref_b = objective.reference_logps(changed, batch, extras.values)
    np.testing.assert_array_equal(np.asarray(ref_a), np.asarray(ref_b))  # the reference did not move
    pol_a, _ = objective.sequence_logps(params, batch, None)
    pol_b, _ = objective.sequence_logps(changed, batch, None)
    assert np.abs(np.asarray(pol_a) - np.asarray(pol_b)).max() > 1e-3  # while the policy did


# DPO in the default suite; the reference-free variants (same paired forward) under slow
@pytest.mark.parametrize("objective_cfg", [
    pytest.param(DPOConfig(beta=0.5), id="dpo"),
    pytest.param(SimPOConfig(), id="simpo", marks=pytest.mark.slow),
    pytest.param(ORPOConfig(), id="orpo", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(objective_cfg):
    runs = []
    for mc, n in ((MeshConfig(preset="dp"), 1), (MeshConfig(preset="fsdp_tp", tensor=2), 8)):
        # lr as tests/test_sharding.py: Adam turns reduction-order rounding of near-zero gradients
        # into lr-sized steps, so the parameter tolerance scales with it
        cfg, shard, objective, setup, extras = _setup(objective_cfg, mesh_cfg=mc, n_devices=n, lr=1e-3)
        state = setup.state
        first = place_batch(objective, shard, pair_batch(seed=0), state)
        step = compile_train_step(objective, setup, shard.batch_shardings(first), 1, extras.shardings)
        ms = []
        for i in range(3):
            state, m = step(state, place_batch(objective, shard, pair_batch(seed=i), state), extras.values)
            ms.append(jax.device_get(m))
        runs.append((ms, jax.device_get(state.params)))
    (m1, p1), (m8, p8) = runs
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)
    np.testing.assert_allclose([m["margin"] for m in m8], [m["margin"] for m in m1], rtol=1e-4, atol=1e-5)
    for path, a in flat_paths(p8).items():
        np.testing.assert_allclose(a, flat_paths(p1)[path], atol=5e-5, err_msg=path)
