"""Frozen extras of the step: reference policies, teachers, buffers, loaded and sharded once.

An objective lists what it reads (`Objective.extras()`), by name:

- `FrozenModel(model_cfg, init_from)`: a whole model of any shape or depth (same tokenizer),
  with weights from a preset, a .gguf file, a Hugging Face directory or a jaxlearn run
  directory (adapters folded in), or a fresh init from `seed` when nothing is named.
- `Buffer(shape, dtype, axes, init)`: an array such as a continual-learning penalty matrix.

`build_extras` lays every leaf out by its logical axes with the policy's sharding rules, so
a teacher shards like the student. The compiled step takes them as one non-donated argument
(never a captured constant, which would be copied into the program and recompiled on change).
On resume they are reloaded from the same specs (they never change during a run).
With PEFT, the reference policy is the base with adapters off (`jaxlearn.peft.merge.base_leaves`
of the policy's own parameters): it needs no extra at all. Example::

    specs = {"teacher": FrozenModel(ModelConfig(n_layers=4), init_from="runs/big")}
    extras = build_extras(specs, shard)
    step(state, batch, extras.values)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import ConfigError, ModelConfig
from jaxlearn.models.transformer import Transformer, abstract_params, fresh_params
from jaxlearn.sharding import ShardingContext, named_sharding, tree_shardings


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen model the objective reads (reference policy, teacher). `init_from` overrides
    `model.init_from`; with neither, the weights are a fresh init from `seed` (derived as the
    trainer derives the policy's from `train.seed`)."""

    model: ModelConfig
    init_from: str = ""
    seed: int = 0

    @property
    def source(self) -> str:
        return self.init_from or self.model.init_from


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A frozen array. `axes`: its logical axes (None: replicated); `init`: () -> host array
    (default zeros)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    axes: tuple[str | None, ...] | None = None
    init: Callable[[], Any] | None = None


@dataclasses.dataclass
class Extras:
    """Loaded extras: `values` (the step's argument), their `shardings`, and the `modules`
    (a `Transformer` per FrozenModel, sharing the policy's sharding context)."""

    values: dict
    shardings: dict
    modules: dict

    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self.values))


def build_extras(specs: dict, shard: ShardingContext, *, abstract: bool = False) -> Extras:
    """Load (or, with `abstract`, only describe as sharded ShapeDtypeStructs) every extra.

    >>> build_extras({}, shard).values
    {}
    """
    values, shardings, modules = {}, {}, {}
    mesh, rules = shard.mesh, shard.rules
    for name, spec in specs.items():
        if isinstance(spec, FrozenModel):
            module = Transformer(spec.model, shard)
            shapes, logical = abstract_params(module)
            sh = tree_shardings(mesh, logical, rules)
            if abstract:
                value = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)
            else:
                value = _load_model(name, spec, module, sh, mesh, rules)
            modules[name] = module
        elif isinstance(spec, Buffer):
            sh = named_sharding(mesh, spec.axes, rules)
            if abstract:
                value = jax.ShapeDtypeStruct(tuple(spec.shape), jnp.dtype(spec.dtype), sharding=sh)
            else:
                host = np.zeros(spec.shape, spec.dtype) if spec.init is None else np.asarray(spec.init(), spec.dtype)
                if host.shape != tuple(spec.shape):
                    raise ValueError(f"extra {name!r}: init gave shape {host.shape}, the spec says {tuple(spec.shape)}.")
                value = jax.device_put(host, sh)
        else:
            raise TypeError(f"extra {name!r}: expected a FrozenModel or a Buffer spec, got {type(spec).__name__}.")
        values[name], shardings[name] = value, sh
    return Extras(values, shardings, modules)


def _load_model(name: str, spec: FrozenModel, module: Transformer, sh: Any, mesh, rules) -> Any:
    source = spec.source
    if not source:  # a fresh model, deterministic in its seed (so a resumed run reloads the same)
        # the key derivation of `build_state`: FrozenModel(cfg.model, seed=cfg.train.seed) is
        # exactly the policy's initial weights
        key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), 0)
        return jax.jit(lambda k: fresh_params(module, k), out_shardings=sh)(key)
    if (Path(source) / "config.yaml").is_file():  # a jaxlearn run: its latest weights, adapters folded in
        from jaxlearn.peft.merge import merge
        from jaxlearn.run import open_run

        run = open_run(source)
        params = merge({k: v for k, v in run.params.items() if k not in ("heads", "prefix", "prompt")})
        want = jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: params))
        have = jax.tree.map(lambda a: a.shape, abstract_params(module)[0])
        if want != have:
            raise ConfigError(f"extra {name!r}: run {source} holds a model of another shape than its spec; give the "
                              f"extra the run's model block ({source}/config.yaml, `model:`).")
        return jax.device_put(params, sh)
    from jaxlearn.models.presets import init_params

    return init_params(dataclasses.replace(spec.model, init_from=source), mesh, rules)
