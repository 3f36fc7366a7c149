"""The pure pieces of policy-gradient RL (GRPO, RLOO, Dr. GRPO, PPO): jnp in, jnp out.

Shapes: B rows (a group of `group_size` samples of one prompt is `group_size` consecutive
rows), T token columns; `mask` [B, T] is 1.0 on the response tokens a loss scores. Log-probs
are per token, aligned with the targets they score (`forward.token_logprobs`). Example::

    adv_b = group_advantages(rewards_b, group_size=4)                     # GRPO
    pg_bt, clipped_bt, ratio_bt = clipped_surrogate(lp_bt, old_bt, adv_b, mask_bt, 0.2)
    kl_bt = k3_kl(lp_bt, ref_bt)                                          # >= 0, 0 at lp == ref
    adv_bt, ret_bt = gae(rew_bt, val_bt, mask_bt, gamma=1.0, lam=0.95)    # PPO
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AdvantageKind = Literal["grpo", "rloo", "dr_grpo"]


def group_advantages(rewards_b: jax.Array, group_size: int, kind: AdvantageKind = "grpo",
                     eps: float = 1e-6) -> jax.Array:
    """Advantages [B] of rewards [B] whose consecutive `group_size` rows share a prompt.

    - `grpo`: (r - group mean) / (group std + eps): zero mean, unit std in every group that
      is not constant (a constant group gets 0: nothing to learn from it).
    - `dr_grpo`: r - group mean (Dr. GRPO drops the std division, which over-weights groups
      whose rewards barely differ).
    - `rloo`: r - mean of the group's OTHER rows (leave-one-out baseline, unbiased because the
      baseline does not depend on the row's own sample); equals G/(G-1) * (r - group mean).

    >>> group_advantages(jnp.asarray([1.0, 0.0, 0.0, 0.0]), 2, "dr_grpo").tolist()
    [0.5, -0.5, 0.0, 0.0]
    >>> group_advantages(jnp.asarray([1.0, 0.0, 3.0, 1.0]), 2, "rloo").tolist()
    [1.0, -1.0, 2.0, -2.0]
    """
    b = rewards_b.shape[0]
    if b % group_size:
        raise ValueError(f"{b} rows do not split into groups of {group_size}.")
    r = rewards_b.astype(jnp.float32).reshape(b // group_size, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if kind == "grpo":
        adv = (r - mean) / (jnp.std(r, axis=1, keepdims=True) + eps)
    elif kind == "dr_grpo":
        adv = r - mean
    elif kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2 (a leave-one-out baseline needs another sample).")
        adv = (r - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage kind {kind!r}; use grpo, rloo or dr_grpo.")
    return adv.reshape(b)


def clipped_surrogate(logp_bt: jax.Array, old_logp_bt: jax.Array, adv: jax.Array, mask_bt: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's clipped policy-ratio objective per token, as a loss to minimise.

    Returns (loss [B, T], clipped [B, T], ratio [B, T]): loss = -min(r A, clip(r, 1-eps, 1+eps) A)
    with r = exp(logp - old_logp), masked (0 off the mask); `clipped` is 1.0 where the clipped
    term is the active one (the gradient is cut there). `adv` is per row [B] (GRPO) or per
    token [B, T] (PPO). Only `logp_bt` carries a gradient.

    >>> loss, clipped, ratio = clipped_surrogate(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1),
    ...                                          jnp.asarray([[1.0, 0.0]]), 0.2)
    >>> loss.tolist(), clipped.tolist(), ratio.tolist()
    ([[-1.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]])
    """
    adv_bt = adv[:, None] if adv.ndim == 1 else adv
    adv_bt = jax.lax.stop_gradient(adv_bt.astype(jnp.float32))
    mask = mask_bt.astype(jnp.float32)
    # Masked positions get log-ratio 0 so exp never overflows on padding.
    ratio = jnp.exp(jnp.where(mask > 0, logp_bt - jax.lax.stop_gradient(old_logp_bt), 0.0))
    unclipped = ratio * adv_bt
    clipped_term = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv_bt
    loss = jnp.where(mask > 0, -jnp.minimum(unclipped, clipped_term), 0.0)
    clipped = (clipped_term < unclipped).astype(jnp.float32) * mask
    return loss, clipped, ratio


