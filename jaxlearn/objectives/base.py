"""What a training method is: an objective of the one step, never a trainer of its own.

A method subclasses `Objective` and sets its typed config block (`Config`, a frozen dataclass
with a `type` field). Only `loss` is required; everything else is an optional seam:

- `loss(params, batch, rng, extras)` -> `(loss_sum, weight, metric_sums)`: the step divides the
  sums by the total weight over all microbatches (so gradient accumulation is exact), and
  training and held-out evaluation report the same `metric_sums`. `rng` is None in evaluation.
- `extras()`: frozen extra models and buffers (a DPO reference, a teacher of another depth,
  continual-learning penalty matrices), as `jaxlearn.train.extras` specs. They are loaded and
  sharded once, and enter the compiled step as non-donated arguments.
- `init_heads(key)` / `head_axes()`: objective-owned trainable parameters (a reward or value
  head, a projection), stored under `params["heads"]`: saved, sharded, exported and filtered as
  trainable like any other parameter.
- `prepare(batch, state)`: the seam between "next batch" and "step". It sees the global batch
  and the current state, so a method may add per-row features or call a jitted sampler on the
  current weights (rollouts). It runs for held-out batches too.
- `abstract_batch(batch_size, seq_len)`: the batch's shapes, for ahead-of-time compiles.

Example (a method in ~10 lines; `docs/architecture.md` has a complete one)::

    @dataclasses.dataclass(frozen=True)
    class MyConfig(ObjectiveConfig):
        type: str = "mine"
        scale: float = 1.0

    class Mine(Objective):
        Config = MyConfig

        def loss(self, params, batch, rng, extras):
            lp = token_logprobs(self.model, params, batch, rng)
            mask = batch["loss_mask"]
            return -self.cfg.scale * jnp.sum(lp * mask), jnp.sum(mask), {}
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import numpy as np

from jaxlearn.config import Config, ObjectiveConfig

LossOut = tuple[jax.Array, jax.Array, dict]


class Objective:
    """Base class of every training objective (see the module docstring for the seams)."""

    Config: ClassVar[type] = ObjectiveConfig
    # Evaluation reports exp(ce) (the metric, else exp(loss)) as perplexity: next-token losses in nats/token.
    reports_perplexity: ClassVar[bool] = False
    # Reads `data.format: unpaired` (single labelled replies, two to a row): KTO only; any other
    # objective is refused such data when it is built (registry.build_objective).
    reads_unpaired: ClassVar[bool] = False

    def __init__(self, model: Any, cfg: ObjectiveConfig, run: Config | None = None):
        self.model = model  # the policy Transformer (carries the sharding context)
        self.cfg = cfg  # this objective's typed config block
        self.run = run if run is not None else Config(objective=cfg)  # the whole recipe

    def loss(self, params: dict, batch: dict, rng: jax.Array | None, extras: dict) -> LossOut:
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def __call__(self, params: dict, batch: dict, rng: jax.Array | None = None, extras: dict | None = None) -> LossOut:
        return self.loss(params, batch, rng, {} if extras is None else extras)

    def extras(self) -> dict:
        """Frozen extra models/buffers this objective reads: {name: FrozenModel | Buffer}."""
        return {}

    def reference_extras(self) -> dict:
        """The reference policy as an extra, when it needs one: a frozen copy of the policy's
        starting weights for full or partial fine-tuning; nothing with adapters, where the
        reference is the base with adapters off (`reference_params`), at no second copy."""
        from jaxlearn.train.extras import FrozenModel

        run = self.run
        if run.peft.type != "none":
            return {}
        return {"reference": FrozenModel(self.model.cfg, seed=run.train.seed)}

    def reference_params(self, params: dict, extras: dict) -> dict:
        """The reference policy's parameters inside the step (see `reference_extras`)."""
        from jaxlearn.peft.merge import without_adapters

        ref = extras["reference"] if "reference" in extras else without_adapters(params)
        return jax.lax.stop_gradient(ref)

    def init_heads(self, key: jax.Array) -> dict | None:
        """Objective-owned trainable parameters (under `params["heads"]`), or None."""
        return None

    def head_axes(self) -> dict | None:
        """Logical axes of `init_heads`'s leaves (same tree, tuples of axis names)."""
        return None

    def prepare(self, batch: dict, state: Any) -> dict:
        """The global batch the step sees, from the feed's batch and the current state."""
        return batch

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        """{feature: ShapeDtypeStruct} of one global batch as the step sees it (ahead-of-time
        compiles): the feed's token batch through `prepare`, traced abstractly with no state.
        A `prepare` that needs the state (a rollout) overrides this."""
        from jaxlearn.data.batching import TOKEN_FEATURES

        fed = {k: jax.ShapeDtypeStruct((batch_size, seq_len), np.dtype(dt)) for k, dt in TOKEN_FEATURES.items()}
        return jax.eval_shape(lambda b: self.prepare(b, None), fed)
