"""Token-level distillation losses: pure jnp functions on [N, V] logits (or log-probs).

Every divergence here compares the teacher's and the student's next-token distributions at
temperature T, p_t = softmax(z_t / T) and q_s = softmax(z_s / T), and is multiplied by T^2
(Hinton et al., 2015): the gradient of the tempered KL with respect to the student's logits is
(q_s - p_t) / T, and at high T the difference q_s - p_t itself shrinks like 1/T, so without the
factor the soft-target gradient would fall like 1/T^2 against the hard-label cross-entropy it is
mixed with.

- `forward_kl`: KL(p_t || q_s), mass-covering (the classic distillation loss).
- `reverse_kl`: KL(q_s || p_t), mode-seeking.
- `jsd`: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024) with
  M = beta p_t + (1 - beta) q_s and JSD_beta = beta KL(p_t || M) + (1 - beta) KL(q_s || M),
  divided by beta (1 - beta). The division makes it continuous in beta with its limits: forward KL
  as beta -> 0 and reverse KL as beta -> 1 (at exactly 0 and 1 those KLs are used). The GKD
  paper's JSD(beta) is this value times beta (1 - beta); `beta=0.5` is 4x the paper's scale.

The top-k approximation (`teacher_topk`, `topk_token_divergence`). A teacher cached offline (or
reduced in the step to save memory) keeps, per token, its k most likely tokens' log-probs at
temperature T, their ids, and the log of the remaining mass (the "tail"). The loss then
compares the two distributions on k + 1 buckets: the k teacher tokens, each on its own, and
everything else as one bucket (the student's tail mass is exact: the logsumexp of its logits off
the teacher's top-k). What is lost is only how each model spreads its tail mass over the tail
tokens. Because the buckets are a coarsening of the vocabulary, the bucketed divergence is a
lower bound of the exact one (data processing inequality; forward KL, reverse KL and JSD are
f-divergences), it equals the exact divergence at k = V, and it never decreases as k grows
(each larger k refines the buckets). So the error is >= 0 and shrinks monotonically with k; the
student learns the teacher's ranking within the top-k and the total tail mass, not the tail's
shape. Example::

    div_n = token_divergence(z_s, z_t, "forward_kl", temperature=2.0)             # [N]
    top = teacher_topk(z_t, k=32, temperature=2.0)                                # cacheable
    approx_n = topk_token_divergence(z_s, top, "forward_kl", temperature=2.0)      # <= div_n
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("forward_kl", "reverse_kl", "jsd")
# A large finite "minus infinity": masked logits stay finite, so empty buckets (the tail at k = V)
# give probability exactly 0 and finite log-probs, and gradients never meet inf - inf.
_NEG = -1e30


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) per row from log-probs [N, K]; buckets with p = 0 add exactly 0."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def divergence(log_p_t: jax.Array, log_q_s: jax.Array, kind: str = "forward_kl", beta: float = 0.5) -> jax.Array:
    """Per-row divergence [N] between teacher and student distributions given as log-probs
    [N, K] over the same K buckets (the vocabulary, or top-k + tail). No temperature here.

    >>> lp = jnp.log(jnp.asarray([[0.5, 0.5]]))
    >>> float(divergence(lp, lp, "jsd")[0])
    0.0
    """
    if kind == "forward_kl":
        return _kl(log_p_t, log_q_s)
    if kind == "reverse_kl":
        return _kl(log_q_s, log_p_t)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(KINDS)}.")
    if beta <= 0.0:  # the limits of the normalised JSD (see the module docstring)
        return _kl(log_p_t, log_q_s)
    if beta >= 1.0:
        return _kl(log_q_s, log_p_t)
    # log M = log(beta p + (1 - beta) q), written from the larger of the two so that it is exactly
    # log p when p == q (the loss is then exactly 0, where logaddexp would leave rounding) and
    # never overflows: M = max * (1 + w expm1(-|log p - log q|)), w the smaller one's weight.
    d = log_p_t - log_q_s
    w = jnp.where(d >= 0, 1.0 - beta, beta)
    log_m = jnp.maximum(log_p_t, log_q_s) + jnp.log1p(w * jnp.expm1(-jnp.abs(d)))
    jsd = beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_q_s, log_m)
    return jsd / (beta * (1.0 - beta))


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """T^2 x divergence of the tempered softmaxes, per token [N], float32, from [N, V] logits.

    >>> z = jnp.asarray([[1.0, 2.0, 3.0]])
    >>> float(token_divergence(z, z, "forward_kl", temperature=2.0)[0])
    0.0
    """
    t = float(temperature)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    return (t * t) * divergence(log_p, log_q, kind, beta)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, kind: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """Sum over masked tokens of `token_divergence` (logits [N, V], mask [N]): a loss sum, as the
    objectives return it (the step divides by the token count).

    >>> z = jnp.zeros((3, 5))
    >>> float(distill_loss(z, z, jnp.ones(3)))
    0.0
    """
    div = token_divergence(student_logits, teacher_logits, kind, temperature, beta)
    return jnp.sum(div * mask.astype(jnp.float32))


class TopK(NamedTuple):
    """A teacher's distribution at temperature T reduced to k tokens + a tail bucket, per token:
    what a cache stores (k + 1 floats and k ids per token instead of V floats).

    logp      float32 [N, k]  log p_t(id) at temperature T, in decreasing order
    ids       int32   [N, k]  the token ids
    tail_logp float32 [N]     log of the mass off the top-k (about -1e30 when k = V: empty)
    """

    logp: jax.Array
    ids: jax.Array
    tail_logp: jax.Array


def _mask_ids(x_nv: jax.Array, ids_nk: jax.Array) -> jax.Array:
    rows = jnp.arange(x_nv.shape[0])[:, None]
    return x_nv.at[rows, ids_nk].set(_NEG)


def teacher_topk(teacher_logits: jax.Array, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's top-k log-probs at temperature T, their ids and its exact tail log-mass.

    >>> top = teacher_topk(jnp.asarray([[0.0, 1.0, 2.0]]), k=1)
    >>> top.ids.tolist(), round(float(jnp.exp(top.logp[0, 0]) + jnp.exp(top.tail_logp[0])), 6)
    ([[2]], 1.0)
    """
    z = teacher_logits.astype(jnp.float32) / float(temperature)
    k = min(int(k), z.shape[-1])
    log_z = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    vals, ids = jax.lax.top_k(z, k)
    tail = jax.nn.logsumexp(_mask_ids(z, ids), axis=-1) - log_z[:, 0]
    return TopK(vals - log_z, ids.astype(jnp.int32), tail)


