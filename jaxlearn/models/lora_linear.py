"""LoRA's y = x W + (x A) (s B) on the XLA path, as augmented GEMMs.

With rank r much smaller than the layer, LoRA's matmuls are a few percent of a step's FLOPs but
each is a separate pass over a [tokens, d] activation: written in the obvious way (`unmerged`),
every adapted projection costs about four extra reads/writes of x-sized and four of y-sized
arrays per step (x A, the add of the delta, dy B^T, dB, dA, the add of u A^T). On CPUs, and for
XLA on GPUs/TPUs, those passes are what LoRA's overhead is made of.

`lora_linear` instead folds the adapter into the GEMM the frozen base needs anyway:

    forward:   [t | y]  = x  @ [A | W + A (sB)]          (one GEMM, r extra output columns)
    backward:  [u | dx] = dy @ [sB ; W + A (sB)]^T       (one GEMM, r extra output columns)
               dA = x^T u,  dB = s t^T dy

so the per-step activation traffic it adds is one pass over x (dA) and one over dy (dB). In
exchange, W + A (sB) is formed twice per step (once each way, a weight-sized pass: nothing
weight-sized is kept for the backward, so memory is unchanged). That trade wins when the batch
has enough tokens (`augmented_wins`); `adapted_linear` picks per layer at trace time.

W is frozen in every PEFT recipe, but the rule still returns its exact gradient x^T dy (XLA
drops that GEMM when nothing uses it), so partial fine-tuning of an adapted weight stays right.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Name of the saved [tokens, r] product x A, so remat policies can keep it (it is tiny) instead
# of the [tokens, r + d_out] GEMM output it is sliced from (jaxlearn/models/layers.py).
LORA_T_NAME = "lora_t"


def augmented_wins(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether `lora_linear` moves fewer bytes than the unmerged form for this layer and batch.

    Unmerged adds ~4 passes over x and ~4 over y: 4 T (d_in + d_out) elements. Augmented adds
    one pass each over x and dy plus four weight-sized passes: T (d_in + d_out) + 4 d_in d_out.
    (SmolLM2-135M: augmented from ~560 tokens per step; a 4096/14336 layer from ~4,250.)

    >>> augmented_wins(1024, 576, 1536), augmented_wins(128, 576, 1536)
    (True, False)
    """
    return 3 * tokens * (d_in + d_out) > 4 * d_in * d_out


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b_scaled: jax.Array, n_in: int = 1) -> jax.Array:
    """x W + (x A) b_scaled, contracting x's last `n_in` axes with W's and A's first `n_in`.

    Shapes: x [..., *in], w [*in, *out], a [*in, r], b_scaled [r, *out] (LoRA's B with the
    scale s already folded in). Same values and gradients as the unmerged form.

    >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    >>> lora_linear(x, w, jnp.ones((3, 1)), jnp.zeros((1, 4))).shape
    (2, 4)
    """
    return _lora_linear(x, w, a, b_scaled, n_in)


def _flat(x, w, a, b, n_in):
    k = math.prod(x.shape[x.ndim - n_in:])
    r = a.shape[-1]
    return x.reshape(-1, k), w.reshape(k, -1), a.reshape(k, r), b.reshape(r, -1)


def _forward(x, w, a, b, n_in):
    x2, w2, a2, b2 = _flat(x, w, a, b, n_in)
    r = a2.shape[1]
    merged = w2 + a2 @ b2  # [k, n]; XLA fuses the concatenation below into this pass
    ty = x2 @ jnp.concatenate([a2, merged], axis=1)  # [T, r + n]
    y = ty[:, r:].reshape(x.shape[:x.ndim - n_in] + w.shape[n_in:])
    return y, checkpoint_name(ty[:, :r], LORA_T_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_linear(x, w, a, b, n_in):
    return _forward(x, w, a, b, n_in)[0]


def _lora_linear_fwd(x, w, a, b, n_in):
    y, t = _forward(x, w, a, b, n_in)
    return y, (x, w, a, b, t)


def _lora_linear_bwd(n_in, res, dy):
    x, w, a, b, t = res
    x2, w2, a2, b2 = _flat(x, w, a, b, n_in)
    r = a2.shape[1]
    dy2 = dy.reshape(x2.shape[0], -1)
    stacked = jnp.concatenate([b2, w2 + a2 @ b2], axis=0)  # [r + k, n], rebuilt rather than kept
    udx = jax.lax.dot_general(dy2, stacked, (((1,), (1,)), ((), ())))  # [T, r + k]
    u, dx = udx[:, :r], udx[:, r:]
    over_tokens = (((0,), (0,)), ((), ()))
    da = jax.lax.dot_general(x2, u, over_tokens)  # [k, r]
    db = jax.lax.dot_general(t, dy2, over_tokens)  # [r, n]
    dw = jax.lax.dot_general(x2, dy2, over_tokens)  # [k, n]; dead code when W is frozen
    return dx.reshape(x.shape), dw.reshape(w.shape), da.reshape(a.shape), db.reshape(b.shape)


_lora_linear.defvjp(_lora_linear_fwd, _lora_linear_bwd)
