"""Opening a run directory written by `jaxlearn train`: its config, tokenizer and latest params.

Example::

    run = open_run("runs/shakespeare")
    run.model, run.params, run.tokenizer
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from jaxlearn.config import Config, ConfigError, load_config
from jaxlearn.data.run_tokenizer import resolve_tokenizer
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.registry import build_objective
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.checkpoint import Checkpointer, abstract_like
from jaxlearn.train.state import build_state


@dataclasses.dataclass
class OpenRun:
    cfg: Config
    model: Transformer
    params: Any
    tokenizer: Any  # Tokenizer (SentencePiece) or BPETokenizer
    step: int


def open_run(run_dir: str | Path, overrides: list[str] = ()) -> OpenRun:
    """Load the resolved config, tokenizer and the latest checkpoint's parameters."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a jaxlearn run directory (no config.yaml). "
                          "Pass the train.run_dir of a finished or running `jaxlearn train`.")
    cfg = load_config(cfg_path, list(overrides))
    tokenizer = resolve_tokenizer(cfg.data, run_dir, may_train=False)  # reading a run never trains one
    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh)
    model = Transformer(cfg.model, ShardingContext(mesh, rules))
    # the objective's own parameters (heads) are part of the run's checkpoints
    setup = build_state(model, cfg, mesh, rules, max(cfg.train.steps, 1), objective=build_objective(model, cfg))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet; train first (jaxlearn train ...).")
    # the newest intact checkpoint: a damaged newer one is named and skipped (and left in place)
    found = ckpt.restore_newest(abstract_like(setup.state, setup.shardings))
    ckpt.close()
    for step, why in sorted(found.damaged.items()):
        print(f"jaxlearn: checkpoint step {step} of {run_dir} is damaged ({why}); using step {found.step}",
              file=sys.stderr)
    return OpenRun(cfg, model, found.state.params, tokenizer, found.step)
