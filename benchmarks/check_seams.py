"""The fast CPU seams give the same values and gradients as the reference ones they replaced.

    python benchmarks/check_seams.py        # prints one line per case, exits 1 on any mismatch

`attend` (grouped_attention: recomputed probabilities, query blocks) and `linear` (custom
backward) against the originals kept in benchmarks/reference_seams.py, forward and backward:
GQA, MHA and MQA; causal, packed segments with padding, a KV cache (decode T=1 and a prefill at
an offset), a PEFT-style prefix, a mask that is not causal at all; `causal=True` (query blocks,
skipping the keys above the diagonal) where the mask allows it; float32 and bfloat16. Small
shapes with 4-query blocks so several blocks show.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import reference_seams as ref  # noqa: E402
from jaxlearn.models import layers  # noqa: E402

KEYS = jax.random.split(jax.random.key(0), 8)


def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def check_attention(name, b, t, s, n, kvh, h, mask, causal, dtype=jnp.float32, tol=2e-5) -> bool:
    q = jax.random.normal(KEYS[0], (b, t, n, h), dtype)
    k = jax.random.normal(KEYS[1], (b, s, kvh, h), dtype)
    v = jax.random.normal(KEYS[2], (b, s, kvh, h), dtype)
    w = jax.random.normal(KEYS[3], (b, t, n, h))

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    new = grads(lambda q, k, v: layers.attend(q, k, v, mask, "xla", causal=causal))
    old = grads(lambda q, k, v: ref.attend(q, k, v, mask, "xla"))
    out_err = _rel(layers.attend(q, k, v, mask, "xla", causal=causal), ref.attend(q, k, v, mask, "xla"))
    errs = [out_err] + [_rel(a, c) for a, c in zip(new[1], old[1])]
    ok = max(errs) < tol
    print(f"{'ok ' if ok else 'BAD'} attend   {name:34s} causal={causal!s:5s} {jnp.dtype(dtype).name:8s} "
          f"rel err out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    return ok


def check_linear(x_shape, w_shape, n_in, w_transposed, dtype=jnp.float32, tol=1e-5) -> bool:
    x = jax.random.normal(KEYS[4], x_shape, dtype)
    w = jax.random.normal(KEYS[5], w_shape)

    def grads(fn):
        loss = lambda x, w: jnp.sum(jnp.sin(fn(x, w, n_in, w_transposed).astype(jnp.float32)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

    (v1, g1), (v2, g2) = grads(layers.linear), grads(ref.linear)
    errs = [_rel(v1, v2)] + [_rel(a, c) for a, c in zip(g1, g2)]
    same_dtypes = all(a.dtype == c.dtype for a, c in zip(g1, g2))
    ok = max(errs) < tol and same_dtypes
    print(f"{'ok ' if ok else 'BAD'} linear   x{x_shape} w{w_shape} n_in={n_in} w_transposed={w_transposed} "
          f"{jnp.dtype(dtype).name}: rel err value {errs[0]:.1e}, dx {errs[1]:.1e}, dw {errs[2]:.1e}, "
          f"grad dtypes {g1[0].dtype}/{g1[1].dtype}")
    return ok


def main() -> int:
    layers.CAUSAL_BLOCK = 4  # several query blocks at these small sizes
    mask = layers.attention_mask
    ok = True
    seg = jnp.asarray([[1] * 8 + [2] * 6 + [0] * 2, [1] * 16])  # two packed documents + padding; one
    idx = jnp.broadcast_to(jnp.arange(16), (2, 16))
    train = mask(seg, idx, seg)
    for causal in (True, False):
        ok &= check_attention("train, packed, GQA 8/2", 2, 16, 16, 8, 2, 8, train, causal)
        ok &= check_attention("train, MHA 4/4", 2, 16, 16, 4, 4, 8, train, causal)
        ok &= check_attention("train, MQA 6/1", 2, 16, 16, 6, 1, 8, train, causal)
        ok &= check_attention("train, bfloat16", 2, 16, 16, 8, 2, 8, train, causal, jnp.bfloat16, tol=3e-2)
    cache_seg = jnp.asarray([[1] * 10 + [0] * 6, [1] * 12 + [0] * 4])
    ok &= check_attention("decode T=1 of S=16 at 9", 2, 1, 16, 8, 2, 8,
                          mask(jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 9), cache_seg), False)
    for start in (0, 3, 8):
        ok &= check_attention(f"prefill T=8 of S=16 at {start}", 2, 8, 16, 8, 2, 8,
                              mask(jnp.ones((2, 8), jnp.int32), jnp.broadcast_to(start + jnp.arange(8), (2, 8)),
                                   jnp.ones((2, 16), jnp.int32)), False)
    prefix = jnp.concatenate([jnp.ones((2, 1, 16, 4), bool), mask(jnp.ones_like(seg), idx, jnp.ones_like(seg))], -1)
    for causal in (True, False):
        ok &= check_attention("prefix P=4 + 16 causal", 2, 16, 20, 8, 2, 8, prefix, causal)
    ok &= check_attention("not causal (all keys visible)", 2, 16, 16, 8, 2, 8, jnp.ones((2, 1, 16, 16), bool), False)

    for dtype in (jnp.float32, jnp.bfloat16):
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        ok &= check_linear((2, 5, 6), (6, 3, 4), 1, False, dtype, tol)  # q/k/v: [embed] -> [heads, head_dim]
        ok &= check_linear((2, 5, 3, 4), (3, 4, 7), 2, False, dtype, tol)  # o: [heads, head_dim] -> [embed]
        ok &= check_linear((2, 5, 6), (9, 6), 1, True, dtype, tol)  # tied LM head
        ok &= check_linear((6,), (6, 4), 1, False, dtype, tol)  # no batch axes
    print("all ok" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
