"""Preference data: (prompt, chosen, rejected) pairs -> paired token rows for DPO and its kin.

Records come from your JSONL/Parquet files (`data.format: preference`) or from checkable
builders on data the project already fetches:

| source | prompt | chosen | rejected | split key |
|---|---|---|---|---|
| `wordnet_antonym_prefs` | `Give an antonym of 'X'.` | an antonym of X | a synonym of X (same synset), else an unrelated word | X's antonym group (as SFT's `wordnet_antonyms`) |
| `wordnet_definition_prefs` | `Define 'X'.` | the first gloss clause of X | the gloss clause of another word of the same split | the lemma |
| `humaneval_prefs` | the HumanEval task's instruction | the canonical solution | the same with one AST node mutated, verified in the sandbox to fail the tests (`jaxlearn/data/code_prefs.py`) | the problem, HumanEval's 0.6/0.1/0.3 (as the SFT data and eval task) |
| `safety_pairs` | a Do-Not-Answer prompt / an allowed prompt (`jaxlearn/data/safety.py`) | a short refusal with a reason / the answer | a compliance opener (no harmful content) / a refusal | as `safety_sft` |
| `jsonl` / `parquet` | `prompt` (or `messages`, multi-turn) | `chosen` | `rejected` | the record's `id`, else its JSON |

Optional record fields `ref_chosen_logp` / `ref_rejected_logp` carry stored reference
log-probs (`objective.reference: stored`).

Unpaired records for KTO (`data.format: unpaired`, JSONL/Parquet): `{prompt | messages,
completion, label}` with `label` true/false (also 1/0, "desirable"/"undesirable"). They are
packed two to a row in the same layout, a desirable example in slot 0 and an undesirable one in
slot 1 while both kinds last (`unpaired_pairs`); each slot keeps its own prompt, and
`pref_labels` says what each slot is (1 desirable, 0 undesirable, -1 an empty slot).

Encoding: both responses are rendered after the SAME prompt with the tokenizer's chat template
(the prompt's tokens are identical in both rows; a test checks it); the loss mask covers the
assistant response only, so log-probs are summed over response tokens only. A pair is kept only
if both rows fit `data.seq_len + 1` tokens whole (never truncated), else dropped and counted.
A batch holds, for B pairs (padding pairs have `pair_mask` 0):

    inputs, targets, segment_ids, positions   int32   [B, 2, T]   [:, 0] chosen, [:, 1] rejected
    loss_mask                                 float32 [B, 2, T]   1.0 on response targets
    pair_mask                                 float32 [B]         1.0 for a real pair
    ref_logps                                 float32 [B, 2]      stored reference log-probs (0 if none)
    pref_labels                               float32 [B, 2]      (1, 0) for a pair; unpaired: per slot

Example::

    pairs = preference_pairs(DataConfig(source="wordnet_antonym_prefs"), "train")
    rows, stats = encode_pairs(tok, pairs, seq_len=64)
    rows[0]["inputs"].shape      # (2, 64)
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlearn.data.batching import per_shard_batch
from jaxlearn.data.corpora import fetch_wordnet, stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.data.formats import PREFERENCE_SOURCES, data_format
from jaxlearn.data.instruct import (_records, prompt_messages, read_wordnet_synsets, split_of, wordnet_antonyms,
                                    wordnet_definitions)
from jaxlearn.data.sft import encode_example

PAIR_FEATURES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                 "loss_mask": np.float32}
_SPLIT = {"train": "train", "eval": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One comparison: `prompt` messages, then the preferred and the rejected assistant reply."""

    id: str
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    split: str = "train"
    ref_logps: tuple[float, float] | None = None  # stored reference log-probs (chosen, rejected)
    # What each slot is: 1 desirable, 0 undesirable, -1 empty. A pair is (1, 0); two packed
    # unpaired examples carry their own labels, and slot 1 its own prompt (`rejected_prompt`).
    labels: tuple[float, float] = (1.0, 0.0)
    rejected_prompt: tuple[dict, ...] | None = None


