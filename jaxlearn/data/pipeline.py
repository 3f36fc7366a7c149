"""grain pipelines that turn documents into packed pretraining batches.

Per document: tokenize, add BOS and EOS, shift (`inputs = ids[:-1]`, `targets = ids[1:]`), so
no target ever comes from another document. Documents are then packed concatenate-then-split
into rows of `seq_len` tokens and batched. Every batch is a token batch, a dict of numpy arrays
of shape [batch, seq_len] with the features of `jaxlearn.data.batching.TOKEN_FEATURES` (a
continued document restarts its positions from 0).

Training streams are infinite (documents shuffled with the seed, reshuffled each epoch),
sharded by document, and checkpointable: the iterator's `get_state()` / `set_state()` resume
exactly. Evaluation is one unshuffled pass, padded to full batches. A run gets all of this,
for every data format and host layout, from `jaxlearn.data.feed.make_feed`. Example::

    tok = resolve_tokenizer(cfg.data, "runs/demo")
    it = text_train_iterator(cfg.data, tok)
    batch = next(it)                      # batch["inputs"].shape == (8, 256)
    state = it.get_state()                # store it with the checkpoint
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from jaxlearn.data.batching import TOKEN_FEATURES, eval_share, per_shard_batch
from jaxlearn.data.errors import DataError
from jaxlearn.data.formats import is_chat
# Re-exported: the tokenizer is chosen in jaxlearn/data/run_tokenizer.py, and only there.
from jaxlearn.data.run_tokenizer import resolve_tokenizer as ensure_tokenizer  # noqa: F401
from jaxlearn.data.sources import make_source

FEATURES = tuple(TOKEN_FEATURES)  # the token batch's feature names (defined in batching.py)

# Documents tokenized ahead of the packer. Few threads: the trainer shares the CPU, and one
# document (a play) is already ~40k tokens, i.e. many batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
# Packed rows shuffled together in training; a long document fills many consecutive rows, so
# without this a batch would be one stretch of one document.
ROW_SHUFFLE_WINDOW = 512


class TokenizeDocument(grain.transforms.Map):
    """str -> {"inputs": ids[:-1], "targets": ids[1:]} with ids = [BOS] + encode(text) + [EOS].

    >>> TokenizeDocument(tok).map("Hi")                         # doctest: +SKIP
    {'inputs': array([2, 1542], dtype=int32), 'targets': array([1542, 3], dtype=int32)}
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        body = tok.encode(text)
        ids = np.empty(len(body) + 2, np.int32)
        ids[0], ids[1:-1], ids[-1] = tok.bos_id, body, tok.eos_id
        return {"inputs": ids[:-1], "targets": ids[1:]}


class PackedRow(grain.transforms.Map):
    """Rename the packer's features to the batch format and add the loss mask.

    >>> PackedRow().map(packed)["loss_mask"]                    # doctest: +SKIP
    array([1., 1., 1., 0.], dtype=float32)
    """

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        return {
            "inputs": packed["inputs"],
            "targets": packed["targets"],
            "segment_ids": segment_ids,
            "positions": packed["inputs_positions"].astype(np.int32),
            "loss_mask": (segment_ids > 0).astype(np.float32),
        }


def pretrain_dataset(
    source: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    row_shuffle_window: int = ROW_SHUFFLE_WINDOW,
    num_workers: int = 0,
) -> grain.IterDataset:
    """The grain dataset of per-host training batches (`batch_size` is the global batch).

    Host `shard_index` of `shard_count` reads documents `shard_index::shard_count` (disjoint,
    together all of them) and yields `batch_size // shard_count` rows per batch.
    `num_epochs=None` repeats forever, each epoch in a new order; a final partial batch of a
    finite run is dropped. `tokenizer` needs `encode`, `bos_id` and `eos_id`. With
    `num_workers` > 0, each grain worker process packs its own share of the documents, so the
    stream is a different (equally deterministic and resumable) one than with 0 workers.

    >>> ds = pretrain_dataset(src, tok, seq_len=128, batch_size=8)    # doctest: +SKIP
    >>> next(iter(ds))["inputs"].shape                                # doctest: +SKIP
    (8, 128)
    """
    per_host = per_shard_batch(batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"host {shard_index} of {shard_count} gets no documents: the train split has "
                        f"only {len(source)}. Use fewer hosts or split the data into more documents.")
    if shuffle:
        ds = ds.shuffle(seed=seed)  # grain reseeds the shuffle each epoch (seed + epoch)
    ds = ds.repeat(num_epochs).map(TokenizeDocument(tokenizer))
    rows = _pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len)
    if shuffle and row_shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=row_shuffle_window, seed=seed)
    batches = rows.batch(per_host, drop_remainder=True)
    if num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batches


