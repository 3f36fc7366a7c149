"""Your own evaluation tasks from a JSONL file: `jaxlearn eval --tasks file:PATH.jsonl`.

Task name::

    file:PATH[?OPTION=VALUE&OPTION=VALUE...]

    file:data/capitals.jsonl
    file:data/capitals.jsonl?shots=3
    file:data/quiz.jsonl?shots=2&split=validation&suffix=Answer+with+one+word.

PATH is used as written (relative to the working directory, no %-decoding, so it cannot hold
`?`). Option values are URL-query encoded: `+` or `%20` is a space, `%26` an `&`, `%2C` a comma
(`--tasks` is split at commas, so a comma in a name must be written `%2C`).

| option | default | meaning |
|---|---|---|
| `shots=K` | 0 | K solved rows of the file's `train` split go before each prompt as earlier user/assistant turns |
| `split=S` | `test` | the rows scored: `train`, `validation` or `test`; a row without `split` is a test row (the harness's `--split` is for the built-in datasets and does not apply) |
| `system=TEXT` | none | a system prompt for every row (a row's own `system` key, or a system message in its `messages`, wins) |
| `suffix=TEXT` | none | an instruction appended, after a newline, to the last user message of each prompt (a row's own `suffix` wins) |
| `max_new_tokens=N` | `--max-new-tokens`, else 32 | generation rows: the reply length |

One JSON object per line (blank lines are skipped). Every row has `prompt` (a string: one user
message) or `messages` (chat messages, the last one from the user); optional `id` (default
`line<N>`, N the 1-based line number), `split`, `system`, `suffix` and `meta` (anything: copied
to the per-example output). A file holds one of two kinds of row:

- generation: `{"prompt": "Capital of France?", "answer": "Paris"}`, with `answer`, `answers`
  (an accept-set) and/or `pattern` (a regular expression). The greedy reply is scored by
  `exact_match` (normalised reply equals a normalised answer, SQuAD-style: lower case, no
  punctuation, articles or extra spaces), `contains` (a normalised answer occurs as whole words in
  the normalised reply) and `pattern` (`re.search` finds the pattern in the raw reply), each
  averaged over the rows it applies to. Headline: `exact_match` (`pattern` if no row has answers).
- multiple choice: `{"prompt": "2+2=?", "choices": ["3", "4"], "label": 1}`. Each choice is
  scored by its log-likelihood as the assistant's reply to the prompt (chat template applied;
  the choice's tokens and the end-of-turn token, the tokens SFT trains on). `acc`: the best
  log-likelihood is the label's; `acc_norm`: the best log-likelihood per character of the choice
  (lm-evaluation-harness's `acc_norm`, which divides by the length of the choice string). Headline: `acc`.

Few-shot: the shots are the K `train` rows with the smallest stable hash (sha256) of their id,
among the train rows that have a reference reply (`answer`, the first of `answers`, or
`choices[label]`; pattern-only rows are never shots), skipping the row being scored (possible
with `split=train`). So every scored row gets the same shots, on every machine and run. Each shot
is its own prompt (with its suffix, without its system prompt) and its reference reply.

`--limit N` scores the N rows of the split with the smallest hash of their id, as for the
built-in tasks. Every problem in a file is a `DataError` naming `PATH:LINE` and the fix. Example::

    check_file_task("file:quiz.jsonl?shots=1")       # reads and checks the file, before any model loads
    metrics, rows = run_file_task(em, "file:quiz.jsonl?shots=1", limit=None, opts={})
    metrics                                          # {'acc': 0.75, 'acc_norm': 0.5, 'n': 4}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from jaxlearn.data.chat import encode_chat
from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.data.sft import chat_tokenizer
from jaxlearn.eval.models import EvalModel, generate_replies, rows_nll
from jaxlearn.eval.scorers import exact_match, normalize_answer

FILE_PREFIX = "file:"
SPLITS = ("train", "validation", "test")
OPTIONS = ("shots", "split", "system", "suffix", "max_new_tokens")
ROLES = ("system", "user", "assistant")
_ROW_KEYS = ("id", "prompt", "messages", "answer", "answers", "pattern", "choices", "label", "split", "system",
             "suffix", "meta")
_EXAMPLE_ROWS = ('{"prompt": "Capital of France?", "answer": "Paris"} or '
                 '{"prompt": "2+2=?", "choices": ["3", "4"], "label": 1}')
DEFAULT_MAX_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class FileTaskSpec:
    """A parsed `file:` task name: the file and its options."""

    name: str
    path: Path
    shots: int = 0
    split: str = "test"
    system: str | None = None
    suffix: str | None = None
    max_new_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class FileRow:
    """One checked row of a task file; `line` is its 1-based line number."""

    line: int
    id: str
    messages: tuple[dict, ...]
    split: str = "test"
    answers: tuple[str, ...] = ()
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    label: int | None = None
    system: str | None = None
    suffix: str | None = None
    meta: Any = None

    @property
    def reference(self) -> str | None:
        """The reply a shot shows: the labelled choice, else the first answer (None: pattern only)."""
        if self.choices:
            return self.choices[self.label]
        return self.answers[0] if self.answers else None


# --------------------------------------------------------------------------------------------
# The task name


def is_file_task(name: str) -> bool:
    """Whether a task name is a `file:` task.

    >>> is_file_task("file:quiz.jsonl?shots=2"), is_file_task("antonyms")
    (True, False)
    """
    return isinstance(name, str) and name.startswith(FILE_PREFIX)


def parse_task_name(name: str) -> FileTaskSpec:
    """The file and options of a `file:PATH[?opt=value&...]` task name (the file is not read).

    >>> s = parse_task_name("file:q.jsonl?shots=2&suffix=One+word%2C+please.")
    >>> str(s.path), s.shots, s.split, s.suffix
    ('q.jsonl', 2, 'test', 'One word, please.')
    """
    body = name[len(FILE_PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise DataError(f"eval task {name!r} names no file; write file:PATH.jsonl (e.g. file:data/quiz.jsonl).")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"eval task {name!r}: cannot read the options {query!r}; write them as "
                        f"file:PATH?shots=3&split=test.") from None
    opts: dict[str, Any] = {}
    for key, value in pairs:
        if key not in OPTIONS:
            raise DataError(f"eval task {name!r}: unknown option {key!r}; options: {', '.join(OPTIONS)}.")
        if key in opts:
            raise DataError(f"eval task {name!r}: option {key!r} given twice; give it once.")
        opts[key] = value
    for key in ("shots", "max_new_tokens"):
        if key in opts:
            opts[key] = _count_option(name, key, opts[key], minimum=0 if key == "shots" else 1)
    if opts.get("split", "test") not in SPLITS:
        raise DataError(f"eval task {name!r}: split={opts['split']!r}; use one of {', '.join(SPLITS)}.")
    return FileTaskSpec(name, Path(path), **opts)


def _count_option(name: str, key: str, value: str, minimum: int) -> int:
    if not value.isdigit() or int(value) < minimum:
        raise DataError(f"eval task {name!r}: {key}={value!r} is not a whole number >= {minimum} (e.g. {key}=3).")
    return int(value)


# --------------------------------------------------------------------------------------------
# Reading and checking the file


def read_rows(path: str | Path) -> list[FileRow]:
    """Every row of a task file, checked; a `DataError` names `PATH:LINE` and the fix otherwise.

    >>> read_rows("quiz.jsonl")[0].choices          # doctest: +SKIP
    ('3', '4')
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval task file {path} not found (looked in {path.absolute().parent}); "
                        f"give the path of a JSONL file, one task row per line, e.g. {_EXAMPLE_ROWS}.")
    rows: list[FileRow] = []
    ids: dict[str, int] = {}
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        row = _parse_row(_json(path, lineno, line), f"{path}:{lineno}", lineno)
        if row.id in ids:
            raise DataError(f"{path}:{lineno}: id {row.id!r} is also used on line {ids[row.id]}; give each row "
                            f"its own id (ids name the per-example outputs).")
        ids[row.id] = lineno
        _same_kind(path, rows, row)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}:1: the file has no rows (empty, or blank lines only); write one JSON object "
                        f"per line, e.g. {_EXAMPLE_ROWS}.")
    return rows


