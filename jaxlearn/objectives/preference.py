"""Preference optimisation objectives: `dpo`, `ipo`, `simpo`, `orpo`, `kto`.

Each reads the paired batch of `jaxlearn.data.preference` ([B, 2, T]: chosen, rejected), runs
the policy once over all 2B sequences, sums token log-probs over the response only, and applies
its loss from `preference_losses.py`. The weight is the number of real pairs, so every metric is
a per-pair mean:

- `reward_chosen`, `reward_rejected`, `margin`, `accuracy` (margin > 0): the method's implicit
  rewards (beta x log-ratio to the reference; SimPO/ORPO: beta x mean log-prob);
- `kl`: log pi/pi_ref of the chosen reply, a sampled KL estimate (reference methods);
- `logp_accuracy`: the policy alone prefers the chosen reply (summed log-prob), meaningful
  before any training too.

The reference (DPO, IPO, KTO) is computed in the same step (`objective.reference: auto`): with
PEFT the base with adapters off (no second copy), else a frozen copy of the starting weights;
or read from the data (`stored`: the records' `ref_chosen_logp` / `ref_rejected_logp`,
see `reference_logps` to compute them once). Example::

    cfg = load_config("configs/dpo_smollm2_wordnet.yaml")     # objective: {type: dpo, beta: 0.1}
    loss_sum, n_pairs, metrics = build_objective(model, cfg)(params, batch, rng, extras)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import ConfigError, ObjectiveConfig
from jaxlearn.data.preference import PAIR_FEATURES
from jaxlearn.objectives import preference_losses as L
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import DEFAULT_LOSS_CHUNK
from jaxlearn.objectives.forward import masked_sum, token_logprobs


@dataclasses.dataclass(frozen=True)
class _PrefConfig(ObjectiveConfig):
    # > 0: the LM head runs this many tokens at a time (no [tokens, vocab] logits exist whole)
    loss_chunk: int = DEFAULT_LOSS_CHUNK

    def __post_init__(self):
        for name in ("beta", "tau"):
            if hasattr(self, name) and getattr(self, name) <= 0:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} must be positive (e.g. 0.1).")
        if self.loss_chunk < 0:
            raise ConfigError(f"objective.loss_chunk: {self.loss_chunk!r} is negative; use 0 (off) or e.g. 256.")


@dataclasses.dataclass(frozen=True)
class DPOConfig(_PrefConfig):
    """`dpo`: sigmoid loss on beta x the log-ratio margin; label_smoothing > 0 is conservative DPO."""

    type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: Literal["auto", "stored"] = "auto"


@dataclasses.dataclass(frozen=True)
class IPOConfig(_PrefConfig):
    """`ipo`: squared distance of the log-ratio margin to 1 / (2 tau)."""

    type: str = "ipo"
    tau: float = 0.1
    reference: Literal["auto", "stored"] = "auto"


@dataclasses.dataclass(frozen=True)
class SimPOConfig(_PrefConfig):
    """`simpo`: length-normalised log-prob margin with a target margin gamma; no reference."""

    type: str = "simpo"
    beta: float = 2.0
    gamma: float = 1.0


@dataclasses.dataclass(frozen=True)
class ORPOConfig(_PrefConfig):
    """`orpo`: SFT loss on the chosen reply + lam x the odds-ratio loss; no reference."""

    type: str = "orpo"
    lam: float = 0.1


@dataclasses.dataclass(frozen=True)
class KTOConfig(_PrefConfig):
    """`kto`: each reply on its own, chosen as desirable and rejected as undesirable; z0 is the
    batch's mean log-ratio (clipped at 0, no gradient)."""

    type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Literal["auto", "stored"] = "auto"