@dataclasses.dataclass
class PrefStats:
    """What encoding kept and dropped (pairs are never truncated: both replies stay whole)."""

    pairs: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    response_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.kept}/{self.pairs} pairs kept, {self.dropped_too_long} dropped as too long, "
                f"{self.dropped_no_target} without a response; {self.response_tokens} response tokens")


# --------------------------------------------------------------------------------------------
# Builders


def wordnet_antonym_pairs(cache_dir: str | os.PathLike | None = None) -> list[PreferencePair]:
    """`Give an antonym of 'X'.`: chosen = X's antonym (the SFT target), rejected = a synonym of X
    from one of its synsets, or, when X has none, another group's word (deterministic). Splits
    follow SFT's antonym groups, so no test word (nor its antonyms) is ever trained on."""
    synsets = read_wordnet_synsets(fetch_wordnet(cache_dir))
    synonyms: dict[str, set[str]] = {}
    for s in synsets.values():
        words = [w for w in s["words"] if w.isalpha() and w.islower() and len(w) >= 3]
        for w in words:
            synonyms.setdefault(w, set()).update(x for x in words if x != w)
    examples = wordnet_antonyms(cache_dir)
    pool = sorted(e.meta["word"] for e in examples)
    out = []
    for e in examples:
        word, accept = e.meta["word"], set(e.answers)
        options = sorted(synonyms.get(word, set()) - accept)
        u = stable_fraction(f"antonym-reject:{word}")
        if options:
            rejected = options[int(u * len(options))]
        else:  # an unrelated word, picked by a stable hash
            rejected = _kth_outside(pool, accept | {word}, u)
        out.append(PreferencePair(f"antonym-pref/{word}", tuple(e.prompt), e.reference, rejected, e.meta["split"]))
    return out


def _kth_outside(pool: list[str], excluded: set[str], u: float) -> str:
    """`[w for w in pool if w not in excluded][int(u * len(that))]` for a sorted `pool`, without
    building the filtered list (why: it is ~2,300 x 4,600 comparisons per build otherwise).

    >>> _kth_outside(["a", "b", "b", "c", "d"], {"b"}, 0.5)
    'c'
    """
    spans = sorted((bisect.bisect_left(pool, w), bisect.bisect_right(pool, w)) for w in excluded)
    k = int(u * (len(pool) - sum(e - s for s, e in spans)))
    for s, e in spans:  # step over each excluded run at or before the k-th kept position
        if s <= k:
            k += e - s
    return pool[k]


def wordnet_definition_pairs(cache_dir: str | os.PathLike | None = None) -> list[PreferencePair]:
    """`Define 'X'.`: chosen = X's gloss clause, rejected = the gloss clause of another word of
    the same split (a stable pick, never one with the same clause)."""
    examples = wordnet_definitions(cache_dir)
    by_split: dict[str, list] = {}
    for e in examples:
        by_split.setdefault(e.meta["split"], []).append(e)
    out = []
    for split, items in by_split.items():
        n = len(items)
        for i, e in enumerate(items):
            j = (i + 1 + int(stable_fraction(f"define-reject:{e.meta['word']}") * (n - 1))) % n
            other = items[j].reference if items[j].reference != e.reference else items[(j + 1) % n].reference
            out.append(PreferencePair(f"define-pref/{e.meta['word']}", tuple(e.prompt), e.reference, other, split))
    return sorted(out, key=lambda p: p.id)


def file_pairs(paths: Sequence[str | os.PathLike], eval_fraction: float) -> list[PreferencePair]:
    """Pairs from JSONL/Parquet records `{prompt | messages, chosen, rejected}` (optional `id`,
    `system`, `ref_chosen_logp`, `ref_rejected_logp`). Errors name the file and line."""
    from jaxlearn.data.sources import expand_paths

    half = eval_fraction / 2
    out = []
    for path in expand_paths(paths, what="preference data"):
        for where, record in _records(path):
            out.append(_record_pair(record, where, (1 - eval_fraction, half, half)))
    if not out:
        raise DataError(f"the preference data files {list(map(str, paths))} hold no records.")
    return out


