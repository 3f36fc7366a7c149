"""Continual-learning metrics from the accuracy matrix, and the reports (markdown, JSON, heatmap).

`a[i][j]` is the score on task j after training task i; `base[j]` the score of the base model
(adapters off) on task j. Scores are oriented before aggregating (`oriented`): a lower-is-better
metric (perplexity, NLL) enters negated, so for every task larger is better, a negative BWT is
forgetting and a positive FWT is help from earlier tasks. (With tasks on different metrics the
average mixes units; the per-task matrix is the primary output.)

- average accuracy: mean_j a[T-1][j]
- backward transfer (Lopez-Paz & Ranzato, GEM): BWT = 1/(T-1) sum_{j<T-1} (a[T-1][j] - a[j][j])
- forward transfer: FWT = 1/(T-1) sum_{j>0} (a[j-1][j] - base[j])

Example::

    summary = transfer_metrics([[0.5, 0.1], [0.4, 0.6]], base=[0.1, 0.2], higher_is_better=[True, True])
    summary["bwt"]      # -0.1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jaxlearn.train.metrics import atomic_write_text, dumps_json


def oriented(value: float, higher_is_better: bool) -> float:
    """`value`, negated when lower is better (so larger is always better).

    >>> oriented(3.0, False)
    -3.0
    """
    return value if higher_is_better else -value


def transfer_metrics(matrix: Sequence[Sequence[float]], base: Sequence[float],
                     higher_is_better: Sequence[bool]) -> dict:
    """Average accuracy after the last task, BWT and FWT (oriented scores; see the module doc).

    >>> m = transfer_metrics([[0.5, 0.1], [0.4, 0.6]], [0.1, 0.2], [True, True])
    >>> round(m["avg_accuracy"], 4), round(m["bwt"], 4), round(m["fwt"], 4)
    (0.5, -0.1, -0.1)
    """
    t = len(matrix)
    s = [[oriented(matrix[i][j], higher_is_better[j]) for j in range(t)] for i in range(t)]
    b = [oriented(base[j], higher_is_better[j]) for j in range(t)]
    last = s[t - 1]
    out = {"avg_accuracy": sum(last) / t}
    out["bwt"] = sum(last[j] - s[j][j] for j in range(t - 1)) / (t - 1) if t > 1 else 0.0
    out["fwt"] = sum(s[j - 1][j] - b[j] for j in range(1, t)) / (t - 1) if t > 1 else 0.0
    return out


def markdown(report: dict) -> str:
    """The report as markdown: the accuracy matrix, the transfer metrics, the general probe, sizes.

    >>> print(markdown({"method": "ella", "tasks": ["a"], "metrics": ["em"], "matrix": [[0.5]], "base": [0.1],
    ...                 "summary": {"avg_accuracy": 0.5, "bwt": 0.0, "fwt": 0.0}, "rows": [{}]}).splitlines()[0])
    # Continual learning: ella
    """
    tasks, metrics = report["tasks"], report["metrics"]
    lines = [f"# Continual learning: {report['method']}", "",
             "Score on task j (columns) after training task i (rows); base = adapters off, before any task.", "",
             "| after \\ on | " + " | ".join(f"{t} ({m})" for t, m in zip(tasks, metrics)) + " |",
             "|---|" + "---|" * len(tasks),
             "| base | " + " | ".join(f"{v:.4f}" for v in report["base"]) + " |"]
    for name, row in zip(tasks, report["matrix"]):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    s = report["summary"]
    lines += ["", f"average accuracy after the last task: {s['avg_accuracy']:.4f} | BWT {s['bwt']:+.4f} | "
                  f"FWT {s['fwt']:+.4f} (oriented: lower-is-better metrics negated)", ""]
    rows = report.get("rows") or []
    if rows and "general" in rows[0]:
        probes = list(rows[0]["general"])
        lines += ["| after | " + " | ".join(probes) + " | stored params | stored MiB | trainable params |",
                  "|---|" + "---|" * (len(probes) + 3)]
        if report.get("base_general"):
            lines.append("| base (adapters off) | " + " | ".join(f"{report['base_general'][p]:.4f}" for p in probes)
                         + " | 0 | 0 | |")
        for name, r in zip(tasks, rows):
            lines.append(f"| {name} | " + " | ".join(f"{r['general'][p]:.4f}" for p in probes)
                         + f" | {r['state_params']} | {r['state_bytes'] / 2**20:.3f} | {r['trainable_params']} |")
    return "\n".join(lines) + "\n"


def heatmap(report: dict, out: str | Path) -> Path:
    """The accuracy matrix as a PNG heatmap (rows: the base, then after task i; columns: task j),
    written atomically; colours compare within a column (`jaxlearn.eval.heatmap.matrix_heatmap`)."""
    from jaxlearn.eval.heatmap import matrix_heatmap

    rows = [list(report["base"])] + [list(r) for r in report["matrix"]]
    return matrix_heatmap(rows, ["base (adapters off)"] + [f"after {t}" for t in report["tasks"]],
                          [f"{t}\n{k}" for t, k in zip(report["tasks"], report["metrics"])],
                          report.get("higher_is_better", [True] * len(report["tasks"])),
                          f"{report['method']}: score on task j after task i", out)


def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """`continual.json`, `continual.md` and `continual.png` in `out_dir` (each written atomically)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "continual.json", "md": out_dir / "continual.md", "png": out_dir / "continual.png"}
    atomic_write_text(paths["json"], dumps_json(report, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(report))
    heatmap(report, paths["png"])
    return paths


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
