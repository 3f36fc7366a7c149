"""The RL loss pieces against direct definitions: group advantages, GAE (a plain Python backward
recursion), the k3 KL and the clipped ratio at policy == reference == behaviour, the value loss
and explained variance."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.objectives import rl_losses as L


def test_group_advantages_zero_mean_unit_std():
    rs = np.random.RandomState(0)
    r = rs.randn(24).astype(np.float32) * 3 + 1
    adv = np.asarray(L.group_advantages(jnp.asarray(r), 6, "grpo")).reshape(4, 6)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(adv.std(1), 1, atol=1e-4)
    # the groups are consecutive rows: a permutation across groups changes the answer
    g = r.reshape(4, 6)
    np.testing.assert_allclose(adv, (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6), rtol=1e-5)
    dr = np.asarray(L.group_advantages(jnp.asarray(r), 6, "dr_grpo")).reshape(4, 6)
    np.testing.assert_allclose(dr.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(dr, g - g.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)
    # a constant group carries no signal
    assert np.all(np.asarray(L.group_advantages(jnp.ones(4), 4)) == 0)


def test_rloo_is_the_leave_one_out_baseline():
    r = np.random.RandomState(1).rand(12).astype(np.float32)
    adv = np.asarray(L.group_advantages(jnp.asarray(r), 4, "rloo"))
    want = [r[i] - np.mean(np.delete(r[4 * (i // 4):4 * (i // 4) + 4], i % 4)) for i in range(12)]
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.group_advantages(jnp.ones(5), 2)


def _gae_reference(r, v, m, gamma, lam):
    """The backward recursion written out per row, per token."""
    b, t = r.shape
    adv = np.zeros((b, t))
    for i in range(b):
        nxt_a = 0.0
        for j in reversed(range(t)):
            nm = m[i, j + 1] if j + 1 < t else 0.0
            nv = v[i, j + 1] * nm if j + 1 < t else 0.0
            delta = r[i, j] + gamma * nv - v[i, j]
            nxt_a = delta + gamma * lam * nm * nxt_a
            adv[i, j] = nxt_a * m[i, j]
    return adv, (adv + v) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_equals_a_backward_recursion(gamma, lam):
    rs = np.random.RandomState(2)
    b, t = 5, 13
    r, v = rs.randn(b, t).astype(np.float32), rs.randn(b, t).astype(np.float32)
    m = np.zeros((b, t), np.float32)
    for i in range(b):  # responses start after a prompt and end at different lengths
        lo = rs.randint(0, 4)
        m[i, lo:lo + rs.randint(1, t - lo + 1)] = 1.0
    adv, ret = L.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
    want_adv, want_ret = _gae_reference(r, v, m, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-4, atol=1e-5)
    # lam = 1, gamma = 1, zero values: the advantage is the reward-to-go
    adv1, _ = L.gae(jnp.asarray(r), jnp.zeros_like(r), jnp.ones_like(r), 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(adv1), np.cumsum(r[:, ::-1], 1)[:, ::-1], rtol=1e-4, atol=1e-4)


def test_ratio_one_and_kl_zero_when_policy_is_reference_and_behaviour():
    rs = np.random.RandomState(3)
    lp = jnp.asarray(-rs.rand(4, 9).astype(np.float32) * 3)
    mask = jnp.asarray((rs.rand(4, 9) > 0.3).astype(np.float32))
    adv = jnp.asarray(rs.randn(4).astype(np.float32))
    loss, clipped, ratio = L.clipped_surrogate(lp, lp, adv, mask, 0.2)
    np.testing.assert_array_equal(np.asarray(ratio), 1.0)
    assert float(jnp.sum(clipped)) == 0.0
    np.testing.assert_allclose(np.asarray(loss), -np.asarray(adv)[:, None] * np.asarray(mask), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(L.k3_kl(lp, lp)), 0.0)
    # away from equality: k3 is positive, and its mean over samples of p estimates KL(p || q)
    p, q = np.asarray([0.7, 0.2, 0.1]), np.asarray([0.3, 0.3, 0.4])
    k3 = np.asarray(L.k3_kl(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))))
    assert (k3 > 0).all()
    np.testing.assert_allclose(np.sum(p * k3), np.sum(p * np.log(p / q)), rtol=1e-5)


def test_clipping_cuts_the_gradient_side_that_moves_too_far():
    old = jnp.zeros((1, 2))
    lp = jnp.asarray([[0.5, -0.5]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    mask = jnp.ones((1, 2))
    loss, clipped, _ = L.clipped_surrogate(lp, old, jnp.ones(1), mask, 0.2)
    # positive advantage: the ratio above 1 + eps is clipped, the one below is not
    assert np.asarray(clipped).tolist() == [[1.0, 0.0]]
    np.testing.assert_allclose(np.asarray(loss), [[-1.2, -np.exp(-0.5)]], rtol=1e-6)
    _, clipped_neg, _ = L.clipped_surrogate(lp, old, -jnp.ones(1), mask, 0.2)
    assert np.asarray(clipped_neg).tolist() == [[0.0, 1.0]]


def test_value_loss_and_explained_variance():
    v, old, ret = jnp.asarray([[1.0, 3.0]]), jnp.asarray([[0.0, 2.9]]), jnp.asarray([[2.0, 3.0]])
    out = np.asarray(L.clipped_value_loss(v, old, ret, jnp.ones((1, 2)), 0.5))
    np.testing.assert_allclose(out, [[0.5 * max(1.0, 1.5 ** 2), 0.0]], atol=1e-6)
    rs = np.random.RandomState(4)
    r = jnp.asarray(rs.randn(3, 7).astype(np.float32))
    m = jnp.ones((3, 7))
    assert float(L.explained_variance(r, r, m)) == pytest.approx(1.0)
    assert float(L.explained_variance(jnp.zeros_like(r) + jnp.mean(r), r, m)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.explained_variance(-r, r, m)) < 0
