"""PPO through the real objective and the real compiled step on a tiny model: at the first step
(policy == reference == behaviour) the ratio is 1 and the KL 0; the batch's per-token rewards,
advantages and returns are the shaped rewards and `rl_losses.gae` of them; the value head trains
while a frozen base (LoRA, partial freeze) does not move; and a reward that prefers one token
raises that token's probability within a few steps (a learning test, not a shape check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, ConfigError, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives import rl_losses as L
from jaxlearn.objectives.forward import token_logprobs
from jaxlearn.objectives.registry import objective_class
from jaxlearn.objectives.rl import PPO, PPOConfig
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

TARGET = 17  # the token the reward prefers
PROMPTS, PROMPT_LEN, GROUP, NEW = 8, 8, 4, 6


class TokenReward(PPO):
    """PPO with a reward read from tokens: the share of response tokens equal to TARGET."""

    def score(self, prompt_bp, response_bn, mask_bn, done_b, record_index_b):
        hits = ((response_bn == TARGET) * mask_bn).sum(1)
        return (hits / np.maximum(mask_bn.sum(1), 1)).astype(np.float32)


def prompt_batch(seed=0):
    rs = np.random.RandomState(seed)
    return {"inputs": rs.randint(1, 128, (PROMPTS, PROMPT_LEN)).astype(np.int32),
            "segment_ids": np.ones((PROMPTS, PROMPT_LEN), np.int32),
            "positions": np.tile(np.arange(PROMPT_LEN, dtype=np.int32), (PROMPTS, 1)),
            "record_index": np.arange(PROMPTS, dtype=np.int32)}


def _setup(lr=2e-2, peft=PeftConfig(), **kw):
    kw = {"group_size": GROUP, **kw}
    ocfg = PPOConfig(max_new_tokens=NEW, stop_at_end_of_turn=False, **kw)
    cfg = Config(model=tiny_model_config(), mesh=MeshConfig(preset="dp"), objective=ocfg, peft=peft,
                 optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0))
    shard = ShardingContext(make_mesh(cfg.mesh, jax.devices()[:1]), rules_for(cfg.mesh))
    model = Transformer(cfg.model, shard)
    objective = TokenReward(model, cfg.objective, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=20, objective=objective)
    return cfg, shard, objective, setup, build_extras(objective.extras(), shard)


def test_registered_and_checked():
    assert objective_class("ppo") is PPO
    with pytest.raises(ConfigError, match="ppo_epochs"):
        PPOConfig(ppo_epochs=2)
    with pytest.raises(ConfigError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ConfigError, match="reward_weights"):
        PPOConfig(rewards=("accept", "format"), reward_weights=(1.0,))


def test_first_step_ratio_one_kl_zero_and_value_head_zero():
    """Full fine-tuning: the reference is the objective's own frozen copy of the starting weights."""
    _, shard, objective, setup, extras = _setup(kl_coef=0.1)
    batch = place_batch(objective, shard, prompt_batch(), setup.state)
    want = objective.abstract_batch(PROMPTS, PROMPT_LEN)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert extras.values == {}  # the step gets no reference: prepare reads it
    mask = np.asarray(batch["loss_mask"])
    assert mask.sum() == PROMPTS * GROUP * NEW
    np.testing.assert_allclose(np.asarray(batch["kl"]), 0.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch["old_values"]), 0.0)  # a zero head at init
    # the recomputed behaviour log-probs are the sampler's up to rounding
    loss, rows, m = jax.jit(objective)(setup.state.params, batch, None, extras.values)
    rows = float(rows)
    assert rows == PROMPTS * GROUP
    assert float(m["ratio"]) / rows == pytest.approx(1.0, abs=1e-5)
    assert float(m["kl"]) / rows == pytest.approx(0.0, abs=1e-6)
    assert float(m["clip_frac"]) == 0.0
    # V = 0: no better than a constant (1 - var/var in float32: a few ulp of 1 from 0)
    assert float(m["explained_variance"]) == pytest.approx(0.0, abs=2e-5)
    # V = old V = 0: the value loss is 0.5 * returns^2, per-row means over response tokens
    ret = np.asarray(batch["returns"])
    want_vl = np.sum(np.sum(0.5 * ret ** 2 * mask, 1) / mask.sum(1))
    assert float(m["value_loss"]) == pytest.approx(want_vl, rel=1e-5)
    # at ratio 1 the surrogate is -sum(adv) and whitened advantages sum to 0
    want = (-np.sum(np.asarray(batch["advantages"])) + 0.1 * want_vl * NEW) / NEW
    assert float(loss) == pytest.approx(want, abs=1e-3)
    assert float(m["reward"]) == pytest.approx(float(np.sum(batch["rewards"])), rel=1e-6)


