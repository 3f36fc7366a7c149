"""Continual-learning math over LoRA factors: Share's shared subspace, ELLA's and O-LoRA's penalties.

Convention (the linear seam's): an adapter is `A [in, r]`, `B [r, out]`, and its update of the
weight is `dW = scale * A @ B` (`x @ W + scale * (x @ A) @ B`). Every function accepts leading
batch dimensions (the `layers` axis of scanned models): matrices are the last two axes, so one
call handles all layers of a site. Everything here is pure `jax.numpy` (jit/vmap/grad-able); the
sequence runner (`jaxlearn/continual/`) calls it between tasks and the `continual` objective
(`jaxlearn/objectives/continual.py`) inside the compiled step. Example::

    basis_a, basis_b, alphas, betas = share_decompose([a1, a2], [b1, b2], k=8)
    a1_again, b1_again = share_factors(basis_a, basis_b, alphas[0], betas[0])   # exact if rank <= k
    pen = ella_penalty(lora_delta(a, b, scale), w_past)                        # 0 while w_past == 0
    pen = olora_penalty(a_new, a_past)                                          # 0 for orthogonal A's

What is implemented (no access to the papers here; from the issue's description):

- Share (arXiv 2602.06043): per adapted matrix, an orthonormal basis of the principal
  directions (left singular vectors) of the stacked A factors (`[in, sum r]`) and, separately, of
  the stacked B factors transposed (`[out, sum r]`); a task is `A = U_A alpha`, `B = beta U_B^T`
  with small coefficients `alpha [k, r]`, `beta [r, k]`. After each task the decomposition is re-run
  over all reconstructed adapters and every task's coefficients are re-projected analytically
  (`alpha = U_A^T A`, `beta = B U_B`: orthogonal projection, no data). When fewer than `k`
  directions exist the basis is completed with a fixed orthonormal complement (so its shape, and
  the memory, never change).
- ELLA (arXiv 2601.02232): `lambda * ||dW_t (.) W_hat||_F^2`, `W_past` the running sum of the past
  tasks' updates (`ella_update`), `W_hat` it divided by its RMS per matrix (`ella_penalty`: why).
- O-LoRA: `sum_s |A_t^T A_s|_1` (O-LoRA's code; `norm="fro2"`: `||A_t^T A_s||_F^2`) over the past
  tasks' A factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["lora_delta", "orthonormal_basis", "project", "reconstruct", "share_decompose", "share_factors",
           "share_reconstruction_error", "ella_penalty", "ella_update", "olora_penalty"]


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def lora_delta(a: jax.Array, b: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
    """The dense update `scale * A @ B` ([..., in, out]) of LoRA factors.

    >>> lora_delta(jnp.ones((3, 1)), jnp.ones((1, 2)), 2.0).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def orthonormal_basis(stacked: jax.Array, k: int) -> jax.Array:
    """`k` orthonormal columns ([..., n, k]): the top principal directions (left singular vectors,
    by singular value) of `stacked` [..., n, m], completed by a fixed orthonormal complement when
    `m < k`, so the basis always has `k` columns and spans every column of `stacked` when its
    rank is <= k.

    >>> u = orthonormal_basis(jnp.asarray([[3.0], [4.0], [0.0]]), 2)
    >>> u.shape, bool(jnp.allclose(u.T @ u, jnp.eye(2), atol=1e-6))
    ((3, 2), True)
    """
    n = stacked.shape[-2]
    if not 0 < k <= n:
        raise ValueError(f"basis size k={k} must be in 1..{n} (the matrix side it spans).")
    u, _, _ = jnp.linalg.svd(stacked.astype(jnp.float32), full_matrices=False)  # [..., n, min(n, m)]
    u = u[..., :k]
    if u.shape[-1] < k:
        # Why a complement instead of zero columns: the new task's coefficients can use it (zero
        # columns would be dead capacity). A fixed key keeps it deterministic (resume-exact).
        extra = jax.random.normal(jax.random.PRNGKey(0), (n, k - u.shape[-1]), jnp.float32)
        extra = jnp.broadcast_to(extra, u.shape[:-1] + (k - u.shape[-1],))
        q, _ = jnp.linalg.qr(jnp.concatenate([u, extra], axis=-1))  # leading span kept: q[:, :m] ~ u
        u = jnp.concatenate([u, q[..., u.shape[-1]:]], axis=-1)
    return u


