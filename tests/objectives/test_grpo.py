"""GRPO through the real objective and the real compiled step on a tiny model: at the first step
(policy == reference == behaviour) the ratio is 1 and the KL 0; the rollout's behaviour
log-probs equal a teacher-forced forward over the sampled tokens; and a reward that prefers one
token raises that token's probability within a few steps (a learning test, not a shape check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, ConfigError, MeshConfig, OptimConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.forward import token_logprobs
from jaxlearn.objectives.registry import build_objective, objective_class
from jaxlearn.objectives.rl import GRPO, GRPOConfig
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

TARGET = 17  # the token the reward prefers
PROMPTS, PROMPT_LEN, GROUP, NEW = 8, 8, 8, 6


class TokenReward(GRPO):
    """GRPO with a reward read from tokens: the share of response tokens equal to TARGET."""

    def score(self, prompt_bp, response_bn, mask_bn, done_b, record_index_b):
        hits = ((response_bn == TARGET) * mask_bn).sum(1)
        return (hits / np.maximum(mask_bn.sum(1), 1)).astype(np.float32)


def prompt_batch(seed=0):
    rs = np.random.RandomState(seed)
    return {"inputs": rs.randint(1, 128, (PROMPTS, PROMPT_LEN)).astype(np.int32),
            "segment_ids": np.ones((PROMPTS, PROMPT_LEN), np.int32),
            "positions": np.tile(np.arange(PROMPT_LEN, dtype=np.int32), (PROMPTS, 1)),
            "record_index": np.arange(PROMPTS, dtype=np.int32)}


def _setup(lr=2e-2, **kw):
    ocfg = GRPOConfig(group_size=GROUP, max_new_tokens=NEW, stop_at_end_of_turn=False, **kw)
    cfg = Config(model=tiny_model_config(), mesh=MeshConfig(preset="dp"), objective=ocfg,
                 optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0))
    shard = ShardingContext(make_mesh(cfg.mesh, jax.devices()[:1]), rules_for(cfg.mesh))
    model = Transformer(cfg.model, shard)
    objective = TokenReward(model, cfg.objective, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=20, objective=objective)
    return cfg, shard, objective, setup, build_extras(objective.extras(), shard)


def test_registered_and_checked():
    assert objective_class("grpo") is GRPO
    with pytest.raises(ConfigError, match="rewards"):
        build_objective(None, Config(objective=GRPOConfig(rewards=("nope",))))
    with pytest.raises(ConfigError, match="reward_weights"):
        GRPOConfig(rewards=("accept", "format"), reward_weights=(1.0,))
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(advantage="rloo", group_size=1)


@pytest.fixture(scope="module")
def first():
    cfg, shard, objective, setup, extras = _setup()
    batch = place_batch(objective, shard, prompt_batch(), setup.state)
    return cfg, shard, objective, setup, extras, batch


def test_rollout_batch_shapes_and_groups(first):
    _, _, objective, _, _, batch = first
    rows, t = PROMPTS * GROUP, PROMPT_LEN + NEW
    want = objective.abstract_batch(PROMPTS, PROMPT_LEN)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert batch["inputs"].shape == (rows, t)
    # each prompt is repeated GROUP times as consecutive rows, and advantages are centred per group
    np.testing.assert_array_equal(np.asarray(batch["inputs"][:GROUP, :PROMPT_LEN]),
                                  np.repeat(prompt_batch()["inputs"][:1], GROUP, 0))
    adv = np.asarray(batch["advantages"]).reshape(PROMPTS, GROUP)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-5)


def test_rollout_logprobs_equal_a_teacher_forced_forward(first):
    _, _, objective, setup, _, batch = first
    mask = np.asarray(batch["loss_mask"])
    assert mask.sum() == PROMPTS * GROUP * NEW  # no stop tokens: every response is NEW tokens
    forced = np.asarray(jax.jit(lambda p, b: token_logprobs(objective.model, p, b))(setup.state.params, batch))
    old = np.asarray(batch["old_logprobs"])
    np.testing.assert_allclose(forced * mask, old * mask, atol=2e-4)
    assert np.all(old[mask > 0] < 0) and np.all(old[mask == 0] == 0)


def test_first_step_ratio_one_kl_zero_through_the_objective(first):
    _, _, objective, setup, extras, batch = first
    loss, rows, m = jax.jit(objective)(setup.state.params, batch, None, extras.values)
    rows = float(rows)
    assert rows == PROMPTS * GROUP
    assert float(m["ratio"]) / rows == pytest.approx(1.0, abs=1e-4)
    assert float(m["kl"]) / rows == pytest.approx(0.0, abs=1e-5)
    assert float(m["clip_frac"]) == 0.0
    # at ratio 1 the surrogate is -sum(adv * mask) / max_new_tokens; the group-centred
    # advantages make it ~0, and the reward metric is the rollout's mean reward
    want = -np.sum(np.asarray(batch["advantages"])[:, None] * np.asarray(batch["loss_mask"])) / NEW
    assert float(loss) == pytest.approx(want, abs=1e-3)
    assert float(m["reward"]) == pytest.approx(float(np.sum(batch["rewards"])), rel=1e-6)


def _target_prob(objective, params, prompts):
    """Teacher-forced p(TARGET) at the first response position, mean over prompts."""
    b = {k: jnp.asarray(v) for k, v in prompts.items()}
    logits = objective.model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])[0]
    return float(jnp.mean(jax.nn.softmax(logits[:, -1].astype(jnp.float32))[:, TARGET]))


def test_a_reward_for_one_token_raises_its_probability():
    cfg, shard, objective, setup, extras = _setup(kl_coef=0.01)
    state = setup.state
    held_out = prompt_batch(seed=99)
    before = _target_prob(objective, state.params, held_out)
    batch = place_batch(objective, shard, prompt_batch(0), state)
    shardings = shard.batch_shardings(batch)
    step = compile_train_step(objective, setup, shardings, 1, extras.shardings)
    metrics = []
    for i in range(5):
        if i:
            batch = place_batch(objective, shard, prompt_batch(i % 4), state, shardings)
        state, m = step(state, batch, extras.values)
        metrics.append(jax.device_get(m))
    after = _target_prob(objective, state.params, held_out)
    assert abs(float(metrics[0]["ratio"]) - 1.0) < 1e-4 and abs(float(metrics[0]["kl"])) < 1e-5
    rewards = [float(m["reward"]) for m in metrics]
    print(f"p(target) {before:.4f} -> {after:.4f}; reward per step {np.round(rewards, 3).tolist()}; "
          f"kl {float(metrics[-1]['kl']):.4f}")
    assert after > 3 * before, (before, after)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])
    assert float(metrics[-1]["kl"]) > 0
    assert step._cache_size() == 1