def student_buckets(student_logits: jax.Array, ids_nk: jax.Array, temperature: float = 1.0) -> jax.Array:
    """The student's log-probs at temperature T on the k + 1 buckets of `ids` (the k tokens, then
    the tail, whose mass is the exact logsumexp off those ids), [N, k + 1]."""
    z = student_logits.astype(jnp.float32) / float(temperature)
    log_z = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    on = jnp.take_along_axis(z, ids_nk, axis=-1) - log_z
    tail = jax.nn.logsumexp(_mask_ids(z, ids_nk), axis=-1, keepdims=True) - log_z
    return jnp.concatenate([on, tail], axis=-1)


def topk_token_divergence(student_logits: jax.Array, top: TopK, kind: str = "forward_kl",
                          temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """T^2 x divergence on the teacher's top-k support plus one tail bucket, per token [N]: a
    lower bound of `token_divergence` that is exact at k = V (see the module docstring).
    `top` must come from `teacher_topk` at the same temperature.

    >>> z_t, z_s = jnp.asarray([[0.0, 1.0, 2.0]]), jnp.asarray([[2.0, 1.0, 0.0]])
    >>> exact = token_divergence(z_s, z_t)
    >>> bool(jnp.allclose(topk_token_divergence(z_s, teacher_topk(z_t, 3)), exact))
    True
    """
    t = float(temperature)
    log_p = jnp.concatenate([top.logp, top.tail_logp[:, None]], axis=-1)
    log_q = student_buckets(student_logits, top.ids, t)
    return (t * t) * divergence(log_p, log_q, kind, beta)
