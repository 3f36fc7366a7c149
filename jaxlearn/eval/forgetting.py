"""The forgetting report of a fine-tuning run: general probes on the base and on the trained model.

A run that starts from pretrained weights (`model.init_from`) ends with `forgetting_report`
(an end-of-run hook, `jaxlearn/train/hooks.py`). It runs `train.forgetting_probes` (default
`probes:facts`, `probes:format`; `perplexity:brown` also works) on a fixed sample of
`train.forgetting_limit` items per probe:

- on the base: the `init_from` weights, loaded again, so full fine-tuning and PEFT runs with
  trained non-adapter leaves are compared with the true starting point. The result is cached
  in `<cache>/forgetting/<fingerprint>.json`; the fingerprint hashes the checkpoint (path,
  file sizes and times), the tokenizer, the probes, the limit and the generation settings, so
  every later run from the same base reuses it;
- on the trained weights.

It writes `forgetting` into summary.json, `forgetting.md` (a table beside the run's held-out
metrics) and `forgetting.png` (a bar chart), and prints a loud line for every probe whose
headline falls by more than `train.forgetting_threshold` points (shares in percentage points;
perplexity in percent). Example::

    section = forgetting_section(base={"probes:facts": {"contains": 0.5, "n": 40}},
                                 after={"probes:facts": {"contains": 0.1, "n": 40}}, threshold=2.0)
    section["warnings"]     # ['probes:facts contains fell 40.0 points (50.0% -> 10.0%)']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from jaxlearn.eval.tasks import HEADLINE

FORMAT = 1  # bump when probe items or scoring change, so cached base results are recomputed
_LOWER_IS_BETTER = ("perplexity", "loss", "nll_per_token")
_SKIP = ("n", "tokens", "seconds")


def forgetting_enabled(cfg) -> bool:
    """Whether a run makes the report: `train.forgetting` true, or auto and `model.init_from` set.

    >>> from jaxlearn.config import load_config
    >>> forgetting_enabled(load_config(None, ["model.init_from=smollm2-135m-instruct"]))
    True
    """
    mode = cfg.train.forgetting
    return bool(cfg.train.forgetting_probes) and (mode is True or (mode == "auto" and bool(cfg.model.init_from)))


def _files_signature(spec: str) -> list:
    """Name, size and modification time of the checkpoint's files: a rewritten base is a new base."""
    from jaxlearn.data.model_files import resolve

    path = resolve(spec)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def base_fingerprint(cfg, opts: dict | None = None) -> str:
    """A hash of what decides the base's probe results: checkpoint, layer selection, tokenizer,
    probes, limit, generation options and the probe format version.

    >>> base_fingerprint(cfg)                                  # doctest: +SKIP
    '3f9a0c...'
    """
    m, t = cfg.model, cfg.train
    key = {"format": FORMAT, "init_from": str(m.init_from), "files": _files_signature(m.init_from),
           "init_layers": m.init_layers, "n_layers": m.n_layers, "tokenizer": str(cfg.data.tokenizer),
           "probes": list(t.forgetting_probes), "limit": t.forgetting_limit, "opts": opts or {}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(cfg, fingerprint: str) -> Path:
    """`train.forgetting_cache`, else `<JAXLEARN_CACHE>/forgetting`, + `<fingerprint>.json`."""
    from jaxlearn.data.corpora import cache_root

    root = Path(cfg.train.forgetting_cache) if cfg.train.forgetting_cache else cache_root() / "forgetting"
    return root / f"{fingerprint}.json"


def sampled_items(tasks, limit: int) -> dict[str, list]:
    """{task: the sampled ProbeItems} of the `probes:*` tasks among `tasks`, built from one read
    of WordNet; base and trained model are asked exactly these.

    >>> len(sampled_items(["probes:facts", "perplexity:brown"], 8)["probes:facts"])   # doctest: +SKIP
    8
    """
    from jaxlearn.eval.probes import build_probes, sample_items

    wanted = [t for t in tasks if t.startswith("probes:")]
    if not wanted:
        return {}
    built = build_probes()
    return {t: sample_items(built[t.split(":", 1)[1]], limit or None) for t in wanted}


def probe_metrics(em, tasks, limit: int, items: dict | None = None, echo=print, **opts: Any) -> dict:
    """{task: metrics} of the tasks on an `EvalModel`: `probes:*` tasks on the given sampled
    `items`, any other eval task through the harness's `run_tasks`.

    >>> probe_metrics(em, ["probes:facts"], 8, sampled_items(["probes:facts"], 8))["probes:facts"]["n"]  # doctest: +SKIP
    8
    """
    from jaxlearn.eval.probes import run_probe
    from jaxlearn.eval.tasks import check_tasks, run_tasks

    check_tasks(list(tasks))
    items = items or {}
    out = {}
    for task in tasks:
        if task in items:
            t0 = time.perf_counter()
            out[task], _ = run_probe(em, task.split(":", 1)[1], None, opts, items=items[task])
            echo(f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in out[task].items()) + f" ({time.perf_counter() - t0:.0f} s)")
        else:
            out.update({r.name: dict(r.metrics) for r in run_tasks(em, [task], limit=limit or None, echo=echo, **opts)})
    return out


