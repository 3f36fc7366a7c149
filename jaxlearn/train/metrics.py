"""Where metrics go: JSONL (one record per step), TensorBoard events, and a loss-curve PNG.

Only process 0 writes. Example::

    log = MetricsLog(run_dir, enabled=jax.process_index() == 0)
    log.write(step=10, split="train", loss=3.2)
    log.plot()   # run_dir/loss_curve.png
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN/inf float replaced by None, so `json.dumps` writes valid JSON (null).

    >>> json_safe({"loss": float("nan"), "xs": [1.0, float("inf")]})
    {'loss': None, 'xs': [1.0, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kw: Any) -> str:
    """`json.dumps` that never writes the non-JSON tokens NaN/Infinity (they become null).

    >>> dumps_json({"loss": float("nan")})
    '{"loss": null}'
    """
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: heavy, and only process 0 needs it

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> int:
        """On (re)start: drop records past `step` (they will be recomputed identically), and a
        torn last line from a kill. Returns how many lines were dropped; the file is rewritten
        only when there is something to drop."""
        if not self.enabled or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        keep = [line for line in lines if _step_of(line) <= step]
        if len(keep) < len(lines):
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        return len(lines) - len(keep)

    def write(self, step: int, split: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(dumps_json(record) + "\n")  # NaN/inf as null: every line stays valid JSON
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def plot(self) -> Path | None:
        """Train and held-out loss against step, saved as run_dir/loss_curve.png."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.records()
        # a skipped non-finite step has loss null: a gap in the curve, not a point
        train = [(r["step"], r["loss"]) for r in recs if r["split"] == "train" and r.get("loss") is not None]
        held = [(r["step"], r["loss"]) for r in recs if r["split"] == "eval" and r.get("loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.run_dir / "loss_curve.png"
        tmp = self.run_dir / ".loss_curve.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def _plain(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)
