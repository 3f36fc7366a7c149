"""Supervised fine-tuning data: conversations -> loss-masked, first-fit-packed batches.

SFT is a data concern: the batches have the same five keys as pretraining batches
(`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`, see `jaxlearn.data.batching`), and
the `lm` objective's masked cross-entropy over `loss_mask` *is* the SFT loss. What changes:

- Each conversation is rendered with the tokenizer's chat template (`encode_chat`) and
  shifted (`inputs = ids[:-1]`, `targets = ids[1:]`); `loss_mask` is 1 on targets inside
  assistant turns (their content and end-of-turn token), 0 on the prompt, system text, role
  headers and padding. `train_on_prompt` puts every target under the loss.
- Examples longer than `seq_len + 1` tokens are never cut silently: `truncation="left"` drops
  prompt tokens from the left when the whole of every assistant turn still fits, otherwise the
  example is dropped; `"drop"` drops them all. `SFTStats` counts kept, truncated and dropped
  examples, and the training loop prints and saves the counts (`data_report.json`).
- Short examples are packed first-fit into rows of `seq_len` (grain's
  `FirstFitPackIterDataset`), each with its own segment id and positions from 0, so attention
  never crosses examples and a packed batch gives the same per-example loss as unpacked ones
  (tests/sft/test_sft_data.py checks this).

Example::

    rows, stats = encode_examples(tok, load_examples("wordnet_antonyms", "train"), seq_len=128)
    batch = next(iter(sft_dataset(rows, seq_len=128, batch_size=8)))   # dict of [8, 128] arrays
    stats.summary()   # '4820 examples: 4820 kept (0 truncated), 0 dropped (too long: 0, no response: 0) ...'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlearn.data.batching import eval_share, per_shard_batch
from jaxlearn.data.chat import encode_chat
from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
# `is_chat` and CHAT_SOURCES are decided in jaxlearn/data/formats.py; re-exported for old imports.
from jaxlearn.data.formats import CHAT_SOURCES, is_chat  # noqa: F401
from jaxlearn.data.instruct import Example, load_examples
# The DataConfig split names of the pretraining pipeline -> instruction dataset splits.
_SPLIT = {"train": "train", "eval": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass
class SFTStats:
    """What happened to the examples of one split on the way to token rows."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0  # kept, with prompt tokens cut from the left
    dropped_too_long: int = 0  # an assistant turn would have been cut
    dropped_no_target: int = 0  # no token under the loss (e.g. no assistant message)
    tokens: int = 0  # input tokens of the kept examples
    target_tokens: int = 0  # tokens under the loss

    def summary(self) -> str:
        """One line for logs.

        >>> SFTStats(3, 2, 1, 1, 0, 40, 9).summary()
        '3 examples: 2 kept (1 truncated), 1 dropped (too long: 1, no response: 0); 40 tokens, 9 under the loss'
        """
        dropped = self.dropped_too_long + self.dropped_no_target
        return (f"{self.examples} examples: {self.kept} kept ({self.truncated} truncated), {dropped} dropped "
                f"(too long: {self.dropped_too_long}, no response: {self.dropped_no_target}); "
                f"{self.tokens} tokens, {self.target_tokens} under the loss")


class _PlainTextChat:
    """A tokenizer without special-token parsing (SentencePiece), for `encode_chat`.

    Chat markup such as `<|im_start|>` becomes ordinary text tokens; the assistant mask still
    covers exactly the assistant's text (and the end-of-turn marker after it).
    """

    chat_template = None
    special_tokens: dict = {}

    def __init__(self, tok: Any):
        self._tok = tok
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        del allow_special
        return self._tok.encode(text)


def chat_tokenizer(tok: Any) -> Any:
    """`tok` if it parses special tokens in text (byte-level BPE), else a plain-text wrapper.

    >>> chat_tokenizer(bpe_tok) is bpe_tok                  # doctest: +SKIP
    True
    """
    return tok if hasattr(tok, "special_tokens") else _PlainTextChat(tok)


def encode_example(tok: Any, messages: Sequence[dict], seq_len: int, *, train_on_prompt: bool = False,
                   truncation: str = "left", template: str | None = None) -> tuple[dict | None, str]:
    """One conversation -> ({inputs, targets, loss_mask} of length <= seq_len, status).

    status is "ok", "truncated" (prompt tokens cut from the left), "too_long" or "no_target"
    (the row is None for the last two).

    >>> row, status = encode_example(tok, [{"role": "user", "content": "Hi"},
    ...                                    {"role": "assistant", "content": "Hello"}], 64)  # doctest: +SKIP
    >>> status, row["loss_mask"].sum()                                                     # doctest: +SKIP
    ('ok', 2.0)
    """
    enc = encode_chat(chat_tokenizer(tok), messages, template)
    ids = np.asarray(enc.ids, np.int32)
    assistant = np.asarray(enc.mask, np.float32)
    status = "ok"
    if len(ids) - 1 > seq_len:
        cut = len(ids) - 1 - seq_len
        # Targets ids[1:cut+1] are lost, and ids[:cut] stop being inputs: allowed only when none
        # of those tokens belongs to an assistant turn.
        if truncation != "left" or assistant[:cut + 1].any():
            return None, "too_long"
        ids, assistant = ids[cut:], assistant[cut:]
        status = "truncated"
    mask = np.ones_like(assistant) if train_on_prompt else assistant
    row = {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.float32)}
    if not row["loss_mask"].any():
        return None, "no_target"
    return row, status


