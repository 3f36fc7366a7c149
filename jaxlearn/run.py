"""Opening a run directory written by `jaxlearn train`: its config, tokenizer and latest params.

Example::

    run = open_run("runs/shakespeare")
    run.model, run.params, run.tokenizer
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxlearn.config import Config, ConfigError, load_config
from jaxlearn.data.bpe_tokenizer import load_tokenizer
from jaxlearn.data.tokenizer import Tokenizer
from jaxlearn.models.transformer import Transformer
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
    if cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        tok_path = run_dir / "tokenizer.model"
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer {tok_path} not found for run {run_dir}; pass data.tokenizer=PATH.")
        tokenizer = Tokenizer.load(tok_path)
    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh)
    model = Transformer(cfg.model, ShardingContext(mesh, rules))
    setup = build_state(model, cfg, mesh, rules, max(cfg.train.steps, 1))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet; train first (jaxlearn train ...).")
    state = ckpt.restore(step, abstract_like(setup.state, setup.shardings))
    ckpt.close()
    return OpenRun(cfg, model, state.params, tokenizer, step)
