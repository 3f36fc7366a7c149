"""Masked next-token cross-entropy: the objective of pretraining and SFT.

An objective is a function `(params, batch, rng) -> (loss_sum, weight, metric_sums)` (`rng` is
None in evaluation, where nothing is random); the
step divides sums by the total weight over all microbatches, so gradient accumulation gives
exactly the full-batch mean. Example::

    objective = make_lm_objective(model, ObjectiveConfig())
    loss_sum, n_tokens, _ = objective(params, batch, rng)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxlearn.config import ObjectiveConfig
from jaxlearn.models.transformer import plain_lm_head
from jaxlearn.objectives.chunked_loss import chunked_head_loss

Objective = Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (both [B, T], float32)."""
    logits = logits_btv.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def make_lm_objective(model, cfg: ObjectiveConfig) -> Objective:
    """Next-token loss over `batch["loss_mask"]`-selected targets."""

    def objective(params, batch, rng):
        # rng is None in evaluation: deterministic. In training it drives LoRA dropout (the base
        # model has none).
        rngs = {"dropout": rng} if rng is not None else None
        mask = batch["loss_mask"].astype(jnp.float32)
        head = plain_lm_head(model.cfg, params) if cfg.loss_chunk else None
        if head is not None:
            h, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                               rngs=rngs, return_hidden=True)
            w, transposed = head
            loss, ce = chunked_head_loss(h.reshape(-1, h.shape[-1]), w, batch["targets"].reshape(-1),
                                         mask.reshape(-1), w_transposed=transposed, chunk=cfg.loss_chunk,
                                         z_loss=cfg.z_loss)
            return loss, jnp.sum(mask), {"ce": ce}
        logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                                rngs=rngs)
        ce, log_z = token_cross_entropy(logits, batch["targets"])
        loss = ce + cfg.z_loss * jnp.square(log_z) if cfg.z_loss else ce
        return jnp.sum(loss * mask), jnp.sum(mask), {"ce": jnp.sum(ce * mask)}

    return objective


def make_objective(model, cfg: ObjectiveConfig) -> Objective:
    """The objective named by `cfg.type`."""
    if cfg.type == "lm":
        return make_lm_objective(model, cfg)
    raise ValueError(f"objective.type {cfg.type!r} is not implemented; available: lm.")
