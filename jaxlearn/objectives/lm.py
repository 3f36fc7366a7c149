"""Masked next-token cross-entropy: the objective of pretraining and SFT (`objective.type: lm`).

With `kl_to_base` > 0 the loss also pulls the policy towards the frozen base (SFT that does not
forget, issue 16): kl_to_base x the sum over scored tokens of KL(policy || base), exact over the
vocabulary. The base is the reference policy of `Objective.reference_extras`: with PEFT the
policy's own weights with adapters off (no second copy), else a frozen copy of the start.

Example::

    objective = make_objective(model, LMConfig(loss_chunk=256))
    loss_sum, n_tokens, metric_sums = objective(params, batch, rng)
    sft = make_objective(model, LMConfig(kl_to_base=0.1), run)           # + metric kl_base
    loss_sum, n_tokens, metric_sums = sft(params, batch, rng, build_extras(sft.extras(), shard).values)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlearn.config import ConfigError, ObjectiveConfig
from jaxlearn.models.transformer import plain_lm_head
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import DEFAULT_LOSS_CHUNK, _chunks, _logits, chunked_head_loss
from jaxlearn.objectives.distill_losses import divergence
from jaxlearn.objectives.forward import hidden_states, logits, model_params, token_cross_entropy

__all__ = ["LMConfig", "LMObjective", "make_objective", "token_cross_entropy", "token_kl"]


@dataclasses.dataclass(frozen=True)
class LMConfig(ObjectiveConfig):
    """`lm`: masked next-token cross-entropy (pretraining, SFT)."""

    type: str = "lm"
    z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting (PaLM)
    # > 0: the LM head and the loss run fused, this many tokens at a time, so no [tokens, vocab]
    # logits (or their gradient) exist whole (jaxlearn/objectives/chunked_loss.py). Same loss
    # and gradients; much less memory with large vocabularies. 0: logits computed whole.
    loss_chunk: int = DEFAULT_LOSS_CHUNK
    # > 0: + kl_to_base x sum over scored tokens of KL(policy || base), exact over the vocabulary;
    # the base is the reference policy (PEFT: adapters off; full fine-tuning: the frozen start).
    # Metric `kl_base` (nats per token). 0: off, and no reference is loaded or run.
    kl_to_base: float = 0.0

    def __post_init__(self):
        if self.loss_chunk < 0:
            raise ConfigError(f"objective.loss_chunk: {self.loss_chunk!r} is negative; use 0 (off) or a "
                              "token count such as 256.")
        if not self.kl_to_base >= 0:  # also refuses NaN
            raise ConfigError(f"objective.kl_to_base: {self.kl_to_base!r} must be >= 0 (0: off; e.g. 0.1 "
                              "weighs the KL to the base model against the cross-entropy).")


class LMObjective(Objective):
    """Next-token loss over `batch["loss_mask"]`-selected targets; metric `ce` (without z-loss),
    and `kl_base` (KL(policy || base) per scored token) when `kl_to_base` > 0."""

    Config = LMConfig
    reports_perplexity = True

    def extras(self):
        # the reference is loaded (full fine-tuning) only when the penalty reads it
        return self.reference_extras() if self.cfg.kl_to_base else {}

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
            if not cfg.kl_to_base:
                return loss, jnp.sum(mask), {"ce": ce}
            kl = jnp.sum(self._chunked_base_kl(params, batch, extras, h, head) * mask)
            return loss + cfg.kl_to_base * kl, jnp.sum(mask), {"ce": ce, "kl_base": kl}
        out = logits(model, params, batch, rng)
        ce, log_z = token_cross_entropy(out, batch["targets"])
        loss = ce + cfg.z_loss * jnp.square(log_z) if cfg.z_loss else ce
        if not cfg.kl_to_base:
            return jnp.sum(loss * mask), jnp.sum(mask), {"ce": jnp.sum(ce * mask)}
        base = logits(model, self.reference_params(params, extras), batch, None)  # no dropout: the base
        kl = jnp.sum(token_kl(out, jax.lax.stop_gradient(base)) * mask)
        return (jnp.sum(loss * mask) + cfg.kl_to_base * kl, jnp.sum(mask),
                {"ce": jnp.sum(ce * mask), "kl_base": kl})

    def _chunked_base_kl(self, params, batch, extras, h_btd, head):
        """KL(policy || base) [B, T] with both heads run `loss_chunk` tokens at a time under
        `jax.checkpoint`, so neither model's [tokens, vocab] logits exist whole (the backward
        re-makes each chunk's)."""
        model, chunk = self.model, self.cfg.loss_chunk
        ref = self.reference_params(params, extras)
        ref_head = plain_lm_head(model.cfg, model_params(ref))
        # without_adapters (PEFT) and the frozen copy (full fine-tuning) both have a bare head
        assert ref_head is not None, "the reference policy's LM head carries adapters"
        h_ref = jax.lax.stop_gradient(hidden_states(model, ref, batch, None))
        b, t, d = h_btd.shape
        n_chunks = -(-(b * t) // chunk)
        (w, transposed), (w_ref, ref_transposed) = head, ref_head

        @jax.checkpoint
        def one(xs):
            h_c, h_ref_c = xs  # padding rows are zeros: equal uniform logits, KL 0, and masked anyway
            return token_kl(_logits(h_c, w, transposed), _logits(h_ref_c, w_ref, ref_transposed))

        kl = jax.lax.map(one, (_chunks(h_btd.reshape(-1, d), n_chunks, chunk),
                               _chunks(h_ref.reshape(-1, d), n_chunks, chunk)))
        return kl.reshape(-1)[:b * t].reshape(b, t)


def token_kl(policy_logits: jax.Array, base_logits: jax.Array) -> jax.Array:
    """KL(policy || base) per position, exact over the vocabulary: [..., V] logits -> [...].
    Exactly 0 where the two logits are equal.

    >>> z = jnp.asarray([[0.0, 1.0, 2.0]])
    >>> float(token_kl(z, z)[0]), round(float(token_kl(z, jnp.zeros((1, 3)))[0]), 4)
    (0.0, 0.2662)
    """
    log_pi = jax.nn.log_softmax(policy_logits.astype(jnp.float32), axis=-1)
    log_base = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    # divergence's "reverse_kl" is KL(second || first): here KL(policy || base)
    return divergence(log_base, log_pi, "reverse_kl")


def make_objective(model, cfg: ObjectiveConfig, run=None) -> Objective:
    """The objective named by `cfg.type`, bound to `model` (see jaxlearn/objectives/registry.py).

    >>> make_objective(model, LMConfig())(params, batch, None)[1]      # tokens scored  # doctest: +SKIP
    """
    from jaxlearn.objectives.registry import objective_class

    return objective_class(cfg.type)(model, cfg, run)