def encode_examples(tok: Any, examples: Sequence[Example | Sequence[dict]], seq_len: int, *,
                    train_on_prompt: bool = False, truncation: str = "left",
                    template: str | None = None) -> tuple[list[dict], SFTStats]:
    """Encode many conversations (Examples or message lists); returns the kept rows and counts.

    >>> rows, stats = encode_examples(tok, examples, seq_len=128)      # doctest: +SKIP
    >>> stats.kept == len(rows)                                        # doctest: +SKIP
    True
    """
    if truncation not in ("left", "drop"):
        raise DataError(f"data.truncation must be 'left' or 'drop', got {truncation!r}.")
    rows, stats = [], SFTStats()
    for ex in examples:
        msgs = ex.messages if isinstance(ex, Example) else ex
        row, status = encode_example(tok, msgs, seq_len, train_on_prompt=train_on_prompt, truncation=truncation,
                                     template=template)
        stats.examples += 1
        if row is None:
            if status == "too_long":
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_target += 1
            continue
        stats.kept += 1
        stats.truncated += status == "truncated"
        stats.tokens += len(row["inputs"])
        stats.target_tokens += int(row["loss_mask"].sum())
        rows.append(row)
    return rows, stats


class PackedSFTRow(grain.transforms.Map):
    """The first-fit packer's output -> the five batch features.

    >>> PackedSFTRow().map(packed)["segment_ids"]          # doctest: +SKIP
    array([1, 1, 2, 2, 2, 0], dtype=int32)
    """

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = packed["inputs_segment_ids"].astype(np.int32)
        return {"inputs": packed["inputs"].astype(np.int32), "targets": packed["targets"].astype(np.int32),
                "segment_ids": seg, "positions": packed["inputs_positions"].astype(np.int32),
                "loss_mask": packed["loss_mask"].astype(np.float32) * (seg > 0)}


