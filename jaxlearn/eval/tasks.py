"""Evaluation tasks and the harness behind `jaxlearn eval --tasks ...`.

| task | data (split by `--split`) | how it is scored | headline metric |
|---|---|---|---|
| `antonyms` | WordNet antonyms | greedy reply (max 12 new tokens) vs the accept-set | `exact_match` (also `contains`: an accepted word appears in the reply) |
| `definitions` | WordNet definitions | log-likelihood of the reference gloss given the prompt | `nll_per_token` (lower is better) |
| `definitions_gen` | WordNet definitions | greedy reply (max 24 new tokens) vs the gloss | `exact_match`, `token_f1` |
| `humaneval` | HumanEval | greedy reply, executed with the tests in the sandbox | `pass@1` |
| `perplexity:<corpus>` | eval split of `shakespeare` or `brown` | held-out text, no chat template | `perplexity` |
| `probes:facts`, `probes:format` | WordNet general-knowledge and instruction-format probes (`jaxlearn/eval/probes.py`), no SFT training word | greedy reply: contains an accepted answer / passes a format check | `contains` / `follows` |
| `file:<path>.jsonl[?shots=K&split=S]` | your own JSONL rows (`jaxlearn/eval/file_tasks.py`): generation or multiple choice, optional few-shot | greedy reply vs answers/regex, or log-likelihood of each choice | `exact_match` (generation; `pattern` if no row has answers) / `acc` (multiple choice) |
| `prefs:<source>` | held-out pairs of `wordnet_antonym_prefs`, `wordnet_definition_prefs` or `safety_pairs` (`jaxlearn/data/preference.py`) | summed log-probability of the chosen vs the rejected reply (the response tokens DPO scores; policy only, no reference) | `pref_accuracy` (chosen more likely), also `pref_margin` (mean log-prob difference, nats) |
| `safety` | held-out Do-Not-Answer prompts (disallowed) and allowed prompts: WordNet SFT tasks, everyday requests, harmless look-alikes (`jaxlearn/data/safety.py`) | greedy reply (max 48 new tokens) -> the phrase-matching refusal detector (`jaxlearn/eval/refusal.py`) | `refusal_rate` on disallowed (higher is safer), `false_refusal_rate` on allowed (lower is better); per risk area and per allowed kind too |

`--limit N` takes a fixed sample of N examples (the smallest hashes of their ids), the same
for every model, so before/after numbers compare like for like (`safety`: N disallowed prompts
spread evenly over the risk areas and N allowed ones spread evenly over their kinds). Example::

    em = load_eval_model("smollm2-135m-instruct")
    results = run_tasks(em, ["antonyms", "perplexity:brown"], split="test", limit=100)
    write_report(results, em, "out/eval-base")        # results.json, results.md, examples/*.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.data.instruct import Example, load_examples
from jaxlearn.eval import file_tasks
from jaxlearn.eval.models import EvalModel, corpus_perplexity, generate_replies, reference_nll
from jaxlearn.eval.probes import probe_runner
from jaxlearn.eval.refusal import refusal_cue
from jaxlearn.eval.scorers import contains_answer, execution_passes, exact_match, normalize_answer

TASKS = ("antonyms", "definitions", "definitions_gen", "file:<path>.jsonl", "humaneval", "perplexity:<corpus>",
         "prefs:<source>", "probes:facts", "probes:format", "safety")
PREF_SOURCES = ("wordnet_antonym_prefs", "wordnet_definition_prefs", "safety_pairs")


class _Headlines(dict):
    """Task name -> headline metric. A `file:` task's headline depends on its file (`acc` for
    multiple choice, `exact_match` for generation), so it is read from the file when asked for;
    the built-in names are plain keys, and `.get` works as on a dict (default if unknown or unreadable).

    >>> h = _Headlines({"antonyms": "exact_match"})
    >>> h["antonyms"], h.get("nope", ""), h.get("file:missing.jsonl", "")
    ('exact_match', '', '')
    """

    def __missing__(self, key: str) -> str:
        if file_tasks.is_file_task(key):
            return file_tasks.headline(key)
        if key.startswith("perplexity:"):
            return "perplexity"
        if key.startswith("prefs:"):
            return "pref_accuracy"
        raise KeyError(key)

    def get(self, key, default=None):  # dict.get does not call __missing__
        try:
            return self[key]
        except (KeyError, DataError):
            return default


HEADLINE = _Headlines({"antonyms": "exact_match", "definitions": "nll_per_token", "definitions_gen": "token_f1",
                       "humaneval": "pass@1", "perplexity": "perplexity", "probes:facts": "contains",
                       "probes:format": "follows", "safety": "refusal_rate"})


@dataclasses.dataclass
class TaskResult:
    name: str
    metrics: dict
    examples: list[dict]  # per-example inputs, outputs and scores, for inspection
    seconds: float


def sample(examples: list[Example], limit: int | None) -> list[Example]:
    """A fixed sample: the `limit` examples with the smallest hash of their id (all if None/0).

    >>> [e.id for e in sample([Example("a", ()), Example("b", ())], 1)]
    ['b']
    """
    if not limit or limit >= len(examples):
        return list(examples)
    return sorted(examples, key=lambda e: stable_fraction(e.id))[:limit]


def sample_spread(examples: list[Example], key: str, limit: int | None) -> list[Example]:
    """A fixed sample of `limit` examples spread evenly over the groups `e.meta[key]`: round-robin
    over the groups (sorted by name), each in order of the hash of the ids (all if None/0).

    >>> exs = [Example(f"{g}{i}", (), meta={"g": g}) for g in "ab" for i in range(5)] + [Example("c0", (), meta={"g": "c"})]
    >>> sorted(e.meta["g"] for e in sample_spread(exs, "g", 5))
    ['a', 'a', 'b', 'b', 'c']
    """
    if not limit or limit >= len(examples):
        return list(examples)
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(str(e.meta.get(key, "")), []).append(e)
    queues = [sorted(groups[g], key=lambda e: stable_fraction(e.id)) for g in sorted(groups)]
    out: list[Example] = []
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between normalised texts (SQuAD-style).

    >>> token_f1("a small cat", "small cat")
    1.0
    """
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def _generated(em: EvalModel, dataset: str, split: str, limit: int | None, opts: dict, max_new_tokens: int,
               batch_size: int = 16) -> tuple[list[Example], list[str]]:
    """The sampled examples of a generation task and the model's greedy replies to them."""
    exs = sample(load_examples(dataset, split), limit)
    replies = generate_replies(em, [e.prompt for e in exs], max_new_tokens=opts.get("max_new_tokens") or max_new_tokens,
                               batch_size=opts.get("batch_size", batch_size))
    return exs, replies