def _text(path: Path) -> str:
    raw = path.read_bytes()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte-order mark is harmless
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None


def _json(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e}); each line must be one JSON object, "
                        f"e.g. {_EXAMPLE_ROWS}.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: the line is a JSON {type(obj).__name__}, not an object; write one "
                        f"object per line, e.g. {_EXAMPLE_ROWS}.")
    return obj


def _parse_row(obj: dict, where: str, lineno: int) -> FileRow:
    """A checked `FileRow` from one JSON object (`where` is `PATH:LINE` for the messages)."""
    unknown = sorted(set(obj) - set(_ROW_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a row has {', '.join(_ROW_KEYS)} "
                        f"(put anything else under \"meta\").")
    choices, label = _choices(obj, where)
    answers, pattern = _answers(obj, where)
    if choices and (answers or pattern is not None):
        raise DataError(f"{where}: the row has both choices and answer/answers/pattern; a row is either multiple "
                        f"choice (choices + label) or generation (answer, answers or pattern).")
    if not choices and not answers and pattern is None:
        raise DataError(f"{where}: the row has no answer, answers, pattern or choices; add one, e.g. {_EXAMPLE_ROWS}.")
    split = obj.get("split", "test")
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r}; use one of {', '.join(SPLITS)} (or leave it out: test).")
    rid = obj.get("id", f"line{lineno}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(f"{where}: id must be a string or a whole number, not {rid!r}.")
    return FileRow(lineno, str(rid), _messages(obj, where), split, answers, pattern, choices, label,
                   _optional_text(obj, "system", where), _optional_text(obj, "suffix", where), obj.get("meta"))


def _messages(obj: dict, where: str) -> tuple[dict, ...]:
    if ("prompt" in obj) == ("messages" in obj):
        raise DataError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (chat messages), "
                        f"e.g. {_EXAMPLE_ROWS}.")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where}: \"prompt\" must be a non-empty string.")
        return ({"role": "user", "content": obj["prompt"]},)
    msgs = obj["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": one of {', '.join(ROLES)}, "
                        f"\"content\": a string}}.")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the last message is from the {msgs[-1]['role']}; it must be the user's (the "
                        f"model replies to it). Put the reference reply in answer/choices instead.")
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


