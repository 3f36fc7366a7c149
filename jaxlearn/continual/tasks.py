"""The tasks of a continual sequence: each a training data block and a held-out evaluation.

Built-in tasks (a sequence names them as a plain string):

| task | trains on (data block) | held-out evaluation (test split / eval documents) | score |
|---|---|---|---|
| `antonyms` | `wordnet_antonyms` (chat) | `jaxlearn eval` task `antonyms` | `exact_match` |
| `definitions` | `wordnet_definitions` (chat) | `jaxlearn eval` task `definitions` | `nll_per_token` (lower is better) |
| `hypernyms` | WordNet hypernym (`@`) pointers, "What is a X a kind of?" (written as chat JSONL into the sequence dir) | greedy reply contains an accepted hypernym | `contains` |
| `humaneval` | `humaneval` (chat) | `jaxlearn eval` task `humaneval` (sandboxed) | `pass@1` |
| `brown:<genre>` | Brown texts of one genre (`news`, `fiction`, `romance`, ...; text LM) | perplexity on the genre's held-out Brown documents | `perplexity` (lower is better) |

A custom task is a mapping `{name, data: {...data block keys...}, eval: chat_nll}`: `chat_nll`
scores the summed NLL per answer token of the held-out (test-split) records of the task's own
`data.paths` chat JSONL. General probes: `perplexity:brown`, `perplexity:shakespeare`,
`probes:facts`, `probes:format` (`jaxlearn/eval/tasks.py`). Example::

    score = evaluate_task(em, TaskSpec("antonyms"), seq_dir, limit=50)   # {'score': 0.12, 'metric': ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from jaxlearn.data.errors import DataError
from jaxlearn.data.instruct import Example, split_of

BUILTIN = ("antonyms", "definitions", "hypernyms", "humaneval", "brown:<genre>")
HYPERNYM_PROMPT = "What is {} a kind of? Answer with one word."  # {}: "a cat", "an apple"
_WORD = re.compile(r"[a-z]{3,}")
# Whether a larger score is better, by metric.
HIGHER_IS_BETTER = {"exact_match": True, "contains": True, "pass@1": True, "nll_per_token": False,
                    "perplexity": False, "follows": True, "refusal_rate": True, "false_refusal_rate": False,
                    "token_f1": True, "pref_accuracy": True}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: `name`, its data block overrides (`data`) and its evaluation (`eval`)."""

    name: str
    data: dict = dataclasses.field(default_factory=dict, hash=False)
    eval: str = ""


def builtin_task(name: str, where: str) -> TaskSpec:
    """The TaskSpec of a built-in task name (see the module table)."""
    from jaxlearn.config import ConfigError

    chat = {"format": "chat"}
    if name == "antonyms":
        return TaskSpec(name, {"source": "wordnet_antonyms", **chat}, "antonyms")
    if name == "definitions":
        return TaskSpec(name, {"source": "wordnet_definitions", **chat}, "definitions")
    if name == "humaneval":
        return TaskSpec(name, {"source": "humaneval", **chat}, "humaneval")
    if name == "hypernyms":
        return TaskSpec(name, {"source": "jsonl", "paths": ["<hypernyms>"], **chat}, "hypernyms")
    if name.startswith("brown:"):
        genre = name.split(":", 1)[1]
        return TaskSpec(name, {"source": "text", "paths": [f"<brown:{genre}:train>"], "format": "text"}, name)
    raise ConfigError(f"{where}: unknown task {name!r}. Built-in tasks: {', '.join(BUILTIN)}; or give a mapping "
                      "{name: ..., data: {source: jsonl, paths: [...], format: chat}, eval: chat_nll}.")


# --------------------------------------------------------------------------------------------
# Data the tasks need, materialised into the sequence directory


def hypernym_examples(cache_dir=None) -> list[Example]:
    """"What is a X a kind of?" -> a hypernym of X's most frequent sense (WordNet `@` pointers), for
    familiar single nouns X (sense-tagged at least once) with a familiar hypernym lemma. Accept-set:
    every lemma of every hypernym of that sense. Split 0.8/0.1/0.1 by a stable hash of X.

    >>> hypernym_examples()[0].messages[0]["content"]               # doctest: +SKIP
    "What is an abandonment a kind of? Answer with one word."
    """
    from jaxlearn.data.corpora import fetch_wordnet
    from jaxlearn.data.instruct import read_wordnet_synsets
    from jaxlearn.eval.probes import _article, _familiar_first_senses

    root = fetch_wordnet(cache_dir, progress=None)
    synsets = read_wordnet_synsets(root)
    nouns = _familiar_first_senses(root)
    out = []
    for word, (tagged, off) in sorted(nouns.items()):
        s = synsets.get(("noun", off))
        if tagged < 1 or s is None:
            continue
        lemmas = [w for sym, o, pos, _ in s["pointers"] if sym == "@" and pos == "n"
                  for w in synsets.get(("noun", o), {"words": []})["words"]]
        familiar = [w for w in lemmas if _WORD.fullmatch(w) and nouns.get(w, (0,))[0] >= 1 and w != word]
        if not familiar:
            continue
        msgs = ({"role": "user", "content": HYPERNYM_PROMPT.format(f"{_article(word)} {word}")}, {"role": "assistant", "content": familiar[0]})
        out.append(Example(f"hypernym/{word}", msgs, tuple(sorted(set(lemmas))),
                           {"split": split_of(f"hypernyms:{word}", (0.8, 0.1, 0.1)), "word": word}))
    return out


