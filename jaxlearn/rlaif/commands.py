"""`jaxlearn rlaif agree` and `jaxlearn rlaif label`: the work behind the CLI subcommand.

    jaxlearn rlaif agree --judge smollm2-135m-instruct --source wordnet_antonym_prefs --split test \\
        --limit 100 --out runs/rlaif/agree.json
    jaxlearn rlaif label --judge smollm2-135m-instruct --policy smollm2-135m-instruct \\
        --source wordnet_antonym_prompts --limit 512 --out runs/rlaif/pairs.jsonl --drop-inconsistent

`load_judge` is the one place a judge model is loaded (tests replace it with a stub).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.rlaif.judge import RUBRICS, Judge, agreement, check_rubric
from jaxlearn.rlaif.labels import (
    LabelStats,
    Samples,
    label_by_reward,
    label_candidates,
    read_candidates,
    sample_candidates,
    sample_replies,
    write_jsonl_atomic,
)

PREF_SOURCES = ("wordnet_antonym_prefs", "wordnet_definition_prefs", "safety_pairs")
PROMPT_SOURCES = ("wordnet_antonym_prompts",)
EVAL_FRACTION = 0.05  # a file's held-out share, as DataConfig's default (splits by record id)


def resolve_rubric(value: str | None, source: str = "") -> tuple[str, str]:
    """(name, text) of `--rubric`: a built-in name (general, antonym), a file, or the text itself
    (with {prompt}, {a}, {b}). Unset: `antonym` for WordNet antonym sources, else `general`.

    >>> resolve_rubric(None, "wordnet_antonym_prefs")[0], resolve_rubric("general")[0]
    ('antonym', 'general')
    >>> resolve_rubric("Q {prompt} A {a} B {b}")
    ('custom', 'Q {prompt} A {a} B {b}')
    """
    if value is None:
        value = "antonym" if "antonym" in source else "general"
    if value in RUBRICS:
        return value, RUBRICS[value]
    if "{" not in value and Path(value).is_file():
        return value, check_rubric(Path(value).read_text(encoding="utf-8"))
    if "{" not in value:
        raise ValueError(f"--rubric {value!r}: not a built-in rubric ({', '.join(RUBRICS)}), not a file, and not a "
                         "rubric text with {prompt}, {a}, {b}.")
    return "custom", check_rubric(value)


def load_judge(spec: str, *, adapter: str | None = None, rubric: str, system: str | None = None,
               batch_size: int = 16) -> Judge:
    """A `Judge` on a preset, run directory or HF directory (plus an optional adapter).

    >>> judge = load_judge("smollm2-135m-instruct", rubric=RUBRICS["antonym"])     # doctest: +SKIP
    """
    from jaxlearn.eval.models import load_eval_model

    return Judge(load_eval_model(spec, adapter=adapter), rubric=rubric, system=system, batch_size=batch_size)


def _is_file_source(source: str) -> bool:
    return source.endswith((".jsonl", ".json", ".parquet")) or Path(source).is_file()


def _sample(items: list, limit: int) -> list:
    """A fixed sample of `limit` items by the hash of their ids (as `jaxlearn eval --limit`)."""
    return sorted(items, key=lambda x: stable_fraction(x.id))[:limit] if limit else items


def load_pref_pairs(source: str, split: str | None, limit: int = 0) -> list:
    """Checkable pairs: a built-in preference source's split, or a preference JSONL/Parquet
    file (`split` None or "all": every record; else the records hashed into that split).

    >>> len(load_pref_pairs("wordnet_antonym_prefs", "test", 100))                  # doctest: +SKIP
    100
    """
    from jaxlearn.config import DataConfig
    from jaxlearn.data.preference import _SPLIT, file_pairs, preference_pairs

    if _is_file_source(source):
        pairs = file_pairs([source], EVAL_FRACTION)
        if split not in (None, "all"):
            pairs = [p for p in pairs if p.split == _SPLIT[split]]
    elif source in PREF_SOURCES:
        pairs = preference_pairs(DataConfig(source=source, format="preference"), split or "test")
    else:
        raise DataError(f"--source {source!r}: use one of {', '.join(PREF_SOURCES)} or a preference .jsonl/.parquet "
                        "file (records with 'prompt', 'chosen', 'rejected').")
    if not pairs:
        raise DataError(f"--source {source}: no pairs in split {split}.")
    return _sample(pairs, limit)


def load_prompts(source: str, split: str | None, limit: int = 0) -> list:
    """Prompts to sample candidates for: `wordnet_antonym_prompts` (split default train) or a
    prompts JSONL/Parquet file (`{prompt | messages, ...}`; split None or "all": every record).

    >>> load_prompts("wordnet_antonym_prompts", "train", 4)[0].prompt               # doctest: +SKIP
    ({'role': 'user', 'content': "Give an antonym of 'able'."},)
    """
    from jaxlearn.config import DataConfig
    from jaxlearn.data.prompts import file_prompts, prompt_records, split_rows

    if _is_file_source(source):
        records = file_prompts([source], EVAL_FRACTION)
        if split not in (None, "all"):
            records = [records[i] for i in split_rows(records, split)]
    elif source in PROMPT_SOURCES:
        records = prompt_records(DataConfig(source=source, format="prompts"))
        records = [records[i] for i in split_rows(records, split or "train")]
    else:
        raise DataError(f"--source {source!r}: use {', '.join(PROMPT_SOURCES)} or a prompts .jsonl/.parquet file "
                        "(records with 'prompt' or 'messages').")
    if not records:
        raise DataError(f"--source {source}: no prompts in split {split}.")
    return _sample(records, limit)


def _write_json(path: Path, obj: Any) -> None:
    from jaxlearn.train.metrics import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _fmt(v) -> str:
    """A metric for the table: 4 decimals, or 3 significant digits when smaller than 0.001
    (a judge's letter mass can be 1e-5: it is not "0.0000").

    >>> _fmt(0.5), _fmt(2.9e-05), _fmt(None), _fmt(7)
    ('0.5000', '2.90e-05', '-', '7')
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def run_agree(args) -> int:
    """`jaxlearn rlaif agree`: judge checkable pairs, print the metrics, write them as JSON."""
    rubric_name, rubric = resolve_rubric(args.rubric, args.source)
    pairs = load_pref_pairs(args.source, args.split, args.limit)  # before the (slow) model load
    judge = load_judge(args.judge, adapter=args.judge_adapter, rubric=rubric, system=args.system,
                       batch_size=args.batch_size)
    metrics, rows = agreement(judge, pairs)
    split = args.split or ("all" if _is_file_source(args.source) else "test")
    print(f"judge {args.judge} (rubric: {rubric_name}) on {len(pairs)} pairs of {args.source} ({split})")
    print("| metric | value |\n|---|---|")
    for k, v in metrics.items():
        print(f"| {k} | {_fmt(v)} |")
    out = Path(args.out)
    _write_json(out, {"judge": getattr(getattr(judge, "em", None), "description", {"model": args.judge}),
                      "rubric_name": rubric_name, "rubric": rubric, "source": args.source, "split": split,
                      "limit": args.limit or None, "metrics": metrics, "pairs": rows})
    print(f"wrote {out}")
    return 0


def reward_judge(spec: str):
    """`reward:TERMS` -> a checkable scorer (`jaxlearn.rewards.make_reward`), or None for a model
    judge. TERMS: comma-separated names, each optionally `=weight`.

    >>> reward_judge("reward:accept,format=0.1")("", "cold", {"answers": ["cold"]})
    1.1
    >>> reward_judge("smollm2-135m-instruct") is None
    True
    """
    if not spec.startswith("reward:"):
        return None
    from jaxlearn.rewards import make_reward

    terms = []
    for term in filter(None, spec.removeprefix("reward:").split(",")):
        name, _, weight = term.partition("=")
        try:
            terms.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"--judge {spec}: the weight of {name!r} is not a number.") from None
    if not terms:
        raise ValueError(f"--judge {spec}: name at least one reward term, e.g. reward:accept.")
    return make_reward(terms)


