"""grain pipelines that turn documents into packed pretraining batches.

Per document: tokenize, add BOS and EOS, shift (`inputs = ids[:-1]`, `targets = ids[1:]`), so
no target ever comes from another document. Documents are then packed concatenate-then-split
into rows of `seq_len` tokens and batched. Every batch is a dict of numpy arrays of shape
[batch, seq_len]:

    inputs       int32    token ids fed to the model (0 on padding)
    targets      int32    the next token of the same document (0 on padding)
    segment_ids  int32    1, 2, 3... for the document pieces within a row; 0 on padding
    positions    int32    position within the piece, from 0 (a continued document restarts)
    loss_mask    float32  1.0 where the target counts, 0.0 on padding

Training streams are infinite (documents shuffled with the seed, reshuffled each epoch),
sharded by document over hosts, and checkpointable: the iterator's `get_state()` /
`set_state()` resume exactly. Evaluation is one unshuffled pass, padded to full batches.
Example::

    tok = ensure_tokenizer(cfg.data, "runs/demo")
    it = make_train_iterator(cfg.data, tok)
    batch = next(it)                      # batch["inputs"].shape == (8, 256)
    state = it.get_state()                # store it with the checkpoint
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxlearn.data.errors import DataError
from jaxlearn.data.sources import make_source
from jaxlearn.data.tokenizer import Tokenizer, train_tokenizer

FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

# Documents tokenized ahead of the packer. Few threads: the trainer shares the CPU, and one
# document (a play) is already ~40k tokens, i.e. many batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
# Packed rows shuffled together in training; a long document fills many consecutive rows, so
# without this a batch would be one stretch of one document.
ROW_SHUFFLE_WINDOW = 512
# Characters of the train split read to train a tokenizer (more adds time, not quality).
_TOKENIZER_CHARS = 50_000_000


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
    per_host = _per_host_batch(batch_size, shard_index, shard_count)
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
    """An endless, checkpointable iterator of this host's training batches for a `DataConfig`.

    `seed` overrides `data_cfg.seed`. Save `it.get_state()` with a checkpoint and call
    `it.set_state(state)` on a fresh iterator to continue exactly where it stopped.

    >>> it = make_train_iterator(cfg.data, tok)                        # doctest: +SKIP
    >>> sorted(next(it))                                               # doctest: +SKIP
    ['inputs', 'loss_mask', 'positions', 'segment_ids', 'targets']
    """
    if _is_chat(data_cfg):  # instruction data: loss-masked, first-fit-packed SFT batches
        from jaxlearn.data.sft import make_sft_train_iterator

        return make_sft_train_iterator(data_cfg, tokenizer, shard_index=shard_index, shard_count=shard_count,
                                       seed=seed)[0]
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
    per_host = _per_host_batch(batch_size, shard_index, shard_count)
    if max_batches is not None and max_batches <= 0:
        raise DataError(f"max_batches must be positive or None, got {max_batches}.")
    ds = grain.MapDataset.source(source).map(TokenizeDocument(tokenizer))
    rows_it = iter(_pack(ds.to_iter_dataset(_READ_OPTIONS), seq_len))
    # Every host packs the same stream (up to what it needs), so hosts agree on the row count.
    limit = math.inf if max_batches is None else max_batches * batch_size
    rows = []
    for row in rows_it:
        rows.append(row)
        if len(rows) >= limit:
            break
    n_batches = math.ceil(len(rows) / batch_size)
    batches = []
    for b in range(n_batches):
        lo = b * batch_size + shard_index * per_host
        mine = rows[lo:lo + per_host]
        mine += [_padding_row(seq_len)] * (per_host - len(mine))
        batches.append({k: np.stack([r[k] for r in mine]) for k in FEATURES})
    return batches


def make_eval_batches(
    data_cfg: Any,
    tokenizer: Any,
    max_batches: int | None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Held-out batches of a `DataConfig` (see `eval_batches`); the same every call.

    >>> bs = make_eval_batches(cfg.data, tok, max_batches=cfg.train.eval_batches)  # doctest: +SKIP
    >>> sum(b["loss_mask"].sum() for b in bs)       # tokens scored                 # doctest: +SKIP
    16384.0
    """
    if _is_chat(data_cfg):  # instruction data: the validation split, SFT-encoded
        from jaxlearn.data.sft import make_sft_eval_batches

        return make_sft_eval_batches(data_cfg, tokenizer, max_batches, shard_index, shard_count)[0]
    return eval_batches(
        make_source(data_cfg, "eval"),
        tokenizer,
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        max_batches=max_batches,
        shard_index=shard_index,
        shard_count=shard_count,
    )


def ensure_tokenizer(data_cfg: Any, run_dir: str | os.PathLike) -> Tokenizer:
    """The run's tokenizer: `data_cfg.tokenizer` if set, else `<run_dir>/tokenizer.model`,
    trained on the train split (with `data_cfg.tokenizer_vocab_size`) if it is not there yet.

    Training is deterministic, so hosts sharing no file system train identical models.

    >>> tok = ensure_tokenizer(DataConfig(source="shakespeare"), "runs/demo")   # doctest: +SKIP
    >>> tok.vocab_size                                                          # doctest: +SKIP
    8192
    """
    if data_cfg.tokenizer:  # a .model/.gguf/tokenizer.json path, HF directory or preset name
        from jaxlearn.data.bpe_tokenizer import load_tokenizer

        return load_tokenizer(data_cfg.tokenizer)
    path = Path(run_dir).expanduser() / "tokenizer.model"
    if not path.exists() and _is_chat(data_cfg):
        raise DataError(f"data.source={data_cfg.source} holds conversations for fine-tuning, so there is no text to "
                        f"train a tokenizer on; set data.tokenizer to the model's tokenizer (a preset such as "
                        f"smollm2-135m-instruct, or a pretraining run's tokenizer.model).")
    if not path.exists():
        source = make_source(data_cfg, "train")
        train_tokenizer(_text_sample(source, _TOKENIZER_CHARS), path.with_suffix(""),
                        vocab_size=data_cfg.tokenizer_vocab_size)
    tok = Tokenizer.load(path)
    if tok.vocab_size != data_cfg.tokenizer_vocab_size:
        raise DataError(f"{path} has vocab_size {tok.vocab_size} but data.tokenizer_vocab_size is "
                        f"{data_cfg.tokenizer_vocab_size}. Delete {path} to train a new one, or set "
                        f"data.tokenizer_vocab_size={tok.vocab_size}.")
    return tok


# --------------------------------------------------------------------------------------------
# Helpers


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


def _is_chat(data_cfg: Any) -> bool:
    from jaxlearn.data.sft import is_chat

    return is_chat(data_cfg)


def _per_host_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, {shard_count}).")
    if batch_size % shard_count:
        raise DataError(f"data.batch_size={batch_size} (the global batch) does not divide over "
                        f"{shard_count} hosts; use a multiple of {shard_count}.")
    return batch_size // shard_count


def _padding_row(seq_len: int) -> dict[str, np.ndarray]:
    zeros = np.zeros(seq_len, np.int32)
    return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
            "loss_mask": np.zeros(seq_len, np.float32)}


def _text_sample(source: Any, max_chars: int):
    """Documents in a fixed pseudo-random order until `max_chars` characters are read."""
    order = np.random.default_rng(0).permutation(len(source))
    total = 0
    for i in order:
        text = source[int(i)]
        yield text
        total += len(text)
        if total >= max_chars:
            return


def _allow_grain_workers() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` they are unparsed.

    Called only when the user asks for workers (never at import): marking flags as parsed
    is process-wide, so it is done as late and as rarely as possible.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
