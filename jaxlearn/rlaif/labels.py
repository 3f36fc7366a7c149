"""RLAIF labels: two candidate responses per prompt, judged, become DPO preference records.

Candidates come from a file or are sampled from a policy (two samples per prompt at a
temperature above 0; identical or empty pairs are skipped and counted). The judge
(`jaxlearn.rlaif.judge`) sees each pair in both orders; its debiased verdict names the chosen
and the rejected response. Records are written as JSONL that `data.source: jsonl` with
`data.format: preference` reads (`jaxlearn.data.preference.file_pairs`):

    {"id": ..., "prompt": "Give an antonym of 'hot'.", "chosen": "cold", "rejected": "warm",
     "judge_p": 0.73, "consistent": true}

`judge_p` is the debiased P(chosen better) (> 0.5), `consistent` whether both orders agreed.
The preference reader ignores keys it does not know, so they ride along in the same file. A
prompt with a system message is written with `system`, a multi-turn prompt as `messages`.
Ties (p = 0.5: no preference) are never written; `drop_inconsistent` also leaves out pairs
whose verdict flips with the order. Example::

    cands, stats = sample_candidates(policy, wordnet_antonym_prompts()[:64], temperature=1.0)
    records, stats = label_candidates(judge, cands, drop_inconsistent=True, stats=stats)
    write_jsonl_atomic("runs/rlaif/pairs.jsonl", records)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxlearn.data.chat import END_OF_TURN, encode_prompt, stop_ids
from jaxlearn.data.errors import DataError
from jaxlearn.data.sft import chat_tokenizer
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.rlaif.judge import Scorer, judge_pairs, question_text


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One prompt (messages up to the assistant's turn) and two responses to compare; `record`
    is what a checkable reward reads (`answers`, from the prompt's data record)."""

    id: str
    prompt: tuple[dict, ...]
    first: str
    second: str
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Samples:
    """One prompt and N sampled replies (end-of-turn cut, stripped), with its data record."""

    id: str
    prompt: tuple[dict, ...]
    replies: tuple[str, ...]
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LabelStats:
    """What happened between prompts and written records."""

    prompts: int = 0
    identical: int = 0  # the two samples were the same text (nothing to prefer)
    empty: int = 0  # a sample was empty (the preference reader needs non-empty replies)
    judged: int = 0
    too_long: int = 0  # the comparison does not fit the judge's context
    ties: int = 0
    inconsistent: int = 0  # the verdict flips with the order (written unless dropped)
    dropped_inconsistent: int = 0
    written: int = 0

    def summary(self) -> str:
        """One line for the log.

        >>> LabelStats(prompts=4, identical=1, judged=3, inconsistent=1, written=3).summary()
        '4 prompts: 1 identical and 0 empty pairs skipped; 3 judged (0 too long, 0 ties, 1 position-inconsistent, 0 of them dropped); 3 records written'
        """
        return (f"{self.prompts} prompts: {self.identical} identical and {self.empty} empty pairs skipped; "
                f"{self.judged} judged ({self.too_long} too long, {self.ties} ties, {self.inconsistent} "
                f"position-inconsistent, {self.dropped_inconsistent} of them dropped); {self.written} records written")


