"""Instruction -> response datasets with fixed train/validation/test splits.

Every dataset is a list of `Example`s: a conversation in the common `messages` form
(`[{"role": "user", ...}, {"role": "assistant", ...}]`, the last assistant message being the
reference answer), the accepted answers for exact-match scoring, and task metadata (tests for
code). Which split an example belongs to is decided by a stable hash of a key (never Python's
salted `hash`, never the file order), so the split is the same on every machine and run:

| dataset | key hashed | train / validation / test | size |
|---|---|---|---|
| `wordnet_antonyms` | the smallest lemma of the word's antonym group (so a test word's antonyms are never trained on either) | 0.8 / 0.1 / 0.1 | 6,018 words |
| `wordnet_definitions` | the lemma | 0.8 / 0.1 / 0.1 | ~16.7 k words (sense-tagged lemmas) |
| `humaneval` | the task id | 0.6 / 0.1 / 0.3 | 164 problems |
| `safety_sft` | Do-Not-Answer: the prompt's template group, by rank within its risk area; allowed prompts: see `jaxlearn/data/safety.py` | 0.7 / 0.1 / 0.2 (disallowed) | 939 disallowed + 866 allowed |
| `chat` (your JSONL/Parquet) | the record's `id`, else its JSON text | `eval_fraction` split evenly into validation/test | as given |

Prompts: `Give an antonym of 'X'.` -> `Y` (accept-set: every antonym of X in WordNet);
`Define 'X'.` -> the first clause of the gloss of X's most frequent sense (WordNet's index
order); HumanEval: the function's signature and docstring -> the whole function. Example::

    train = load_examples("wordnet_antonyms", "train")
    train[0].messages        # [{'role': 'user', 'content': "Give an antonym of 'able'."}, {'role': 'assistant', ...}]
    train[0].answers         # ('unable',)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlearn.data.corpora import fetch_humaneval, fetch_wordnet, stable_fraction
from jaxlearn.data.errors import DataError

SPLITS = ("train", "validation", "test")
DATASETS = ("wordnet_antonyms", "wordnet_definitions", "humaneval", "safety_sft", "chat")
FRACTIONS = {"wordnet_antonyms": (0.8, 0.1, 0.1), "wordnet_definitions": (0.8, 0.1, 0.1),
             "humaneval": (0.6, 0.1, 0.3)}
ROLES = ("system", "user", "assistant")

ANTONYM_PROMPT = "Give an antonym of '{}'."
DEFINE_PROMPT = "Define '{}'."
CODE_PROMPT = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
               "```python\n{}```")


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction example. `messages[-1]` is the reference assistant answer."""

    id: str
    messages: tuple[dict, ...]
    answers: tuple[str, ...] = ()  # accepted answers (exact match after normalisation)
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to (not including) the final assistant answer."""
        return list(self.messages[:-1])

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


def split_of(key: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split ("train", "validation" or "test") of `key`, by a stable hash.

    >>> split_of("able") == split_of("able")
    True
    >>> split_of("x", (1.0, 0.0, 0.0))
    'train'
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}.")
    u = stable_fraction(key)
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def load_examples(name: str, split: str, *, paths: Sequence[str | os.PathLike] = (), eval_fraction: float = 0.1,
                  cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """The examples of one split of dataset `name` (see the module docstring), in a fixed order.

    >>> len(load_examples("humaneval", "test"))        # doctest: +SKIP
    48
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if name == "wordnet_antonyms":
        examples = wordnet_antonyms(cache_dir)
    elif name == "wordnet_definitions":
        examples = wordnet_definitions(cache_dir)
    elif name == "humaneval":
        examples = humaneval_examples(cache_dir)
    elif name == "safety_sft":  # refusals for Do-Not-Answer prompts + allowed prompts (jaxlearn/data/safety.py)
        from jaxlearn.data.safety import safety_examples

        examples = safety_examples(cache_dir)
    elif name == "chat":
        examples = chat_examples(paths)
        half = eval_fraction / 2
        return [e for e in examples if split_of(e.meta["split_key"], (1 - eval_fraction, half, half)) == split]
    else:
        raise DataError(f"unknown instruction dataset {name!r}; available: {', '.join(DATASETS)}.")
    return [e for e in examples if e.meta["split"] == split]


# --------------------------------------------------------------------------------------------
# WordNet

_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: able(p), galore(ip)
_WORD = re.compile(r"[a-z]{3,}")


def _lemma(raw: str) -> str:
    return _MARKER.sub("", raw).replace("_", " ").lower()


