"""Prompt data for RL (`data.format: prompts`): prompts with the answers a reward checks.

Records come from checkable builders or your JSONL/Parquet files:

| source | prompt | answers (the accept-set) | split key |
|---|---|---|---|
| `wordnet_antonym_prompts` | `Give an antonym of 'X'.` | every antonym of X | X's antonym group (as SFT's `wordnet_antonyms`) |
| `jsonl` / `parquet` | `prompt` (or `messages`, ending with a user turn) | `answers` (a list, optional) | the record's `id`, else its JSON |

A row is one prompt, rendered with the chat template's generation prompt and LEFT-padded to
`data.seq_len` (the prompt budget: the sampler appends `objective.max_new_tokens` after it);
a longer prompt is dropped and counted. A batch holds, for B prompts:

    inputs, segment_ids, positions   int32 [B, seq_len]   segment id 0 on the left padding
    record_index                     int32 [B]            index into `prompt_records(data_cfg)`

The text and the accept-set stay on the host: a reward looks the record up by `record_index`
(all splits are one list, so train and held-out rows share the lookup). Example::

    records = prompt_records(DataConfig(source="wordnet_antonym_prompts", format="prompts"))
    rows, stats = encode_prompts(tok, records, split_rows(records, "train"), seq_len=48)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlearn.data.batching import per_shard_batch
from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.data.instruct import _records, prompt_messages, split_of, wordnet_antonyms

PROMPT_FEATURES = {"inputs": np.int32, "segment_ids": np.int32, "positions": np.int32}
_SPLIT = {"train": "train", "eval": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt (messages up to the assistant's turn) and the answers that count as right."""

    id: str
    prompt: tuple[dict, ...]
    answers: tuple[str, ...] = ()
    split: str = "train"

    def as_record(self) -> dict:
        """What a reward function sees as `record`."""
        return {"id": self.id, "answers": list(self.answers), "split": self.split}


@dataclasses.dataclass
class PromptStats:
    prompts: int = 0
    kept: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        return f"{self.kept}/{self.prompts} prompts kept, {self.dropped_too_long} dropped as longer than data.seq_len"


