"""The LM head and its cross-entropy fused, a chunk of tokens at a time (`objective.loss_chunk`).

Computed whole, the head's float32 logits [tokens, vocab] and their gradient are the largest
arrays of a small model's step (SmolLM2-135M, 1,024 tokens: 192 MiB each, more than all 30
layers' saved projections together). Here each chunk's logits are made, reduced to the loss,
and turned into their gradients at once: dh = g W^T for the hidden states and, only if the
head is being trained, dW += h^T g. The backward then only scales those by the incoming
cotangents. Peak memory holds one [chunk, vocab] block instead of two [tokens, vocab] arrays;
the FLOPs are the same as the unfused head (its matmuls are not recomputed).

Whether the head is trained is known from the custom_vjp's symbolic zeros: a frozen head (PEFT)
gets no dW work at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Every objective's `loss_chunk` default. Measured on SmolLM2-135M, 4 x 256 tokens, 2 CPU cores,
# all variants timed interleaved in one run (`python benchmarks/peft_benchmark.py --only full
# lora_r8 --loss-chunks 0 256 1024`): step time 0.99-1.00x of unchunked (noise), step memory
# 0.80x for LoRA, 1.00x for full fine-tuning; on TPU pods it removes the [tokens, vocab] logits
# (docs/pods.md). A batch of fewer tokens than this is one chunk, i.e. the unchunked math.
DEFAULT_LOSS_CHUNK = 256


def chunked_head_loss(h_nd: jax.Array, w: jax.Array, targets_n: jax.Array, mask_n: jax.Array, *,
                      w_transposed: bool, chunk: int, z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of mask * (ce + z_loss * log_z^2), sum of mask * ce) over N tokens.

    `h_nd` [N, D] final hidden states; `w` the head, [D, V] (or [V, D] with `w_transposed`, the
    tied embedding); `targets_n` int [N]; `mask_n` float [N]. N need not divide by `chunk`.

    >>> h, w = jnp.zeros((5, 4)), jnp.zeros((4, 7))
    >>> loss, ce = chunked_head_loss(h, w, jnp.zeros(5, jnp.int32), jnp.ones(5), w_transposed=False, chunk=2)
    >>> round(float(ce), 4)  # uniform over 7 classes: 5 * ln 7
    9.7296
    """
    return _chunked(h_nd, w, targets_n, mask_n.astype(jnp.float32), w_transposed, chunk, float(z_loss))


def _logits(h, w, w_transposed):
    dims = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32)


def _chunks(x, n_chunks, chunk):
    pad = n_chunks * chunk - x.shape[0]
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((n_chunks, chunk) + x.shape[1:])


def _run(h, w, targets, mask, w_transposed, chunk, z_loss, head_grad, token_grad=True):
    """Loss sums, and the gradients of the ce part and the z part: per token (dh, when
    `token_grad`) and of the head (dw, when `head_grad`). Unused parts (no z-loss, frozen head,
    no differentiation at all as in evaluation) are never computed."""
    n, d = h.shape
    n_chunks = -(-n // chunk)
    hs, ts, ms = _chunks(h, n_chunks, chunk), _chunks(targets, n_chunks, chunk), _chunks(mask, n_chunks, chunk)
    parts = ("ce", "z") if z_loss else ("ce",)
    w32 = w.astype(jnp.float32)
    to_h = (((1,), (0,)), ((), ())) if w_transposed else (((1,), (1,)), ((), ()))

    def body(dw, xs):
        h_c, t_c, m_c = xs
        logits = _logits(h_c, w, w_transposed)  # [chunk, V] float32
        log_z = jax.nn.logsumexp(logits, axis=-1)
        ce = log_z - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        sums = (jnp.sum(m_c * (ce + z_loss * jnp.square(log_z))), jnp.sum(m_c * ce))
        if not token_grad:
            return dw, (sums, {})
        p = jnp.exp(logits - log_z[:, None])
        g = {"ce": (p - jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)) * m_c[:, None]}
        if z_loss:  # d(sum mask * z log_z^2) / d logits
            g["z"] = p * (2.0 * z_loss * log_z * m_c)[:, None]
        dh = {k: jax.lax.dot_general(g[k], w32, to_h) for k in parts}
        if head_grad:
            h32 = h_c.astype(jnp.float32)
            dw = {k: dw[k] + (g[k].T @ h32 if w_transposed else h32.T @ g[k]) for k in parts}
        return dw, (sums, dh)

    dw0 = {k: jnp.zeros(w.shape, jnp.float32) for k in parts} if head_grad else {}
    dw, ((loss, ce), dh) = jax.lax.scan(body, dw0, (hs, ts, ms))
    dh = {k: v.reshape(-1, d)[:n] for k, v in dh.items()}
    return (jnp.sum(loss), jnp.sum(ce)), (dh, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(h, w, targets, mask, w_transposed, chunk, z_loss):
    return _run(h, w, targets, mask, w_transposed, chunk, z_loss, head_grad=False, token_grad=False)[0]


def _chunked_fwd(h, w, targets, mask, w_transposed, chunk, z_loss):
    sums, grads = _run(h.value, w.value, targets.value, mask.value, w_transposed, chunk, z_loss,
                       head_grad=w.perturbed)
    # zero-size arrays carry the dtypes to the backward (residuals must be arrays)
    return sums, (grads, jnp.zeros((0,), h.value.dtype), jnp.zeros((0,), w.value.dtype))


def _chunked_bwd(w_transposed, chunk, z_loss, res, cts):
    (dh, dw), h_like, w_like = res
    # loss = ce part + z part; the `ce` output (a metric) is the ce part alone
    g_loss, g_ce = (0.0 if isinstance(c, jax.custom_derivatives.SymbolicZero) else c for c in cts)
    scale = {"ce": g_loss + g_ce, "z": g_loss}
    d_h = sum(scale[k] * v for k, v in dh.items()).astype(h_like.dtype)
    d_w = sum(scale[k] * v for k, v in dw.items()).astype(w_like.dtype) if dw else None
    return d_h, d_w, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)
