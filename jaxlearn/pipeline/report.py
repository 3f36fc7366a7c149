"""The pipeline's forgetting matrix and what it shows: markdown, JSON, a heatmap and a plot of
each metric across stages.

`matrix[i][j]` is column j's score after stage i (a column is one metric of one evaluation; its
owner is the first stage that lists it, -1 for a general probe); `base[j]` is the score of the
first stage's starting model, when it has one. Changes are **oriented** (lower-is-better metrics
negated), so a negative change is always a loss:

- `retained[j]` = score after the last stage - score after the owner stage (general probes:
  after the last stage - the base, or - after stage 0 without a base);
- `stage_cost[i][j]` = score after stage i - score after stage i-1 (stage 0: - the base), for
  the columns owned by earlier stages and the general probes: what stage i cost the others.

Example::

    report = build_report(spec, base_row, rows)
    write_reports(report, "runs/pipeline_tiny")   # pipeline.{json,md,png}, pipeline_metrics.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxlearn.continual.metrics import oriented
from jaxlearn.train.metrics import atomic_write_text, dumps_json


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _delta(new: float, old: float, hib: bool) -> float:
    if old is None or not (math.isfinite(new) and math.isfinite(old)):
        return float("nan")
    return oriented(new, hib) - oriented(old, hib)


def forgetting(matrix: list[list[float]], base: list[float] | None, owners: list[int],
               higher_is_better: list[bool]) -> dict:
    """`retained` per column and `stage_cost` per stage (see the module doc; oriented changes).

    >>> f = forgetting([[0.5, 3.0], [0.3, 2.0]], None, [0, 1], [True, False])
    >>> [round(x, 4) for x in f["retained"]], [[round(x, 4) if x == x else None for x in r] for r in f["stage_cost"]]
    ([-0.2, 0.0], [[None, None], [-0.2, None]])
    """
    t, n = len(matrix), len(owners)
    retained = []
    for j in range(n):
        o = owners[j]
        ref = (matrix[o][j] if o >= 0 else (base[j] if base is not None else matrix[0][j]))
        retained.append(_delta(matrix[t - 1][j], ref, higher_is_better[j]))
    cost = []
    for i in range(t):
        prev = matrix[i - 1] if i > 0 else base
        cost.append([_delta(matrix[i][j], prev[j], higher_is_better[j]) if prev is not None and owners[j] < i
                     else float("nan") for j in range(n)])
    return {"retained": retained, "stage_cost": cost}


def build_report(spec, base: dict | None, rows: list[dict]) -> dict:
    """The report dict from the base row (or None) and one row per stage."""
    cols = spec.columns
    keys = [c.key for c in cols]
    hib = [c.higher_is_better for c in cols]
    owners = [c.owner for c in cols]
    matrix = [[r["scores"][k] for k in keys] for r in rows]
    base_scores = [base["scores"][k] for k in keys] if base else None
    return {"path": spec.path, "stages": [s.name for s in spec.stages], "columns": keys,
            "evals": [c.eval.name for c in cols], "metrics": [c.metric for c in cols], "owners": owners,
            "higher_is_better": hib, "base": base_scores, "matrix": matrix,
            **forgetting(matrix, base_scores, owners, hib),
            "handoff": [r.get("handoff", {}) for r in rows],
            "eval_seconds": [r.get("eval_seconds") for r in rows]}


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def markdown(report: dict) -> str:
    """The report as markdown: the forgetting matrix, what each stage cost the others, and what
    was handed from stage to stage.

    >>> r = {"stages": ["sft"], "columns": ["antonyms/exact_match"], "owners": [0], "higher_is_better": [True],
    ...      "base": [0.0], "matrix": [[0.3]], "retained": [0.0], "stage_cost": [[float("nan")]], "handoff": [{}]}
    >>> print(markdown(r).splitlines()[0])
    # Alignment pipeline: sft
    """
    stages, cols = report["stages"], report["columns"]
    owner = [stages[o] if o >= 0 else "general" for o in report["owners"]]
    arrow = ["↑" if h else "↓" for h in report["higher_is_better"]]
    lines = [f"# Alignment pipeline: {' → '.join(stages)}", "",
             "Score of each column (an evaluation's metric; ↑ higher is better, ↓ lower) after each stage. "
             "A column's owner is the stage that lists it (general: a probe owned by none); its own stage's "
             "row is in bold.", "",
             "| after \\ on | " + " | ".join(f"{c} {a} ({o})" for c, a, o in zip(cols, arrow, owner)) + " |",
             "|---|" + "---|" * len(cols)]
    if report.get("base") is not None:
        lines.append("| base | " + " | ".join(_fmt(v) for v in report["base"]) + " |")
    for i, (name, row) in enumerate(zip(stages, report["matrix"])):
        cells = [f"**{_fmt(v)}**" if report["owners"][j] == i else _fmt(v) for j, v in enumerate(row)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Retained after the last stage (oriented: negative = lost since the owner stage's row; general "
                  "probes since the base, or since the first stage's row without one):", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
              "| " + " | ".join(_fmt(v) for v in report["retained"]) + " |", "",
              "What each stage cost the columns owned before it (oriented change from the previous row):", "",
              "| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in zip(stages, report["stage_cost"]):
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += ["", "| stage | trained from | objective | PEFT | handed on (adapters merged) | train s |",
              "|---|---|---|---|---|---|"]
    for name, h in zip(stages, report["handoff"]):
        ts = h.get("train_seconds")
        lines.append(f"| {name} | {h.get('init_from') or 'fresh init'} | {h.get('objective', '')} | "
                     f"{h.get('peft', '')} | {h.get('merged', '')} | {_fmt(ts)} |")
    return "\n".join(lines) + "\n"


def metrics_plot(report: dict, out: str | Path) -> Path:
    """One small panel per column: its score at the base and after each stage (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    labels = (["base"] if report.get("base") is not None else []) + report["stages"]
    rows = ([report["base"]] if report.get("base") is not None else []) + report["matrix"]
    n = len(report["columns"])
    ncol = min(n, 3)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False)
    for j, col in enumerate(report["columns"]):
        ax = axes[j // ncol][j % ncol]
        ax.plot(range(len(labels)), [r[j] for r in rows], marker="o")
        o = report["owners"][j]
        if o >= 0:  # where the column's own stage trained
            ax.axvline(labels.index(report["stages"][o]), color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20)
        ax.set_title(f"{col} ({'higher' if report['higher_is_better'][j] else 'lower'} better)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.tight_layout()
    from jaxlearn.eval.heatmap import save_figure

    return save_figure(fig, out)


def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """`pipeline.json`, `pipeline.md`, `pipeline.png` (heatmap), `pipeline_metrics.png`, atomically."""
    from jaxlearn.eval.heatmap import matrix_heatmap

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "pipeline.json", "md": out_dir / "pipeline.md", "png": out_dir / "pipeline.png",
             "plot": out_dir / "pipeline_metrics.png"}
    atomic_write_text(paths["json"], dumps_json(report, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    has_base = report.get("base") is not None
    rows = ([report["base"]] if has_base else []) + report["matrix"]
    labels = (["base"] if has_base else []) + [f"after {s}" for s in report["stages"]]
    cols = [c.replace("/", "\n") for c in report["columns"]]
    matrix_heatmap(rows, labels, cols, report["higher_is_better"], "forgetting matrix: score after each stage",
                   paths["png"])
    metrics_plot(report, paths["plot"])
    return paths