def wordnet_antonym_prompts(cache_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """`Give an antonym of 'X'.` with X's antonyms as the accept-set; splits as SFT's antonyms.

    >>> wordnet_antonym_prompts()[0].answers          # doctest: +SKIP
    ('unable',)
    """
    return [PromptRecord(e.id, tuple(e.prompt), tuple(e.answers), e.meta["split"]) for e in wordnet_antonyms(cache_dir)]


def file_prompts(paths: Sequence[str | os.PathLike], eval_fraction: float) -> list[PromptRecord]:
    """Records `{prompt | messages, answers?, id?, system?}` from JSONL/Parquet files.

    >>> file_prompts(["prompts.jsonl"], 0.1)[0].answers      # doctest: +SKIP
    ('cold',)
    """
    from jaxlearn.data.sources import expand_paths

    half = eval_fraction / 2
    out = []
    for path in expand_paths(paths, what="prompt data"):
        for where, record in _records(path):
            out.append(_record_prompt(record, where, (1 - eval_fraction, half, half)))
    if not out:
        raise DataError(f"the prompt data files {list(map(str, paths))} hold no records.")
    return out


def _record_prompt(record: Any, where: str, fractions) -> PromptRecord:
    if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
        raise DataError(f"{where}: a prompt record must be a JSON object with 'prompt' (or 'messages') and optional "
                        f"'answers'; got {record!r:.80}.")
    msgs = prompt_messages(record, where, "the model's")
    answers = record.get("answers", [])
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: 'answers' must be a list of strings.")
    key = str(record["id"]) if "id" in record else json.dumps([msgs, answers], sort_keys=True)
    return PromptRecord(where, tuple(msgs), tuple(answers), split_of(f"prompt:{key}", fractions))


def prompt_records(data_cfg: Any) -> list[PromptRecord]:
    """Every prompt record of a DataConfig, all splits, in a fixed order (`record_index` indexes it).

    >>> len(prompt_records(DataConfig(source="wordnet_antonym_prompts", format="prompts")))   # doctest: +SKIP
    """
    src = data_cfg.source
    if src == "wordnet_antonym_prompts":
        return wordnet_antonym_prompts()
    if src in ("jsonl", "parquet"):
        return file_prompts(data_cfg.paths, data_cfg.eval_fraction)
    raise DataError(f"data.format=prompts needs prompts: use data.source wordnet_antonym_prompts, or jsonl/parquet "
                    f"records with 'prompt' and 'answers'; got {src!r}.")


def split_rows(records: Sequence[PromptRecord], split: str, max_examples: int = 0) -> list[int]:
    """Indices of one split's records; `max_examples` caps the training split with a fixed sample.

    >>> split_rows([PromptRecord("a", (), (), "train"), PromptRecord("b", (), (), "test")], "test")
    [1]
    """
    if split not in _SPLIT:
        raise DataError(f"unknown split {split!r}; use train, eval/validation or test.")
    idx = [i for i, r in enumerate(records) if r.split == _SPLIT[split]]
    if _SPLIT[split] == "train" and max_examples:
        idx = sorted(sorted(idx, key=lambda i: stable_fraction(records[i].id))[:max_examples])
    return idx


def encode_prompts(tok: Any, records: Sequence[PromptRecord], indices: Sequence[int],
                   seq_len: int) -> tuple[list[dict], PromptStats]:
    """Rows of the prompts at `indices`, left-padded to `seq_len` (never truncated), and the counts.

    >>> rows, stats = encode_prompts(tok, records, [0, 1], 48)      # doctest: +SKIP
    """
    from jaxlearn.data.chat import encode_prompt
    from jaxlearn.data.sft import chat_tokenizer

    ctok = chat_tokenizer(tok)
    rows, stats = [], PromptStats()
    for i in indices:
        stats.prompts += 1
        ids = encode_prompt(ctok, list(records[i].prompt))
        if len(ids) > seq_len:
            stats.dropped_too_long += 1
            continue
        pad = seq_len - len(ids)
        row = {k: np.zeros(seq_len, dt) for k, dt in PROMPT_FEATURES.items()}
        row["inputs"][pad:] = ids
        row["segment_ids"][pad:] = 1
        row["positions"][pad:] = np.arange(len(ids))
        row["record_index"] = np.int32(i)
        rows.append(row)
        stats.kept += 1
    return rows, stats


def encode_split(data_cfg: Any, tokenizer: Any, split: str) -> tuple[list[dict], PromptStats]:
    """The encoded prompt rows of one split, and the counts (every split must keep one)."""
    records = prompt_records(data_cfg)
    rows, stats = encode_prompts(tokenizer, records, split_rows(records, split, data_cfg.max_examples),
                                 data_cfg.seq_len)
    if not rows:
        raise DataError(f"data.source={data_cfg.source}: no {split} prompt fits data.seq_len={data_cfg.seq_len} "
                        f"({stats.summary()}); raise data.seq_len or add data.")
    return rows, stats


def train_iterator(data_cfg: Any, rows: Sequence[dict], *, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of one shard's batches of prompts (shard `s` of `n`
    reads prompts `s::n`), reshuffled every epoch."""
    per_shard = per_shard_batch(data_cfg.batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(list(rows))[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"data shard {shard_index} of {shard_count} gets no prompts (only {len(rows)} kept).")
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=data_cfg.seed)
    return iter(ds.repeat(None).to_iter_dataset().batch(per_shard, drop_remainder=True))


def eval_batches(data_cfg: Any, rows: Sequence[dict], *, max_batches: int | None, shards: range = range(1),
                 shard_count: int = 1) -> list[dict]:
    """This host's share of each held-out global batch of prompts, in order. Only whole batches:
    a padding prompt would still be sampled from (it has no real token to start from)."""
    b = data_cfg.batch_size
    per_shard = per_shard_batch(b, 0, shard_count)
    n_batches = len(rows) // b if max_batches is None else min(len(rows) // b, max_batches)
    out = []
    for lo in range(0, n_batches * b, b):
        mine = [r for s in shards for r in rows[lo + s * per_shard:lo + (s + 1) * per_shard]]
        out.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
    if not out:
        raise DataError(f"{len(rows)} held-out prompts make no batch of data.batch_size={b}; add data or raise "
                        "data.eval_fraction.")
    return out
