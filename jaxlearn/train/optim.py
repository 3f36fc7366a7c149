"""The optimizer: AdamW with warmup + decay and global-norm clipping, built from `OptimConfig`.

Example::

    tx, schedule = make_optimizer(OptimConfig(lr=3e-4), total_steps=1000)
    opt_state = tx.init(trainable_params)
"""

from __future__ import annotations

from typing import Any

import optax

from jaxlearn.config import OptimConfig
from jaxlearn.peft.filter import flat_paths, unflatten_paths


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine/linear decay to `lr * min_lr_ratio` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (`kernel`, `embedding`), never on norm scales."""
    flat = flat_paths(params)
    return unflatten_paths({k: k.rsplit("/", 1)[-1] in ("kernel", "embedding") for k in flat})


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
