"""Knowledge distillation (`objective.type: distill`): the losses' identities (zero at
student == teacher, T^2, JSD's limits, the top-k bound), the chunked head, feature distillation
through the layer states, a refused vocabulary mismatch, on-policy rows, and train steps through
the real compiled step with a teacher of another depth and width, sharded == unsharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import Config, ConfigError, DataConfig, MeshConfig, OptimConfig, load_config
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives import distill_losses as L
from jaxlearn.objectives.distill import DistillConfig, layer_pairs, layer_states
from jaxlearn.objectives.forward import hidden_states
from jaxlearn.objectives.registry import build_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def _logits(n=6, v=64, seed=0, scale=3.0):
    rs = np.random.RandomState(seed)
    return jnp.asarray(rs.randn(n, v) * scale, jnp.float32), jnp.asarray(rs.randn(n, v) * scale, jnp.float32)


def _np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- the pure losses ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pure_losses_zero_at_equal_logits_and_positive_otherwise(kind):
    z_s, z_t = _logits()
    assert float(jnp.max(jnp.abs(L.token_divergence(z_t, z_t, kind, 2.0)))) == 0.0
    assert float(jnp.min(L.token_divergence(z_s, z_t, kind, 2.0))) > 1e-3


def test_temperature_and_its_square():
    """Forward/reverse KL at T = 3 equal 9 x the KL of the tempered softmaxes (float64 numpy)."""
    z_s, z_t = _logits()
    p, q = _np_softmax(np.asarray(z_t) / 3.0), _np_softmax(np.asarray(z_s) / 3.0)
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "forward_kl", 3.0), 9.0 * _np_kl(p, q), rtol=1e-4)
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "reverse_kl", 3.0), 9.0 * _np_kl(q, p), rtol=1e-4)
    # the factor is what keeps the soft-target gradient's scale: without it, T = 3 would be far smaller
    g1 = jax.grad(lambda z: jnp.sum(L.token_divergence(z, z_t, "forward_kl", 1.0)))(z_s)
    g3 = jax.grad(lambda z: jnp.sum(L.token_divergence(z, z_t, "forward_kl", 3.0)))(z_s)
    assert 0.2 < float(jnp.linalg.norm(g3) / jnp.linalg.norm(g1)) < 5.0


def test_jsd_reduces_to_the_kls_at_its_extreme_betas():
    z_s, z_t = _logits()
    fwd = L.token_divergence(z_s, z_t, "forward_kl", 2.0)
    rev = L.token_divergence(z_s, z_t, "reverse_kl", 2.0)
    # the mixture formula itself (0 < beta < 1) tends to them; the endpoints equal them
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "jsd", 2.0, beta=1e-4), fwd, rtol=1e-2)
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "jsd", 2.0, beta=1 - 1e-4), rev, rtol=1e-2)
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "jsd", 2.0, beta=0.0), fwd, rtol=1e-6)
    np.testing.assert_allclose(L.token_divergence(z_s, z_t, "jsd", 2.0, beta=1.0), rev, rtol=1e-6)
    # in between: the generalized JSD / (beta (1 - beta)), checked in float64 numpy
    p, q = _np_softmax(np.asarray(z_t) / 2.0), _np_softmax(np.asarray(z_s) / 2.0)
    b = 0.3
    m = b * p + (1 - b) * q
    want = 4.0 * (b * _np_kl(p, m) + (1 - b) * _np_kl(q, m)) / (b * (1 - b))
    got = L.token_divergence(z_s, z_t, "jsd", 2.0, beta=b)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.all(np.asarray(got) < np.asarray(fwd)) or np.all(np.asarray(got) < np.asarray(rev))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_is_exact_at_vocab_and_its_error_shrinks_with_k(kind):
    z_s, z_t = _logits(n=8, v=64, seed=1)
    ks = (1, 2, 4, 8, 16, 32, 64)

    @jax.jit  # one compile for every k
    def run(z_s, z_t):
        exact = L.token_divergence(z_s, z_t, kind, 2.0)
        approx = jnp.stack([L.topk_token_divergence(z_s, L.teacher_topk(z_t, k, 2.0), kind, 2.0) for k in ks])
        # the student's gradient at k = V must be the exact one (the empty tail adds nothing, no NaN)
        g = jax.grad(lambda z: jnp.sum(L.topk_token_divergence(z, L.teacher_topk(z_t, 64, 2.0), kind, 2.0)))(z_s)
        g_exact = jax.grad(lambda z: jnp.sum(L.token_divergence(z, z_t, kind, 2.0)))(z_s)
        return exact[None] - approx, g, g_exact

    errs, g, g_exact = map(np.asarray, run(z_s, z_t))  # errs [k, N]
    assert np.all(errs > -1e-5)  # a lower bound
    assert np.all(np.diff(errs, axis=0) < 1e-5)  # never worse as k grows, per token
    assert np.all(errs[0] > 1e-3)  # k = 1 really is an approximation
    np.testing.assert_allclose(errs[-1], 0.0, atol=1e-5)  # k = V: exact
    np.testing.assert_allclose(g, g_exact, atol=1e-5)


def test_topk_buckets_are_distributions():
    z_s, z_t = _logits()
    top = L.teacher_topk(z_t, 5, 1.5)
    total = np.exp(np.asarray(top.logp)).sum(-1) + np.exp(np.asarray(top.tail_logp))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(L.student_buckets(z_s, top.ids, 1.5))).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.diff(np.asarray(top.logp), axis=-1) <= 0)


# ---- the objective on the tiny model ------------------------------------------------------


def _objective(ocfg, model_cfg=None, mesh_cfg=MeshConfig(preset="dp"), n_devices=1, seq_len=32):
    cfg = Config(model=model_cfg or tiny_model_config(), mesh=mesh_cfg, objective=ocfg,
                 data=DataConfig(seq_len=seq_len), optim=OptimConfig(lr=3e-3, warmup_steps=0))
    shard = ShardingContext(make_mesh(mesh_cfg, jax.devices()[:n_devices]), rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    return cfg, shard, objective


def _batch(seed=0, b=4, t=32):
    out = {k: jnp.asarray(v) for k, v in random_batch(b, t, 128, seed=seed, n_docs=2).items()}
    out["loss_mask"] = out["loss_mask"].at[0, :5].set(0.0)
    return out


SAME_TEACHER = dict(teacher=tiny_model_config(), teacher_seed=0)  # the student's own initial weights


@pytest.fixture(scope="module")
def teacher_params():
    _, shard, objective = _objective(DistillConfig(**SAME_TEACHER))
    return build_extras(objective.extras(), shard).values["teacher"]


def _jit(objective):
    """The objective under jit (one compile per objective, reused for every call of a test)."""
    return jax.jit(lambda p, b, e: objective(p, b, None, e))


@pytest.mark.parametrize("opts", [dict(kind="forward_kl"), dict(kind="reverse_kl", loss_chunk=24),
                                  dict(kind="jsd", beta=0.3, top_k=16, temperature=2.0),
                                  dict(kind="forward_kl", feature_weight=1.0, loss_chunk=40)],
                         ids=["fkl", "rkl-chunked", "jsd-topk", "features"])
def test_zero_when_student_is_the_teacher(opts, teacher_params):
    _, _, objective = _objective(DistillConfig(**SAME_TEACHER, ce_weight=0.0, **opts))
    params = dict(teacher_params)
    if opts.get("feature_weight"):
        params["heads"] = objective.init_heads(jax.random.key(0))
    batch, fn = _batch(), _jit(objective)
    loss, n, m = fn(params, batch, {"teacher": teacher_params})
    assert float(m["kd"]) == 0.0 and float(n) == float(batch["loss_mask"].sum())
    if opts.get("feature_weight"):
        assert abs(float(m["feature"])) < 1e-9
        assert abs(float(loss)) < 1e-9
    else:
        assert float(loss) == 0.0
    # another student: every term is positive (the test can fail)
    other = jax.tree.map(lambda a: a * 1.1, teacher_params)
    if "heads" in params:
        other["heads"] = params["heads"]
    _, _, m2 = fn(other, batch, {"teacher": teacher_params})
    assert float(m2["kd"]) > 1e-3 and (not opts.get("feature_weight") or float(m2["feature"]) > 1e-4)


def test_chunked_equals_whole_with_a_deeper_teacher():
    """loss_chunk (not dividing the 128 tokens) gives the loss and gradients of the whole logits."""
    teacher = tiny_model_config(n_layers=3, d_model=96, d_ff=160)
    grads = {}
    for chunk in (0, 48):
        _, shard, objective = _objective(DistillConfig(teacher=teacher, teacher_seed=5, ce_weight=0.5, loss_chunk=chunk,
                                                       kind="jsd", temperature=2.0))
        ext = build_extras(objective.extras(), shard).values
        params = build_extras({"s": dataclasses.replace(objective.extras()["teacher"], model=tiny_model_config(),
                                                        seed=1)}, shard).values["s"]
        fn = jax.jit(jax.value_and_grad(lambda p, b, e: objective(p, b, None, e)[0]))
        grads[chunk] = fn(params, _batch(), ext)
    np.testing.assert_allclose(grads[0][0], grads[48][0], rtol=1e-5)
    for path, g in flat_paths(grads[0][1]).items():
        np.testing.assert_allclose(g, flat_paths(grads[48][1])[path], atol=1e-6, rtol=1e-4, err_msg=path)


def test_layer_states_are_the_layers_residual_streams(teacher_params):
    """Segmented forward: the final state equals the model's own hidden states, and the state
    after layer 0, through the final norm, equals a 1-layer model made of layer 0."""
    _, _, objective = _objective(DistillConfig(**SAME_TEACHER))
    model, batch = objective.model, _batch()
    h, states = jax.jit(lambda p, b: layer_states(model, p, b, (0,)))(teacher_params, batch)
    np.testing.assert_allclose(h, jax.jit(lambda p, b: hidden_states(model, p, b))(teacher_params, batch), atol=1e-6)
    one = Transformer(dataclasses.replace(model.cfg, n_layers=1))
    p1 = {**teacher_params, "layers": jax.tree.map(lambda a: a[:1], teacher_params["layers"])}
    h1 = jax.jit(lambda p, b: hidden_states(one, p, b))(p1, batch)
    normed = one.apply({"params": p1}, states[0], method=lambda m, x: m.final_norm(x))
    np.testing.assert_allclose(normed, h1, atol=1e-6)
    assert layer_pairs(DistillConfig(), 2, 6) == ((0, 2), (1, 5))
    with pytest.raises(ConfigError, match="feature_layers"):
        layer_pairs(DistillConfig(feature_layers=((0, 6),)), 2, 6)


def test_vocabulary_mismatch_is_refused():
    with pytest.raises(ConfigError, match=r"objective\.teacher\.vocab_size=256 differs from model\.vocab_size=128"):
        _objective(DistillConfig(teacher=tiny_model_config(vocab_size=256)))
    # the same from a recipe's typed block (the teacher's model block is checked like `model:`)
    cfg = load_config(None, ["objective.type=distill", "objective.teacher.vocab_size=300", "model.vocab_size=256",
                             "objective.kind=jsd"])
    assert cfg.objective.teacher.vocab_size == 300 and cfg.objective.kind == "jsd"
    with pytest.raises(ConfigError, match="teacher.vocab_size=300"):
        build_objective(Transformer(cfg.model), cfg)
    with pytest.raises(ConfigError, match="objective.kind"):
        load_config(None, ["objective.type=distill", "objective.kind=kl"])
    with pytest.raises(ConfigError, match="objective.temperature"):
        DistillConfig(temperature=0.0)


def test_on_policy_rows_are_the_students_samples(teacher_params):
    """`prepare` swaps the first rows for student continuations of their first tokens (same
    shapes; the hard labels skip them); the offline rows are untouched."""
    _, shard, objective = _objective(DistillConfig(**SAME_TEACHER, on_policy=0.5, prompt_len=8, ce_weight=1.0))

    class State:
        step = jnp.int32(0)
        params = teacher_params

    batch = _batch(b=4, t=32)
    out = objective.prepare(batch, State)
    assert {k: v.shape for k, v in out.items()} == {**{k: v.shape for k, v in batch.items()}, "offline": (4,)}
    np.testing.assert_array_equal(out["offline"], [0, 0, 1, 1])
    np.testing.assert_array_equal(out["inputs"][2:], batch["inputs"][2:])
    np.testing.assert_array_equal(out["inputs"][:2, :8], batch["inputs"][:2, :8])
    assert not np.array_equal(out["inputs"][:2, 8:], batch["inputs"][:2, 8:])
    assert float(out["loss_mask"][:2, :7].sum()) == 0.0 and float(out["loss_mask"][:2, 7:].sum()) > 0
    fn = _jit(objective)
    _, _, m = fn(teacher_params, out, {"teacher": teacher_params})
    assert float(m["kd"]) == 0.0  # the teacher is the student: its own samples cost nothing
    want_ce = float(fn(teacher_params, {**out, "loss_mask": out["loss_mask"] * out["offline"][:, None]},
                       {"teacher": teacher_params})[2]["ce"])
    np.testing.assert_allclose(float(m["ce"]), want_ce, rtol=1e-6)


# ---- the real compiled step: sharded == unsharded ------------------------------------------

STEPS = 3
# a teacher with larger initial weights: sharper next-token distributions than the student's
DEEPER = DistillConfig(teacher=tiny_model_config(n_layers=3, d_model=96, d_ff=160, init_std=0.2), teacher_seed=11,
                       kind="forward_kl", temperature=2.0, ce_weight=0.5, feature_weight=0.5, loss_chunk=40)


def _train(mesh_cfg, n_devices):
    cfg, shard, objective = _objective(DEEPER, mesh_cfg=mesh_cfg, n_devices=n_devices)
    setup = build_state(objective.model, cfg, shard.mesh, shard.rules, total_steps=10, objective=objective)
    extras = build_extras(objective.extras(), shard)
    state = setup.state
    first = place_batch(objective, shard, random_batch(8, 32, 128, seed=0, n_docs=2), state)
    step = compile_train_step(objective, setup, shard.batch_shardings(first), 1, extras.shardings)
    metrics = []
    for i in range(STEPS):
        batch = first if i == 0 else place_batch(objective, shard, random_batch(8, 32, 128, seed=0, n_docs=2), state)
        state, m = step(state, batch, extras.values)
        metrics.append(jax.device_get(m))
    return state, metrics, extras


@pytest.fixture(scope="module")
def single():
    return _train(MeshConfig(preset="dp"), 1)


def test_train_steps_with_a_teacher_of_another_depth_and_width(single):
    state, metrics, extras = single
    assert extras.values["teacher"]["layers"]["attn"]["q"]["kernel"].shape[:2] == (3, 96)
    assert state.trainable["layers"]["attn"]["q"]["kernel"].shape[:2] == (2, 64)
    assert state.trainable["heads"]["feature_proj"]["kernel"].shape == (2, 64, 96)  # a trained head
    assert set(metrics[0]) >= {"loss", "kd", "ce", "feature"}
    assert metrics[-1]["kd"] < metrics[0]["kd"] and metrics[-1]["loss"] < metrics[0]["loss"]


def test_sharded_step_matches_single_device(single):
    state, metrics, extras = _train(MeshConfig(preset="fsdp"), 8)
    for key in ("loss", "kd", "ce", "feature"):
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in single[1]], rtol=1e-5, err_msg=key)
    want = flat_paths(jax.device_get(single[0].params))
    # Adam's g / sqrt(v) turns reduction-order differences of a near-zero gradient into an
    # update-sized difference for a rare weight: the tolerance is a tenth of one step's update (lr)
    for path, a in flat_paths(jax.device_get(state.params)).items():
        np.testing.assert_allclose(a, want[path], atol=3e-4, err_msg=path)
    assert np.mean([np.max(np.abs(a - want[p])) for p, a in flat_paths(jax.device_get(state.params)).items()]) < 5e-5
    q = extras.values["teacher"]["layers"]["attn"]["q"]["kernel"]
    assert tuple(q.sharding.spec)[:2] == (None, "fsdp")  # the teacher shards like the student
