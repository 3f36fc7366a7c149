"""LoRA dropout: drops only the adapter's input, only in training, unbiased, and travels with
the adapter (frozen rate leaf)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import ConfigError, PeftConfig, load_config
from jaxlearn.models.layers import adapted_linear
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.filter import flat_paths, merge_params, unflatten_paths

from helpers import random_batch
from test_peft_invariants import _attached, _forward, _perturb, _setup


def _leaves(rate, d_in=64, d_out=32, r=8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (16, d_in)), jax.random.normal(k2, (d_in, d_out)) * 0.1,
            {"lora_a": jax.random.normal(k3, (d_in, r)) * 0.3, "lora_b": jnp.ones((r, d_out)) * 0.2,
             "lora_scale": jnp.float32(2.0), "lora_dropout": jnp.float32(rate)})


def test_dropout_only_with_rng_and_only_on_the_adapter_path():
    x, w, ad = _leaves(0.5)
    plain = adapted_linear(x, w, ad)  # no rng: deterministic, as in evaluation and generation
    np.testing.assert_array_equal(plain, adapted_linear(x, w, {k: v for k, v in ad.items() if k != "lora_dropout"}))
    dropped = adapted_linear(x, w, ad, dropout_rng=jax.random.key(1))
    assert not np.allclose(dropped, plain)
    # The base path x W is never dropped: with B = 0 the output is exactly x W whatever the mask.
    zero_b = {**ad, "lora_b": jnp.zeros_like(ad["lora_b"])}
    np.testing.assert_array_equal(adapted_linear(x, w, zero_b, dropout_rng=jax.random.key(1)), x @ w)


def test_dropout_is_unbiased_and_drops_at_the_rate():
    x, w, ad = _leaves(0.3)
    base = x @ w
    delta = adapted_linear(x, w, ad) - base
    keys = jax.random.split(jax.random.key(7), 4000)
    samples = jax.vmap(lambda k: adapted_linear(x, w, ad, dropout_rng=k) - base)(keys)
    # Inverted dropout: the mean over masks is the undropped delta (Monte-Carlo error ~ 1/sqrt(n)).
    err = np.abs(np.mean(samples, 0) - delta).max() / np.abs(delta).max()
    assert err < 0.05, err
    # With W = 0, A = B = I and scale 1 the layer returns LoRA's (dropped) input itself: about
    # 30% of it is exactly zero and the rest is x / 0.7 (inverted dropout).
    eye = jnp.eye(x.shape[1])
    ident = {"lora_a": eye, "lora_b": eye, "lora_scale": jnp.float32(1.0), "lora_dropout": jnp.float32(0.3)}
    seen = jax.vmap(lambda k: adapted_linear(x, jnp.zeros_like(eye), ident, dropout_rng=k))(keys[:200])
    dropped = np.asarray(seen == 0)
    assert abs(float(dropped.mean()) - 0.3) < 0.01
    kept = np.broadcast_to(np.asarray(x), seen.shape)[~dropped]
    np.testing.assert_allclose(np.asarray(seen)[~dropped], kept / 0.7, rtol=1e-5)


def test_model_dropout_leaf_is_frozen_identity_at_attach_and_deterministic_in_eval():
    model, base, params, _, _ = _attached("lora", True, dropout=0.2)
    rates = {k: v for k, v in flat_paths(params).items() if k.endswith("lora_dropout")}
    assert rates and all(np.all(np.asarray(v) == np.float32(0.2)) for v in rates.values())
    batch = random_batch(2, 16, 128, n_docs=2)
    np.testing.assert_array_equal(_forward(model, base, batch), _forward(model, params, batch))
    trained = _perturb(params)
    no_drop = unflatten_paths({k: v for k, v in flat_paths(trained).items() if not k.endswith("lora_dropout")})
    objective = jax.jit(make_objective(model, load_config(None).objective))
    eval_loss = float(objective(trained, batch, None)[0])
    assert eval_loss == float(objective(no_drop, batch, None)[0])  # no rng: dropout is off
    train_a, train_b = (float(objective(trained, batch, jax.random.key(i))[0]) for i in (0, 1))
    assert train_a != train_b and eval_loss not in (train_a, train_b)
    assert train_a == float(objective(trained, batch, jax.random.key(0))[0])  # same rng, same masks
    # Every adapted projection draws its own mask: no two of them get the same dropout key
    # (on the unscanned model, where each projection is a call of its own; the keys are returned
    # from the jitted forward).
    unscanned, _, p2, _, _ = _attached("lora", False, dropout=0.2)
    ks = []

    def spy(x, kernel, adapters, n_in=1, dropout_rng=None):
        if dropout_rng is not None:
            ks.append(jax.random.key_data(dropout_rng))
        return real(x, kernel, adapters, n_in)

    def keys_used(p):
        ks.clear()
        unscanned.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"],
                        rngs={"dropout": jax.random.key(0)})
        return list(ks)

    import jaxlearn.models.layers as layers
    real = layers.adapted_linear
    layers.adapted_linear = spy
    try:
        keys = jax.jit(keys_used)(p2)
    finally:
        layers.adapted_linear = real
    datas = {tuple(np.asarray(k).ravel()) for k in keys}
    assert len(keys) == 7 * 2 and len(datas) == len(keys)  # one distinct key per adapted projection (7 a layer)


def test_train_step_uses_dropout_and_rate_is_frozen():
    _, _, setup, step = _setup(PeftConfig(type="lora", rank=4, dropout=0.5))
    assert not any(p.endswith("lora_dropout") for p in flat_paths(setup.state.trainable))
    assert any(p.endswith("lora_dropout") for p in flat_paths(setup.state.frozen))
    frozen_before = jax.tree.map(np.asarray, setup.state.frozen)
    state = setup.state
    batch = random_batch(4, 16, 128, n_docs=2)
    # A copy of the state with another rng: other dropout masks. At B = 0 the adapters add
    # nothing, dropped or not, so the loss is the same; the gradient (B's, through LoRA's dropped
    # input x A) is not.
    twin = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state)
    twin = twin.replace(rng=jax.device_put(twin.rng ^ np.uint32(1), state.rng.sharding))
    _, other = step(twin, batch, {})
    losses = []
    for i in range(3):
        state, m = step(state, batch, {})
        losses.append(float(m["loss"]))
        if i == 0:
            assert float(m["loss"]) == float(other["loss"])
            assert float(m["grad_norm"]) != pytest.approx(float(other["grad_norm"]), rel=1e-3)
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, state.frozen))
    assert np.all(np.isfinite(losses))
    full = merge_params(state.trainable, state.frozen)
    assert np.any(np.asarray(flat_paths(full)["layers/attn/q/lora_b"]) != 0)


@pytest.mark.parametrize("bad", ["1.0", "-0.1"])
def test_bad_dropout_is_refused(bad):
    with pytest.raises(ConfigError, match=r"peft.dropout: .* \[0, 1\)"):
        load_config(None, ["peft.type=lora", f"peft.dropout={bad}"])


def test_dropout_on_other_methods_is_refused():
    with pytest.raises(ConfigError, match="lora/dora only"):
        PeftConfig(type="ia3", dropout=0.1)