def _headline(task: str) -> str:
    return HEADLINE.get(task, HEADLINE.get(task.split(":", 1)[0], ""))


def _change(metric: str, base: float, after: float) -> tuple[float, str]:
    """(how far it fell, unit): percentage points for shares, percent for perplexity-like metrics."""
    if any(metric.startswith(k) for k in _LOWER_IS_BETTER):
        return (100.0 * (after - base) / base if base else 0.0), "%"
    return 100.0 * (base - after), "points"


def forgetting_section(base: dict, after: dict, threshold: float) -> dict:
    """summary.json's `forgetting`: per task and metric base, after and change; the warnings for
    headlines that fell by more than `threshold`.

    >>> s = forgetting_section({"probes:format": {"follows": 0.8, "n": 5}}, {"probes:format": {"follows": 0.4, "n": 5}}, 2.0)
    >>> s["probes"]["probes:format"]["follows"]["fell"], s["warnings"]
    (40.0, ['probes:format follows fell 40.0 points (80.0% -> 40.0%)'])
    """
    probes: dict = {}
    warnings = []
    for task, bm in base.items():
        am = after.get(task, {})
        rows = {}
        for k, b in bm.items():
            if k in _SKIP or k not in am or not isinstance(b, (int, float)):
                continue
            fell, unit = _change(k, float(b), float(am[k]))
            rows[k] = {"base": b, "after": am[k], "fell": round(fell, 2), "unit": unit}
        rows["n"] = bm.get("n", bm.get("tokens"))
        probes[task] = rows
        head = _headline(task)
        if head in rows and rows[head]["fell"] > threshold:
            r = rows[head]
            vals = (f"{100 * r['base']:.1f}% -> {100 * r['after']:.1f}%" if r["unit"] == "points"
                    else f"{r['base']:.2f} -> {r['after']:.2f}")
            warnings.append(f"{task} {head} fell {r['fell']:.1f} {'points' if r['unit'] == 'points' else '%'} ({vals})")
    return {"threshold": threshold, "probes": probes, "warnings": warnings}