def project(x: jax.Array, basis: jax.Array) -> jax.Array:
    """Coefficients of the columns of `x` [..., n, r] in an orthonormal `basis` [..., n, k]:
    `basis^T x` [..., k, r] (the least-squares fit; analytic, no data).

    >>> project(jnp.asarray([[2.0], [0.0]]), jnp.eye(2)[:, :1]).tolist()
    [[2.0]]
    """
    return jnp.matmul(_t(basis), x.astype(jnp.float32))


def reconstruct(basis: jax.Array, coef: jax.Array) -> jax.Array:
    """`basis @ coef`: the columns back from their coefficients. `reconstruct(U, project(x, U))`
    is `x` exactly when the columns of `x` lie in the span of `U`.

    >>> reconstruct(jnp.eye(2)[:, :1], jnp.asarray([[2.0]])).tolist()
    [[2.0], [0.0]]
    """
    return jnp.matmul(basis, coef)


def share_decompose(a_list: Sequence[jax.Array], b_list: Sequence[jax.Array], k: int
                    ) -> tuple[jax.Array, jax.Array, list[jax.Array], list[jax.Array]]:
    """Share's decomposition of several adapters of one matrix: `(U_A [.., in, k], U_B [.., out, k],
    alphas, betas)` with `alpha_i = U_A^T A_i` [.., k, r_i] and `beta_i = B_i U_B` [.., r_i, k].

    The adapters may differ in rank. Exact (`share_factors` returns the A's and B's) when the
    stacked A's and the stacked B's each have rank <= k.

    >>> a, b = jnp.ones((4, 1)), jnp.ones((1, 3))
    >>> ua, ub, al, be = share_decompose([a, 2 * a], [b, b], k=2)
    >>> bool(jnp.allclose(share_factors(ua, ub, al[1], be[1])[0], 2 * a, atol=1e-5))
    True
    """
    if len(a_list) != len(b_list) or not a_list:
        raise ValueError(f"share_decompose needs one B per A (got {len(a_list)} A's, {len(b_list)} B's).")
    basis_a = orthonormal_basis(jnp.concatenate([a.astype(jnp.float32) for a in a_list], axis=-1), k)
    basis_b = orthonormal_basis(jnp.concatenate([_t(b.astype(jnp.float32)) for b in b_list], axis=-1), k)
    alphas = [project(a, basis_a) for a in a_list]
    betas = [_t(project(_t(b), basis_b)) for b in b_list]
    return basis_a, basis_b, alphas, betas


