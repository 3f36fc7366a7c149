"""Per-pair preference losses, written as their papers define them (pure jnp, per pair).

Inputs are per-sequence log-probabilities summed over response tokens: `pc`/`pr` of the
policy for the chosen/rejected reply, `rc`/`rr` of the reference, `nc`/`nr` the number of
response tokens. Each returns a [B] loss; the objectives in `preference.py` sum and mask them.

- DPO (Rafailov et al. 2023, eq. 7), with label smoothing eps (conservative DPO, Mitchell 2023):
  `-(1 - eps) log s(beta h) - eps log s(-beta h)`, `h = (pc - rc) - (pr - rr)`.
- IPO (Azar et al. 2023, eq. 17): `(h - 1 / (2 tau))^2`.
- SimPO (Meng et al. 2024, eq. 6): `-log s(beta pc / nc - beta pr / nr - gamma)`, no reference.
- ORPO (Hong et al. 2024, eqs. 4-7): `-pc / nc + lam * -log s(log odds_c - log odds_r)` with
  `odds = P / (1 - P)`, `P = exp(mean token log-prob)`, no reference.
- KTO (Ethayarajh et al. 2024, eq. 8): desirable `lam_d (1 - s(beta (r - z0)))`, undesirable
  `lam_u (1 - s(beta (z0 - r)))`, `r = log pi / pi_ref`, `z0` the (batch) KL estimate, no gradient.
- Bradley-Terry reward model: `-log s(r_c - r_r - margin)`.

>>> import jax.numpy as jnp
>>> z = jnp.zeros(2)
>>> [round(float(x), 4) for x in dpo_loss(z, z, z, z, beta=0.1)]      # policy == reference: ln 2
[0.6931, 0.6931]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid


def dpo_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    logits = beta * ((pc - rc) - (pr - rr))
    return -(1.0 - label_smoothing) * log_sigmoid(logits) - label_smoothing * log_sigmoid(-logits)


def ipo_loss(pc, pr, rc, rr, *, tau: float) -> jax.Array:
    h = (pc - rc) - (pr - rr)
    return jnp.square(h - 1.0 / (2.0 * tau))


def simpo_loss(pc, pr, nc, nr, *, beta: float, gamma: float) -> jax.Array:
    return -log_sigmoid(beta * pc / nc - beta * pr / nr - gamma)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(pc, pr, nc, nr, *, lam: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(total, the SFT term, the odds-ratio term), each [B]."""
    ac, ar = pc / nc, pr / nr  # mean token log-probs: log P of the length-normalised likelihood
    log_odds = (ac - log1mexp(ac)) - (ar - log1mexp(ar))
    ratio = -log_sigmoid(log_odds)
    nll = -ac
    return nll + lam * ratio, nll, ratio


def kto_loss(p, r, desirable, *, beta: float, z0, lam_d: float = 1.0, lam_u: float = 1.0) -> jax.Array:
    """`desirable` is 1.0 / 0.0 per sequence; `z0` a scalar reference point (stop-gradient)."""
    ratio = p - r
    return jnp.where(desirable > 0, lam_d * (1.0 - jax.nn.sigmoid(beta * (ratio - z0))),
                     lam_u * (1.0 - jax.nn.sigmoid(beta * (z0 - ratio))))


def bradley_terry_loss(r_chosen, r_rejected, *, margin: float = 0.0) -> jax.Array:
    return -log_sigmoid(r_chosen - r_rejected - margin)
