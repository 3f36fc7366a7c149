"""`TrainState`: everything a step reads and writes, as one pytree, created in its shardings.

Example::

    setup = build_state(model, cfg, mesh, rules, total_steps=100)
    setup.state.step  # 0, with params already laid out over the mesh
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlearn.config import Config
from jaxlearn.models.transformer import Transformer, abstract_params, fresh_params
from jaxlearn.peft.attach import SEAM_METHODS, attach, attach_axes, find_sites, trainable_patterns
from jaxlearn.peft.filter import merge_params, split_params
from jaxlearn.sharding import Rules, tree_shardings
from jaxlearn.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    trainable: Any  # differentiated, has optimizer state
    frozen: Any  # no gradient, no optimizer state
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key, so checkpoints hold plain arrays

    @property
    def params(self) -> dict:
        return merge_params(self.trainable, self.frozen)


@dataclasses.dataclass
class StateSetup:
    """The state plus the static things built alongside it."""

    state: TrainState
    shardings: TrainState  # same structure, NamedSharding leaves
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    param_logical: Any  # logical axes of the full parameter tree


def state_shardings(mesh: Mesh, rules: Rules, param_logical: Any, patterns, optimizer, abstract_trainable,
                    param_shapes: Any = None) -> TrainState:
    """Shardings for every leaf of the state: params by their logical axes (and, given
    `param_shapes`, their sizes: LoRA factors shard only where the mesh divides them), optimizer
    moments like the parameter they belong to, scalars replicated."""
    param_sh = tree_shardings(mesh, param_logical, rules, param_shapes)
    train_sh, frozen_sh = split_params(param_sh, patterns)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, train_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh, rng=replicated)


def build_state(model: Transformer, cfg: Config, mesh: Mesh, rules: Rules, total_steps: int,
                params: Any | None = None, prompt_init_ids: Any | None = None,
                abstract: bool = False, objective: Any | None = None) -> StateSetup:
    """Create the initial state directly into its shardings (no unsharded copy on one device).

    `params`, when given (an imported checkpoint), is used instead of a fresh init. PEFT
    adapters from `cfg.peft` are attached and the tree is split by its trainable filter;
    `prompt_init_ids` start a soft prompt from those tokens' embeddings (prompt tuning).
    `abstract=True` allocates nothing: the state's leaves are `ShapeDtypeStruct`s carrying their
    shardings, traced from the same `create` function (ahead-of-time compilation of models too
    big for this machine, over devices that are not here; see jaxlearn/pod/compile.py).
    `objective`'s own parameters (`init_heads`, e.g. a reward head) join the tree under `heads`
    and always train.
    """
    optimizer, schedule = make_optimizer(cfg.optim, total_steps)
    base_abstract, base_logical = abstract_params(model)
    sites = find_sites(base_abstract, base_logical, cfg.peft) if cfg.peft.type in SEAM_METHODS else []
    peft_key = jax.random.PRNGKey(cfg.peft.seed)
    head_key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 2)
    add_heads = _heads_adder(objective, head_key)
    attached = jax.eval_shape(lambda p: add_heads(attach(p, cfg.peft, sites, peft_key, prompt_init_ids)),
                              base_abstract)
    logical = attach_axes(base_logical, cfg.peft, sites)
    patterns = trainable_patterns(cfg.peft)
    if "heads" in attached:
        logical = {**logical, "heads": objective.head_axes()}
        if not any(re.search(p, "heads/") for p in patterns):
            patterns = patterns + ["^heads/"]
    abstract_trainable, _ = split_params(attached, patterns)
    shardings = state_shardings(mesh, rules, logical, patterns, optimizer, abstract_trainable, attached)

    def create(key, given):
        full = given if given is not None else fresh_params(model, jax.random.fold_in(key, 0))
        full = add_heads(attach(full, cfg.peft, sites, peft_key, prompt_init_ids))
        trainable, frozen = split_params(full, patterns)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                          opt_state=optimizer.init(trainable), rng=jax.random.fold_in(key, 1))

    key = jax.random.PRNGKey(cfg.train.seed)
    if abstract:
        shapes = jax.eval_shape(create, key, params)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    else:
        state = jax.jit(create, out_shardings=shardings)(key, params)
    return StateSetup(state, shardings, optimizer, schedule, logical)


def _heads_adder(objective: Any | None, key: jax.Array):
    """params -> params with the objective's heads under `heads` (identity when it has none)."""
    if objective is None or jax.eval_shape(lambda: objective.init_heads(key)) is None:
        return lambda p: p

    def add(params):
        if "heads" in params:  # given parameters of a run that trained them (evaluation, export)
            return params
        return {**params, "heads": objective.init_heads(key)}

    return add