def pack_rows(rows: grain.IterDataset, seq_len: int, num_bins: int) -> grain.IterDataset:
    """First-fit pack encoded examples into rows of `seq_len` (segment ids and positions per example).

    >>> packed = pack_rows(grain.MapDataset.source(rows).to_iter_dataset(), 128, 8)   # doctest: +SKIP
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        rows, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_bins, shuffle_bins=False)
    return packed.map(PackedSFTRow())


def sft_dataset(rows: Sequence[dict], *, seq_len: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None) -> grain.IterDataset:
    """Training batches of packed examples (`batch_size` global, this shard's share per batch).

    Shard `shard_index` of `shard_count` reads examples `shard_index::shard_count` and yields
    `batch_size // shard_count` rows per batch, as pretraining shards documents.
    `num_epochs=None` repeats forever, reshuffled each epoch. The iterator is checkpointable
    (`get_state`/`set_state`).

    >>> next(iter(sft_dataset(rows, seq_len=128, batch_size=8)))["inputs"].shape   # doctest: +SKIP
    (8, 128)
    """
    per_shard = per_shard_batch(batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(list(rows))[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"shard {shard_index} of {shard_count} gets no SFT examples (only {len(rows)} kept); "
                        f"lower data.shards or add examples.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).to_iter_dataset()
    return pack_rows(ds, seq_len, num_bins=per_shard).batch(per_shard, drop_remainder=True)


def sft_eval_batches(rows: Sequence[dict], *, seq_len: int, batch_size: int, max_batches: int | None = None,
                     shard_index: int = 0, shard_count: int = 1) -> list[dict[str, np.ndarray]]:
    """One unshuffled pass over `rows`, packed first-fit, padded to full batches (this shard's share).

    >>> len(sft_eval_batches(rows, seq_len=128, batch_size=8, max_batches=2))   # doctest: +SKIP
    2
    """
    per_shard_batch(batch_size, shard_index, shard_count)  # a bad layout fails before packing
    packed = sft_eval_rows(rows, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    return eval_share(packed, batch_size=batch_size, shards=range(shard_index, shard_index + 1),
                      shard_count=shard_count)


def sft_eval_rows(rows: Sequence[dict], *, seq_len: int, batch_size: int,
                  max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The packed rows of one unshuffled pass (at most `max_batches` global batches of them).

    They do not depend on the number of hosts or shards; `batching.eval_share` splits them.

    >>> len(sft_eval_rows(rows, seq_len=128, batch_size=8, max_batches=2)) <= 16   # doctest: +SKIP
    True
    """
    limit = math.inf if max_batches is None else max_batches * batch_size
    packed = []
    for row in pack_rows(grain.MapDataset.source(list(rows)).to_iter_dataset(), seq_len, num_bins=batch_size):
        packed.append(row)
        if len(packed) >= limit:
            break
    return packed


def chat_examples_for(data_cfg: Any, split: str) -> list[Example]:
    """The instruction examples a DataConfig names, for split "train", "eval"/"validation" or "test".

    `wordnet` is antonyms and definitions together. `data.max_examples` caps the training split
    with a fixed sample (the examples with the smallest hash of their id).

    >>> len(chat_examples_for(DataConfig(source="humaneval"), "test"))   # doctest: +SKIP
    46
    """
    if split not in _SPLIT:
        raise DataError(f"unknown split {split!r}; use train, eval/validation or test.")
    name = _SPLIT[split]
    src = data_cfg.source
    if src == "wordnet":
        examples = load_examples("wordnet_antonyms", name) + load_examples("wordnet_definitions", name)
    elif src in CHAT_SOURCES:
        examples = load_examples(src, name)
    elif src in ("jsonl", "parquet"):
        examples = load_examples("chat", name, paths=data_cfg.paths, eval_fraction=data_cfg.eval_fraction)
    else:
        raise DataError(f"data.format=chat needs conversations: use data.source jsonl or parquet (records with "
                        f"'messages' or 'prompt'/'response'), or one of {', '.join(CHAT_SOURCES)}; got {src!r}.")
    if name == "train" and data_cfg.max_examples:
        examples = sorted(examples, key=lambda e: stable_fraction(e.id))[:data_cfg.max_examples]
    if not examples:
        raise DataError(f"data.source={src}: the {name} split holds no examples. Add data, or raise data.eval_fraction.")
    return examples


def encode_split(data_cfg: Any, tokenizer: Any, split: str) -> tuple[list[dict], SFTStats]:
    """The encoded rows of one split of a DataConfig's conversations, and the encoding counts.

    The training split must keep at least one example (a DataError says how to fix it).

    >>> rows, stats = encode_split(DataConfig(source="wordnet", seq_len=128), tok, "train")   # doctest: +SKIP
    """
    rows, stats = encode_examples(tokenizer, chat_examples_for(data_cfg, split), data_cfg.seq_len,
                                  train_on_prompt=data_cfg.train_on_prompt, truncation=data_cfg.truncation)
    if split == "train" and not rows:
        raise DataError(f"no SFT training example fits data.seq_len={data_cfg.seq_len} ({stats.summary()}); "
                        f"raise data.seq_len.")
    return rows, stats


def train_rows_iterator(data_cfg: Any, rows: Sequence[dict], *, shard_index: int = 0, shard_count: int = 1,
                        seed: int | None = None) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of one shard's SFT training batches of encoded `rows`.

    `seed` overrides `data_cfg.seed`.

    >>> it = train_rows_iterator(cfg.data, encode_split(cfg.data, tok, "train")[0])   # doctest: +SKIP
    """
    return iter(sft_dataset(rows, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, shuffle=data_cfg.shuffle,
                            seed=data_cfg.seed if seed is None else seed, shard_index=shard_index,
                            shard_count=shard_count))


def make_sft_train_iterator(data_cfg: Any, tokenizer: Any, *, shard_index: int = 0, shard_count: int = 1,
                            seed: int | None = None) -> tuple[grain.DatasetIterator, SFTStats]:
    """An endless, checkpointable iterator of one shard's SFT training batches, and the encoding counts.

    New code uses `jaxlearn.data.feed.make_feed`, which encodes once for all the shards a host owns.

    >>> it, stats = make_sft_train_iterator(DataConfig(source="wordnet", seq_len=128), tok)   # doctest: +SKIP
    """
    rows, stats = encode_split(data_cfg, tokenizer, "train")
    return train_rows_iterator(data_cfg, rows, shard_index=shard_index, shard_count=shard_count, seed=seed), stats


def make_sft_eval_batches(data_cfg: Any, tokenizer: Any, max_batches: int | None, shard_index: int = 0,
                          shard_count: int = 1, split: str = "validation") -> tuple[list[dict], SFTStats]:
    """Held-out SFT batches (the validation split by default) and the encoding counts.

    >>> batches, stats = make_sft_eval_batches(cfg.data, tok, max_batches=4)    # doctest: +SKIP
    """
    rows, stats = encode_split(data_cfg, tokenizer, split)
    return sft_eval_batches(rows, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, max_batches=max_batches,
                            shard_index=shard_index, shard_count=shard_count), stats
