"""`objective.kl_to_base` of the LM/SFT objective (issue 16): the loss adds kl_to_base x the sum
over scored tokens of KL(policy || base), exact over the vocabulary. The base is the reference
policy: with LoRA the policy's own base weights with adapters off (no copy), with full
fine-tuning a frozen copy of the start. Checked: the term is exactly 0 at step 0 with adapters at
identity, it grows as LoRA trains, a weighted run stays closer to the base than an unweighted one,
the chunked head gives the same values and gradients, and the default (0) is the plain LM loss
(same program, same bits, no reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, ConfigError, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer, plain_lm_head
from jaxlearn.objectives.chunked_loss import chunked_head_loss
from jaxlearn.objectives.forward import hidden_states, logits, model_params, token_cross_entropy
from jaxlearn.objectives.lm import LMConfig, LMObjective, token_kl
from jaxlearn.objectives.registry import build_objective
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

LORA = PeftConfig(type="lora", rank=4)
# 2 x 16 tokens: below `augmented_wins`'s threshold for the tiny model, every adapted projection
# is x W + (x A)(s B), which adds exact zeros while B = 0, so policy and base logits are the same
# bits. (From ~60 tokens on, the LoRA GEMM is x [A | W + A sB], whose float32 sums XLA may order
# differently from x W: the KL at step 0 is then ~1e-9 per token, not 0.)
B, T = 2, 16


def _setup(peft: PeftConfig, objective: LMConfig, lr: float = 1e-2):
    mc = MeshConfig(preset="dp")
    cfg = Config(model=tiny_model_config(), mesh=mc, peft=peft, objective=objective,
                 optim=OptimConfig(lr=lr, warmup_steps=0))
    shard = ShardingContext(make_mesh(mc, jax.devices()[:1]), rules_for(mc))
    model = Transformer(cfg.model, shard)
    obj = build_objective(model, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=100, objective=obj)
    return obj, shard, setup, build_extras(obj.extras(), shard)


def _train(peft: PeftConfig, weight: float, steps: int):
    """(per-step metrics, final state, start params, objective, extras) of `steps` steps that
    alternate between two fixed batches."""
    obj, shard, setup, extras = _setup(peft, LMConfig(kl_to_base=weight))
    state = setup.state
    start = jax.device_get(state.params)
    batches = [place_batch(obj, shard, random_batch(B, T, 128, seed=s), state) for s in (0, 1)]
    step = compile_train_step(obj, setup, shard.batch_shardings(batches[0]), 1, extras.shardings)
    metrics = []
    for i in range(steps):
        state, m = step(state, batches[i % 2], extras.values)
        metrics.append(jax.device_get(m))
    return metrics, state, start, obj, extras


def _held_out():
    return {k: jnp.asarray(v) for k, v in random_batch(4, 32, 128, seed=99).items()}


def test_kl_to_base_must_not_be_negative():
    for bad in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="kl_to_base"):
            LMConfig(kl_to_base=bad)


@pytest.fixture(scope="module")
def lora_runs():
    """12 LoRA steps without and with a strong KL weight, on the same two batches."""
    return {w: _train(LORA, w, steps=12) for w in (0.0, 50.0)}


def test_kl_to_base_is_exactly_zero_at_step_0_with_adapters_at_identity(lora_runs):
    metrics, _, _, obj, extras = lora_runs[50.0]
    assert extras.values == {}  # LoRA: the base is the policy's own frozen weights, no copy
    assert float(metrics[0]["kl_base"]) == 0.0
    assert float(metrics[0]["loss"]) == float(metrics[0]["ce"])  # nothing added at identity
    assert float(metrics[-1]["kl_base"]) > 1e-3  # the adapters moved the policy away from the base


def test_weighted_run_stays_closer_to_the_base(lora_runs):
    measure = jax.jit(lambda obj, p, b: obj(p, b, None, {}), static_argnums=0)
    obj = lora_runs[50.0][3]
    held = _held_out()
    kl = {}
    for w, (_, state, _, _, _) in lora_runs.items():
        _, n, sums = measure(obj, state.params, held)
        kl[w] = float(sums["kl_base"] / n)
    # measured: ~0.024 nats/token unweighted, ~0.005 with weight 50
    assert kl[0.0] > 5e-3, kl
    assert kl[50.0] < 0.5 * kl[0.0], kl


def test_full_finetuning_reference_is_the_frozen_start_copy():
    metrics, state, start, obj, extras = _train(PeftConfig(), 0.5, steps=3)
    assert set(extras.values) == {"reference"}
    ref = flat_paths(jax.device_get(extras.values["reference"]))
    for p, a in flat_paths(start).items():  # bit-identical to the policy's first weights, and never moved
        np.testing.assert_array_equal(a, ref[p], err_msg=p)
    assert float(metrics[0]["kl_base"]) == 0.0
    assert float(metrics[-1]["kl_base"]) > 1e-4
    assert not np.array_equal(flat_paths(jax.device_get(state.params))["layers/attn/q/kernel"],
                              ref["layers/attn/q/kernel"])  # the policy trained
    # the term is the KL to the *start*, computed here by hand from the two models' logits
    held = _held_out()
    model = obj.model
    _, n, sums = jax.jit(lambda p, b, e: obj(p, b, None, e))(state.params, held, extras.values)
    by_hand = jax.jit(lambda p, p0, b: jnp.sum(token_kl(logits(model, p, b), logits(model, p0, b))
                                               * b["loss_mask"]))(state.params, start, held)
    np.testing.assert_allclose(float(sums["kl_base"]), float(by_hand), rtol=1e-5)
    assert float(by_hand) > 0


def test_chunked_head_gives_the_same_kl_and_gradients():
    obj_whole, _, setup, _ = _setup(LORA, LMConfig(kl_to_base=0.5))
    # the same model and recipe, the heads run 24 tokens at a time (64 tokens: 3 chunks, 8 padded)
    obj_chunk = LMObjective(obj_whole.model, LMConfig(kl_to_base=0.5, loss_chunk=24), obj_whole.run)
    flat = flat_paths(setup.state.params)
    rs = np.random.RandomState(0)  # move the adapters off identity, so policy != base
    params = unflatten_paths({k: (v + 0.05 * rs.standard_normal(v.shape).astype(v.dtype)
                                  if k.endswith("lora_b") else v) for k, v in flat.items()})
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, 32, 128, seed=3, n_docs=2).items()}

    def run(obj):
        f = lambda p: (lambda out: (out[0], out[2]))(obj(p, batch, None, {}))  # noqa: E731
        (loss, sums), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return loss, sums, flat_paths(grads)

    (l0, s0, g0), (l1, s1, g1) = run(obj_whole), run(obj_chunk)
    assert float(s0["kl_base"]) > 1e-3
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    np.testing.assert_allclose(float(s1["kl_base"]), float(s0["kl_base"]), rtol=1e-4)
    for p in g0:
        if p.endswith(("lora_a", "lora_b")):
            np.testing.assert_allclose(g1[p], g0[p], rtol=1e-3, atol=1e-6, err_msg=p)


def _plain_lm_loss(model, loss_chunk, params, batch):
    """The LM objective's loss as it was before `kl_to_base` (z_loss 0)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    head = plain_lm_head(model.cfg, model_params(params)) if loss_chunk else None
    if head is not None:
        h = hidden_states(model, params, batch, None)
        w, transposed = head
        loss, ce = chunked_head_loss(h.reshape(-1, h.shape[-1]), w, batch["targets"].reshape(-1),
                                     mask.reshape(-1), w_transposed=transposed, chunk=loss_chunk, z_loss=0.0)
        return loss, jnp.sum(mask), {"ce": ce}
    ce, _ = token_cross_entropy(logits(model, params, batch, None), batch["targets"])
    return jnp.sum(ce * mask), jnp.sum(mask), {"ce": jnp.sum(ce * mask)}


@pytest.mark.parametrize("loss_chunk", [0, 24])
def test_default_is_the_plain_lm_loss_bit_for_bit(loss_chunk):
    obj, _, setup, extras = _setup(PeftConfig(), LMConfig(loss_chunk=loss_chunk))
    assert obj.cfg.kl_to_base == 0.0 and obj.extras() == {} and extras.values == {}  # no reference loaded
    params = setup.state.params
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, 32, 128, seed=5).items()}
    ours = lambda p, b: obj(p, b, None, {})  # noqa: E731
    plain = lambda p, b: _plain_lm_loss(obj.model, loss_chunk, p, b)  # noqa: E731
    # the same program (no extra compute) ...
    assert str(jax.make_jaxpr(ours)(params, batch)) == str(jax.make_jaxpr(plain)(params, batch))
    # ... and so the same bits
    a, b = jax.jit(ours)(params, batch), jax.jit(plain)(params, batch)
    assert set(a[2]) == {"ce"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
