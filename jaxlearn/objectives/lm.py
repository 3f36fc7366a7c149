"""Masked next-token cross-entropy: the objective of pretraining and SFT (`objective.type: lm`).

Example::

    objective = make_objective(model, LMConfig(loss_chunk=256))
    loss_sum, n_tokens, metric_sums = objective(params, batch, rng)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlearn.config import ConfigError, ObjectiveConfig
from jaxlearn.models.transformer import plain_lm_head
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import chunked_head_loss
from jaxlearn.objectives.forward import model_params, hidden_states, logits, token_cross_entropy

__all__ = ["LMConfig", "LMObjective", "make_objective", "token_cross_entropy"]


@dataclasses.dataclass(frozen=True)
class LMConfig(ObjectiveConfig):
    """`lm`: masked next-token cross-entropy (pretraining, SFT)."""

    type: str = "lm"
    z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting (PaLM)
    # > 0: the LM head and the loss run fused, this many tokens at a time, so no [tokens, vocab]
    # logits (or their gradient) exist whole (jaxlearn/objectives/chunked_loss.py). Same loss
    # and gradients; much less memory with large vocabularies. 0: logits computed whole.
    loss_chunk: int = 0

    def __post_init__(self):
        if self.loss_chunk < 0:
            raise ConfigError(f"objective.loss_chunk: {self.loss_chunk!r} is negative; use 0 (off) or a "
                              "token count such as 256.")


class LMObjective(Objective):
    """Next-token loss over `batch["loss_mask"]`-selected targets; metric `ce` (without z-loss)."""

    Config = LMConfig
    reports_perplexity = True

    def loss(self, params, batch, rng, extras):
        cfg, model = self.cfg, self.model
        mask = batch["loss_mask"].astype(jnp.float32)
        head = plain_lm_head(model.cfg, model_params(params)) if cfg.loss_chunk else None
        if head is not None:  # fused head + loss: its custom VJP builds only the gradients needed
            h = hidden_states(model, params, batch, rng)
            w, transposed = head
            loss, ce = chunked_head_loss(h.reshape(-1, h.shape[-1]), w, batch["targets"].reshape(-1),
                                         mask.reshape(-1), w_transposed=transposed, chunk=cfg.loss_chunk,
                                         z_loss=cfg.z_loss)
            return loss, jnp.sum(mask), {"ce": ce}
        ce, log_z = token_cross_entropy(logits(model, params, batch, rng), batch["targets"])
        loss = ce + cfg.z_loss * jnp.square(log_z) if cfg.z_loss else ce
        return jnp.sum(loss * mask), jnp.sum(mask), {"ce": jnp.sum(ce * mask)}


def make_objective(model, cfg: ObjectiveConfig, run=None) -> Objective:
    """The objective named by `cfg.type`, bound to `model` (see jaxlearn/objectives/registry.py).

    >>> make_objective(model, LMConfig())(params, batch, None)[1]      # tokens scored  # doctest: +SKIP
    """
    from jaxlearn.objectives.registry import objective_class

    return objective_class(cfg.type)(model, cfg, run)
