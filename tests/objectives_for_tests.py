"""Objectives that exist only to prove the seams of the one step (no method in the library).

Named in recipes as `objective.type: tests.objectives_for_tests:L2ToFrozen` (the repository
root is on the path in tests and in the CLI subprocesses of `cli_runner`).

`L2ToFrozen`: next-token loss plus an L2 pull of the student's hidden states, through an
objective-owned projection head, towards a FROZEN second model of another depth (a teacher
passed to the step as a sharded extra), weighted per row by a per-row scalar feature that
`prepare` adds to each batch, and scaled per width by a frozen buffer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlearn.config import ObjectiveConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.forward import hidden_states, model_params, token_logprobs
from jaxlearn.objectives.lm import LMConfig, LMObjective
from jaxlearn.train.extras import Buffer, FrozenModel


@dataclasses.dataclass(frozen=True)
class L2Config(ObjectiveConfig):
    type: str = "tests.objectives_for_tests:L2ToFrozen"
    teacher_layers: int = 1  # the student has model.n_layers; the teacher another depth
    teacher_seed: int = 7
    l2_weight: float = 1.0


class L2ToFrozen(Objective):
    Config = L2Config
    reports_perplexity = False

    def __init__(self, model, cfg, run=None):
        super().__init__(model, cfg, run)
        self.lm = LMObjective(model, LMConfig(), run)
        self.teacher_cfg = dataclasses.replace(model.cfg, n_layers=cfg.teacher_layers, init_from="")
        self.teacher = Transformer(self.teacher_cfg, model.shard)

    def extras(self):
        d = self.model.cfg.d_model
        return {"teacher": FrozenModel(self.teacher_cfg, seed=self.cfg.teacher_seed),
                "width_scale": Buffer((d,), "float32", ("embed",), init=lambda: 0.5 + jnp.arange(d) / d)}

    def init_heads(self, key):
        d = self.model.cfg.d_model
        return {"proj": {"kernel": jnp.eye(d) + 0.01 * jax.random.normal(key, (d, d))}}

    def head_axes(self):
        return {"proj": {"kernel": ("embed", None)}}

    def prepare(self, batch, state):
        # A per-row scalar [B]: the share of scored tokens in the row (0 for a padding row).
        batch = dict(batch)
        batch["row_weight"] = jnp.mean(batch["loss_mask"].astype(jnp.float32), axis=-1)
        return batch

    def loss(self, params, batch, rng, extras):
        ce_sum, n_tokens, sums = self.lm(params, batch, rng, extras)
        h_s = hidden_states(self.model, model_params(params), batch, rng) @ params["heads"]["proj"]["kernel"]
        h_t = jax.lax.stop_gradient(hidden_states(self.teacher, extras["teacher"], batch))
        sq = jnp.mean(jnp.square(h_s - h_t) * extras["width_scale"], axis=-1)  # [B, T]
        mask = batch["loss_mask"].astype(jnp.float32)
        l2 = jnp.sum(batch["row_weight"][:, None] * sq * mask)
        return ce_sum + self.cfg.l2_weight * l2, n_tokens, {**sums, "l2": l2}



@dataclasses.dataclass(frozen=True)
class KLConfig(ObjectiveConfig):
    type: str = "tests.objectives_for_tests:KLToReference"
    kl_weight: float = 0.1


class KLToReference(Objective):
    """Next-token loss plus a sampled-token KL estimate to the reference policy: the policy's
    starting weights (full fine-tuning: a frozen extra) or the base with adapters off (PEFT:
    no extra, no second copy). Metric `kl` is 0 while the policy is the reference."""

    Config = KLConfig

    def extras(self):
        return self.reference_extras()

    def loss(self, params, batch, rng, extras):
        mask = batch["loss_mask"].astype(jnp.float32)
        lp = token_logprobs(self.model, params, batch, rng)
        ref = token_logprobs(self.model, self.reference_params(params, extras), batch)
        kl = jnp.sum((lp - ref) * mask)
        return -jnp.sum(lp * mask) + self.cfg.kl_weight * kl, jnp.sum(mask), {"kl": kl}


@dataclasses.dataclass(frozen=True)
class SelfSampledConfig(ObjectiveConfig):
    type: str = "tests.objectives_for_tests:SelfSampled"
    prompt_len: int = 8
    new_tokens: int = 8
    seed: int = 3


class SelfSampled(Objective):
    """The rollout seam: `prepare` samples continuations of each row's first tokens from the
    CURRENT weights with the jitted sampler, and the loss is a policy-gradient surrogate with
    the importance ratio to the behaviour log-probs. Metric `ratio_dev` (sum of |ratio - 1|)
    is 0 exactly when the batch was sampled from the weights the step differentiates."""

    Config = SelfSampledConfig

    def _sampling(self):
        from jaxlearn.models.generate import SamplingConfig

        return SamplingConfig(max_new_tokens=self.cfg.new_tokens, temperature=1.0)

    def prepare(self, batch, state):
        from jaxlearn.models.generate import rollout_batch, sample

        p = self.cfg.prompt_len
        tokens = batch["inputs"][:, :p]
        seg = jnp.ones_like(tokens)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), tokens.shape)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), state.step)
        ro = sample(self.model, model_params(state.params), tokens, seg, pos, rng, self._sampling())
        out = rollout_batch(tokens, seg, pos, ro)
        # behaviour log-probs aligned with the targets they score; a toy reward per row
        out["behaviour_logprobs"] = jnp.concatenate(
            [jnp.zeros((tokens.shape[0], p - 1)), ro.logprobs, jnp.zeros((tokens.shape[0], 1))], axis=1)
        out["reward"] = jnp.sum((ro.tokens % 2 == 0) * ro.mask, axis=-1) / jnp.maximum(jnp.sum(ro.mask, -1), 1.0)
        return out

    def abstract_batch(self, batch_size, seq_len):
        t = self.cfg.prompt_len + self.cfg.new_tokens
        shapes = {k: ((batch_size, t), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        shapes.update(loss_mask=((batch_size, t), jnp.float32), behaviour_logprobs=((batch_size, t), jnp.float32),
                      reward=((batch_size,), jnp.float32))
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}

    def loss(self, params, batch, rng, extras):
        mask = batch["loss_mask"]
        lp = token_logprobs(self.model, params, batch, rng)
        ratio = jnp.exp(lp - batch["behaviour_logprobs"])
        adv = (batch["reward"] - jnp.mean(batch["reward"]))[:, None]
        return (-jnp.sum(adv * ratio * mask), jnp.sum(mask),
                {"ratio_dev": jnp.sum(jnp.abs(ratio - 1.0) * mask), "reward": jnp.sum(batch["reward"][:, None] * mask)})
