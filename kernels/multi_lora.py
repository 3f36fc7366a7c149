"""Multi-adapter LoRA batches (Punica's BGMV/SGMV idea): one pass over a shared frozen base,
each example adding the LoRA adapter it picks from a stacked bank by index.

The kernels are the fused LoRA kernels of lora.py with the token axis split into groups (one
per example) and the adapter blocks chosen by each token tile's id (TPU: scalar prefetch feeds
the index maps; GPU: the tile reads its id and indexes the bank), so the bank is never gathered
into per-example copies and the base matmul runs over all tokens at once. Gradients flow to the
bank (summed over the examples that used each adapter), never to W.

    y = multi_lora_matmul(x_bsd, w, a_bank, b_bank, scales, ids, impl="xla")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.kernels.lora import F32, Blocks, fused_lora, make_plan


def multi_lora_matmul(x: jax.Array, w, a_bank: jax.Array, b_bank: jax.Array, scales: jax.Array,
                      ids: jax.Array, *, impl: str = "xla", blocks: Blocks | None = None,
                      interpret: bool = False, xa_mode: str = "recompute") -> jax.Array:
    """y[b] = x[b] W + scales[ids[b]] (x[b] A[ids[b]]) B[ids[b]].

    x [B, S, d_in]; w [d_in, d_out] (dense or QuantizedWeight); a_bank [N, d_in, r];
    b_bank [N, r, d_out]; scales [N]; ids [B] int in [0, N).

    >>> x, w = jnp.ones((3, 4, 8)), jnp.ones((8, 5))
    >>> a, b = jnp.ones((2, 8, 2)), jnp.ones((2, 2, 5))
    >>> multi_lora_matmul(x, w, a, b, jnp.ones(2), jnp.array([0, 1, 1])).shape
    (3, 4, 5)
    """
    if x.ndim != 3:
        raise ValueError(f"multi_lora_matmul wants x [batch, seq, d_in]; got shape {x.shape}.")
    plan = make_plan(impl, x.shape[1], x.shape[2], b_bank.shape[-1], x.dtype, w, blocks, interpret, xa_mode)
    bs = b_bank.astype(x.dtype) * jnp.asarray(scales, F32).astype(x.dtype)[:, None, None]
    return fused_lora(plan, x, w, a_bank.astype(x.dtype), bs, ids.astype(jnp.int32))


def multi_lora_loop(x, w, a_bank, b_bank, scales, ids):
    """The per-example loop multi_lora_matmul must equal (a test oracle; plain XLA, f32)."""
    w = jnp.asarray(w, F32)
    ids = np.asarray(ids)  # concrete: the loop is unrolled in Python
    rows = []
    for i in range(x.shape[0]):
        n = int(ids[i])
        xb = x[i].astype(F32)
        rows.append(xb @ w + scales[n] * ((xb @ a_bank[n].astype(F32)) @ b_bank[n].astype(F32)))
    return jnp.stack(rows)