def _answers(obj: dict, where: str) -> tuple[tuple[str, ...], str | None]:
    if "answer" in obj and "answers" in obj:
        raise DataError(f"{where}: give \"answer\" (one string) or \"answers\" (a list), not both.")
    answers = [obj["answer"]] if "answer" in obj else obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers) or (
            "answers" in obj and not answers):
        raise DataError(f"{where}: answers must be non-empty strings (\"answer\": \"Paris\" or \"answers\": "
                        f"[\"Paris\", \"paris, france\"]); write numbers as strings (\"4\").")
    pattern = obj.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise DataError(f"{where}: \"pattern\" must be a non-empty regular expression string.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise DataError(f"{where}: \"pattern\" {pattern!r} is not a valid regular expression ({e}); fix it "
                            f"(remember JSON needs \\\\ for one backslash).") from None
    return tuple(answers), pattern


def _choices(obj: dict, where: str) -> tuple[tuple[str, ...], int | None]:
    if "choices" not in obj and "label" not in obj:
        return (), None
    choices, label = obj.get("choices"), obj.get("label")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: \"choices\" must be a non-empty list of non-empty strings, e.g. "
                        f"\"choices\": [\"3\", \"4\"], \"label\": 1.")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(f"{where}: \"label\" is {label!r}; it must be the 0-based index of the right choice, "
                        f"0 to {len(choices) - 1}.")
    return tuple(choices), label


