"""Fused LoRA matmul: y = x W + (x A) B_s with B_s = scale * B, as Pallas kernels and their XLA
reference, under one `custom_vjp`.

Shapes: x [T, d_in] (the caller flattens tokens), W [d_in, d_out] frozen (dense, or int8/NF4
quantized, see quant.py), A [d_in, r], B [r, d_out]. The scale is folded into B outside the
kernels (`B_s = scale * B`, an r x d_out product), so the kernels carry no scalars and autodiff
gives dB and dscale from dB_s.

Forward (one pass over x, W + s A B never formed): the TPU grid is (token tile i, out tile j,
in tile k). Each step adds x_ik W_kj to an f32 accumulator; while j == 0 it also adds x_ik A_k
to a [tm, r] f32 scratch, which is complete after the last k of j == 0 and then reused by every
later j of the same row block (j and k run in order, i in parallel). At the last k,
y_ij = acc + xa_i B_s,j. xa [T, r] is written out once as the backward's residual.

Backward (no dW: W is frozen): on TPU u = dy B_s^T [T, r] is accumulated during the first
in-tile of the dx kernel and reused for the others, dx = dy W^T + u A^T in one kernel over W's
tiles, then dA = x^T u and dB_s = xa^T dy are skinny XLA matmuls (f32 accumulation).

GPU (Pallas on Triton): programs of a grid run concurrently, so nothing is shared between
them: the grid is (i, j) with the k loop inside. By default each program accumulates its own
xa in the same k loop (x is read once, but the x A work is repeated for every out tile: r/tn
of the base matmul, 16/128 at r = 16, on narrow tensor-core tiles); `xa_mode="precompute"`
instead computes xa once with a skinny XLA matmul (one more read of x, T d_in bytes) and the
kernel only adds xa B_s. benchmarks/lora_kernels.py times both. In the backward u = dy B_s^T
is always computed once (skinny XLA matmul) and the dx kernel adds u A^T to dy W^T.
On TPU the sequential j axis makes the reuse free: LoRA adds r (1/d_in + 1/d_out) of the base
FLOPs to the forward (0.8% at r = 16, d = 4096).

Tokens are grouped (one adapter per group, `fused_lora`): one adapter is a bank of 1, and a
multi-adapter batch picks each token tile's adapter by index (multi_lora.py).

Any shape: tokens, d_in, d_out and r are zero-padded to block multiples in the wrapper and the
result sliced (zero rows/columns add nothing to any product). A dense W whose dims are not block
multiples is copied padded on every call (XLA may hoist it out of a loop, not out of a step);
model dims (multiples of 128) need no copy. Float32 and bfloat16 inputs,
float32 accumulation everywhere; outputs in x's dtype.

    y = lora_matmul(x, w, a, b, 2.0, impl="xla")                # the reference
    y = lora_matmul(x, w, a, b, 2.0, impl="tpu", interpret=True)  # the kernel on CPU
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlearn.kernels.quant import QuantizedWeight, dequantize, dequantize_pieces, nf4_decode

IMPLS = ("xla", "tpu", "gpu")
F32 = jnp.float32


def _dot(a, b, trans_b: bool = False):
    """2-D product with float32 accumulation; trans_b contracts both last dims (a @ b^T)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: tm tokens, tn output features, tk input features (tk is also the
    weight's packing group for NF4)."""

    tm: int
    tn: int
    tk: int


def default_blocks(impl: str, t: int, d_in: int, d_out: int, dtype, w=None) -> Blocks:
    """Tiles that fit the shape: TPU wants (8|16, 128)-aligned tiles, Triton powers of two."""
    sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
    if impl == "tpu":
        tm = min(256, _round_up(t, sub))
        tn = min(512, _round_up(d_out, 128))
        tk = min(512, _round_up(d_in, 128))
    else:
        # Triton: 128 x 128 output tiles stepping 64 deep (the usual H100 shape); the dx kernel
        # swaps the roles (128-wide dx tiles stepping 64 over d_out), see `_dx`.
        tm = min(128, max(16, pl.next_power_of_2(t)))
        tn = min(128, max(16, pl.next_power_of_2(d_out)))
        tk = min(64, max(16, pl.next_power_of_2(d_in)))
    if isinstance(w, QuantizedWeight) and w.fmt == "nf4":
        tk = w.group  # a tile must be one packing group
        if impl == "gpu":  # the dx kernel keeps a [tm, group] accumulator in registers
            tm, tn = min(tm, 32), min(tn, 64)
    return Blocks(tm, tn, tk)


# ----------------------------------------------------------------------------- the weight
# A base weight reaches the kernels as a tuple of arrays plus a static format: ("dense", (w,)),
# ("int8", (q, scale)), ("nf4", (q, scale)). `_w_tile_specs` gives each array's block rows per
# k tile; `_pieces` turns the loaded tiles into dense pieces (row offset, rows, tile).

def _w_arrays(w) -> tuple[str, tuple]:
    if isinstance(w, QuantizedWeight):
        return w.fmt, (w.q, w.scale)
    return "dense", (w,)


def _w_rows(fmt: str, tk: int) -> tuple[int, ...]:
    """Rows of each weight array that belong to one k tile of `tk` weight rows."""
    if fmt == "dense":
        return (tk,)
    if fmt == "int8":
        return (tk, 0)  # 0: the per-channel scale row is shared by every k tile
    return (tk // 2, tk // 64)


def _pieces(fmt: str, tiles, tk: int, dtype, per_scale_row: bool = False):
    """Dense pieces of one weight tile. `per_scale_row` (GPU) splits NF4 halves into 64-row
    pieces with one scale row each, so Triton never reshapes a scale tile."""
    if fmt == "dense":
        return [(0, tk, tiles[0].astype(dtype))]
    if fmt == "nf4" and per_scale_row:
        p = tiles[0].astype(jnp.int32)
        scale = tiles[1]
        half, n_half = tk // 2, tk // 128
        out = []
        for h, codes in enumerate((p & 15, (p >> 4) & 15)):  # low nibbles: first half of the tile
            vals = nf4_decode(codes)  # [tk/2, tn]
            for g in range(n_half):
                s_row = scale[h * n_half + g:h * n_half + g + 1]  # [1, tn]
                out.append((h * half + g * 64, 64, (vals[g * 64:(g + 1) * 64] * s_row).astype(dtype)))
        return out
    return dequantize_pieces(fmt, tiles[0], tiles[1], tk, dtype)


def _pad_weight(fmt: str, arrays, d_in_p: int, d_out_p: int):
    """Zero-pad the weight arrays to the padded (d_in, d_out). Quantized weights are padded
    along d_in at quantize time (nf4) or here (int8: a zero code is a zero weight)."""
    def pad(a, rows):
        return jnp.pad(a, ((0, rows - a.shape[0]), (0, d_out_p - a.shape[1])))
    if fmt == "dense":
        return (pad(arrays[0], d_in_p),)
    if fmt == "int8":
        return pad(arrays[0], d_in_p), pad(arrays[1], 1)
    q, s = arrays
    return pad(q, d_in_p // 2), pad(s, d_in_p // 64)


# ----------------------------------------------------------------------------- TPU (Mosaic)
# Adapters come as a bank a [N, d_in, r], b_s [N, r, d_out] and one adapter id per token tile
# (`tile_ids`, scalar-prefetched into SMEM so the index maps can read it): a single adapter is
# N = 1, and a multi-adapter batch (multi_lora.py) picks each tile's adapter by index.

def _tpu_fwd_kernel(fmt, n_w, tk, ids_ref, x_ref, *refs):
    del ids_ref  # used by the index maps only
    w_refs, (a_ref, b_ref, y_ref, xa_ref, acc_ref, xa_acc_ref) = refs[:n_w], refs[n_w:]
    j, k, nk = pl.program_id(1), pl.program_id(2), pl.num_programs(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((j == 0) & (k == 0))
    def _():
        xa_acc_ref[...] = jnp.zeros_like(xa_acc_ref)

    x = x_ref[...]
    acc = acc_ref[...]
    for off, rows, piece in _pieces(fmt, [r[...] for r in w_refs], tk, x.dtype):
        acc = acc + _dot(x[:, off:off + rows], piece)
    acc_ref[...] = acc

    @pl.when(j == 0)  # xa for this row block, once; later j reuse it
    def _():
        xa_acc_ref[...] += _dot(x, a_ref[...])

    @pl.when(k == nk - 1)
    def _():
        xa = xa_acc_ref[...]
        y_ref[...] = (acc_ref[...] + _dot(xa.astype(b_ref.dtype), b_ref[...])).astype(y_ref.dtype)
        xa_ref[...] = xa


def _tpu_dx_kernel(fmt, n_w, tk, ids_ref, dy_ref, *refs):
    del ids_ref
    w_refs, (a_ref, b_ref, dx_ref, u_ref, acc_ref, u_acc_ref) = refs[:n_w], refs[n_w:]
    kk, j, nj = pl.program_id(1), pl.program_id(2), pl.num_programs(2)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((kk == 0) & (j == 0))
    def _():
        u_acc_ref[...] = jnp.zeros_like(u_acc_ref)

    dy = dy_ref[...]
    for off, rows, piece in _pieces(fmt, [r[...] for r in w_refs], tk, dy.dtype):
        acc_ref[:, off:off + rows] += _dot(dy, piece, trans_b=True)

    @pl.when(kk == 0)  # u = dy B_s^T for this row block, once; later in-tiles reuse it
    def _():
        u_acc_ref[...] += _dot(dy, b_ref[...], trans_b=True)

    @pl.when(j == nj - 1)
    def _():
        u = u_acc_ref[...]
        dx_ref[...] = (acc_ref[...] + _dot(u.astype(a_ref.dtype), a_ref[...], trans_b=True)).astype(dx_ref.dtype)
        u_ref[...] = u


def _tpu_w_specs(fmt, arrays, tk, tn, transposed_grid: bool):
    """BlockSpecs of the weight arrays; grid (i, j, k) forward, (i, k, j) for dx."""
    specs = []
    for arr, rows in zip(arrays, _w_rows(fmt, tk)):
        block = (rows if rows else arr.shape[0], tn)
        if transposed_grid:
            specs.append(pl.BlockSpec(block, (lambda i, k, j, ids: (k, j)) if rows else (lambda i, k, j, ids: (0, j))))
        else:
            specs.append(pl.BlockSpec(block, (lambda i, j, k, ids: (k, j)) if rows else (lambda i, j, k, ids: (0, j))))
    return specs


def _tpu_cost(t: int, d_in: int, d_out: int, r: int, *arrays) -> pl.CostEstimate:
    """XLA's view of a fused kernel's work: 2 t (d_in d_out + d_in r + r d_out) FLOPs (forward:
    x W, x A, (x A) B; dx: dy W^T, dy B^T, u A^T) and its operands' and outputs' bytes. Without
    it XLA's cost analysis counts a Mosaic call as zero FLOPs, and the fit check's FLOPs per step
    (jaxlearn/pod/compile.py) would miss every adapted projection's matmul."""
    nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.CostEstimate(flops=2 * t * (d_in * d_out + d_in * r + r * d_out), transcendentals=0,
                           bytes_accessed=int(nbytes))


def _tpu_call(kernel, name, grid, in_specs, out_specs, out_shape, scratch, interpret, cost=None):
    from jax.experimental.pallas import tpu as pltpu
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        # The second axis must run in order within a row block (xa / u are made at its first
        # index and reused), the third is the reduction; row blocks are independent.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name=name,
        cost_estimate=cost,
    )


def _tpu_forward(x, fmt, w_arrays, a, bs, tile_ids, blk: Blocks, interpret):
    from jax.experimental.pallas import tpu as pltpu
    t, d_in = x.shape
    d_out, r = bs.shape[2], a.shape[2]
    outs = [jax.ShapeDtypeStruct((t, d_out), x.dtype), jax.ShapeDtypeStruct((t, r), F32)]
    call = _tpu_call(
        functools.partial(_tpu_fwd_kernel, fmt, len(w_arrays), blk.tk), "lora_fwd",
        (t // blk.tm, d_out // blk.tn, d_in // blk.tk),
        [pl.BlockSpec((blk.tm, blk.tk), lambda i, j, k, ids: (i, k)),
         *_tpu_w_specs(fmt, w_arrays, blk.tk, blk.tn, False),
         pl.BlockSpec((None, blk.tk, r), lambda i, j, k, ids: (ids[i], k, 0)),
         pl.BlockSpec((None, r, blk.tn), lambda i, j, k, ids: (ids[i], 0, j))],
        [pl.BlockSpec((blk.tm, blk.tn), lambda i, j, k, ids: (i, j)),
         pl.BlockSpec((blk.tm, r), lambda i, j, k, ids: (i, 0))],
        outs, [pltpu.VMEM((blk.tm, blk.tn), F32), pltpu.VMEM((blk.tm, r), F32)], interpret,
        _tpu_cost(t, d_in, d_out, r, x, *w_arrays, a, bs, *outs))
    return call(tile_ids, x, *w_arrays, a, bs)


def _tpu_dx(dy, fmt, w_arrays, a, bs, tile_ids, blk: Blocks, interpret):
    from jax.experimental.pallas import tpu as pltpu
    t, d_out = dy.shape
    d_in, r = a.shape[1], a.shape[2]
    outs = [jax.ShapeDtypeStruct((t, d_in), dy.dtype), jax.ShapeDtypeStruct((t, r), F32)]
    call = _tpu_call(
        functools.partial(_tpu_dx_kernel, fmt, len(w_arrays), blk.tk), "lora_dx",
        (t // blk.tm, d_in // blk.tk, d_out // blk.tn),
        [pl.BlockSpec((blk.tm, blk.tn), lambda i, k, j, ids: (i, j)),
         *_tpu_w_specs(fmt, w_arrays, blk.tk, blk.tn, True),
         pl.BlockSpec((None, blk.tk, r), lambda i, k, j, ids: (ids[i], k, 0)),
         pl.BlockSpec((None, r, blk.tn), lambda i, k, j, ids: (ids[i], 0, j))],
        [pl.BlockSpec((blk.tm, blk.tk), lambda i, k, j, ids: (i, k)),
         pl.BlockSpec((blk.tm, r), lambda i, k, j, ids: (i, 0))],
        outs, [pltpu.VMEM((blk.tm, blk.tk), F32), pltpu.VMEM((blk.tm, r), F32)], interpret,
        _tpu_cost(t, d_in, d_out, r, dy, *w_arrays, a, bs, *outs))
    return call(tile_ids, dy, *w_arrays, a, bs)


# ----------------------------------------------------------------------------- GPU (Triton)
# Full-extent blocks along the loop axis, sliced with pl.ds inside the kernel (Triton loads
# are pointer arithmetic); the adapter bank is indexed by this tile's id read from tile_ids.

def _gpu_rows(ref, k, rows):
    return ref[pl.ds(k * rows, rows), :] if rows else ref[...]


def _gpu_fwd_kernel(fmt, n_w, tk, nk, xa_given, ids_ref, x_ref, *refs):
    """y tile (i, j): loop over k. xa is either accumulated in the same loop (one pass over x,
    recomputed by every j: r/tn extra work) or, with `xa_given`, read precomputed."""
    w_refs, rest = refs[:n_w], refs[n_w:]
    if xa_given:
        xa_in_ref, b_ref, y_ref = rest
    else:
        a_ref, b_ref, y_ref, xa_ref = rest
    tm, tn, r = y_ref.shape[0], y_ref.shape[1], b_ref.shape[1]
    w_rows = _w_rows(fmt, tk)
    adapter = ids_ref[pl.program_id(0)]

    def body(k, carry):
        acc, xa = carry
        x = x_ref[:, pl.ds(k * tk, tk)]
        tiles = [_gpu_rows(ref, k, rows) for ref, rows in zip(w_refs, w_rows)]
        for off, rows, piece in _pieces(fmt, tiles, tk, x.dtype, per_scale_row=True):
            acc += _dot(x_ref[:, pl.ds(k * tk + off, rows)] if rows != tk else x, piece)
        if not xa_given:
            xa = xa + _dot(x, a_ref[adapter, pl.ds(k * tk, tk), :])
        return acc, xa

    acc, xa = jax.lax.fori_loop(0, nk, body, (jnp.zeros((tm, tn), F32), jnp.zeros((tm, r), F32)))
    if xa_given:
        xa = xa_in_ref[...]
    y_ref[...] = (acc + _dot(xa.astype(b_ref.dtype), b_ref[adapter, :, :])).astype(y_ref.dtype)

    if not xa_given:
        @pl.when(pl.program_id(1) == 0)
        def _():
            xa_ref[...] = xa


def _gpu_dx_kernel(fmt, n_w, tk, nj, tn, ids_ref, dy_ref, *refs):
    """dx tile (i, k): loop over d_out; u = dy B_s^T comes precomputed (once, by XLA)."""
    w_refs, (u_ref, a_ref, dx_ref) = refs[:n_w], refs[n_w:]
    tm = dx_ref.shape[0]
    n_pieces = 1 if fmt != "nf4" else tk // 64
    adapter = ids_ref[pl.program_id(0)]

    def body(j, accs):
        dy = dy_ref[:, pl.ds(j * tn, tn)]
        tiles = [ref[:, pl.ds(j * tn, tn)] for ref in w_refs]
        pieces = _pieces(fmt, tiles, tk, dy.dtype, per_scale_row=True)
        return tuple(acc + _dot(dy, piece, trans_b=True) for acc, (_, _, piece) in zip(accs, pieces))

    rows = tk // n_pieces
    accs = jax.lax.fori_loop(0, nj, body, tuple(jnp.zeros((tm, rows), F32) for _ in range(n_pieces)))
    u = u_ref[...]
    k0 = pl.program_id(1) * tk
    for p, acc in enumerate(accs):
        a_p = a_ref[adapter, pl.ds(k0 + p * rows, rows), :]
        dx_ref[:, p * rows:(p + 1) * rows] = (acc + _dot(u.astype(a_p.dtype), a_p, trans_b=True)).astype(dx_ref.dtype)


def _gpu_call(kernel, name, grid, in_specs, out_specs, out_shape, interpret):
    from jax.experimental.pallas import triton as plgpu
    tile = out_shape[0].shape[1] // grid[1] * out_shape[0].shape[0] // grid[0]  # output tile elements
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=8 if tile >= 128 * 128 else 4, num_stages=3),
                          interpret=interpret, name=name)


def _group_xa(x, a, tile_ids, tm):
    """x A per token tile with its adapter (XLA): [T, r] f32."""
    if a.shape[0] == 1:
        return _dot(x, a[0])
    g = tile_ids.shape[0]
    xg = x.reshape(g, tm, x.shape[1])
    return jnp.einsum("gtd,gdr->gtr", xg, a[tile_ids], preferred_element_type=F32).reshape(x.shape[0], -1)


def _gpu_forward(x, fmt, w_arrays, a, bs, tile_ids, blk: Blocks, interpret, xa_mode="recompute"):
    t, d_in = x.shape
    d_out, r = bs.shape[2], a.shape[2]
    given = xa_mode == "precompute"
    w_specs = [pl.BlockSpec((arr.shape[0], blk.tn), lambda i, j: (0, j)) for arr in w_arrays]
    b_spec = pl.BlockSpec((bs.shape[0], r, blk.tn), lambda i, j: (0, 0, j))
    y_spec = pl.BlockSpec((blk.tm, blk.tn), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((blk.tm, r), lambda i, j: (i, 0))
    y_shape = jax.ShapeDtypeStruct((t, d_out), x.dtype)
    kernel = functools.partial(_gpu_fwd_kernel, fmt, len(w_arrays), blk.tk, d_in // blk.tk, given)
    head = [pl.BlockSpec(tile_ids.shape, lambda i, j: (0,)), pl.BlockSpec((blk.tm, d_in), lambda i, j: (i, 0)), *w_specs]
    if given:  # one skinny XLA matmul reads x once more; the kernel only adds xa B
        xa = _group_xa(x, a, tile_ids, blk.tm)
        call = _gpu_call(kernel, "lora_fwd", (t // blk.tm, d_out // blk.tn), [*head, row_spec, b_spec], [y_spec],
                         [y_shape], interpret)
        return call(tile_ids, x, *w_arrays, xa, bs)[0], xa
    call = _gpu_call(kernel, "lora_fwd", (t // blk.tm, d_out // blk.tn),
                     [*head, pl.BlockSpec(a.shape, lambda i, j: (0, 0, 0)), b_spec], [y_spec, row_spec],
                     [y_shape, jax.ShapeDtypeStruct((t, r), F32)], interpret)
    return call(tile_ids, x, *w_arrays, a, bs)


def _gpu_dx(dy, fmt, w_arrays, a, bs, tile_ids, blk: Blocks, interpret):
    t, d_out = dy.shape
    d_in, r = a.shape[1], a.shape[2]
    # u = dy B_s^T once, by XLA (a skinny [T, d_out] x [d_out, r] product, reused by every dx tile)
    if bs.shape[0] == 1:
        u = _dot(dy, bs[0], trans_b=True)
    else:
        g = tile_ids.shape[0]
        u = jnp.einsum("gto,gro->gtr", dy.reshape(g, blk.tm, d_out), bs[tile_ids],
                       preferred_element_type=F32).reshape(t, r)
    w_specs = [pl.BlockSpec((rows if rows else arr.shape[0], d_out), (lambda i, k: (k, 0)) if rows else (lambda i, k: (0, 0)))
               for arr, rows in zip(w_arrays, _w_rows(fmt, blk.tk))]
    call = _gpu_call(
        functools.partial(_gpu_dx_kernel, fmt, len(w_arrays), blk.tk, d_out // blk.tn, blk.tn), "lora_dx",
        (t // blk.tm, d_in // blk.tk),
        [pl.BlockSpec(tile_ids.shape, lambda i, k: (0,)),
         pl.BlockSpec((blk.tm, d_out), lambda i, k: (i, 0)), *w_specs,
         pl.BlockSpec((blk.tm, r), lambda i, k: (i, 0)),
         pl.BlockSpec(a.shape, lambda i, k: (0, 0, 0))],
        [pl.BlockSpec((blk.tm, blk.tk), lambda i, k: (i, k))],
        [jax.ShapeDtypeStruct((t, d_in), dy.dtype)], interpret)
    return call(tile_ids, dy, *w_arrays, u, a)[0], u


# ----------------------------------------------------------------------------- the op
# Internally tokens are [G, S, d] (G groups of S tokens, one adapter per group: G = 1 for plain
# LoRA, G = batch for a multi-adapter batch) and adapters a bank [N, ...] picked by ids [G].

@dataclasses.dataclass(frozen=True)
class Plan:
    """How to run: impl ("xla" | "tpu" | "gpu"), tile sizes, and Pallas interpret mode."""

    impl: str
    blocks: Blocks | None = None
    interpret: bool = False
    # GPU forward: "recompute" xa inside every output tile (one pass over x, r/tn extra MMA
    # work) or "precompute" it with one skinny XLA matmul first; the benchmark measures both.
    xa_mode: str = "recompute"


def _pad_operands(plan: Plan, d_in: int, fmt, w_arrays, a, bs):
    """Padded d_in and weight/adapter operands at block multiples."""
    blk = plan.blocks
    d_out, r = bs.shape[2], a.shape[2]
    # Triton: every loaded block's size a power of two, every dot at least 16 deep
    r_p = max(16, pl.next_power_of_2(r)) if plan.impl == "gpu" else r
    if plan.impl == "gpu":  # dx swaps tk and tn (powers of two: the larger is a multiple of both)
        d_in_p, d_out_p = _round_up(d_in, max(blk.tk, blk.tn)), _round_up(d_out, max(blk.tk, blk.tn))
    else:
        d_in_p, d_out_p = _round_up(d_in, blk.tk), _round_up(d_out, blk.tn)
    if fmt == "nf4":
        d_in_p = max(d_in_p, w_arrays[0].shape[0] * 2)
    ap = jnp.pad(a, ((0, 0), (0, d_in_p - d_in), (0, r_p - r)))
    bp = jnp.pad(bs, ((0, 0), (0, r_p - r), (0, d_out_p - d_out)))
    return d_in_p, _pad_weight(fmt, w_arrays, d_in_p, d_out_p), ap, bp


def _tokens_padded(z_gsd, tm: int, cols: int):
    """[G, S, d] -> [G * S_p, cols]: each group padded to whole token tiles (a tile never
    straddles two adapters) and the feature axis zero-padded."""
    g, s, d = z_gsd.shape
    s_p = _round_up(s, tm)
    return jnp.pad(z_gsd, ((0, 0), (0, s_p - s), (0, cols - d))).reshape(g * s_p, cols)


def _reference_forward(x, w, a, bs, ids):
    """XLA: the same math as the kernels (f32 accumulation, xa cast to B's dtype)."""
    w_dense = dequantize(w, x.dtype) if isinstance(w, QuantizedWeight) else w.astype(x.dtype)
    g, s, d_in = x.shape
    base = _dot(x.reshape(g * s, d_in), w_dense).reshape(g, s, -1)
    xa = jnp.einsum("gsd,gdr->gsr", x, a[ids], preferred_element_type=F32)
    delta = jnp.einsum("gsr,gro->gso", xa.astype(bs.dtype), bs[ids], preferred_element_type=F32)
    return (base + delta).astype(x.dtype), xa


def _reference_dx(dy, w, a, bs, ids):
    w_dense = dequantize(w, dy.dtype) if isinstance(w, QuantizedWeight) else w.astype(dy.dtype)
    g, s, d_out = dy.shape
    base = _dot(dy.reshape(g * s, d_out), w_dense, trans_b=True).reshape(g, s, -1)
    u = jnp.einsum("gso,gro->gsr", dy, bs[ids], preferred_element_type=F32)
    return (base + jnp.einsum("gsr,gdr->gsd", u.astype(a.dtype), a[ids], preferred_element_type=F32)).astype(dy.dtype), u


def _forward(plan: Plan, x, w, a, bs, ids):
    if plan.impl == "xla":
        return _reference_forward(x, w, a, bs, ids)
    g, s, d_in = x.shape
    fmt, arrays = _w_arrays(w)
    d_in_p, wp, ap, bp = _pad_operands(plan, d_in, fmt, arrays, a, bs)
    xp = _tokens_padded(x, plan.blocks.tm, d_in_p)
    tile_ids = jnp.repeat(ids.astype(jnp.int32), xp.shape[0] // g // plan.blocks.tm)
    if plan.impl == "tpu":
        y, xa = _tpu_forward(xp, fmt, wp, ap, bp, tile_ids, plan.blocks, plan.interpret)
    else:
        y, xa = _gpu_forward(xp, fmt, wp, ap, bp, tile_ids, plan.blocks, plan.interpret, plan.xa_mode)
    y, xa = y.reshape(g, -1, y.shape[1]), xa.reshape(g, -1, xa.shape[1])
    return y[:, :s, :bs.shape[2]], xa[:, :s, :a.shape[2]]


def _dx(plan: Plan, dy, w, a, bs, ids, d_in):
    if plan.impl == "xla":
        return _reference_dx(dy, w, a, bs, ids)
    g, s, _ = dy.shape
    fmt, arrays = _w_arrays(w)
    _, wp, ap, bp = _pad_operands(plan, d_in, fmt, arrays, a, bs)
    dyp = _tokens_padded(dy, plan.blocks.tm, bp.shape[2])
    tile_ids = jnp.repeat(ids.astype(jnp.int32), dyp.shape[0] // g // plan.blocks.tm)
    blk = plan.blocks
    if plan.impl == "gpu" and fmt != "nf4":
        # dx tiles are [tm, tk] stepping tn over d_out: wide output tiles, a short step
        blk = Blocks(blk.tm, tn=min(blk.tn, blk.tk), tk=max(blk.tn, blk.tk))
    run = _tpu_dx if plan.impl == "tpu" else _gpu_dx
    dx, u = run(dyp, fmt, wp, ap, bp, tile_ids, blk, plan.interpret)
    dx, u = dx.reshape(g, -1, dx.shape[1]), u.reshape(g, -1, u.shape[1])
    return dx[:, :s, :d_in], u[:, :s, :a.shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_lora(plan: Plan, x_gsd, w, a_ndr, bs_nro, ids_g):
    """The differentiable core: y[g] = x[g] W + (x[g] A[ids[g]]) B_s[ids[g]], f32 accumulation.

    Prefer `lora_matmul` / `multi_lora_matmul`, which reshape, scale and pick blocks.
    """
    return _forward(plan, x_gsd, w, a_ndr, bs_nro, ids_g)[0]


def _fused_fwd(plan, x, w, a, bs, ids):
    y, xa = _forward(plan, x, w, a, bs, ids)
    return y, (x, w, a, bs, ids, xa)


def _fused_bwd(plan, res, dy):
    x, w, a, bs, ids, xa = res
    dx, u = _dx(plan, dy, w, a, bs, ids, x.shape[2])
    # Skinny products over each group's tokens ([d_in, r] and [r, d_out], f32 accumulation),
    # summed into the adapter each group used.
    da = jnp.einsum("gsd,gsr->gdr", x, u.astype(x.dtype), preferred_element_type=F32)
    dbs = jnp.einsum("gsr,gso->gro", xa.astype(dy.dtype), dy, preferred_element_type=F32)
    n = a.shape[0]
    if n == 1:
        da, dbs = jnp.sum(da, 0, keepdims=True), jnp.sum(dbs, 0, keepdims=True)
    else:
        da, dbs = jax.ops.segment_sum(da, ids, n), jax.ops.segment_sum(dbs, ids, n)
    # W is frozen: its cotangent is a symbolic zero (None), never computed.
    dw = None if not isinstance(w, QuantizedWeight) else jax.tree.map(lambda _: None, w)
    return dx, dw, da.astype(a.dtype), dbs.astype(bs.dtype), None


fused_lora.defvjp(_fused_fwd, _fused_bwd)


def make_plan(impl: str, t: int, d_in: int, d_out: int, dtype, w, blocks: Blocks | None = None,
              interpret: bool = False, xa_mode: str = "recompute") -> Plan:
    """A Plan with default tiles for the shape (NF4 forces tk to its packing group)."""
    if impl not in IMPLS:
        raise ValueError(f"lora kernel impl {impl!r}; use one of {IMPLS}.")
    if impl == "xla":
        return Plan("xla")
    blocks = blocks or default_blocks(impl, t, d_in, d_out, dtype, w)
    if isinstance(w, QuantizedWeight) and w.fmt == "nf4":
        if blocks.tk != w.group:
            blocks = dataclasses.replace(blocks, tk=w.group)  # an NF4 k tile is one packing group
        if impl == "tpu" and not interpret and (w.group // 64) % 8:
            raise ValueError(f"NF4 group {w.group} gives a scale tile of {w.group // 64} rows; TPU needs a "
                             f"multiple of 8: quantize with group=512 (the default).")
    if xa_mode not in ("recompute", "precompute"):
        raise ValueError(f"xa_mode {xa_mode!r}; use recompute or precompute.")
    return Plan(impl, blocks, interpret, xa_mode)


def lora_matmul(x: jax.Array, w, a: jax.Array, b: jax.Array, scale, *, impl: str = "xla",
                blocks: Blocks | None = None, interpret: bool = False, xa_mode: str = "recompute") -> jax.Array:
    """y = x W + scale (x A) B over the last axis of x, W frozen (dense or QuantizedWeight).

    `impl`: "xla" (reference), "tpu" (Pallas Mosaic), "gpu" (Pallas Triton); `interpret` runs
    a Pallas kernel's semantics on CPU; `xa_mode` (GPU only) see `Plan`. Differentiable in x,
    A, B and scale (not W).

    >>> x, w, a, b = jnp.ones((5, 8)), jnp.ones((8, 3)), jnp.ones((8, 2)), jnp.ones((2, 3))
    >>> lora_matmul(x, w, a, b, 0.5).shape
    (5, 3)
    """
    lead, d_in = x.shape[:-1], x.shape[-1]
    x_gsd = x.reshape(1, -1, d_in)
    d_out = b.shape[-1]
    plan = make_plan(impl, x_gsd.shape[1], d_in, d_out, x.dtype, w, blocks, interpret, xa_mode)
    bs = b.astype(x.dtype) * jnp.asarray(scale, F32).astype(x.dtype)
    y = fused_lora(plan, x_gsd, w, a.astype(x.dtype)[None], bs[None], jnp.zeros((1,), jnp.int32))
    return y.reshape(*lead, d_out)


def lora_matmul_flops(t: int, d_in: int, d_out: int, r: int) -> dict[str, float]:
    """Model FLOPs of forward and backward (no dW), for the benchmark's TFLOP/s."""
    fwd = 2.0 * t * d_in * d_out + 2.0 * t * r * (d_in + d_out)
    bwd = 2.0 * t * d_in * d_out + 2.0 * t * r * (d_out + d_in) + 2.0 * t * r * (d_in + d_out)
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}