def k3_kl(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(policy || reference) on tokens sampled from the policy:
    exp(ref - logp) - (ref - logp) - 1. Unbiased, always >= 0, exactly 0 where the log-probs
    agree, and with lower variance than the plain log-ratio (Schulman's "Approximating KL").

    >>> [round(float(x), 4) for x in k3_kl(jnp.asarray([-1.0, -1.0]), jnp.asarray([-1.0, -2.0]))]
    [0.0, 0.3679]
    """
    d = ref_logp_bt.astype(jnp.float32) - logp_bt.astype(jnp.float32)
    return jnp.exp(d) - d - 1.0


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over token columns, by a reverse `lax.scan`.

    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t and A_t = delta_t + gamma * lam * m_{t+1} A_{t+1},
    with m the mask: the episode ends after the last masked-in token (no bootstrap past it, V = 0
    there). Returns (advantages, returns = A + V), both [B, T] and 0 off the mask; no gradient.

    >>> adv, ret = gae(jnp.asarray([[0.0, 1.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.5, 1.0)
    >>> adv.tolist(), ret.tolist()
    ([[0.5, 1.0]], [[0.5, 1.0]])
    """
    r = jax.lax.stop_gradient(rewards_bt.astype(jnp.float32))
    v = jax.lax.stop_gradient(values_bt.astype(jnp.float32))
    m = mask_bt.astype(jnp.float32)
    b = r.shape[0]
    zero = jnp.zeros((b, 1), jnp.float32)
    next_m = jnp.concatenate([m[:, 1:], zero], axis=1)
    next_v = jnp.concatenate([v[:, 1:], zero], axis=1) * next_m
    delta = r + gamma * next_v - v

    def step(carry_b, xs):
        delta_b, nm_b = xs
        adv_b = delta_b + gamma * lam * nm_b * carry_b
        return adv_b, adv_b

    # scan over time (columns), last column first
    _, adv_tb = jax.lax.scan(step, jnp.zeros((b,), jnp.float32), (delta.T, next_m.T), reverse=True)
    adv = adv_tb.T * m
    return adv, (adv + v) * m


def clipped_value_loss(values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array,
                       mask_bt: jax.Array, clip_eps: float) -> jax.Array:
    """PPO's clipped value loss per token [B, T]: 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = old + clip(V - old, -eps, eps), masked. The max keeps the value head from moving
    far from the values the advantages were computed with in one update.

    >>> clipped_value_loss(jnp.asarray([[2.0]]), jnp.asarray([[0.0]]), jnp.asarray([[2.0]]),
    ...                    jnp.ones((1, 1)), 0.5).tolist()
    [[1.125]]
    """
    old = jax.lax.stop_gradient(old_values_bt)
    ret = jax.lax.stop_gradient(returns_bt)
    v_clip = old + jnp.clip(values_bt - old, -clip_eps, clip_eps)
    loss = 0.5 * jnp.maximum(jnp.square(values_bt - ret), jnp.square(v_clip - ret))
    return loss * mask_bt.astype(loss.dtype)


def explained_variance(values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R] over the masked tokens: 1 for a perfect value head, 0 for one no
    better than a constant, negative for a worse one (0 when the returns do not vary).

    >>> float(explained_variance(jnp.asarray([[1.0, 2.0]]), jnp.asarray([[1.0, 2.0]]), jnp.ones((1, 2))))
    1.0
    """
    m = mask_bt.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)

    def var(x):
        mean = jnp.sum(x * m) / n
        return jnp.sum(jnp.square(x - mean) * m) / n

    var_r = var(returns_bt.astype(jnp.float32))
    return jnp.where(var_r > 0, 1.0 - var(returns_bt - values_bt) / jnp.where(var_r > 0, var_r, 1.0), 0.0)
