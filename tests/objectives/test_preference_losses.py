"""Each preference loss equals an independent transcription of its paper's formula (float64
NumPy), values and gradients, on random log-probs; and the invariants at initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.objectives import preference_losses as L

RS = np.random.RandomState(0)
PC, PR, RC, RR = (RS.uniform(-40, -5, 16) for _ in range(4))
NC, NR = RS.randint(3, 20, 16).astype(float), RS.randint(3, 20, 16).astype(float)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def dpo_ref(pc, pr, rc, rr, beta, eps):
    z = beta * (np.log(np.exp(pc) / np.exp(rc)) - np.log(np.exp(pr) / np.exp(rr)))  # log-ratios, paper form
    return -(1 - eps) * np.log(sig(z)) - eps * np.log(sig(-z))


def ipo_ref(pc, pr, rc, rr, tau):
    return ((pc - pr) - (rc - rr) - 1 / (2 * tau)) ** 2


def simpo_ref(pc, pr, nc, nr, beta, gamma):
    return -np.log(sig(beta / nc * pc - beta / nr * pr - gamma))


def orpo_ref(pc, pr, nc, nr, lam):
    p_c, p_r = np.exp(pc / nc), np.exp(pr / nr)
    odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
    return -pc / nc - lam * np.log(sig(np.log(odds_c / odds_r)))


def kto_ref(p, r, desirable, beta, z0, ld, lu):
    x = p - r
    return np.where(desirable > 0, ld * (1 - sig(beta * (x - z0))), lu * (1 - sig(beta * (z0 - x))))


CASES = {
    "dpo": (lambda a: L.dpo_loss(*a[:4], beta=0.1), lambda a: dpo_ref(*a[:4], 0.1, 0.0)),
    "cdpo": (lambda a: L.dpo_loss(*a[:4], beta=0.3, label_smoothing=0.2), lambda a: dpo_ref(*a[:4], 0.3, 0.2)),
    "ipo": (lambda a: L.ipo_loss(*a[:4], tau=0.05), lambda a: ipo_ref(*a[:4], 0.05)),
    "simpo": (lambda a: L.simpo_loss(a[0], a[1], a[4], a[5], beta=2.0, gamma=0.5),
              lambda a: simpo_ref(a[0], a[1], a[4], a[5], 2.0, 0.5)),
    "orpo": (lambda a: L.orpo_loss(a[0], a[1], a[4], a[5], lam=0.1)[0],
             lambda a: orpo_ref(a[0], a[1], a[4], a[5], 0.1)),
    "kto": (lambda a: L.kto_loss(a[0], a[2], a[6], beta=0.1, z0=0.3, lam_d=1.0, lam_u=1.5),
            lambda a: kto_ref(a[0], a[2], a[6], 0.1, 0.3, 1.0, 1.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_match_the_paper(name):
    ours, ref = CASES[name]
    desirable = (np.arange(16) % 2).astype(float)
    args64 = (PC, PR, RC, RR, NC, NR, desirable)
    args = tuple(jnp.asarray(a, jnp.float32) for a in args64)
    np.testing.assert_allclose(ours(args), ref(args64), rtol=2e-5, atol=1e-6)
    # gradients w.r.t. the policy log-probs: autodiff of ours vs central differences of the reference
    g = jax.grad(lambda pc, pr: jnp.sum(ours((pc, pr) + args[2:])), argnums=(0, 1))(args[0], args[1])
    h = 1e-5
    for i, gi in enumerate(g):
        plus, minus = list(args64), list(args64)
        plus[i], minus[i] = args64[i] + h, args64[i] - h
        fd = (ref(tuple(plus)) - ref(tuple(minus))) / (2 * h)
        np.testing.assert_allclose(gi, fd, rtol=2e-3, atol=1e-6)


def test_invariants_at_initialisation():
    z = jnp.zeros(4)
    np.testing.assert_allclose(L.dpo_loss(z, z, z, z, beta=0.1), np.log(2), rtol=1e-6)  # policy == reference
    np.testing.assert_allclose(L.dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.3), np.log(2), rtol=1e-6)
    np.testing.assert_allclose(L.bradley_terry_loss(z, z), np.log(2), rtol=1e-6)  # equal rewards
    np.testing.assert_allclose(L.ipo_loss(z, z, z, z, tau=0.1), 25.0, rtol=1e-6)  # (0 - 1/(2 tau))^2


def test_log1mexp_is_accurate_at_both_ends():
    x = jnp.asarray([-1e-6, -0.5, -5.0, -50.0])
    np.testing.assert_allclose(L.log1mexp(x), np.log(-np.expm1(np.asarray(x, np.float64))), rtol=1e-5, atol=1e-12)