def share_factors(basis_a: jax.Array, basis_b: jax.Array, alpha: jax.Array, beta: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """A task's LoRA factors from the shared bases and its coefficients: `(U_A alpha, beta U_B^T)`.

    >>> a, b = share_factors(jnp.eye(3)[:, :2], jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)))
    >>> a.shape, b.shape
    ((3, 1), (1, 2))
    """
    return reconstruct(basis_a, alpha), _t(reconstruct(basis_b, _t(beta)))


def share_reconstruction_error(a_list, b_list, basis_a, basis_b) -> jax.Array:
    """Relative Frobenius error of the reconstructed updates `sum_i ||dW_i - dW_i'||^2 / sum_i ||dW_i||^2`
    after projecting every adapter onto the bases (0 when both bases cover the stacked ranks).

    >>> ua, ub, _, _ = share_decompose([jnp.ones((3, 1))], [jnp.ones((1, 2))], k=1)
    >>> float(share_reconstruction_error([jnp.ones((3, 1))], [jnp.ones((1, 2))], ua, ub)) < 1e-10
    True
    """
    num, den = 0.0, 0.0
    for a, b in zip(a_list, b_list):
        a2, b2 = share_factors(basis_a, basis_b, project(a, basis_a), _t(project(_t(b), basis_b)))
        d = lora_delta(a, b)
        num = num + jnp.sum(jnp.square(d - lora_delta(a2, b2)))
        den = den + jnp.sum(jnp.square(d))
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def ella_penalty(delta: jax.Array, w_past: jax.Array, normalize: str = "rms") -> jax.Array:
    """ELLA's interference penalty `||delta (.) W_hat||_F^2` (summed over any leading axes); the
    caller multiplies by lambda. Exactly 0, with gradient 0, wherever `W_past` is 0: the first
    task is unconstrained, and directions no past task used stay free.

    `normalize="rms"` (default): `W_hat = W_past / rms(W_past)`, per matrix (the last two axes), so
    lambda is scale-free. Why: past LoRA updates have entries ~1e-3, so with the raw `W_past`
    the penalty's pull, `2 lambda W_past^2 delta`, is ~1e-6 lambda delta: at lambda = 1 nothing
    is shrunk and ELLA trains like sequential merged LoRA (Adam removes any overall gradient
    scale, so the learning rate cannot make up for it). With `W_hat` the entries where past
    tasks put typical energy have weight ~1 and lambda means the same for every model and task
    count. `normalize="none"`: the raw `W_past`.

    >>> float(ella_penalty(jnp.ones((2, 2)), jnp.zeros((2, 2))))
    0.0
    >>> round(float(ella_penalty(jnp.ones((2, 2)), 1e-3 * jnp.eye(2))), 4)   # rms 1e-3 / sqrt(2)
    4.0
    >>> float(ella_penalty(jnp.ones((2, 2)), jnp.eye(2), normalize="none"))
    2.0
    """
    w = w_past.astype(jnp.float32)
    if normalize == "rms":
        rms = jnp.sqrt(jnp.mean(jnp.square(w), axis=(-2, -1), keepdims=True))
        w = w / jnp.maximum(rms, jnp.finfo(jnp.float32).tiny)  # all-zero W_past stays 0
    elif normalize != "none":
        raise ValueError(f"normalize={normalize!r}: use 'rms' or 'none'.")
    return jnp.sum(jnp.square(delta.astype(jnp.float32) * w))


def ella_update(w_past: jax.Array, delta: jax.Array) -> jax.Array:
    """`W_past + delta`: after a task, its update joins the running sum (one buffer per matrix,
    whatever the number of tasks).

    >>> ella_update(jnp.zeros((1, 1)), jnp.ones((1, 1))).tolist()
    [[1.0]]
    """
    return w_past.astype(jnp.float32) + delta.astype(jnp.float32)


def olora_penalty(a: jax.Array, a_past: jax.Array, norm: str = "l1") -> jax.Array:
    """O-LoRA's orthogonality penalty on `A_t^T A_past` (= the blocks `A_t^T A_s` of every past
    task s), with the past tasks' A factors stacked as the columns of `a_past` [..., in, R] (zero
    columns: no past task). `norm="l1"` (default): the sum of absolute entries, as in O-LoRA's
    code; `"fro2"`: the squared Frobenius norm. Why L1: the entries of `A_t^T A_s` are well below 1
    (LoRA's A starts at +-1/sqrt(in)), so squaring them makes the penalty orders of magnitude
    weaker at the same lambda.

    >>> float(olora_penalty(jnp.eye(3)[:, :1], jnp.eye(3)[:, 1:]))
    0.0
    >>> float(olora_penalty(jnp.ones((2, 1)), jnp.ones((2, 1))))
    2.0
    >>> float(olora_penalty(jnp.ones((2, 1)), jnp.ones((2, 1)), norm="fro2"))
    4.0
    """
    overlap = jnp.matmul(_t(a.astype(jnp.float32)), a_past.astype(jnp.float32))
    if norm == "l1":
        return jnp.sum(jnp.abs(overlap))
    if norm == "fro2":
        return jnp.sum(jnp.square(overlap))
    raise ValueError(f"norm={norm!r}: use 'l1' or 'fro2'.")
