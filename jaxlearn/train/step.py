"""The ONE training step: `(state, batch) -> (state, metrics)`, pure, compiled once.

The method (pretraining, SFT, DPO, distillation, ...) enters only as the objective. Gradient
accumulation runs inside the compiled step as a scan over microbatches. Example::

    step = compile_train_step(objective, setup, batch_sharding, grad_accum=2)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlearn.objectives.lm import Objective
from jaxlearn.peft.filter import merge_params
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

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)

        def loss_sum(trainable, mb, r):
            total, weight, sums = objective(merge_params(trainable, state.frozen), mb, r)
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": total / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": weight,
            **{k: v / denom for k, v in sums.items()},
        }
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


def compile_train_step(objective: Objective, setup: StateSetup, batch_sharding: Any, grad_accum: int = 1):
    """jit the step with explicit in/out shardings; the old state's buffers are donated."""
    step = make_train_step(objective, setup.optimizer, setup.schedule, grad_accum)
    replicated = NamedSharding(batch_sharding.mesh, P()) if isinstance(batch_sharding, NamedSharding) else None
    return jax.jit(step, in_shardings=(setup.shardings, batch_sharding),
                   out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


def compile_eval_step(objective: Objective, setup: StateSetup, batch_sharding: Any):
    """jit `(trainable, frozen, batch) -> (loss_sum, weight)` for held-out evaluation."""

    def evaluate(trainable, frozen, batch):
        total, weight, _ = objective(merge_params(trainable, frozen), batch, None)  # None: no dropout
        return total, weight

    sh = setup.shardings
    return jax.jit(evaluate, in_shardings=(sh.trainable, sh.frozen, batch_sharding))