def _cut_at_end_of_turn(text: str) -> str:
    cut = min((text.find(s) for s in END_OF_TURN if s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


def sample_replies(policy: Any, prompts: Sequence[Any], n: int = 2, *, temperature: float = 1.0, top_p: float = 1.0,
                   max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0) -> list[Samples]:
    """`n` sampled replies per prompt from `policy` (an `EvalModel`), every prompt kept.

    `prompts` are `PromptRecord`s (or anything with `id` and `prompt` messages; `as_record()`,
    when present, becomes `Samples.record`). Sampling needs `temperature` > 0, else every sample
    is the greedy reply. A prompt's n rows sit in the same batch with different random streams;
    batches are padded to `batch_size` rows (at least n).

    >>> samples = sample_replies(em, wordnet_antonym_prompts()[:8], 4, temperature=1.0)   # doctest: +SKIP
    >>> samples[0].replies                                                                # doctest: +SKIP
    ('cold', 'freezing', 'The opposite of hot is cold.', 'cold')
    """
    if temperature <= 0:
        raise ValueError(f"sampling {n} replies per prompt needs a temperature above 0 "
                         "(at 0 all are the greedy reply).")
    if n < 2:
        raise ValueError(f"a pair needs at least 2 samples per prompt, got {n}.")
    tok = policy.tokenizer
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_tokens=stop_ids(tok) if hasattr(tok, "special_tokens") else (tok.eos_id,),
                              pad_id=tok.pad_id)
    per_batch = max(batch_size // n, 1)
    rows = max(batch_size, n)
    key = jax.random.PRNGKey(seed)
    out = []
    for b, lo in enumerate(range(0, len(prompts), per_batch)):
        chunk = prompts[lo:lo + per_batch]
        ids = [encode_prompt(chat_tokenizer(tok), list(p.prompt)) for p in chunk]
        batch = [i for i in ids for _ in range(n)]
        batch += [batch[-1]] * (rows - len(batch))
        gen = generate(policy.model, policy.params, batch, sampling, jax.random.fold_in(key, b))
        for j, p in enumerate(chunk):
            replies = tuple(_cut_at_end_of_turn(tok.decode(gen.tokens[n * j + k])) for k in range(n))
            record = p.as_record() if hasattr(p, "as_record") else {}
            out.append(Samples(p.id, tuple(p.prompt), replies, record))
    return out


def sample_candidates(policy: Any, prompts: Sequence[Any], *, temperature: float = 1.0, top_p: float = 1.0,
                      max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0,
                      stats: LabelStats | None = None) -> tuple[list[Candidates], LabelStats]:
    """Two sampled replies per prompt from `policy` (`sample_replies`); identical or empty pairs skipped.

    >>> cands, stats = sample_candidates(em, wordnet_antonym_prompts()[:8], temperature=1.0)  # doctest: +SKIP
    >>> cands[0].first, cands[0].second                                                       # doctest: +SKIP
    ('cold', 'freezing')
    """
    stats = stats or LabelStats()
    out = []
    for s in sample_replies(policy, prompts, 2, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed):
        x, y = s.replies
        stats.prompts += 1
        if not x or not y:
            stats.empty += 1
        elif x == y:
            stats.identical += 1
        else:
            out.append(Candidates(s.id, s.prompt, x, y, s.record))
    return out, stats


def label_by_reward(reward: Callable[[str, str, dict], float], samples: Sequence[Samples], *,
                    stats: LabelStats | None = None) -> tuple[list[dict], LabelStats]:
    """Pairs labelled by a checkable scorer instead of a judge: per prompt, a highest-scoring
    sampled reply is chosen and a lowest-scoring one rejected (`reward(question, reply, record)`,
    e.g. `jaxlearn.rewards.make_reward({"accept": 1.0})`: the WordNet accept-set). Empty replies
    are not candidates; prompts whose distinct replies all score the same carry no preference and
    are counted as ties. Records carry `reward_chosen` / `reward_rejected`.

    >>> s = Samples("1", ({"role": "user", "content": "Give an antonym of 'hot'."},), ("warm", "cold", ""),
    ...             {"answers": ["cold"]})
    >>> records, stats = label_by_reward(lambda q, r, rec: float(r in rec["answers"]), [s])
    >>> records[0]["chosen"], records[0]["rejected"], stats.written
    ('cold', 'warm', 1)
    """
    stats = stats or LabelStats()
    records = []
    for s in samples:
        stats.prompts += 1
        replies = list(dict.fromkeys(r for r in s.replies if r))  # distinct, non-empty, in sampled order
        if len(replies) < 2:  # nothing to compare: all empty, or one distinct reply
            if replies:
                stats.identical += 1
            else:
                stats.empty += 1
            continue
        stats.judged += 1
        question = question_text(s.prompt)
        scores = [float(reward(question, r, s.record)) for r in replies]
        hi, lo = max(range(len(replies)), key=scores.__getitem__), min(range(len(replies)), key=scores.__getitem__)
        if scores[hi] == scores[lo]:
            stats.ties += 1
            continue
        records.append({"id": s.id, **_prompt_fields(s.prompt), "chosen": replies[hi], "rejected": replies[lo],
                        "reward_chosen": scores[hi], "reward_rejected": scores[lo]})
    stats.written = len(records)
    return records, stats


def read_candidates(path: str | os.PathLike) -> list[Candidates]:
    """Candidate pairs from JSONL: `{prompt | messages, responses: [x, y]}` (optional `id`,
    `system`). Errors name the file and line.

    >>> read_candidates("cands.jsonl")[0].first                                     # doctest: +SKIP
    'cold'
    """
    from jaxlearn.data.prompts import _record_prompt

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}).") from None
            responses = record.get("responses") if isinstance(record, dict) else None
            if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
                raise DataError(f"{where}: a candidate record needs 'responses': a list of two strings, and 'prompt' "
                                "(or 'messages').")
            prompt = _record_prompt(record, where, (1.0, 0.0, 0.0))  # the prompt checks of RL prompt files
            out.append(Candidates(str(record.get("id", where)), prompt.prompt, responses[0], responses[1],
                                  prompt.as_record()))
    if not out:
        raise DataError(f"{path} holds no candidate records.")
    return out