def run_label(args) -> int:
    """`jaxlearn rlaif label`: candidates (a file, or policy samples per prompt) labelled by a judge
    model (both orders) or by a checkable scorer (`--judge reward:accept`) -> preference JSONL
    (atomically) and a `.summary.json` beside it."""
    if bool(args.policy) == bool(args.candidates):
        raise ValueError("give exactly one of --policy MODEL_OR_RUN (sample replies per prompt) or "
                         "--candidates FILE.jsonl (records with 'prompt' and 'responses': [x, y]).")
    scorer = reward_judge(args.judge)
    if args.samples != 2 and scorer is None:
        raise ValueError("--samples above 2 needs a checkable scorer (--judge reward:accept): the judge compares two.")
    rubric_name, rubric = resolve_rubric(args.rubric, "" if args.candidates else args.source)
    if args.candidates:
        cands = _sample(read_candidates(args.candidates), args.limit)
        stats = LabelStats(prompts=len(cands))
    else:
        prompts = load_prompts(args.source, args.split, args.limit)
    judge = None if scorer else load_judge(args.judge, adapter=args.judge_adapter, rubric=rubric, system=args.system,
                                           batch_size=args.batch_size)
    sample = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, seed=args.seed)
    if not args.candidates:
        from jaxlearn.eval.models import load_eval_model

        same = judge is not None and args.policy == args.judge and args.policy_adapter == args.judge_adapter \
            and hasattr(judge, "em")
        policy = judge.em if same else load_eval_model(args.policy, adapter=args.policy_adapter)
    if scorer is not None:  # checkable labels: best vs worst of the samples by the reward
        samples = ([Samples(c.id, c.prompt, (c.first, c.second), c.record) for c in cands] if args.candidates
                   else sample_replies(policy, prompts, args.samples, **sample))
        records, stats = label_by_reward(scorer, samples)
        rubric_name, rubric = args.judge, None
    else:
        if not args.candidates:
            cands, stats = sample_candidates(policy, prompts, **sample)
        records, stats = label_candidates(judge, cands, drop_inconsistent=args.drop_inconsistent, stats=stats)
    print(stats.summary())
    if not records:
        raise DataError("no preference pair was labelled (see the counts above): nothing to write. Sample more "
                        "prompts, raise --temperature, or keep inconsistent pairs.")
    out = write_jsonl_atomic(args.out, records)
    summary = out.with_suffix(".summary.json")
    split = None if args.candidates else args.split or ("all" if _is_file_source(args.source) else "train")
    _write_json(summary, {"judge": args.judge, "policy": args.policy, "candidates": args.candidates,
                          "source": None if args.candidates else args.source, "split": split, "rubric_name": rubric_name, "rubric": rubric,
                          "temperature": args.temperature, "samples": args.samples,
                          "drop_inconsistent": args.drop_inconsistent,
                          "stats": vars(stats)})
    for r in records[:3]:
        print(json.dumps(r, ensure_ascii=False))
    print(f"wrote {out} ({len(records)} pairs; data.source: jsonl, data.format: preference) and {summary}")
    return 0


def run(args) -> int:
    """Dispatch `jaxlearn rlaif <agree|label>`."""
    return {"agree": run_agree, "label": run_label}[args.rlaif_command](args)
