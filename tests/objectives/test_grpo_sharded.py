"""A GRPO step sharded over 8 CPU devices (fsdp) equals the same step on one device: the same
prompts, the same rollout (fixed sampling seed: same tokens, behaviour log-probs, rewards and
advantages), then one update with equal loss, metrics and parameters."""

import jax
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, MeshConfig, OptimConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.rl import GRPO, GRPOConfig
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

TARGET = 17
PROMPTS, PROMPT_LEN, GROUP, NEW = 8, 8, 4, 6  # 32 rows: 4 per device on the fsdp mesh


class TokenReward(GRPO):
    """A reward read from tokens (no tokenizer): the share of response tokens equal to TARGET."""

    def score(self, prompt_bp, response_bn, mask_bn, done_b, record_index_b):
        return (((response_bn == TARGET) * mask_bn).sum(1) / np.maximum(mask_bn.sum(1), 1)).astype(np.float32)


def _prompts():
    rs = np.random.RandomState(0)
    return {"inputs": rs.randint(1, 128, (PROMPTS, PROMPT_LEN)).astype(np.int32),
            "segment_ids": np.ones((PROMPTS, PROMPT_LEN), np.int32),
            "positions": np.tile(np.arange(PROMPT_LEN, dtype=np.int32), (PROMPTS, 1)),
            "record_index": np.arange(PROMPTS, dtype=np.int32)}


def _one_step(mesh_cfg: MeshConfig, n_devices: int):
    # kl_coef > 0 with full fine-tuning: the reference is a frozen extra, sharded like the policy
    cfg = Config(model=tiny_model_config(), mesh=mesh_cfg, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                 objective=GRPOConfig(group_size=GROUP, max_new_tokens=NEW, stop_at_end_of_turn=False, kl_coef=0.1))
    shard = ShardingContext(make_mesh(mesh_cfg, jax.devices()[:n_devices]), rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    objective = TokenReward(model, cfg.objective, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=10, objective=objective)
    extras = build_extras(objective.extras(), shard)
    batch = place_batch(objective, shard, _prompts(), setup.state)
    step = compile_train_step(objective, setup, shard.batch_shardings(batch), 1, extras.shardings)
    host_batch, start = jax.device_get((batch, setup.state.params))  # copied out: the step donates the state
    state, metrics = step(setup.state, batch, extras.values)
    return host_batch, jax.device_get(metrics), (start, jax.device_get(state.params)), batch


# ~60 s on 2 cores (two rollouts and two step compiles). The default suite covers the sharded
# step with a frozen reference extra in
# tests/train/test_extras_step.py::test_sharded_step_with_extras_matches_single_device[fsdp],
# and the GRPO step itself in tests/objectives/test_grpo.py::test_a_reward_for_one_token_raises_its_probability.
@pytest.mark.slow
def test_grpo_step_on_eight_devices_equals_one_device():
    single_batch, single_m, (start, single_p), _ = _one_step(MeshConfig(preset="dp"), 1)
    batch, m, (_, params), placed = _one_step(MeshConfig(preset="fsdp"), 8)
    assert tuple(placed["inputs"].sharding.spec)[0] == ("data", "fsdp")  # really spread over the devices
    assert len(placed["inputs"].sharding.device_set) == 8
    # the same rollout: tokens and rewards exactly, log-probs and advantages to rounding
    for k in ("inputs", "targets", "loss_mask", "rewards"):
        np.testing.assert_array_equal(batch[k], single_batch[k], err_msg=k)
    np.testing.assert_allclose(batch["old_logprobs"], single_batch["old_logprobs"], atol=1e-5)
    np.testing.assert_allclose(batch["advantages"], single_batch["advantages"], rtol=1e-5, atol=1e-6)
    assert np.asarray(batch["rewards"]).std() > 0  # advantages are not all zero: the update does something
    # one update: equal loss and metrics, close parameters
    assert set(m) == set(single_m)
    for k in ("loss", "reward", "kl", "clip_frac", "ratio", "response_len", "entropy"):
        assert float(m[k]) == pytest.approx(float(single_m[k]), rel=1e-5, abs=1e-7), k
    moved = 0.0
    for path, a in flat_paths(params).items():
        b = flat_paths(single_p)[path]
        # Adam divides each gradient entry by its own scale, so an entry whose gradient is tiny moves by
        # up to lr = 1e-2 on a float32 rounding difference of its reduction order (8 devices vs 1):
        # seen 5.1e-5 on one of 16,384 entries; 2e-4 is still 1/50 of one full step
        np.testing.assert_allclose(a, b, atol=2e-4, err_msg=path)
        moved = max(moved, float(np.abs(b - flat_paths(start)[path]).max()))
    assert moved > 1e-3  # the update changed the weights, so "close" compares two real updates