def _optional_text(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string.")
    return value


def _same_kind(path: Path, rows: list[FileRow], row: FileRow) -> None:
    # One kind per file: the metrics (and the headline) of a task are those of one kind.
    if rows and bool(rows[0].choices) != bool(row.choices):
        first = "multiple-choice" if rows[0].choices else "generation"
        raise DataError(f"{path}:{row.line}: a {'multiple-choice' if row.choices else 'generation'} row in a "
                        f"{first} file (line {rows[0].line}); put generation and multiple-choice rows in separate files.")


# --------------------------------------------------------------------------------------------
# Prompts and shots


def select_shots(rows: Sequence[FileRow], row: FileRow, k: int, path: str | Path = "") -> list[FileRow]:
    """The `k` shots for `row`: train rows with a reference reply, smallest hash of id first, never `row`.

    >>> rows = [FileRow(i, f"r{i}", (), "train", ("x",)) for i in range(1, 5)]
    >>> [s.id for s in select_shots(rows, rows[0], 2)] == [s.id for s in select_shots(rows, rows[1], 2)]
    False
    """
    if k == 0:
        return []
    pool = sorted((r for r in rows if r.split == "train" and r.reference is not None and r.line != row.line),
                  key=lambda r: (stable_fraction(r.id), r.line))
    if len(pool) < k:
        raise DataError(f"{path}: shots={k}, but the file has only {len(pool)} other train row(s) with a reference "
                        f"reply (answer, answers or choices + label); add train rows (\"split\": \"train\") or use "
                        f"fewer shots.")
    return pool[:k]


def _with_suffix(messages: Sequence[dict], suffix: str | None) -> list[dict]:
    """The messages, without system messages, the suffix appended to the last user message."""
    out = [dict(m) for m in messages if m["role"] != "system"]
    if suffix:
        last = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last]["content"] = f"{out[last]['content']}\n{suffix}"
    return out


def build_conversation(row: FileRow, shots: Sequence[FileRow], spec: FileTaskSpec) -> list[dict]:
    """The chat prompt of `row`: system prompt, each shot as a user turn and its reference reply,
    then the row's own messages (the suffix appended to its last user message).

    >>> spec = FileTaskSpec("file:q.jsonl", Path("q.jsonl"), suffix="One word.")
    >>> shot = FileRow(1, "a", ({"role": "user", "content": "Hot?"},), "train", ("cold",))
    >>> row = FileRow(2, "b", ({"role": "user", "content": "Up?"},), "test", ("down",))
    >>> [m["content"] for m in build_conversation(row, [shot], spec)]
    ['Hot?\\nOne word.', 'cold', 'Up?\\nOne word.']
    """
    own_system = [dict(m) for m in row.messages if m["role"] == "system"]
    system = row.system if row.system is not None else spec.system
    head = own_system or ([{"role": "system", "content": system}] if system else [])
    turns: list[dict] = []
    for s in shots:
        turns += _with_suffix(s.messages, s.suffix if s.suffix is not None else spec.suffix)
        turns.append({"role": "assistant", "content": s.reference})
    return head + turns + _with_suffix(row.messages, row.suffix if row.suffix is not None else spec.suffix)


# --------------------------------------------------------------------------------------------
# Scoring


def contains_answer(reply: str, answers: Sequence[str]) -> bool:
    """Whether a normalised answer occurs as whole words in the normalised reply.

    >>> contains_answer("It is Paris, I think.", ["paris"]), contains_answer("Parisian", ["paris"])
    (True, False)
    """
    words = f" {normalize_answer(reply)} "
    return any(f" {normalize_answer(a)} " in words for a in answers)