class PreferenceObjective(Objective):
    """Shared by the preference methods: the paired forward, the reference, the metrics."""

    uses_reference = True

    def extras(self):
        if self.uses_reference and self.cfg.reference == "auto":
            return self.reference_extras()
        return {}

    def abstract_batch(self, batch_size, seq_len):
        shapes = {k: jax.ShapeDtypeStruct((batch_size, 2, seq_len), np.dtype(dt)) for k, dt in PAIR_FEATURES.items()}
        shapes["pair_mask"] = jax.ShapeDtypeStruct((batch_size,), np.float32)
        shapes["ref_logps"] = jax.ShapeDtypeStruct((batch_size, 2), np.float32)
        shapes["pref_labels"] = jax.ShapeDtypeStruct((batch_size, 2), np.float32)
        return shapes

    def sequence_logps(self, params, batch, rng):
        """([B, 2] summed response log-probs, [B, 2] response lengths) of `params`."""
        b, two, t = batch["inputs"].shape
        flat = {k: batch[k].reshape(b * two, t) for k in PAIR_FEATURES}
        lp = token_logprobs(self.model, params, flat, rng, chunk=self.cfg.loss_chunk)
        mask = flat["loss_mask"].astype(jnp.float32)
        return masked_sum(lp, mask).reshape(b, two), jnp.sum(mask, axis=-1).reshape(b, two)

    def reference_logps(self, params, batch, extras):
        if self.cfg.reference == "stored":
            return batch["ref_logps"]
        return jax.lax.stop_gradient(self.sequence_logps(self.reference_params(params, extras), batch, None)[0])

    def pair_losses(self, pol, lens, ref, labels):
        """([B] loss, [B] reward_chosen, [B] reward_rejected, extra metric arrays). `labels` [B, 2]:
        (1, 0) for every pair; only objectives that read `data.format: unpaired` (KTO) use it."""
        raise NotImplementedError

    def loss(self, params, batch, rng, extras):
        pm = batch["pair_mask"].astype(jnp.float32)
        pol, lens = self.sequence_logps(params, batch, rng)
        lens = jnp.maximum(lens, 1.0)  # padding pairs have no response tokens
        ref = self.reference_logps(params, batch, extras) if self.uses_reference else None
        # what each slot is (1 desirable, 0 undesirable, -1 empty); a batch without it holds pairs
        labels = batch.get("pref_labels", jnp.broadcast_to(jnp.asarray([1.0, 0.0]), pol.shape))
        losses, rc, rr, extra = self.pair_losses(pol, lens, ref, labels)
        s = lambda x: jnp.sum(x * pm)  # noqa: E731
        metrics = {"reward_chosen": s(rc), "reward_rejected": s(rr), "margin": s(rc - rr),
                   "accuracy": s((rc > rr).astype(jnp.float32)),
                   "logp_accuracy": s((pol[:, 0] > pol[:, 1]).astype(jnp.float32)),
                   **{k: s(v) for k, v in extra.items()}}
        if ref is not None:
            metrics["kl"] = s(pol[:, 0] - ref[:, 0])
        return s(losses), jnp.sum(pm), metrics


class DPO(PreferenceObjective):
    Config = DPOConfig

    def pair_losses(self, pol, lens, ref, labels):
        c = self.cfg
        loss = L.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=c.beta, label_smoothing=c.label_smoothing)
        return loss, c.beta * (pol[:, 0] - ref[:, 0]), c.beta * (pol[:, 1] - ref[:, 1]), {}


class IPO(PreferenceObjective):
    Config = IPOConfig

    def pair_losses(self, pol, lens, ref, labels):
        loss = L.ipo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], tau=self.cfg.tau)
        return loss, pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1], {}


class SimPO(PreferenceObjective):
    Config = SimPOConfig
    uses_reference = False

    def pair_losses(self, pol, lens, ref, labels):
        c = self.cfg
        loss = L.simpo_loss(pol[:, 0], pol[:, 1], lens[:, 0], lens[:, 1], beta=c.beta, gamma=c.gamma)
        return loss, c.beta * pol[:, 0] / lens[:, 0], c.beta * pol[:, 1] / lens[:, 1], {}


class ORPO(PreferenceObjective):
    Config = ORPOConfig
    uses_reference = False

    def pair_losses(self, pol, lens, ref, labels):
        loss, nll, ratio = L.orpo_loss(pol[:, 0], pol[:, 1], lens[:, 0], lens[:, 1], lam=self.cfg.lam)
        return loss, pol[:, 0] / lens[:, 0], pol[:, 1] / lens[:, 1], {"sft": nll, "odds_ratio": ratio}


class KTO(PreferenceObjective):
    """Each reply on its own: pairs give a desirable (chosen) and an undesirable (rejected) reply;
    `data.format: unpaired` gives two independent labelled examples per row (`pref_labels`)."""

    Config = KTOConfig
    reads_unpaired = True

    def pair_losses(self, pol, lens, ref, labels):
        c = self.cfg
        ratio = pol - ref  # [B, 2]
        real = (labels >= 0).astype(jnp.float32)  # an empty slot of an odd unpaired row counts nowhere
        # z0: the batch's KL estimate, a reference point that carries no gradient (paper, sec. 4.1).
        # Empty slots and padding pairs have no reply tokens, so their ratio is 0 (as before).
        z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(ratio), 0.0))
        want = jnp.clip(labels, 0.0, 1.0)
        per = L.kto_loss(pol, ref, want, beta=c.beta, z0=z0, lam_d=c.desirable_weight, lam_u=c.undesirable_weight)
        return (per * real).sum(axis=1), c.beta * ratio[:, 0], c.beta * ratio[:, 1], {}


def reference_logps(model, params, batches) -> list[np.ndarray]:
    """[B, 2] summed response log-probs of `params` for each paired batch: what `reference:
    stored` reads from the records (`ref_chosen_logp`, `ref_rejected_logp`), computed once.

    >>> logps = reference_logps(model, params, feed.eval_batches)       # doctest: +SKIP
    """
    fn = jax.jit(lambda p, b: DPO(model, DPOConfig()).sequence_logps(p, b, None)[0])
    return [np.asarray(fn(params, {k: jnp.asarray(v) for k, v in b.items()})) for b in batches]
