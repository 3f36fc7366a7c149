"""Batch kinds and the host split: the one definition of each batch's features, and padding.

A token batch (pretraining and SFT alike) is a dict of [batch, seq_len] numpy arrays:

    inputs       int32    token ids fed to the model (0 on padding)
    targets      int32    the next token of the same document (0 on padding)
    segment_ids  int32    1, 2, 3... for the pieces packed into a row; 0 on padding
    positions    int32    position within the piece, from 0
    loss_mask    float32  1.0 where the target counts, 0.0 on padding

Global batch `b` of a stream of rows holds rows `b*batch_size ... (b+1)*batch_size - 1`; shard
`s` of `n` owns the contiguous block `s*per_shard ... (s+1)*per_shard - 1` of it
(`per_shard = batch_size / n`), and a host owns a contiguous range of shards. Example::

    rows = [padding_row(4)] * 3
    [b["inputs"].shape for b in eval_share(rows, batch_size=2)]   # [(2, 4), (2, 4)]
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence

import numpy as np

from jaxlearn.data.errors import DataError

# Read-only, so no caller can change what every other module sees as the batch format.
TOKEN_FEATURES: Mapping[str, type] = types.MappingProxyType({
    "inputs": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "loss_mask": np.float32,
})


def per_shard_batch(batch_size: int, shard_index: int = 0, shard_count: int = 1) -> int:
    """Rows of each global batch that shard `shard_index` of `shard_count` feeds.

    >>> per_shard_batch(8, 1, 4)
    2
    """
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, {shard_count}).")
    if batch_size % shard_count:
        raise DataError(f"data.batch_size={batch_size} (the global batch) does not divide over "
                        f"{shard_count} hosts (or data shards); use a multiple of {shard_count}.")
    return batch_size // shard_count


def padding_row(seq_len: int, features: Mapping[str, type] = TOKEN_FEATURES) -> dict[str, np.ndarray]:
    """One row that scores nothing: zeros of each feature's dtype (segment 0, loss_mask 0).

    >>> padding_row(3)["loss_mask"]
    array([0., 0., 0.], dtype=float32)
    """
    return {k: np.zeros(seq_len, dtype) for k, dtype in features.items()}


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]],
               features: Mapping[str, type] = TOKEN_FEATURES) -> dict[str, np.ndarray]:
    """Rows -> one batch dict with a leading batch axis, each feature in its dtype.

    >>> stack_rows([padding_row(3)] * 2)["inputs"].shape
    (2, 3)
    """
    return {k: np.stack([r[k] for r in rows]).astype(dtype, copy=False) for k, dtype in features.items()}


def eval_share(rows: Sequence[Mapping[str, np.ndarray]], *, batch_size: int, shards: range = range(1),
               shard_count: int = 1, features: Mapping[str, type] = TOKEN_FEATURES) -> list[dict[str, np.ndarray]]:
    """A host's rows of every global batch of one unshuffled pass over `rows`, padded.

    The host owns the contiguous shard range `shards` of `shard_count`; it gets, concatenated in
    order, those shards' blocks of each global batch. The last batch is filled with padding rows,
    so every batch has the same shape and every host gets the same number of batches. Owning
    shards 0 and 1 gives exactly shard 0's rows followed by shard 1's.

    >>> rows = [dict(padding_row(4), inputs=np.full(4, i, np.int32)) for i in range(3)]
    >>> [b["inputs"][:, 0].tolist() for b in eval_share(rows, batch_size=2, shards=range(1, 2), shard_count=2)]
    [[1], [0]]
    """
    if not rows:
        return []
    if len(shards) == 0 or shards.step != 1:
        raise DataError(f"a host owns a non-empty, contiguous range of shards, got {shards}.")
    per_shard = per_shard_batch(batch_size, shards.start, shard_count)
    per_shard_batch(batch_size, shards.stop - 1, shard_count)  # the range fits in [0, shard_count)
    seq_len = len(rows[0]["inputs"])
    width = per_shard * len(shards)
    batches = []
    for b in range(math.ceil(len(rows) / batch_size)):
        lo = b * batch_size + shards.start * per_shard
        mine = list(rows[lo:lo + width])
        mine += [padding_row(seq_len, features)] * (width - len(mine))
        batches.append(stack_rows(mine, features))
    return batches