def score_generation(rows: Sequence[FileRow], replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-row outputs) of generation rows: exact_match and contains over the rows with
    answers, pattern over the rows with a pattern, n; `n_answers`/`n_pattern` when not all rows have them.

    >>> r = [FileRow(1, "a", (), answers=("Paris",)), FileRow(2, "b", (), pattern=r"\\d+")]
    >>> score_generation(r, ["paris.", "none"])[0]
    {'exact_match': 1.0, 'contains': 1.0, 'pattern': 0.0, 'n': 2, 'n_answers': 1, 'n_pattern': 1}
    """
    out = []
    for row, reply in zip(rows, replies, strict=True):
        o: dict[str, Any] = {"id": row.id, "line": row.line, "reply": reply}
        if row.answers:
            o.update(answers=list(row.answers), exact_match=exact_match(reply, row.answers),
                     contains=contains_answer(reply, row.answers))
        if row.pattern is not None:
            o.update(pattern=row.pattern, pattern_match=re.search(row.pattern, reply) is not None)
        out.append(o)
    metrics: dict[str, Any] = {}
    for metric, key in (("exact_match", "exact_match"), ("contains", "contains"), ("pattern", "pattern_match")):
        vals = [o[key] for o in out if key in o]
        if vals:
            metrics[metric] = sum(vals) / len(vals)
    metrics["n"] = len(out)
    for name, have in (("n_answers", sum("exact_match" in o for o in out)),
                       ("n_pattern", sum("pattern_match" in o for o in out))):
        if 0 < have < len(out):  # only where a metric covers part of the rows
            metrics[name] = have
    return metrics, out


def score_choices(rows: Sequence[FileRow], logliks: Sequence[Sequence[float]]) -> tuple[dict, list[dict]]:
    """(metrics, per-row outputs) of multiple-choice rows from each choice's log-likelihood:
    acc (argmax log-likelihood), acc_norm (argmax log-likelihood / characters of the choice), n.

    >>> r = [FileRow(1, "a", (), choices=("a", "bbbb"), label=1)]
    >>> score_choices(r, [[-2.0, -4.0]])[0]          # per character: -2.0 vs -1.0
    {'acc': 0.0, 'acc_norm': 1.0, 'n': 1}
    """
    out = []
    for row, ll in zip(rows, logliks, strict=True):
        per_char = [v / len(c) for v, c in zip(ll, row.choices, strict=True)]
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(per_char))
        out.append({"id": row.id, "line": row.line, "choices": list(row.choices), "label": row.label,
                    "loglik": [float(v) for v in ll], "loglik_per_char": per_char, "pred": pred,
                    "pred_norm": pred_norm, "acc": pred == row.label, "acc_norm": pred_norm == row.label})
    n = len(out)
    return {"acc": sum(o["acc"] for o in out) / n, "acc_norm": sum(o["acc_norm"] for o in out) / n, "n": n}, out


def _last_turn_row(tok: Any, conversation: Sequence[dict], seq_len: int) -> dict | None:
    """{inputs, targets, loss_mask} scoring only the LAST assistant turn (None: too long).

    Why not `reference_nll`: it scores every assistant turn, so with shots the shots' replies
    would be added to each choice's score (a constant per row, which still skews acc_norm).
    """
    enc = encode_chat(chat_tokenizer(tok), list(conversation))
    ids, mask = np.asarray(enc.ids, np.int32), np.asarray(enc.mask, np.float32)
    if len(ids) - 1 > seq_len:
        return None
    end = int(np.flatnonzero(mask)[-1]) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    last = np.zeros_like(mask)
    last[start:end] = 1.0
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": last[1:]}


def choice_logliks(em: EvalModel, conversations: Sequence[Sequence[dict]], *, batch_size: int = 16,
                   bucket: int = 32, labels: Sequence[str] | None = None) -> list[tuple[float, int]]:
    """(summed log-likelihood in nats, token count) of each conversation's last assistant turn
    given everything before it (the turn's tokens and its end-of-turn token, as SFT scores them).
    Without earlier assistant turns this is minus `reference_nll`. `labels` name the
    conversations in the too-long error.

    >>> choice_logliks(em, [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # doctest: +SKIP
    [(-3.1, 2)]
    """
    rows = []
    for i, c in enumerate(conversations):
        row = _last_turn_row(em.tokenizer, c, em.max_seq_len)
        if row is None:
            where = labels[i] if labels else f"conversation {i}"
            raise DataError(f"{where}: the prompt and choice are longer than the model's {em.max_seq_len} tokens; "
                            f"shorten the row or use fewer shots.")
        rows.append(row)
    return [(-nll, n) for nll, n in rows_nll(em, rows, batch_size=batch_size, bucket=bucket)]


# --------------------------------------------------------------------------------------------
# The task


def _sample(rows: list[FileRow], limit: int | None) -> list[FileRow]:
    """The `limit` rows with the smallest hash of their id (all if None/0), in file order."""
    if not limit or limit >= len(rows):
        return list(rows)
    keep = {r.line for r in sorted(rows, key=lambda r: (stable_fraction(r.id), r.line))[:limit]}
    return [r for r in rows if r.line in keep]


def prepare(name: str, limit: int | None = None) -> tuple[FileTaskSpec, list[FileRow], list[list[FileRow]]]:
    """(spec, scored rows, their shots) of a `file:` task: everything but the model.

    >>> spec, rows, shots = prepare("file:quiz.jsonl?shots=1")      # doctest: +SKIP
    """
    spec = parse_task_name(name)
    rows = read_rows(spec.path)
    scored = _sample([r for r in rows if r.split == spec.split], limit)
    if not scored:
        have = sorted({r.split for r in rows})
        raise DataError(f"{spec.path}: no rows in split {spec.split!r} to score (the file has {', '.join(have)}; a row "
                        f"without \"split\" is a test row); pick one with ?split=..., or add rows.")
    return spec, scored, [select_shots(rows, r, spec.shots, spec.path) for r in scored]


def check_file_task(name: str) -> None:
    """Read and check a `file:` task's name and file (every row), before any model is loaded.

    >>> check_file_task("file:missing.jsonl")
    Traceback (most recent call last):
    ...
    jaxlearn.data.errors.DataError: eval task file missing.jsonl not found ...
    """
    prepare(name)


def headline(name: str) -> str:
    """The headline metric of a `file:` task: `acc` (multiple choice), else `exact_match`
    (`pattern` when no row has answers).

    >>> headline("file:quiz.jsonl")                 # doctest: +SKIP
    'acc'
    """
    rows = read_rows(parse_task_name(name).path)
    if rows[0].choices:
        return "acc"
    return "exact_match" if any(r.answers for r in rows) else "pattern"


def _context(outputs: list[dict], convs: list[list[dict]], shots: list[list[FileRow]], rows: list[FileRow]) -> list[dict]:
    """Per-row outputs with the prompt shown (the last user message), the shot ids and `meta`."""
    for o, c, s, r in zip(outputs, convs, shots, rows, strict=True):
        o["prompt"] = next(m["content"] for m in reversed(c) if m["role"] == "user")
        o["shots"] = [x.id for x in s]
        if r.meta is not None:
            o["meta"] = r.meta
    return outputs


def run_file_task(em: EvalModel, name: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    """(metrics, per-row outputs) of a `file:` task on `em`; opts: batch_size, max_new_tokens.

    >>> run_file_task(em, "file:capitals.jsonl?shots=2", 50, {})[0]    # doctest: +SKIP
    {'exact_match': 0.62, 'contains': 0.8, 'n': 50}
    """
    spec, rows, shots = prepare(name, limit)
    convs = [build_conversation(r, s, spec) for r, s in zip(rows, shots)]
    batch_size = opts.get("batch_size") or 16
    if rows[0].choices:
        flat = [c + [{"role": "assistant", "content": ch}] for c, r in zip(convs, rows) for ch in r.choices]
        where = [f"{spec.path}:{r.line} (choice {j})" for r in rows for j in range(len(r.choices))]
        scores = iter(choice_logliks(em, flat, batch_size=batch_size, labels=where))
        logliks = [[next(scores)[0] for _ in r.choices] for r in rows]
        metrics, outputs = score_choices(rows, logliks)
    else:
        max_new = spec.max_new_tokens or opts.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        replies = generate_replies(em, convs, max_new_tokens=max_new, batch_size=batch_size)
        metrics, outputs = score_generation(rows, replies)
    return metrics, _context(outputs, convs, shots, rows)
