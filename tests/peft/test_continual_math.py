"""Invariants of the continual-learning math (jaxlearn/peft/continual.py): Share's projection and
reconstruction, ELLA's and O-LoRA's penalties."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.peft.continual import (ella_penalty, ella_update, lora_delta, olora_penalty, orthonormal_basis,
                                     project, reconstruct, share_decompose, share_factors,
                                     share_reconstruction_error)


def _rand(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def test_projection_of_an_adapter_in_the_span_returns_it_exactly():
    basis = orthonormal_basis(_rand(0, 2, 16, 5), 5)  # two layers: leading axes are batch axes
    a = reconstruct(basis, _rand(1, 2, 5, 3))  # columns in the span of the basis
    np.testing.assert_allclose(reconstruct(basis, project(a, basis)), a, atol=1e-5)
    np.testing.assert_allclose(jnp.swapaxes(basis, -1, -2) @ basis, jnp.broadcast_to(jnp.eye(5), (2, 5, 5)),
                               atol=1e-5)


def test_reconstruction_error_is_zero_when_k_covers_the_stacked_rank():
    a_list = [_rand(i, 3, 12, 2) for i in range(3)]  # stacked A's: rank 6
    b_list = [_rand(10 + i, 3, 2, 9) for i in range(3)]
    ua, ub, alphas, betas = share_decompose(a_list, b_list, k=6)
    assert float(share_reconstruction_error(a_list, b_list, ua, ub)) < 1e-9
    for a, b, al, be in zip(a_list, b_list, alphas, betas):
        a2, b2 = share_factors(ua, ub, al, be)
        np.testing.assert_allclose(a2, a, atol=1e-4)
        np.testing.assert_allclose(b2, b, atol=1e-4)
    # fewer directions than the stacked rank: a real (positive) error
    ua, ub, _, _ = share_decompose(a_list, b_list, k=2)
    assert float(share_reconstruction_error(a_list, b_list, ua, ub)) > 1e-3


def test_share_basis_is_completed_to_k_columns_and_keeps_the_span():
    a = _rand(3, 10, 2)
    u = orthonormal_basis(a, 5)
    assert u.shape == (10, 5)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(reconstruct(u, project(a, u)), a, atol=1e-5)


def test_ella_penalty_is_zero_on_the_first_task_and_its_gradient_zero_where_w_past_is_zero():
    a, b = _rand(0, 8, 2), _rand(1, 2, 6)
    zero = jnp.zeros((8, 6))
    assert float(ella_penalty(lora_delta(a, b, 2.0), zero)) == 0.0
    ga, gb = jax.grad(lambda a, b: ella_penalty(lora_delta(a, b, 2.0), zero), argnums=(0, 1))(a, b)
    assert not np.any(np.asarray(ga)) and not np.any(np.asarray(gb))
    w_past = ella_update(zero, lora_delta(_rand(2, 8, 2), _rand(3, 2, 6)))
    w_past = w_past.at[:, :3].set(0.0)  # a past update that never touched the first 3 outputs
    g = jax.grad(lambda d: ella_penalty(d, w_past))(lora_delta(a, b))
    assert not np.any(np.asarray(g)[:, :3]) and np.all(np.asarray(g)[:, 3:] != 0)
    assert float(ella_penalty(lora_delta(a, b), w_past)) > 0


def test_ella_rms_normalisation_makes_lambda_scale_free_per_matrix():
    delta = lora_delta(_rand(0, 2, 8, 2), _rand(1, 2, 2, 6))  # two layers
    w_past = _rand(2, 2, 8, 6)
    tiny = w_past * jnp.array([1e-3, 1e-4])[:, None, None]  # past updates are small, and differ per layer
    # normalised: the same penalty whatever the scale of each layer's W_past
    np.testing.assert_allclose(float(ella_penalty(delta, tiny)), float(ella_penalty(delta, w_past)), rtol=1e-5)
    # raw: the penalty shrinks with W_past^2 (why the default normalises)
    assert float(ella_penalty(delta, tiny, normalize="none")) < 1e-5 * float(ella_penalty(delta, w_past, "none"))
    # every matrix of rms 1 gives the raw penalty
    unit = w_past / jnp.sqrt(jnp.mean(w_past**2, axis=(-2, -1), keepdims=True))
    np.testing.assert_allclose(float(ella_penalty(delta, unit)), float(ella_penalty(delta, unit, "none")), rtol=1e-5)


def test_olora_penalty_is_zero_for_orthogonal_a_and_positive_otherwise():
    q, _ = jnp.linalg.qr(_rand(0, 16, 6))
    assert float(olora_penalty(q[:, :3], q[:, 3:])) < 1e-5  # float32 round-off of exact zeros (L1: 18 entries)
    assert float(olora_penalty(q[:, :3], q[:, 3:], "fro2")) < 1e-10
    assert float(olora_penalty(q[:, :3], jnp.zeros((16, 4)))) == 0.0  # no past task
    a, past = _rand(1, 16, 3), _rand(2, 16, 4)
    for norm, f in (("l1", jnp.abs), ("fro2", jnp.square)):
        want = sum(float(jnp.sum(f(a.T @ past[:, s:s + 2]))) for s in (0, 2))  # sum over two past tasks
        np.testing.assert_allclose(float(olora_penalty(a, past, norm)), want, rtol=1e-5)