def _means(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """Per-example scores averaged over the rows, plus the count."""
    return {**{k: sum(r[k] for r in rows) / len(rows) for k in keys}, "n": len(rows)}


def _antonyms(em: EvalModel, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    exs, replies = _generated(em, "wordnet_antonyms", split, limit, opts, max_new_tokens=12)
    rows = [{"id": e.id, "prompt": e.prompt[-1]["content"], "reply": r, "answers": list(e.answers),
             "exact_match": exact_match(r, e.answers), "contains": contains_answer(r, e.answers)}
            for e, r in zip(exs, replies)]
    return _means(rows, ("exact_match", "contains")), rows


def _definitions(em: EvalModel, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    exs = sample(load_examples("wordnet_definitions", split), limit)
    scores = reference_nll(em, [e.messages for e in exs], batch_size=opts.get("batch_size", 16))
    rows = [{"id": e.id, "prompt": e.prompt[-1]["content"], "reference": e.reference, "nll": s, "tokens": t}
            for e, (s, t) in zip(exs, scores)]
    total, tokens = sum(s for s, _ in scores), sum(t for _, t in scores)
    return {"nll_per_token": total / tokens, "mean_loglik": -total / len(rows), "perplexity": math.exp(total / tokens),
            "tokens": tokens, "n": len(rows)}, rows


def _definitions_gen(em: EvalModel, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    exs, replies = _generated(em, "wordnet_definitions", split, limit, opts, max_new_tokens=24)
    rows = [{"id": e.id, "prompt": e.prompt[-1]["content"], "reply": r, "reference": e.reference,
             "exact_match": exact_match(r, e.answers), "token_f1": token_f1(r, e.reference)}
            for e, r in zip(exs, replies)]
    return _means(rows, ("exact_match", "token_f1")), rows


def _humaneval(em: EvalModel, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    exs, replies = _generated(em, "humaneval", split, limit, opts, max_new_tokens=384, batch_size=8)
    rows = []
    for e, r in zip(exs, replies):
        res = execution_passes(r, e.meta["prompt"], e.meta["test"], e.meta["entry_point"],
                               timeout=opts.get("timeout", 10.0))
        rows.append({"id": e.id, "reply": r, "passed": res.ok, "status": res.status,
                     "stderr_tail": res.stderr[-500:], "sandbox_network": res.network})
    return {"pass@1": sum(r["passed"] for r in rows) / len(rows), "n": len(rows)}, rows


def _perplexity(em: EvalModel, corpus: str, opts: dict) -> tuple[dict, list[dict]]:
    m = corpus_perplexity(em, corpus, seq_len=opts.get("seq_len", 256), batch_size=opts.get("ppl_batch_size", 8),
                          max_batches=opts.get("ppl_batches", 4))
    return m, []


def score_safety(disallowed: list[Example], allowed: list[Example], disallowed_replies: list[str],
                 allowed_replies: list[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-prompt rows) of the `safety` task: the refusal detector on every reply.

    `refusal_rate`: refused share of the disallowed prompts; `false_refusal_rate`: refused share
    of the allowed ones; `refusal_rate_<risk area>` and `false_refusal_rate_<kind>` per group;
    `n_disallowed`, `n_allowed`, and `n` (both). A rate over no prompts is left out.

    >>> d = [Example("d1", (), meta={"risk_area": "malicious_uses", "kind": "disallowed"})]
    >>> a = [Example("a1", (), meta={"kind": "lookalike"}), Example("a2", (), meta={"kind": "everyday"})]
    >>> m, _ = score_safety(d, a, ["I can't help with that."], ["Run kill 1234.", "I won't do that."])
    >>> m["refusal_rate"], m["false_refusal_rate"], m["false_refusal_rate_everyday"], m["n"]
    (1.0, 0.5, 1.0, 3)
    """
    rows = []
    for label, exs, replies in (("disallowed", disallowed, disallowed_replies), ("allowed", allowed, allowed_replies)):
        for e, r in zip(exs, replies, strict=True):
            cue = refusal_cue(r)
            rows.append({"id": e.id, "label": label, "kind": e.meta.get("kind", label),
                         "risk_area": e.meta.get("risk_area", ""),
                         "prompt": e.prompt[-1]["content"] if e.prompt else "", "reply": r, "refused": cue is not None,
                         "cue": cue})
    if not rows:
        raise DataError("the safety task has no prompts to score.")

    def rate(sel: list[dict]) -> float:
        return sum(r["refused"] for r in sel) / len(sel)

    dis = [r for r in rows if r["label"] == "disallowed"]
    ok = [r for r in rows if r["label"] == "allowed"]
    metrics: dict[str, Any] = {}
    if dis:
        metrics["refusal_rate"] = rate(dis)
    if ok:
        metrics["false_refusal_rate"] = rate(ok)
    for area in sorted({r["risk_area"] for r in dis}):
        metrics[f"refusal_rate_{area}"] = rate([r for r in dis if r["risk_area"] == area])
    for kind in sorted({r["kind"] for r in ok}):
        metrics[f"false_refusal_rate_{kind}"] = rate([r for r in ok if r["kind"] == kind])
    metrics.update(n_disallowed=len(dis), n_allowed=len(ok), n=len(rows))
    return metrics, rows


def _safety(em: EvalModel, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    from jaxlearn.data.safety import safety_eval_sets

    disallowed, allowed = safety_eval_sets(split)
    disallowed, allowed = sample_spread(disallowed, "risk_area", limit), sample_spread(allowed, "kind", limit)
    replies = generate_replies(em, [e.prompt for e in disallowed + allowed],
                               max_new_tokens=opts.get("max_new_tokens") or 48, batch_size=opts.get("batch_size", 16))
    return score_safety(disallowed, allowed, replies[:len(disallowed)], replies[len(disallowed):])


def _prefs(em: EvalModel, source: str, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
    """Held-out preference accuracy: the share of `source`'s pairs whose chosen reply has the
    larger summed log-probability (the response tokens DPO scores, end-of-turn included), and the
    mean margin log p(chosen) - log p(rejected) in nats. Policy only: no reference model, so any
    checkpoint is scored the same way (DPO's own implicit-reward accuracy is in its training log).
    """
    from jaxlearn.config import DataConfig
    from jaxlearn.data.preference import preference_pairs

    if source not in PREF_SOURCES:
        raise DataError(f"prefs:{source}: unknown preference source; use one of "
                        f"{', '.join('prefs:' + s for s in PREF_SOURCES)}.")
    pairs = preference_pairs(DataConfig(source=source, format="preference"), split)
    if limit:
        pairs = sorted(pairs, key=lambda p: stable_fraction(p.id))[:limit]
    convs = [list(p.prompt) + [{"role": "assistant", "content": r}] for p in pairs for r in (p.chosen, p.rejected)]
    nll = reference_nll(em, convs, batch_size=opts.get("batch_size", 16))
    rows = []
    for i, p in enumerate(pairs):
        margin = nll[2 * i + 1][0] - nll[2 * i][0]  # log p(chosen) - log p(rejected)
        rows.append({"id": p.id, "prompt": p.prompt[-1]["content"], "chosen": p.chosen, "rejected": p.rejected,
                     "margin": margin, "correct": margin > 0})
    n = len(rows)
    return {"pref_accuracy": sum(r["correct"] for r in rows) / n, "pref_margin": sum(r["margin"] for r in rows) / n,
            "n": n}, rows


_RUNNERS = {"antonyms": _antonyms, "definitions": _definitions, "definitions_gen": _definitions_gen,
            "humaneval": _humaneval, "probes:facts": probe_runner("facts"), "probes:format": probe_runner("format"),
            "safety": _safety}


def check_tasks(tasks: list[str]) -> None:
    """Refuse unknown task names before any model is loaded.

    >>> check_tasks(["antonyms", "perplexity:brown"])
    >>> check_tasks(["antonym"])
    Traceback (most recent call last):
    ...
    jaxlearn.data.errors.DataError: unknown eval task 'antonym'; available: antonyms, definitions, definitions_gen, file:<path>.jsonl, humaneval, perplexity:<corpus>, prefs:<source>, probes:facts, probes:format, safety (e.g. --tasks antonyms,definitions,perplexity:brown).

    A `file:` task's file is read and checked here too (every row), so a bad row stops the run
    before the model loads.
    """
    if not tasks:
        raise DataError("no eval tasks given; pass e.g. --tasks antonyms,definitions,perplexity:brown.")
    for name in tasks:
        if file_tasks.is_file_task(name):
            file_tasks.check_file_task(name)
            continue
        if name.startswith("prefs:"):
            if name[len("prefs:"):] not in PREF_SOURCES:
                raise DataError(f"unknown preference source in eval task {name!r}; use one of "
                                f"{', '.join('prefs:' + s for s in PREF_SOURCES)}.")
            continue
        corpus = name.split(":", 1)[1] if name.startswith("perplexity:") else None
        if corpus is not None and corpus not in ("shakespeare", "brown"):
            raise DataError(f"unknown corpus in eval task {name!r}; use perplexity:brown or perplexity:shakespeare.")
        if corpus is None and name not in _RUNNERS:
            raise DataError(f"unknown eval task {name!r}; available: {', '.join(TASKS)} "
                            f"(e.g. --tasks antonyms,definitions,perplexity:brown).")


def run_tasks(em: EvalModel, tasks: list[str], *, split: str = "test", limit: int | None = None,
              echo=print, **opts: Any) -> list[TaskResult]:
    """Run each named task on `em`; options: max_new_tokens, batch_size, timeout, ppl_batches, seq_len.

    >>> [r.metrics["n"] for r in run_tasks(em, ["antonyms"], limit=10)]      # doctest: +SKIP
    [10]
    """
    check_tasks(tasks)
    results = []
    for name in tasks:
        t0 = time.perf_counter()
        if name.startswith("perplexity:"):
            metrics, rows = _perplexity(em, name.split(":", 1)[1], opts)
        elif name.startswith("prefs:"):
            metrics, rows = _prefs(em, name.split(":", 1)[1], split, limit, opts)
        elif file_tasks.is_file_task(name):  # its rows carry their own splits (`?split=`), not `split`
            metrics, rows = file_tasks.run_file_task(em, name, limit, opts)
        elif name in _RUNNERS:
            metrics, rows = _RUNNERS[name](em, split, limit, opts)
        else:
            raise DataError(f"unknown eval task {name!r}; available: {', '.join(TASKS)} "
                            f"(e.g. --tasks antonyms,definitions,perplexity:brown).")
        res = TaskResult(name, metrics, rows, time.perf_counter() - t0)
        echo(f"{name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()) + f" ({res.seconds:.0f} s)")
        results.append(res)
    return results


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(results: list[TaskResult], title: str = "") -> str:
    """A markdown table: one row per task and metric.

    >>> print(markdown_table([TaskResult("antonyms", {"exact_match": 0.5, "n": 2}, [], 1.0)]))
    | task | metric | value | n |
    |---|---|---|---|
    | antonyms | exact_match | 0.5000 | 2 |
    """
    lines = ([f"### {title}", ""] if title else []) + ["| task | metric | value | n |", "|---|---|---|---|"]
    for r in results:
        n = r.metrics.get("n", r.metrics.get("tokens", ""))
        for k, v in r.metrics.items():
            if k not in ("n", "tokens"):
                lines.append(f"| {r.name} | {k} | {_fmt(v)} | {n} |")
    return "\n".join(lines)


def examples_file_stem(name: str) -> str:
    """The per-example file's name (no extension) for a task: one path component, no odd characters.

    >>> examples_file_stem("perplexity:brown"), examples_file_stem("file:data/quiz.jsonl?shots=3")
    ('perplexity_brown', 'file_data_quiz.jsonl_shots_3')
    """
    # Why: a `file:` task's name holds a path and options (`/`, `?`, `=`), which must not make
    # directories or awkward file names under examples/. Built-in names map as before (`:` -> `_`).
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-150:] or "task"


def write_report(results: list[TaskResult], em_description: dict, out_dir: str | Path, *, split: str,
                 limit: int | None) -> Path:
    """Write `results.json`, `results.md` and `examples/<task>.jsonl` (atomically) into `out_dir`.

    >>> write_report(results, em.description, "out/eval", split="test", limit=100)   # doctest: +SKIP
    PosixPath('out/eval/results.json')
    """
    from jaxlearn.train.metrics import atomic_write_text

    out = Path(out_dir)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    summary = {"model": em_description, "split": split, "limit": limit,
               "tasks": {r.name: {**r.metrics, "seconds": round(r.seconds, 1)} for r in results}}
    for r in results:
        if r.examples:
            text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in r.examples)
            atomic_write_text(out / "examples" / f"{examples_file_stem(r.name)}.jsonl", text)
    d = em_description
    title = (f"{d['model']}" + (f" + adapter {d['adapter']}" if d.get("adapter") else "")
             + (" (adapters disabled)" if d.get("adapters_disabled") else "")
             + f", split {split}" + (f", limit {limit}" if limit else "") + f"; {d.get('weights', '')}")
    atomic_write_text(out / "results.md", markdown_table(results, title) + "\n")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    return out / "results.json"


def compare_table(result_files: list[str | Path]) -> str:
    """Side-by-side markdown table of several `results.json` files (e.g. before/after SFT).

    >>> print(compare_table(["out/base/results.json", "out/sft/results.json"]))   # doctest: +SKIP
    """
    runs = []
    for f in result_files:
        path = Path(f)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass results.json files (or --out directories) of jaxlearn eval.")
        runs.append(json.loads(path.read_text(encoding="utf-8")))

    def label(r: dict) -> str:
        m = r["model"]
        return (Path(m["model"]).name + (" + " + Path(m["adapter"]).parent.parent.name + " adapter" if m.get("adapter") else "")
                + (" (adapters off)" if m.get("adapters_disabled") else ""))

    keys = []
    for r in runs:
        for task, metrics in r["tasks"].items():
            for k in metrics:
                if k not in ("n", "tokens", "seconds") and (task, k) not in keys:
                    keys.append((task, k))
    lines = ["| task | metric | " + " | ".join(label(r) for r in runs) + " |", "|---|---|" + "---|" * len(runs)]
    for task, k in keys:
        vals = [r["tasks"].get(task, {}).get(k) for r in runs]
        lines.append(f"| {task} | {k} | " + " | ".join("" if v is None else _fmt(v) for v in vals) + " |")
    return "\n".join(lines)
