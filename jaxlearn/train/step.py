"""The ONE training step: `(state, batch, extras) -> (state, metrics)`, pure, compiled once.

The method (pretraining, SFT, DPO, distillation, ...) enters only as the objective; frozen
extra models and buffers (a reference policy, a teacher) as `extras`, a sharded argument that
is never donated. Gradient accumulation runs inside the compiled step as a scan over
microbatches. A step whose loss or gradient norm is not finite changes nothing but the step
counter and the rng (metric `nonfinite` = 1; see jaxlearn/train/guard.py). Example::

    step = compile_train_step(objective, setup, batch_shardings, grad_accum=2, extras_shardings=ex.shardings)
    state, metrics = step(state, batch, ex.values)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlearn.objectives.base import Objective
from jaxlearn.peft.filter import merge_params
from jaxlearn.train.guard import all_finite, keep_if_not
from jaxlearn.train.state import StateSetup, TrainState


def _split_microbatches(batch: dict, n: int) -> dict:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches; "
                             "make data.batch_size a multiple of optim.grad_accum.")
        # Strided split ([n, B/n] with row i*n + j in microbatch j) keeps each microbatch spread
        # over every data-parallel shard instead of concentrating it on a few devices.
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1):
    """Build the pure step function (not yet jitted)."""

    def step(state: TrainState, batch: dict, extras: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)

        def loss_sum(trainable, mb, r):
            total, weight, sums = objective(merge_params(trainable, state.frozen), mb, r, extras)
            return total, (weight, sums)

        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
        if grad_accum == 1:
            (total, (weight, sums)), grads = grad_fn(state.trainable, batch, step_rng)
        else:
            mbs = _split_microbatches(batch, grad_accum)
            rngs = jax.random.split(step_rng, grad_accum)

            def body(acc, xs):
                mb, r = xs
                (t, (w, s)), g = grad_fn(state.trainable, mb, r)
                return jax.tree.map(jnp.add, acc, (t, w, s, g)), None

            zero_g = jax.tree.map(jnp.zeros_like, state.trainable)
            first = jax.eval_shape(lambda: grad_fn(state.trainable, jax.tree.map(lambda x: x[0], mbs), rngs[0]))
            zero_s = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first[0][1][1])
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_s, zero_g)
            (total, weight, sums, grads), _ = jax.lax.scan(body, init, (mbs, rngs))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss, grad_norm = total / denom, optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # The non-finite guard: a NaN/inf loss or gradient (or an update that overflows) must
        # never reach the weights, so the old parameters and optimizer state are kept. The step
        # counter and the rng still advance, so a resumed run replays exactly the same steps.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)
        trainable, opt_state = keep_if_not(finite, (trainable, opt_state), (state.trainable, state.opt_state))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": weight,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
            **{k: v / denom for k, v in sums.items()},
        }
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


def compile_train_step(objective: Objective, setup: StateSetup, batch_shardings: Any, grad_accum: int = 1,
                       extras_shardings: Any = None):
    """jit the step with explicit in/out shardings; the old state's buffers are donated, the
    batch and the frozen extras are not. `batch_shardings`: one sharding for every leaf, or a
    tree of them (`ShardingContext.batch_shardings`)."""
    step = make_train_step(objective, setup.optimizer, setup.schedule, grad_accum)
    replicated = NamedSharding(_mesh_of(batch_shardings), P())
    return jax.jit(step, in_shardings=(setup.shardings, batch_shardings, extras_shardings or {}),
                   out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


def compile_eval_step(objective: Objective, setup: StateSetup, batch_shardings: Any, extras_shardings: Any = None):
    """jit `(trainable, frozen, batch, extras) -> (loss_sum, weight, metric_sums)` for held-out
    evaluation (no dropout: rng is None)."""

    def evaluate(trainable, frozen, batch, extras):
        return objective(merge_params(trainable, frozen), batch, None, extras)

    sh = setup.shardings
    return jax.jit(evaluate, in_shardings=(sh.trainable, sh.frozen, batch_shardings, extras_shardings or {}))


def _mesh_of(shardings: Any):
    return jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