def make_train_iterator(
    data_cfg: Any,
    tokenizer: Any,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    seed: int | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of one shard's pretraining batches (text data).

    A run reads through `jaxlearn.data.feed.make_feed`, the one format dispatch (it builds every
    shard a host owns, for every format); this is its text builder for one shard.
    `seed` overrides `data_cfg.seed`.

    >>> it = make_train_iterator(cfg.data, tok)                        # doctest: +SKIP
    >>> sorted(next(it))                                               # doctest: +SKIP
    ['inputs', 'loss_mask', 'positions', 'segment_ids', 'targets']
    """
    _text_only(data_cfg)
    return text_train_iterator(data_cfg, tokenizer, shard_index=shard_index, shard_count=shard_count, seed=seed)


def text_train_iterator(
    data_cfg: Any,
    tokenizer: Any,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    seed: int | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of one shard's pretraining batches for a `DataConfig`.

    `seed` overrides `data_cfg.seed`. Save `it.get_state()` with a checkpoint and call
    `it.set_state(state)` on a fresh iterator to continue exactly where it stopped.

    >>> it = text_train_iterator(cfg.data, tok, shard_index=1, shard_count=2)   # doctest: +SKIP
    >>> next(it)["inputs"].shape                                               # doctest: +SKIP
    (4, 256)
    """
    if data_cfg.num_workers > 0:
        _allow_grain_workers()
    ds = pretrain_dataset(
        make_source(data_cfg, "train"),
        tokenizer,
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        shuffle=data_cfg.shuffle,
        seed=data_cfg.seed if seed is None else seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=data_cfg.num_workers,
    )
    return iter(ds)


def eval_batches(
    source: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """This host's share of one unshuffled pass over `source`, as a list of padded batches.

    The documents are packed in order into rows; global batch `b` holds rows
    `b*batch_size ... (b+1)*batch_size - 1` and host `i` gets the contiguous block
    `i*per_host ... (i+1)*per_host - 1` of it. The last batch is filled with padding rows
    (segment_ids 0, loss_mask 0) so every batch has the same shape, and every host returns the
    same number of batches (at most `max_batches`; None: the whole source). The result does
    not depend on the number of hosts, so eval loss is comparable across runs.

    >>> bs = eval_batches(src, tok, seq_len=128, batch_size=8, max_batches=4)  # doctest: +SKIP
    >>> len(bs), bs[-1]["loss_mask"].shape                                      # doctest: +SKIP
    (4, (8, 128))
    """
    per_shard_batch(batch_size, shard_index, shard_count)  # a bad layout fails before packing
    rows = eval_rows(source, tokenizer, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    return eval_share(rows, batch_size=batch_size, shards=range(shard_index, shard_index + 1),
                      shard_count=shard_count)


def eval_rows(source: Any, tokenizer: Any, *, seq_len: int, batch_size: int,
              max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The packed rows of one unshuffled pass over `source` (at most `max_batches` global batches).

    Every host packs the same stream (up to what it needs), so hosts agree on the row count;
    `batching.eval_share` then gives each host its rows.

    >>> len(eval_rows(src, tok, seq_len=128, batch_size=8, max_batches=4)) <= 32   # doctest: +SKIP
    True
    """
    if max_batches is not None and max_batches <= 0:
        raise DataError(f"max_batches must be positive or None, got {max_batches}.")
    ds = grain.MapDataset.source(source).map(TokenizeDocument(tokenizer))
    limit = math.inf if max_batches is None else max_batches * batch_size
    rows = []
    for row in _pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len):
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def make_eval_batches(
    data_cfg: Any,
    tokenizer: Any,
    max_batches: int | None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """One shard's held-out batches of a text `DataConfig` (see `eval_batches`); the same every
    call. Runs and tools read through `jaxlearn.data.feed` (`make_feed`, `host_eval_batches`).

    >>> bs = make_eval_batches(cfg.data, tok, max_batches=cfg.train.eval_batches)  # doctest: +SKIP
    >>> sum(b["loss_mask"].sum() for b in bs)       # tokens scored                 # doctest: +SKIP
    16384.0
    """
    _text_only(data_cfg)
    return eval_batches(
        make_source(data_cfg, "eval"),
        tokenizer,
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        max_batches=max_batches,
        shard_index=shard_index,
        shard_count=shard_count,
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _text_only(data_cfg: Any) -> None:
    if is_chat(data_cfg):
        raise DataError(f"data.source={data_cfg.source} (format chat) is not document text; read it through "
                        "jaxlearn.data.feed.make_feed, which picks the SFT encoder.")


def _pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    packed = grain.experimental.ConcatThenSplitIterDataset(
        docs, length_struct={"inputs": seq_len, "targets": seq_len}
    )
    return _JsonSafeState(packed).map(PackedRow())


class _JsonSafeState(grain.IterDataset):
    """Passes the packer through, repairing its state after a JSON round trip.

    grain's checkpoint handler stores iterator state as JSON, which turns the packer's
    `(-1, -1)` "no remainder" slices into lists; the packer compares them with a tuple, so a
    restored iterator would wrongly resume from a remainder (grain 0.2.18). Converting them
    back to tuples in `set_state` makes `CheckpointSave`/`CheckpointRestore` resume exactly.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        slices = state.get("remainder_slices", {})
        state = {**state, "remainder_slices": {k: tuple(v) for k, v in slices.items()}}
        self._parent.set_state(state)


def _allow_grain_workers() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` they are unparsed.

    Called only when the user asks for workers (never at import): marking flags as parsed
    is process-wide, so it is done as late and as rarely as possible.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