def _record_pair(record: Any, where: str, fractions) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a preference record must be a JSON object, got {type(record).__name__}.")
    missing = [k for k in ("chosen", "rejected") if not isinstance(record.get(k), str) or not record[k]]
    if missing or not ("prompt" in record or "messages" in record):
        raise DataError(f"{where}: a preference record needs 'prompt' (or 'messages') and non-empty 'chosen' and "
                        f"'rejected' strings; it has keys {sorted(record)}.")
    prompt = prompt_messages(record, where, "'chosen'/'rejected'")
    ref = None
    if "ref_chosen_logp" in record or "ref_rejected_logp" in record:
        try:
            ref = (float(record["ref_chosen_logp"]), float(record["ref_rejected_logp"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: stored reference log-probs need both 'ref_chosen_logp' and "
                            "'ref_rejected_logp' as numbers.") from None
    key = str(record["id"]) if "id" in record else json.dumps([prompt, record["chosen"], record["rejected"]],
                                                              sort_keys=True)
    return PreferencePair(where, prompt, record["chosen"], record["rejected"],
                          split_of(f"pref:{key}", fractions), ref)


# JSON true/false; 1/0 hash as True/False, so they are accepted too (a float label is refused).
_LABELS = {True: 1.0, False: 0.0, "desirable": 1.0, "undesirable": 0.0, "true": 1.0, "false": 0.0}


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """One KTO record: a prompt, a completion, and whether the completion is desirable."""

    id: str
    prompt: tuple[dict, ...]
    completion: str
    desirable: bool
    split: str = "train"


def unpaired_examples(paths: Sequence[str | os.PathLike], eval_fraction: float) -> list[UnpairedExample]:
    """Records `{prompt | messages, completion, label}` (optional `id`, `system`) from JSONL/Parquet;
    errors name the file and line.

    >>> unpaired_examples(["kto.jsonl"], 0.1)[0].desirable      # doctest: +SKIP
    True
    """
    from jaxlearn.data.sources import expand_paths

    half = eval_fraction / 2
    out = []
    for path in expand_paths(paths, what="unpaired (KTO) data"):
        for where, record in _records(path):
            completion = record.get("completion") if isinstance(record, dict) else None
            if not isinstance(completion, str) or not completion:
                raise DataError(f"{where}: an unpaired record needs 'prompt' (or 'messages'), a non-empty 'completion' "
                                "string and a 'label' (true/false); "
                                f"it has {sorted(record) if isinstance(record, dict) else type(record).__name__}.")
            label = record.get("label")
            key = label.lower() if isinstance(label, str) else label
            if isinstance(key, float) or key not in _LABELS:  # 1.0 hashes as 1: refuse floats explicitly
                raise DataError(f"{where}: 'label' is {label!r}; use true (desirable) or false (undesirable) "
                                "(1/0 and \"desirable\"/\"undesirable\" also work).")
            prompt = prompt_messages(record, where, "'completion'")
            ident = str(record["id"]) if "id" in record else json.dumps([prompt, record["completion"]], sort_keys=True)
            out.append(UnpairedExample(where, prompt, record["completion"], _LABELS[key] == 1.0,
                                       split_of(f"kto:{ident}", (1 - eval_fraction, half, half))))
    if not out:
        raise DataError(f"the unpaired data files {list(map(str, paths))} hold no records.")
    return out


def unpaired_pairs(examples: Sequence[UnpairedExample]) -> list[PreferencePair]:
    """Pack unpaired examples two to a row: desirable + undesirable while both kinds last (so a
    row's slots compare like a pair's), then two of the same kind, then one with an empty slot.
    Order within each kind is kept (the feed shuffles rows).

    >>> ex = [UnpairedExample(str(i), ({"role": "user", "content": "q"},), "a", i % 2 == 0) for i in range(3)]
    >>> [p.labels for p in unpaired_pairs(ex)]
    [(1.0, 0.0), (1.0, -1.0)]
    """
    good = [e for e in examples if e.desirable]
    bad = [e for e in examples if not e.desirable]
    slots = []
    while good and bad:
        slots.append((good.pop(0), bad.pop(0)))
    rest = good or bad
    slots += [(rest[i], rest[i + 1] if i + 1 < len(rest) else None) for i in range(0, len(rest), 2)]
    out = []
    for a, b in slots:
        label = lambda e: -1.0 if e is None else float(e.desirable)  # noqa: E731
        out.append(PreferencePair(f"{a.id}+{b.id if b else '-'}", a.prompt, a.completion, b.completion if b else "",
                                  a.split, labels=(label(a), label(b)), rejected_prompt=b.prompt if b else a.prompt))
    return out


def preference_pairs(data_cfg: Any, split: str) -> list[PreferencePair]:
    """The pairs of one split ("train", "eval"/"validation", "test") a DataConfig names;
    `data.max_examples` caps the training split with a fixed sample.

    >>> len(preference_pairs(DataConfig(source="wordnet_antonym_prefs"), "test"))   # doctest: +SKIP
    """
    if split not in _SPLIT:
        raise DataError(f"unknown split {split!r}; use train, eval/validation or test.")
    name, src = _SPLIT[split], data_cfg.source
    if data_format(data_cfg) == "unpaired":
        if src not in ("jsonl", "parquet"):
            raise DataError(f"data.format=unpaired reads your JSONL/Parquet records ({{prompt, completion, label}}): "
                            f"set data.source to jsonl or parquet and data.paths; got data.source={src!r}.")
        examples = [e for e in unpaired_examples(data_cfg.paths, data_cfg.eval_fraction) if e.split == name]
        if name == "train" and data_cfg.max_examples:
            examples = sorted(examples, key=lambda e: stable_fraction(e.id))[:data_cfg.max_examples]
        pairs = unpaired_pairs(examples)
        if not pairs:
            raise DataError(f"data.format=unpaired: the {name} split holds no records. Add data, or raise "
                            "data.eval_fraction.")
        return pairs
    if src == "wordnet_antonym_prefs":
        pairs = wordnet_antonym_pairs()
    elif src == "wordnet_definition_prefs":
        pairs = wordnet_definition_pairs()
    elif src == "humaneval_prefs":  # canonical solution > a one-node mutant verified to fail (code_prefs.py)
        from jaxlearn.data.code_prefs import humaneval_pairs

        pairs = humaneval_pairs()
    elif src == "safety_pairs":  # refusal > compliance / answer > refusal (jaxlearn/data/safety.py)
        from jaxlearn.data.safety import safety_pairs

        pairs = safety_pairs()
    elif src in ("jsonl", "parquet"):
        pairs = file_pairs(data_cfg.paths, data_cfg.eval_fraction)
    else:
        raise DataError(f"data.format=preference needs pairs: use data.source jsonl or parquet (records with "
                        f"'prompt', 'chosen', 'rejected'), or one of {', '.join(PREFERENCE_SOURCES)}; got {src!r}.")
    pairs = [p for p in pairs if p.split == name]
    if name == "train" and data_cfg.max_examples:
        pairs = sorted(pairs, key=lambda p: stable_fraction(p.id))[:data_cfg.max_examples]
    if not pairs:
        raise DataError(f"data.source={src}: the {name} split holds no preference pairs. Add data, or raise "
                        "data.eval_fraction.")
    return pairs


# --------------------------------------------------------------------------------------------
# Encoding and batching


def encode_pair(tok: Any, pair: PreferencePair, seq_len: int) -> tuple[dict | None, str]:
    """One pair -> ({feature: [2, seq_len]} plus `ref_logps` [2], status "ok" | "too_long" |
    "no_target"). Both rows are padded to `seq_len`; neither is ever truncated.

    >>> row, status = encode_pair(tok, PreferencePair("x", ({"role": "user", "content": "Hi"},), "Hello", "Bye"), 32)  # doctest: +SKIP
    """
    rows = []
    prompts = (pair.prompt, pair.rejected_prompt or pair.prompt)
    for prompt, reply, label in zip(prompts, (pair.chosen, pair.rejected), pair.labels):
        if label < 0:  # an empty slot (an odd unpaired example out): all zeros, no loss
            rows.append(None)
            continue
        row, status = encode_example(tok, list(prompt) + [{"role": "assistant", "content": reply}], seq_len,
                                     truncation="drop")
        if row is None:
            return None, status
        rows.append(row)
    out = {k: np.zeros((2, seq_len), dt) for k, dt in PAIR_FEATURES.items()}
    for i, row in enumerate(rows):
        if row is None:
            continue
        n = len(row["inputs"])
        for k in ("inputs", "targets", "loss_mask"):
            out[k][i, :n] = row[k]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    out["ref_logps"] = np.asarray(pair.ref_logps or (0.0, 0.0), np.float32)
    out["pref_labels"] = np.asarray(pair.labels, np.float32)
    return out, "ok"


def encode_pairs(tok: Any, pairs: Sequence[PreferencePair], seq_len: int) -> tuple[list[dict], PrefStats]:
    """Encode many pairs; the kept rows and the counts.

    >>> rows, stats = encode_pairs(tok, pairs, 64)       # doctest: +SKIP
    """
    rows, stats = [], PrefStats()
    for p in pairs:
        stats.pairs += 1
        row, status = encode_pair(tok, p, seq_len)
        if row is None:
            stats.dropped_too_long += status == "too_long"
            stats.dropped_no_target += status == "no_target"
            continue
        stats.kept += 1
        stats.response_tokens += int(row["loss_mask"].sum())
        rows.append(row)
    return rows, stats


def encode_split(data_cfg: Any, tokenizer: Any, split: str) -> tuple[list[dict], PrefStats]:
    """The encoded pair rows of one split, and the counts (the training split must keep one)."""
    rows, stats = encode_pairs(tokenizer, preference_pairs(data_cfg, split), data_cfg.seq_len)
    if split == "train" and not rows:
        raise DataError(f"no preference pair fits data.seq_len={data_cfg.seq_len} whole ({stats.summary()}); "
                        "raise data.seq_len.")
    return rows, stats


class _WithPairMask(grain.transforms.Map):
    def map(self, row: dict) -> dict:
        return {**row, "pair_mask": np.float32(1.0)}


def train_iterator(data_cfg: Any, rows: Sequence[dict], *, shard_index: int = 0,
                   shard_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of one shard's batches of pairs (shard `s` of `n`
    reads pairs `s::n`, yields `batch_size / n` pairs, reshuffled every epoch).

    >>> it = train_iterator(cfg.data, rows)          # doctest: +SKIP
    """
    per_shard = per_shard_batch(data_cfg.batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(list(rows))[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"data shard {shard_index} of {shard_count} gets no preference pairs (only {len(rows)} kept).")
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=data_cfg.seed)
    ds = ds.repeat(None).map(_WithPairMask()).to_iter_dataset()
    return iter(ds.batch(per_shard, drop_remainder=True))


def eval_batches(data_cfg: Any, rows: Sequence[dict], *, max_batches: int | None, shards: range = range(1),
                 shard_count: int = 1) -> list[dict]:
    """This host's share (the shards it owns) of each held-out global batch of pairs, in order;
    the last batch is filled with padding pairs (`pair_mask` 0).

    >>> bs = eval_batches(cfg.data, rows, max_batches=4)       # doctest: +SKIP
    """
    b = data_cfg.batch_size
    per_shard = per_shard_batch(b, 0, shard_count)
    n = len(rows) if max_batches is None else min(len(rows), max_batches * b)
    pad = {**{k: np.zeros((2, data_cfg.seq_len), dt) for k, dt in PAIR_FEATURES.items()},
           "ref_logps": np.zeros(2, np.float32), "pref_labels": np.full(2, -1.0, np.float32)}
    out = []
    for lo in range(0, n, b):
        mine = []
        for s in shards:  # global batch rows lo + s*per_shard ... as `eval_share` orders them
            start = lo + s * per_shard
            part = [dict(r, pair_mask=np.float32(1.0)) for r in rows[start:min(start + per_shard, lo + b, n)]]
            mine += part + [dict(pad, pair_mask=np.float32(0.0))] * (per_shard - len(part))
        out.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
    return out

