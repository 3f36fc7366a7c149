"""Score matrices as heatmaps: rows are checkpoints (a base, then after each task or stage), columns
are evaluations with their own units and directions.

Example::

    matrix_heatmap([[0.1, 50.0], [0.4, 45.0]], ["base", "after sft"], ["antonyms\\nexact_match", "brown\\nppl"],
                   [True, False], "sft: score after each stage", "out.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def column_shades(rows: Sequence[Sequence[float]], higher_is_better: Sequence[bool]) -> list[list[float]]:
    """Each column scaled to [0, 1] over the rows, 1 = the best score of that column (its metric's
    direction). Why: the columns' metrics have different units (exact match, NLL, perplexity), so
    one colour scale for the whole matrix would only show the largest unit. NaN cells (not
    measured) stay NaN.

    >>> column_shades([[0.0, 50.0], [0.3, 45.0]], [True, False])
    [[0.0, 0.0], [1.0, 1.0]]
    """
    import numpy as np

    m = np.asarray(rows, float)
    o = np.where(np.asarray(higher_is_better, bool)[None, :], m, -m)
    lo, hi = np.nanmin(o, axis=0, keepdims=True), np.nanmax(o, axis=0, keepdims=True)
    return np.where(hi > lo, (o - lo) / np.where(hi > lo, hi - lo, 1.0), np.where(np.isnan(o), np.nan, 0.5)).tolist()


def matrix_heatmap(rows: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                   higher_is_better: Sequence[bool], title: str, out: str | Path) -> Path:
    """Write the matrix as a PNG heatmap atomically. Cells show the raw scores; colours compare
    within a column (brighter is better for that column: `column_shades`), so forgetting shows as
    a column darkening downwards. NaN cells are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    m = np.asarray(rows, float)
    shade = np.asarray(column_shades(m, higher_is_better))
    fig, ax = plt.subplots(figsize=(1.4 * m.shape[1] + 2.5, 0.9 * m.shape[0] + 1.8))
    im = ax.imshow(np.ma.masked_invalid(shade), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center",
                        color="k" if shade[i, j] > 0.6 else "w", fontsize=8)
    arrows = ["higher better" if h else "lower better" for h in higher_is_better]
    ax.set_xticks(range(m.shape[1]), [f"{c}\n({a})" for c, a in zip(col_labels, arrows)], fontsize=7)
    ax.set_yticks(range(m.shape[0]), list(row_labels), fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="within-column rank (1 = best of the column)")
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (a temporary file renamed into place) and close it.

    >>> save_figure(fig, "runs/x/plot.png")                 # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