def read_wordnet_synsets(root: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """Parse `data.{noun,verb,adj,adv}`: {(file pos, offset): {"words", "pointers", "gloss"}}.
    Parsed once per process and directory (the files never change under a run; every WordNet
    builder reads them, ~2 s each time otherwise): treat the result as read-only.

    A line is `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr... | gloss`; `w_cnt`
    is hexadecimal, each pointer is `symbol offset pos source/target` (source/target: two hex
    digits each, word numbers from 1, 0000 for a semantic pointer). Licence lines start with
    two spaces and are skipped.

    >>> syn = read_wordnet_synsets(fetch_wordnet())                  # doctest: +SKIP
    >>> syn[("a", "00001740")]["words"]                              # doctest: +SKIP
    ['able']
    """
    return _parse_wordnet_synsets(str(Path(root).resolve()))


@functools.lru_cache(maxsize=2)
def _parse_wordnet_synsets(root_str: str) -> dict[tuple[str, str], dict]:
    root = Path(root_str)
    synsets: dict[tuple[str, str], dict] = {}
    for pos_file in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos_file}"
        with open(path, encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                try:
                    offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
                    words = [_lemma(w) for w in fields[4:4 + 2 * w_cnt:2]]
                    i = 4 + 2 * w_cnt
                    p_cnt = int(fields[i])
                    pointers = [tuple(fields[i + 1 + 4 * k:i + 5 + 4 * k]) for k in range(p_cnt)]
                except (IndexError, ValueError):
                    raise DataError(f"{path}:{lineno}: not a WordNet data line ({line[:60]!r}); the file is damaged. "
                                    f"Delete {root} and fetch again.") from None
                synsets[(_POS_FILES[ss_type], offset)] = {"words": words, "pointers": pointers,
                                                          "gloss": gloss.strip(), "pos": ss_type}
    return synsets


def wordnet_antonyms(cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """`Give an antonym of 'X'.` -> an antonym, for every single-word lemma X with antonyms.

    Antonyms come from lexical `!` pointers. The accept-set holds all of X's antonyms (over all
    senses); the training target is the first in sorted order. X and its antonyms are linked
    into groups (union-find), and the whole group goes to one split.
    """
    synsets = read_wordnet_synsets(fetch_wordnet(cache_dir))
    ants: dict[str, set[str]] = {}
    for (_pos, _off), s in synsets.items():
        for sym, off, pos, st in s["pointers"]:
            if sym != "!":
                continue
            src, tgt = int(st[:2], 16), int(st[2:], 16)
            target = synsets.get((_POS_FILES[pos], off))
            if not target or src == 0 or tgt == 0:
                continue
            a, b = s["words"][src - 1], target["words"][tgt - 1]
            if _WORD.fullmatch(a) and _WORD.fullmatch(b) and a != b:
                ants.setdefault(a, set()).add(b)
    parent = {w: w for w in ants}

    def find(w: str) -> str:
        while parent[w] != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for a, bs in ants.items():
        for b in bs:
            if b in parent:
                ra, rb = find(a), find(b)
                parent[max(ra, rb)] = min(ra, rb)
    out = []
    for word in sorted(ants):
        answers = tuple(sorted(ants[word]))
        split = split_of(f"wordnet_antonyms:{find(word)}", FRACTIONS["wordnet_antonyms"])
        msgs = ({"role": "user", "content": ANTONYM_PROMPT.format(word)}, {"role": "assistant", "content": answers[0]})
        out.append(Example(f"antonym/{word}", msgs, answers, {"split": split, "word": word}))
    return out


def wordnet_definitions(cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """`Define 'X'.` -> the first clause of the gloss of X's most frequent sense.

    Lemmas: single lowercase words of 3+ letters that are sense-tagged in WordNet's corpus
    (`tagsense_cnt` > 0 in `index.*`: common words); of a lemma's parts of speech, the one with
    the most tagged senses wins (ties: noun, verb, adjective, adverb). The clause is the gloss up to its first `;` (examples in
    quotes follow it).
    """
    root = fetch_wordnet(cache_dir)
    synsets = read_wordnet_synsets(root)
    chosen: dict[str, tuple[int, str, str]] = {}
    for pos_file in ("noun", "verb", "adj", "adv"):
        with open(root / f"index.{pos_file}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                fields = line.split()
                lemma, p_cnt = fields[0], int(fields[3])
                tagsense_cnt, offsets = int(fields[5 + p_cnt]), fields[6 + p_cnt:]
                best = chosen.get(lemma, (0,))[0]
                if tagsense_cnt > best and _WORD.fullmatch(lemma) and offsets:
                    chosen[lemma] = (tagsense_cnt, pos_file, offsets[0])
    out = []
    for word in sorted(chosen):
        s = synsets.get(chosen[word][1:])
        if s is None:
            continue
        clause = s["gloss"].split(";")[0].strip()
        if not clause or clause.startswith('"'):
            continue
        split = split_of(f"wordnet_definitions:{word}", FRACTIONS["wordnet_definitions"])
        msgs = ({"role": "user", "content": DEFINE_PROMPT.format(word)}, {"role": "assistant", "content": clause})
        out.append(Example(f"define/{word}", msgs, (clause,), {"split": split, "word": word,
                                                                "pos": _POS_NAMES[s["pos"]]}))
    return out


# --------------------------------------------------------------------------------------------
# HumanEval


def humaneval_examples(cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """HumanEval's 164 problems: prompt (signature + docstring) -> the whole canonical function.

    `meta` holds `prompt`, `test` (defines `check(candidate)`), `entry_point` and the split.
    """
    path = fetch_humaneval(cache_dir)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
            task, prompt, solution = p["task_id"], p["prompt"], p["canonical_solution"]
            test, entry = p["test"], p["entry_point"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{path}:{lineno}: not a HumanEval problem ({e}); delete the file and fetch again.") from None
        split = split_of(f"humaneval:{task}", FRACTIONS["humaneval"])
        msgs = ({"role": "user", "content": CODE_PROMPT.format(prompt)},
                {"role": "assistant", "content": f"```python\n{prompt}{solution}```"})
        out.append(Example(task, msgs, (), {"split": split, "prompt": prompt, "test": test, "entry_point": entry,
                                            "canonical_solution": solution}))
    return out


# --------------------------------------------------------------------------------------------
# Your own data: JSONL / Parquet records in `messages` or prompt/response form


def chat_record_messages(record: Any, where: str) -> list[dict]:
    """A record's conversation: `{"messages": [{role, content}, ...]}`, or
    `{"prompt": ..., "response": ...}` (optional `"system"`). Errors name `where` and the fix.

    >>> chat_record_messages({"prompt": "Hi", "response": "Hello"}, "x.jsonl:1")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a chat record must be a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, "
                                f"\"content\": a string}}, got {m!r}.")
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings.")
        out = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str) and record["system"]:
            out.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise DataError(f"{where}: a chat record needs 'messages' (a list of {{role, content}}) or 'prompt' and "
                        f"'response' strings; it has keys {sorted(record)}.")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing would be trained on.")
    return out


def prompt_messages(record: dict, where: str, replies: str) -> tuple[dict, ...]:
    """The prompt of a record the model answers (preference, unpaired, RL prompt and candidate
    files): `messages` ending with a user turn, or `prompt` (+ `system`). `replies` names what
    answers it, for the error message. Errors name `where` and the fix.

    >>> prompt_messages({"prompt": "Hi", "system": "Be brief."}, "x.jsonl:1", "'chosen'/'rejected'")
    ({'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'})
    """
    if "messages" in record:
        prompt = chat_record_messages({"messages": record["messages"] + [{"role": "assistant", "content": "x"}]},
                                      where)[:-1]
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: 'messages' must end with a user turn (the replies are {replies}).")
        return tuple(prompt)
    if not isinstance(record.get("prompt"), str) or not record["prompt"]:
        raise DataError(f"{where}: 'prompt' must be a non-empty string (or give 'messages').")
    prompt = [{"role": "user", "content": record["prompt"]}]
    if isinstance(record.get("system"), str) and record["system"]:
        prompt.insert(0, {"role": "system", "content": record["system"]})
    return tuple(prompt)


def chat_examples(paths: Sequence[str | os.PathLike]) -> list[Example]:
    """Read `.jsonl` (one record a line) and `.parquet` files of chat records (see
    `chat_record_messages`). The split key is the record's `id` if it has one, else its JSON.

    >>> chat_examples(["data/chat.jsonl"])[0].messages[-1]["role"]      # doctest: +SKIP
    'assistant'
    """
    from jaxlearn.data.sources import expand_paths

    out = []
    for path in expand_paths(paths, what="chat data"):
        for where, record in _records(path):
            msgs = chat_record_messages(record, where)
            key = str(record["id"]) if "id" in record else json.dumps(msgs, sort_keys=True)
            final = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""
            out.append(Example(where, tuple(msgs), (final,) if final else (), {"split_key": f"chat:{key}"}))
    if not out:
        raise DataError(f"the chat data files {list(map(str, paths))} hold no records.")
    return out


def _records(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e}). Each line must be one JSON object.") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}). Save it as UTF-8.") from None