def test_batch_holds_shaped_rewards_and_their_gae():
    """Away from the start (a moved policy, a random value head): per-token rewards are the
    sequence reward on the last response token minus kl_coef * (log pi - log pi_ref), and the
    advantages/returns are `rl_losses.gae` of them with the rollout-time values."""
    gamma, lam, kl_coef = 0.9, 0.8, 0.3
    _, shard, objective, setup, _ = _setup(kl_coef=kl_coef, gamma=gamma, lam=lam, whiten_advantages=False)
    rs = np.random.RandomState(3)
    moved = jax.tree.map(lambda x: x + 0.05 * rs.standard_normal(x.shape).astype(x.dtype), setup.state.trainable)
    state = setup.state.replace(trainable=moved)
    batch = jax.device_get(place_batch(objective, shard, prompt_batch(1), state))
    mask = batch["loss_mask"]
    # rollout-time values: the head on the moved policy's hidden states (nonzero)
    assert np.abs(batch["old_values"][mask > 0]).min() > 0
    # an independent reference: the starting weights of a fresh build
    _, _, _, fresh, _ = _setup()
    ref_lp = np.asarray(jax.jit(lambda p, b: token_logprobs(objective.model, p, b))(fresh.state.params, batch))
    kl_bt = (batch["old_logprobs"] - ref_lp) * mask
    assert np.abs(kl_bt).sum() > 1e-2  # the leash is active
    np.testing.assert_allclose(batch["kl"], kl_bt.sum(1), rtol=1e-4, atol=1e-5)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    want_r = -kl_coef * kl_bt
    want_r[np.arange(len(last)), last] += batch["rewards"]
    np.testing.assert_allclose(batch["token_rewards"], want_r, rtol=1e-4, atol=1e-5)
    adv, ret = L.gae(jnp.asarray(batch["token_rewards"]), jnp.asarray(batch["old_values"]), jnp.asarray(mask),
                     gamma, lam)
    np.testing.assert_allclose(batch["advantages"], np.asarray(adv), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch["returns"], np.asarray(ret), rtol=1e-5, atol=1e-6)
    # and the default (whitened) advantages are the same GAE, standardised over response tokens
    # (the rollout is a function of (seed, step), so a second objective samples the same rows)
    import dataclasses

    whitening = TokenReward(objective.model, dataclasses.replace(objective.cfg, whiten_advantages=True), objective.run)
    whitened = jax.device_get(place_batch(whitening, shard, prompt_batch(1), state))
    np.testing.assert_array_equal(whitened["inputs"], batch["inputs"])
    a, n = np.asarray(adv)[mask > 0], mask.sum()
    np.testing.assert_allclose(whitened["advantages"][mask > 0], (a - a.mean()) / (a.std() + 1e-6),
                               rtol=1e-4, atol=1e-5)
    assert n == PROMPTS * GROUP * NEW


@pytest.mark.parametrize("peft", [PeftConfig(type="lora", rank=4), PeftConfig(trainable=("mlp",))],
                         ids=["lora", "partial"])
def test_value_head_trains_and_the_frozen_base_does_not(peft):
    cfg, shard, objective, setup, extras = _setup(peft=peft, lr=1e-2)
    assert "heads/value/kernel" in flat_paths(setup.state.trainable)
    frozen0 = jax.device_get(setup.state.frozen)  # copied out: the step donates the state
    head0 = np.asarray(setup.state.trainable["heads"]["value"]["kernel"])
    state = setup.state
    batch = place_batch(objective, shard, prompt_batch(0), state)
    shardings = shard.batch_shardings(batch)
    step = compile_train_step(objective, setup, shardings, 1, extras.shardings)
    for i in range(3):
        if i:
            batch = place_batch(objective, shard, prompt_batch(i), state, shardings)
        state, m = step(state, batch, extras.values)
    assert np.abs(np.asarray(state.trainable["heads"]["value"]["kernel"]) - head0).max() > 1e-4
    assert len(flat_paths(frozen0)) > 0
    for (p, a), b in zip(flat_paths(frozen0).items(), jax.tree.leaves(jax.device_get(state.frozen))):
        np.testing.assert_array_equal(a, b, err_msg=p)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["value_loss"]))


def _target_prob(objective, params, prompts):
    """Teacher-forced p(TARGET) at the first response position, mean over prompts."""
    b = {k: jnp.asarray(v) for k, v in prompts.items()}
    mp = {k: v for k, v in params.items() if k != "heads"}
    logits = objective.model.apply({"params": mp}, b["inputs"], b["positions"], b["segment_ids"])[0]
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
    assert abs(float(metrics[0]["ratio"]) - 1.0) < 1e-5 and abs(float(metrics[0]["kl"])) < 1e-6
    rewards = [float(m["reward"]) for m in metrics]
    print(f"p(target) {before:.4f} -> {after:.4f}; reward per step {np.round(rewards, 3).tolist()}; "
          f"kl {float(metrics[-1]['kl']):.4f}; explained variance "
          f"{[round(float(m['explained_variance']), 3) for m in metrics]}")
    assert after > 3 * before, (before, after)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])
    assert float(metrics[-1]["kl"]) > 0
    assert step._cache_size() == 1