def _prompt_fields(prompt: Sequence[dict]) -> dict:
    """The prompt as `file_pairs` reads it: `prompt` (+ `system`) for one user turn, else `messages`."""
    roles = [m["role"] for m in prompt]
    if roles == ["user"]:
        return {"prompt": prompt[0]["content"]}
    if roles == ["system", "user"]:
        return {"system": prompt[0]["content"], "prompt": prompt[1]["content"]}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in prompt]}


def label_candidates(judge: Scorer, candidates: Sequence[Candidates], *, drop_inconsistent: bool = False,
                     stats: LabelStats | None = None) -> tuple[list[dict], LabelStats]:
    """Judge each candidate pair in both orders -> preference records (and the counts).

    Pairs the judge cannot fit (`judge.fits`, when it has one) and ties are skipped; with
    `drop_inconsistent`, pairs whose verdict flips with the order are too.

    >>> records, stats = label_candidates(judge, [Candidates("1", ({"role": "user", "content": "Antonym of hot?"},),
    ...                                                      "warm", "cold")])        # doctest: +SKIP
    >>> records[0]["chosen"], records[0]["judge_p"]                                    # doctest: +SKIP
    ('cold', 0.71)
    """
    stats = stats or LabelStats()
    fits = getattr(judge, "fits", None)
    kept = []
    for c in candidates:
        if fits is not None and not fits(question_text(c.prompt), c.first, c.second):
            stats.too_long += 1
        else:
            kept.append(c)
    verdicts = judge_pairs(judge, [(c.prompt, c.first, c.second) for c in kept]) if kept else []
    records = []
    for c, v in zip(kept, verdicts):
        stats.judged += 1
        if v.prefers_x is None:
            stats.ties += 1
            continue
        if not v.consistent:
            stats.inconsistent += 1
            if drop_inconsistent:
                stats.dropped_inconsistent += 1
                continue
        chosen, rejected, p = (c.first, c.second, v.p) if v.prefers_x else (c.second, c.first, 1.0 - v.p)
        records.append({"id": c.id, **_prompt_fields(c.prompt), "chosen": chosen, "rejected": rejected,
                        "judge_p": round(p, 6), "consistent": v.consistent})
    stats.written = len(records)
    return records, stats


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as JSONL via a temporary file in the same directory and a rename: readers
    (and a training run started next) see the old file or the whole new one, never a part; on
    any error the temporary file is removed and an existing file is left as it was.

    >>> write_jsonl_atomic(tmp / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}])  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
