"""A reward model: a scalar head on the transformer, trained on preference pairs with the
Bradley-Terry loss (`objective.type: reward`).

The head (`params["heads"]["reward"]`: a [D] kernel and a bias, zero at init, so every reward
starts at 0 and the loss at ln 2) reads the final hidden state at the last response token of
each sequence. It is a parameter of the run like any other: trained (with the whole model, or
beside LoRA adapters), checkpointed, and saved with the adapter file. Metrics per pair:
`accuracy` (r_chosen > r_rejected), `margin`, `reward_chosen`, `reward_rejected`. Example::

    objective: {type: reward, margin: 0.0}
    r = RewardModel(model, RewardConfig()).rewards(params, batch)      # [B, 2]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlearn.config import ObjectiveConfig
from jaxlearn.data.preference import PAIR_FEATURES
from jaxlearn.objectives.forward import hidden_states, model_params
from jaxlearn.objectives.preference import PreferenceObjective
from jaxlearn.objectives.preference_losses import bradley_terry_loss


@dataclasses.dataclass(frozen=True)
class RewardConfig(ObjectiveConfig):
    """`reward`: Bradley-Terry on a scalar head; `margin` asks r_chosen - r_rejected > margin."""

    type: str = "reward"
    margin: float = 0.0


def last_response_index(loss_mask_bt: jax.Array) -> jax.Array:
    """[B] index of the last scored position of each row (0 for a row with none).

    >>> last_response_index(jnp.asarray([[0, 1, 1, 0], [1, 0, 0, 0]])).tolist()
    [2, 0]
    """
    t = loss_mask_bt.shape[-1]
    return t - 1 - jnp.argmax(jnp.flip(loss_mask_bt > 0, axis=-1), axis=-1)


class RewardModel(PreferenceObjective):
    Config = RewardConfig
    uses_reference = False

    def init_heads(self, key):
        d = self.model.cfg.d_model
        return {"reward": {"kernel": jnp.zeros((d,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}

    def head_axes(self):
        return {"reward": {"kernel": ("embed",), "bias": ()}}

    def rewards(self, params, batch, rng=None) -> jax.Array:
        """[B, 2] scalar rewards of the chosen and rejected replies."""
        b, two, t = batch["inputs"].shape
        flat = {k: batch[k].reshape(b * two, t) for k in PAIR_FEATURES}
        h = hidden_states(self.model, model_params(params), flat, rng)  # [2B, T, D]
        last = last_response_index(flat["loss_mask"])
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        head = params["heads"]["reward"]
        return (h_last @ head["kernel"] + head["bias"]).reshape(b, two)

    def loss(self, params, batch, rng, extras):
        pm = batch["pair_mask"].astype(jnp.float32)
        r = self.rewards(params, batch, rng)
        losses = bradley_terry_loss(r[:, 0], r[:, 1], margin=self.cfg.margin)
        s = lambda x: jnp.sum(x * pm)  # noqa: E731
        return s(losses), jnp.sum(pm), {"reward_chosen": s(r[:, 0]), "reward_rejected": s(r[:, 1]),
                                        "margin": s(r[:, 0] - r[:, 1]),
                                        "accuracy": s((r[:, 0] > r[:, 1]).astype(jnp.float32))}