def brown_genre_files(genre: str, split: str) -> list[str]:
    """The Brown corpus files of one genre (`news`, `fiction`, ...) in a split (`train`/`eval`)."""
    from jaxlearn.data.corpora import corpus_dir, fetch_corpus

    fetch_corpus("brown", progress=None)
    root = corpus_dir("brown")
    genres = json.loads((root / "manifest.json").read_text(encoding="utf-8"))["genre"]
    files = sorted(str(p) for p in (root / split).glob("*.txt") if genres.get(p.stem) == genre)
    if not files:
        raise DataError(f"Brown genre {genre!r} has no {split} documents; genres: {', '.join(sorted(set(genres.values())))}.")
    return files


def resolve_data(task: TaskSpec, seq_dir: Path) -> dict:
    """The task's data block with placeholders (`<hypernyms>`, `<brown:G:train>`) made real paths."""
    paths = []
    for p in task.data.get("paths", []):
        if p == "<hypernyms>":
            target = seq_dir / "data" / "hypernyms_train.jsonl"
            if not target.is_file():
                from jaxlearn.train.metrics import atomic_write_text

                target.parent.mkdir(parents=True, exist_ok=True)
                rows = [{"id": e.id, "messages": list(e.messages)} for e in hypernym_examples()
                        if e.meta["split"] == "train"]
                atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
            paths.append(str(target))
        elif p.startswith("<brown:") and p.endswith(":train>"):
            paths.extend(brown_genre_files(p[len("<brown:"):-len(":train>")], "train"))
        else:
            paths.append(p)
    return {**task.data, **({"paths": paths} if paths else {})}


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate_task(em, task: TaskSpec, data: dict, *, limit: int, batch_size: int = 16, max_new_tokens: int = 0,
                  ppl_batches: int = 4) -> dict:
    """`{"metric", "score", "higher_is_better", ...}` of the EvalModel `em` on `task`'s held-out data."""
    from jaxlearn.eval.models import generate_replies, reference_nll
    from jaxlearn.eval.tasks import HEADLINE, run_tasks, sample

    name = task.eval
    if name == "hypernyms":
        from jaxlearn.eval.probes import reply_contains

        exs = sample([e for e in hypernym_examples() if e.meta["split"] == "test"], limit)
        replies = generate_replies(em, [e.prompt for e in exs], max_new_tokens=max_new_tokens or 8,
                                   batch_size=batch_size)
        score = sum(reply_contains(r, e.answers) for e, r in zip(exs, replies)) / len(exs)
        return {"metric": "contains", "score": score, "n": len(exs)}
    if name == "chat_nll":
        from jaxlearn.data.instruct import load_examples

        exs = sample(load_examples("chat", "test", paths=data.get("paths", ()),
                                   eval_fraction=data.get("eval_fraction", 0.05)), limit)
        if not exs:
            raise DataError(f"task {task.name}: its chat data has no held-out (test-split) records to score; raise "
                            "data.eval_fraction.")
        scores = reference_nll(em, [e.messages for e in exs], batch_size=batch_size)
        total, tokens = sum(s for s, _ in scores), sum(t for _, t in scores)
        return {"metric": "nll_per_token", "score": total / max(tokens, 1), "n": len(exs)}
    if name.startswith("brown:"):
        return {"metric": "perplexity", **_genre_perplexity(em, name.split(":", 1)[1], ppl_batches)}
    opts: dict[str, Any] = {"batch_size": batch_size, "ppl_batches": ppl_batches}
    if max_new_tokens:
        opts["max_new_tokens"] = max_new_tokens
    res = run_tasks(em, [name], split="test", limit=limit or None, echo=lambda _m: None, **opts)[0]
    metric = HEADLINE[name]
    return {"metric": metric, "score": float(res.metrics[metric]), "n": res.metrics.get("n", res.metrics.get("tokens")),
            "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}


def _genre_perplexity(em, genre: str, max_batches: int) -> dict:
    from jaxlearn.data.pipeline import eval_batches
    from jaxlearn.data.sources import TextFileSource
    from jaxlearn.eval.models import batch_nll

    batches = eval_batches(TextFileSource(brown_genre_files(genre, "eval")), em.tokenizer, seq_len=256,
                           batch_size=8, max_batches=max_batches)
    sums, counts = batch_nll(em, batches)
    loss = float(sums.sum() / max(counts.sum(), 1.0))
    return {"score": math.exp(min(loss, 50.0)), "loss": loss, "n": int(counts.sum())}

