"""Quantized frozen base weights (QLoRA): int8 with per-output-channel scales, and NF4 with
block scales; the quantize step, the plain dequantize (the XLA reference) and the tile
dequantizer the Pallas kernels call on each weight tile.

Layouts (W is [d_in, d_out]; rows are the contracted d_in axis):

    int8  q [d_in, d_out] int8,  scale [1, d_out] f32     W ~= q * scale (symmetric, absmax/127)
    nf4   q [d_in/2, d_out] uint8, scale [d_in/64, d_out] f32
          W[r] ~= NF4[code(r)] * scale[r // 64]           (absmax per block of 64 rows)

NF4 packs two 4-bit codes per byte. Within each group of `group` rows (the kernels' k block),
byte row p holds row p (low nibble) and row p + group/2 (high nibble), so a kernel unpacks a
tile into two contiguous halves and never interleaves rows (which TPU vector layouts make
costly). d_in is padded with zero rows to a multiple of `group`.

    qw = quantize(w, "nf4")  # group 512: an (8, 128)-aligned scale tile on TPU
    w_approx = dequantize(qw)      # [d_in, d_out] float32
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

NF4_BLOCK = 64  # rows per NF4 scale (QLoRA's block size)
FORMATS = ("int8", "nf4")


def _nf4_levels() -> np.ndarray:
    """The 16 NF4 levels of QLoRA: quantiles of N(0, 1) (8 positive, 7 negative, an exact 0),
    normalised to [-1, 1]. Computed from the definition rather than typed in."""
    offset = 0.9677083  # QLoRA's choice: the mean of the two outermost quantile midpoints
    ppf = statistics.NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.array(sorted(pos + neg + [0.0]), np.float64)
    return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A frozen [d_in, d_out] weight stored quantized (see the module docstring for layouts)."""

    q: jax.Array
    scale: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    d_in: int = dataclasses.field(metadata=dict(static=True))  # true rows (before padding)
    group: int = dataclasses.field(metadata=dict(static=True), default=0)  # nf4 packing group
    # the linear layer's own kernel shape (e.g. [d, heads, head_dim]) when it is not 2-D
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_in, self.q.shape[1])

    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def quantize(w: jax.Array, fmt: str, group: int = 512) -> QuantizedWeight:
    """Quantize a [d_in, d_out] weight (done once, when the adapter is attached).

    >>> quantize(jnp.ones((128, 4)), "int8").q.dtype
    dtype('int8')
    """
    w = jnp.asarray(w, jnp.float32)
    d_in, _ = w.shape
    if fmt == "int8":
        scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        return QuantizedWeight(q, scale, "int8", d_in)
    if fmt == "nf4":
        if group % (2 * NF4_BLOCK):
            raise ValueError(f"nf4 group {group} must be a multiple of {2 * NF4_BLOCK}.")
        pad = -d_in % group
        wp = jnp.pad(w, ((0, pad), (0, 0)))
        blocks = wp.reshape(-1, NF4_BLOCK, wp.shape[1])  # [n_blocks, 64, d_out]
        scale = jnp.max(jnp.abs(blocks), axis=1)  # [n_blocks, d_out]
        scale = jnp.where(scale == 0, 1.0, scale)
        normed = blocks / scale[:, None, :]
        codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
        codes = codes.reshape(-1, 2, group // 2, wp.shape[1]).astype(jnp.uint8)  # [groups, lo/hi, g/2, d_out]
        packed = codes[:, 0] | (codes[:, 1] << 4)
        return QuantizedWeight(packed.reshape(-1, wp.shape[1]), scale, "nf4", d_in, group)
    raise ValueError(f"unknown quantization {fmt!r}; use one of {FORMATS}.")


def nf4_decode(codes: jax.Array) -> jax.Array:
    """float32 NF4 levels of integer codes in [0, 16), as a chain of selects: a table gather is
    not a vector op on TPU, 16 selects are."""
    out = jnp.zeros(codes.shape, jnp.float32)
    for c, level in enumerate(NF4_LEVELS.tolist()):
        out = jnp.where(codes == c, jnp.float32(level), out)
    return out


def expand_rows(scale: jax.Array, rows: int) -> jax.Array:
    """[n, d] block scales -> [rows, d], each scale row repeated rows/n times."""
    n, d = scale.shape
    if n == 1:
        return jnp.broadcast_to(scale, (rows, d))
    return jnp.broadcast_to(scale[:, None, :], (n, rows // n, d)).reshape(rows, d)


def dequantize_pieces(fmt: str, q: jax.Array, scale: jax.Array, rows: int, dtype) -> list[tuple[int, int, jax.Array]]:
    """Dequantize one weight tile of `rows` rows: a list of (row offset, row count, W piece).

    int8 gives one piece; nf4 gives the tile's two halves (low and high nibbles). `q` and
    `scale` are the tile's slices in the layouts of the module docstring. This one function
    is used by the reference, the TPU kernels and the GPU kernels, so all do the same math.
    """
    if fmt == "int8":
        return [(0, rows, (q.astype(jnp.float32) * scale).astype(dtype))]
    if fmt == "nf4":
        half = rows // 2
        p = q.astype(jnp.int32)
        lo, hi = nf4_decode(p & 15), nf4_decode((p >> 4) & 15)
        n_half = scale.shape[0] // 2
        s_lo, s_hi = expand_rows(scale[:n_half], half), expand_rows(scale[n_half:], half)
        return [(0, half, (lo * s_lo).astype(dtype)), (half, half, (hi * s_hi).astype(dtype))]
    raise ValueError(f"unknown quantization {fmt!r}; use one of {FORMATS}.")


def nf4_group(d_in: int) -> int:
    """The packing group jaxlearn's models use for an NF4 weight with `d_in` rows: the largest of
    512/256/128 that pads d_in least (so a layer can rebuild its QuantizedWeight from shapes).
    TPU kernels need 512 (an (8, 128)-aligned scale tile); GPU and the XLA path take any.

    >>> nf4_group(2048), nf4_group(576), nf4_group(768)
    (512, 128, 256)
    """
    return min((512, 256, 128), key=lambda g: (-(-d_in // g) * g, -g))


def dequantize_kernel(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """`dequantize`, reshaped to the layer's kernel shape when one was recorded."""
    w = dequantize(qw, dtype)
    return w.reshape(qw.kernel_shape) if qw.kernel_shape else w


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The full [d_in, d_out] weight (the XLA reference path).

    >>> w = jnp.linspace(-1, 1, 512).reshape(128, 4)
    >>> float(jnp.max(jnp.abs(dequantize(quantize(w, "int8")) - w))) < 0.01
    True
    """
    if qw.fmt == "int8":
        return dequantize_pieces("int8", qw.q, qw.scale, qw.d_in, dtype)[0][2]
    g, d_out = qw.group, qw.q.shape[1]
    # Vectorised over groups; elementwise the same ops as `dequantize_pieces` on each tile.
    p = qw.q.astype(jnp.int32).reshape(-1, 1, g // 2, d_out)  # [groups, 1, g/2, d_out]
    codes = jnp.concatenate([p & 15, (p >> 4) & 15], axis=1)  # [groups, lo/hi, g/2, d_out]
    scale = jnp.repeat(qw.scale, NF4_BLOCK, axis=0).reshape(codes.shape)
    return (nf4_decode(codes) * scale).astype(dtype).reshape(-1, d_out)[:qw.d_in]


def base_nbytes(qw_or_w) -> int:
    """Bytes the frozen base occupies (quantized: codes + scales)."""
    if isinstance(qw_or_w, QuantizedWeight):
        return qw_or_w.nbytes()
    return int(qw_or_w.size * qw_or_w.dtype.itemsize)
