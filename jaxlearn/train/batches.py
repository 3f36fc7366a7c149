"""From the feed's host-local rows to the batch the step sees, and held-out evaluation over it.

`place_batch` is the path every batch takes, in training and evaluation alike: this host's
rows become global arrays (each leaf sharded by its rank: [B, T] tokens, [B, 2, T] pairs,
[B] per-row scalars), then the objective's `prepare` (the rollout seam) sees them with the
current state. Example::

    batch = place_batch(objective, shard, next(feed.train), state)
    evaluate = make_evaluator(objective, setup, shard, extras, feed.eval_batches)
    evaluate(state)            # {"loss": ..., <objective metrics>..., "weight": ...}
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from jaxlearn.sharding import ShardingContext
from jaxlearn.train.extras import Extras
from jaxlearn.train.state import StateSetup, TrainState
from jaxlearn.train.step import compile_eval_step


def global_batch(local: dict, shard: ShardingContext) -> dict:
    """Global arrays from this host's rows (multi-host safe); each leaf sharded by its rank.
    Leaves that already are global arrays (made on device, e.g. by a sampler) pass through."""
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_process_local_data(shard.batch_sharding(np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


def place_batch(objective: Any, shard: ShardingContext, local: dict, state: TrainState,
                shardings: Any | None = None) -> dict:
    """feed batch -> global arrays -> `objective.prepare` -> the step's shardings."""
    batch = objective.prepare(global_batch(local, shard), state)
    shardings = shard.batch_shardings(batch) if shardings is None else shardings
    return jax.device_put(batch, shardings)


def make_evaluator(objective: Any, setup: StateSetup, shard: ShardingContext, extras: Extras,
                   batches: list[dict]) -> Callable[[TrainState], dict]:
    """state -> held-out means of the objective's loss and metric sums over `batches` (the same
    quantities the step reports), plus perplexity for next-token objectives."""
    compiled: dict = {}

    def evaluate(state: TrainState) -> dict:
        total, weight, sums = 0.0, 0.0, {}
        for local in batches:
            batch = place_batch(objective, shard, local, state)
            if "step" not in compiled:  # the eval batches' structure is known only now
                compiled["step"] = compile_eval_step(objective, setup, shard.batch_shardings(batch), extras.shardings)
            t, w, s = jax.device_get(compiled["step"](state.trainable, state.frozen, batch, extras.values))
            total, weight = total + float(t), weight + float(w)
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        denom = max(weight, 1.0)
        out = {"loss": total / denom, **{k: v / denom for k, v in sums.items()}, "weight": weight}
        if objective.reports_perplexity:
            # exp of the cross-entropy alone where reported: penalties in the loss (z-loss, a KL to
            # the base) are not part of the model's perplexity
            out.update(perplexity=math.exp(min(out.get("ce", out["loss"]), 50.0)), tokens=weight)
        return out

    return evaluate