def markdown(section: dict, final_eval: dict | None = None, title: str = "") -> str:
    """forgetting.md: one row per probe metric (base, after, fall), then the run's held-out metrics.

    >>> print(markdown(forgetting_section({"probes:facts": {"contains": 0.5, "n": 4}},
    ...                                   {"probes:facts": {"contains": 0.25, "n": 4}}, 2.0)).splitlines()[2])
    | probes:facts | contains | 0.5000 | 0.2500 | -25.0 points **(fell)** | 4 |
    """
    lines = ([f"### {title}", ""] if title else []) + [
        "| probe | metric | base | after | change | n |", "|---|---|---|---|---|---|"]
    for task, rows in section["probes"].items():
        head = _headline(task)
        for k, r in rows.items():
            if k == "n":
                continue
            loud = " **(fell)**" if k == head and r["fell"] > section["threshold"] else ""
            change = f"{-r['fell']:+.1f} {r['unit']}" if r["unit"] == "points" else f"{r['fell']:+.1f} %"
            lines.append(f"| {task} | {k} | {r['base']:.4f} | {r['after']:.4f} | {change}{loud} | {rows['n']} |")
    if final_eval:
        lines += ["", "Task metrics of the run (held out, after training):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in final_eval.items() if isinstance(v, float)]
    return "\n".join(lines)


def plot(section: dict, out: Path, title: str = "") -> Path:
    """forgetting.png: base and after bars for every share metric (perplexity stays in the table).

    >>> plot(section, Path("runs/x/forgetting.png"))      # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, base, after = [], [], []
    for task, rows in section["probes"].items():
        for k, r in rows.items():
            if k != "n" and r["unit"] == "points":
                labels.append(f"{task.split(':', 1)[-1]}\n{k}")
                base.append(100 * r["base"])
                after.append(100 * r["after"])
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(labels)), 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after fine-tuning")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("% of probe items")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    tmp = out.with_name(f".{out.stem}.tmp.png")  # same style and atomic write as loss_curve.png
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _base_metrics(run, cfg, echo) -> tuple[dict, dict, Path, bool]:
    """The base's probe metrics and the sampled items, from the cache or computed (then cached):
    (metrics, items, path, cached). The items are cached too, so a later run asks the same
    questions without reading WordNet again."""
    from jaxlearn.eval.models import EvalModel
    from jaxlearn.eval.probes import ProbeItem
    from jaxlearn.models.presets import init_params
    from jaxlearn.train.metrics import atomic_write_text

    tc = cfg.train
    path = cache_path(cfg, base_fingerprint(cfg))
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        items = {t: [ProbeItem(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in its]
                 for t, its in cached["items"].items()}
        return cached["metrics"], items, path, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    items = sampled_items(tc.forgetting_probes, tc.forgetting_limit)
    # The starting weights loaded again: exact for full fine-tuning and for PEFT alike.
    params = init_params(cfg.model, run.shard.mesh, run.shard.rules)
    em = EvalModel(str(cfg.model.init_from), run.model, params, run.tokenizer, {"model": str(cfg.model.init_from)})
    echo(f"forgetting: probes on the base {cfg.model.init_from} (cached afterwards in {path})")
    metrics = probe_metrics(em, tc.forgetting_probes, tc.forgetting_limit, items, echo=echo)
    if run.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"init_from": str(cfg.model.init_from), "metrics": metrics,
                  "items": {t: [dataclasses.asdict(i) for i in its] for t, its in items.items()}}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return metrics, items, path, False


def forgetting_report(run, state, result) -> None:
    """End-of-run hook: the probes on the base (cached) and on the trained weights; the section
    `forgetting` for summary.json (`result.extra_summary`), forgetting.md, forgetting.png, and a
    loud line per probe that fell by more than the threshold.

    >>> forgetting_report(run, state, result)          # doctest: +SKIP
    """
    from jaxlearn.eval.models import EvalModel
    from jaxlearn.objectives.forward import model_params
    from jaxlearn.train.metrics import atomic_write_text

    cfg = run.cfg
    if not forgetting_enabled(cfg):
        return
    tc = cfg.train
    say = result.echo if run.is_main else (lambda _m: None)
    base, items, path, cached = _base_metrics(run, cfg, say)
    if cached:
        say(f"forgetting: base probes from the cache {path}")
    em = EvalModel(str(run.run_dir), run.model, model_params(state.params), run.tokenizer, {"model": str(run.run_dir)})
    say("forgetting: probes on the trained weights")
    after = probe_metrics(em, tc.forgetting_probes, tc.forgetting_limit, items, echo=say)
    section = forgetting_section(base, after, tc.forgetting_threshold)
    section.update(limit=tc.forgetting_limit, base_cache=str(path), base_cached=cached)
    result.extra_summary["forgetting"] = section
    if not run.is_main:
        return
    title = f"{run.run_dir.name}: general probes, base {cfg.model.init_from} vs after {result.steps} steps"
    atomic_write_text(run.run_dir / "forgetting.md", markdown(section, result.final_eval, title) + "\n")
    plot(section, run.run_dir / "forgetting.png", title)
    for w in section["warnings"]:
        say(f"!!! FORGETTING: {w} (threshold {tc.forgetting_threshold:g}); see {run.run_dir / 'forgetting.md'} !!!")
    if not section["warnings"]:
        say(f"forgetting: no probe fell by more than {tc.forgetting_threshold:g} points; see {run.run_dir / 'forgetting.md'}")
