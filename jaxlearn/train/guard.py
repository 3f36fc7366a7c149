"""Non-finite guards: NaN/inf never reaches the weights, a checkpoint, or a JSON file.

Three layers, each cheap:

* inside the compiled step (jaxlearn/train/step.py): `keep_if_not` keeps the old parameters
  and optimizer state when the loss or the gradient norm is not finite, and the step reports
  `nonfinite` = 1. With `train.on_nonfinite: stop` the loop then ends the run
  (`NonFiniteError`, exit 2 from the CLI); with `skip` (the default) it counts and carries on;
* before every checkpoint (jaxlearn/train/checkpoint.py): `state_is_finite` refuses to save a
  state holding NaN/inf, so a finite checkpoint is never rotated out by a broken one;
* in every JSON file (jaxlearn/train/metrics.py `json_safe`): NaN/inf are written as null.

Example::

    finite = jnp.isfinite(loss) & all_finite(new_params)
    params = keep_if_not(finite, new_params, old_params)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class NonFiniteError(ValueError):
    """Training produced a NaN/inf loss or gradient (train.on_nonfinite=stop), or a state to be
    saved holds NaN/inf. A user error: the fix is in the recipe (learning rate, warmup, clipping)."""


def all_finite(tree: Any) -> jax.Array:
    """Traceable: True when every floating-point leaf of `tree` is finite (integer leaves, such
    as an optimizer's step count, are always finite).

    >>> bool(all_finite({"a": jnp.ones(3), "n": jnp.zeros((), jnp.int32)}))
    True
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def keep_if_not(ok: jax.Array, new: Any, old: Any) -> Any:
    """Traceable: `new` where `ok`, else `old`, leaf by leaf (a select: no branch, no host sync).

    >>> keep_if_not(jnp.array(False), {"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"].tolist()
    [0.0, 0.0]
    """
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


_all_finite_jit = jax.jit(all_finite)


def state_is_finite(state: Any) -> bool:
    """Host-side check of a whole (sharded) state: one reduction and one scalar fetched.

    >>> state_is_finite({"w": jnp.array([1.0, jnp.nan])})
    False
    """
    return bool(_all_finite_jit(state))


def nonfinite_message(step: int, metrics: dict, last_checkpoint: int | None) -> str:
    """One paragraph for a run stopped by `train.on_nonfinite=stop`."""
    got = ", ".join(f"{k} {metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
    ckpt = (f"The last checkpoint (step {last_checkpoint}) holds finite weights; continue from it with --resume "
            "after the fix." if last_checkpoint is not None else "No checkpoint was written before it.")
    return (f"step {step}: the loss or gradient norm is not finite ({got}); the update was skipped and the run "
            f"stopped (train.on_nonfinite=stop). {ckpt} Lower optim.lr, raise optim.warmup_steps or set "
            "optim.clip_norm; or set train.on_nonfinite=skip to skip such steps and go on.")
