"""`objective.type: continual`: next-token loss of one task of a continual sequence, with the method's
adapters and penalty (sequential LoRA, one LoRA per task, O-LoRA, Share, ELLA).

Each task of a sequence (`jaxlearn continual`, `jaxlearn/continual/`) is an ordinary
`jaxlearn train` run whose objective is this one. The method enters through the usual seams only:

- **heads** (`params["heads"]["continual"]`, one entry per adapted module, 2-D factors with the
  module's `layers` axis in front): what trains, `a [in, r]`/`b [r, out]` (a LoRA), or Share's
  `alpha [k, r]`/`beta [r, k]` (+ optional `extra_a`/`extra_b`, temporary extra rank) beside the
  **frozen** shared bases `basis_a [in, k]`/`basis_b [out, k]`. Which head leaves train is the
  project's trainable filter: the runner sets `peft.trainable=[CONTINUAL_TRAINABLE]` (every head
  leaf but `basis_*`), so the bases are frozen leaves of the state, without optimizer state.
- **frozen extras** (`Buffer`s, one per module): ELLA's `W_past` (the running sum of past
  updates); O-LoRA's past A factors (stacked) and the past updates merged. They are penalty
  inputs and, merged into the kernels in the forward, the past tasks' knowledge.
- the **loss**: the heads become `lora_a`/`lora_b`/`lora_scale` leaves beside the kernels (the
  linear seam applies them), the LM loss runs, and `lambda x penalty x tokens` is added, so after
  the step's division by the token count the penalty enters once per step (exact under gradient
  accumulation); metric `penalty`.

The state a task starts from (the previous tasks' bases, coefficients, buffers) is the sequence
state file `objective.state` (a `.npz` written by the runner between tasks,
`jaxlearn/continual/state.py`); it is read when the heads and extras are built, so a resumed
task rebuilds exactly the same ones. Example::

    cfg = load_config("configs/sft_lora_smollm2_wordnet.yaml", ["objective.type=continual",
          "objective.method=ella", "peft.type=none", f"peft.trainable=[{CONTINUAL_TRAINABLE}]"])
    train(cfg)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import ConfigError, ObjectiveConfig, PeftConfig
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import DEFAULT_LOSS_CHUNK
from jaxlearn.objectives.forward import model_params
from jaxlearn.objectives.lm import LMConfig, LMObjective
from jaxlearn.peft import continual as cm
from jaxlearn.peft.attach import Site, find_sites
from jaxlearn.peft.filter import flat_paths, unflatten_paths

METHODS = ("sequential", "per_task", "olora", "share", "ella")
# The trainable filter of a continual task: every head leaf except Share's shared bases. It must
# also match the bare prefix `heads/` (it does: the lookahead is empty there), or build_state would
# add `^heads/` and the bases would train.
CONTINUAL_TRAINABLE = r"^heads/(?!.*/basis_)"


@dataclasses.dataclass(frozen=True)
class ContinualConfig(ObjectiveConfig):
    """`continual`: one task of a continual-learning sequence (see the module docstring)."""

    type: str = "continual"
    method: Literal["sequential", "per_task", "olora", "share", "ella"] = "sequential"
    rank: int = 8  # LoRA rank of a task (Share: the coefficients' rank r)
    alpha: float = 16.0  # LoRA scale alpha / rank
    targets: tuple[str, ...] = ()  # module regexes (as peft.targets); empty: attention + MLP projections
    task: int = 0  # index of this task in the sequence (seeds its fresh factors)
    state: str = ""  # the sequence state (.npz) after the previous task; "" before the first
    olora_lambda: float = 0.5  # weight of sum_s |A_t^T A_s| (olora_norm)
    olora_norm: Literal["l1", "fro2"] = "l1"  # O-LoRA's code: L1; fro2: squared Frobenius
    ella_lambda: float = 1.0  # weight of ||dW_t (.) W_hat||_F^2
    ella_normalize: Literal["rms", "none"] = "rms"  # W_hat = W_past / rms(W_past) per matrix, or raw
    share_k: int = 8  # Share: size of the shared basis per side (in, out) of a matrix
    share_extra_rank: int = 0  # Share: temporary plain-LoRA rank trained beside the coefficients
    loss_chunk: int = DEFAULT_LOSS_CHUNK  # as objective.loss_chunk of `lm`

    def __post_init__(self):
        for name in ("rank", "share_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} must be >= 1 (e.g. 8).")
        for name in ("olora_lambda", "ella_lambda", "alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} must be >= 0.")
        if self.share_extra_rank < 0 or self.task < 0:
            raise ConfigError("objective.share_extra_rank and objective.task must be >= 0.")


def site_dims(site: Site) -> tuple[tuple[int, ...], int, int]:
    """(leading layers dims, flattened in, flattened out) of a site's kernel."""
    in_shape, out_shape, _, _ = site.split()
    return site.lead, math.prod(in_shape), math.prod(out_shape)


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a sequence state file ({} for "")."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"objective.state: {p} does not exist; it is written by `jaxlearn continual` after "
                          "each task. Leave it empty for the first task.")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def with_adapters(params: dict, sites: list[Site], factors: dict, deltas: dict, scale: float) -> dict:
    """`params` with, at every site, LoRA leaves from `factors[site.path] = (a [.., in, r], b [.., r, out])`
    and the dense `deltas[site.path]` ([.., in, out]) added to the kernel (merged past updates).

    >>> p = with_adapters(params, sites, {"layers/attn/q": (a, b)}, {}, scale=2.0)   # doctest: +SKIP
    """
    flat = flat_paths(params)
    for site in sites:
        in_shape, out_shape, _, _ = site.split()
        lead = site.lead
        kpath = f"{site.path}/kernel"
        kernel = flat[kpath]
        if site.path in deltas:
            flat[kpath] = (kernel.astype(jnp.float32)
                           + deltas[site.path].reshape(lead + in_shape + out_shape)).astype(kernel.dtype)
        if site.path in factors:
            a, b = factors[site.path]
            r = a.shape[-1]
            flat[f"{site.path}/lora_a"] = a.reshape(lead + in_shape + (r,)).astype(kernel.dtype)
            flat[f"{site.path}/lora_b"] = b.reshape(lead + (r,) + out_shape).astype(kernel.dtype)
            flat[f"{site.path}/lora_scale"] = jnp.full(lead, scale, jnp.float32)
    return unflatten_paths(flat)


class ContinualObjective(Objective):
    """The LM loss of one task, through the method's adapters, plus its penalty (metric `penalty`)."""

    Config = ContinualConfig
    reports_perplexity = True

    def __init__(self, model, cfg: ContinualConfig, run=None):
        super().__init__(model, cfg, run)
        peft = self.run.peft
        if peft.type != "none" or tuple(peft.trainable) != (CONTINUAL_TRAINABLE,):
            raise ConfigError(f"objective.type=continual trains its own adapters (objective heads): set "
                              f"peft.type=none and peft.trainable=['{CONTINUAL_TRAINABLE}'] (got peft.type="
                              f"{peft.type!r}, peft.trainable={list(peft.trainable)}). `jaxlearn continual` sets both.")
        self.lm = LMObjective(model, LMConfig(loss_chunk=cfg.loss_chunk), run)
        from jaxlearn.models.transformer import abstract_params

        shapes, logical = abstract_params(model)
        self.sites = find_sites(shapes, logical, PeftConfig(type="lora", targets=cfg.targets))
        self.carried = load_state(cfg.state)
        self.scale = cfg.alpha / cfg.rank
        self.share_basis = cfg.method == "share" and any(k.startswith("basis_a/") for k in self.carried)

    # ---- heads ------------------------------------------------------------------------------

    def _lora_init(self, key, site: Site, rank: int) -> tuple[jax.Array, jax.Array]:
        """LoRA's init (A uniform +-1/sqrt(fan_in), B zero): the task starts as the identity."""
        lead, n_in, n_out = site_dims(site)
        bound = 1.0 / math.sqrt(n_in)
        return (jax.random.uniform(key, lead + (n_in, rank), jnp.float32, -bound, bound),
                jnp.zeros(lead + (rank, n_out), jnp.float32))

    def init_heads(self, key):
        cfg, carried = self.cfg, self.carried
        key = jax.random.fold_in(key, 1000 + cfg.task)  # each task's fresh factors differ
        out = {}
        for i, site in enumerate(self.sites):
            k_site = jax.random.fold_in(key, i)
            p = site.path
            if cfg.method == "sequential" and f"lora/{p}/a" in carried:  # the one adapter, carried on
                out[f"{p}/a"], out[f"{p}/b"] = jnp.asarray(carried[f"lora/{p}/a"]), jnp.asarray(carried[f"lora/{p}/b"])
            elif self.share_basis:
                ua, ub = jnp.asarray(carried[f"basis_a/{p}"]), jnp.asarray(carried[f"basis_b/{p}"])
                k = ua.shape[-1]
                lead = site.lead
                ka, kx = jax.random.split(k_site)
                # alpha random, beta zero: dW starts at 0 but d/d(beta) = (x U_A alpha)^T ... != 0.
                # (Both zero would give zero gradients for both, forever.) Columns of U_A alpha then
                # have LoRA's init norm (~ sqrt(1/3)).
                out[f"{p}/alpha"] = jax.random.normal(ka, lead + (k, cfg.rank), jnp.float32) / math.sqrt(3 * k)
                out[f"{p}/beta"] = jnp.zeros(lead + (cfg.rank, k), jnp.float32)
                out[f"{p}/basis_a"], out[f"{p}/basis_b"] = ua, ub
                if cfg.share_extra_rank:
                    out[f"{p}/extra_a"], out[f"{p}/extra_b"] = self._lora_init(kx, site, cfg.share_extra_rank)
            else:  # a fresh LoRA: per_task, olora, ella, the first sequential/Share task
                out[f"{p}/a"], out[f"{p}/b"] = self._lora_init(k_site, site, cfg.rank)
        return {"continual": unflatten_paths(out)}

    def head_axes(self):
        # Replicated: the heads are small (and the 2-D factor views have no logical axis names).
        shapes = jax.eval_shape(lambda: self.init_heads(jax.random.PRNGKey(0)))
        return jax.tree.map(lambda a: (None,) * a.ndim, shapes)

    # ---- extras -----------------------------------------------------------------------------

    def extras(self):
        from jaxlearn.train.extras import Buffer

        cfg, carried, specs = self.cfg, self.carried, {}

        def buf(name, shape):
            have = carried.get(name)
            if have is not None and tuple(have.shape) != tuple(shape):
                raise ConfigError(f"objective.state: {name} has shape {have.shape}, this model needs {shape}; the "
                                  "state file belongs to another model or targets.")
            return Buffer(tuple(shape), "float32", None, (lambda h=have: h) if have is not None else None)

        for site in self.sites:
            lead, n_in, n_out = site_dims(site)
            if cfg.method == "ella":
                specs[f"w_past/{site.path}"] = buf(f"w_past/{site.path}", lead + (n_in, n_out))
            elif cfg.method == "olora":
                past = carried.get(f"past_a/{site.path}")
                width = past.shape[-1] if past is not None else 1  # one zero column: no past task
                specs[f"past_a/{site.path}"] = buf(f"past_a/{site.path}", lead + (n_in, width))
                specs[f"merged/{site.path}"] = buf(f"merged/{site.path}", lead + (n_in, n_out))
        return specs

    # ---- the loss ---------------------------------------------------------------------------

    def factors(self, heads: dict) -> dict:
        """{site path: (a, b)} of the task being trained, from the heads (Share: basis x coefficients)."""
        flat = flat_paths(heads)
        out = {}
        for site in self.sites:
            p = site.path
            if f"{p}/alpha" in flat:
                a, b = cm.share_factors(jax.lax.stop_gradient(flat[f"{p}/basis_a"]),
                                        jax.lax.stop_gradient(flat[f"{p}/basis_b"]), flat[f"{p}/alpha"],
                                        flat[f"{p}/beta"])
                if f"{p}/extra_a" in flat:
                    a = jnp.concatenate([a, flat[f"{p}/extra_a"]], axis=-1)
                    b = jnp.concatenate([b, flat[f"{p}/extra_b"]], axis=-2)
            else:
                a, b = flat[f"{p}/a"], flat[f"{p}/b"]
            out[p] = (a, b)
        return out

    def penalty(self, factors: dict, extras: dict) -> jax.Array:
        """The method's interference penalty (before lambda); 0 for sequential/per_task/share."""
        total = jnp.zeros((), jnp.float32)
        for p, (a, b) in factors.items():
            if self.cfg.method == "ella":
                total = total + cm.ella_penalty(cm.lora_delta(a, b, self.scale), extras[f"w_past/{p}"],
                                               self.cfg.ella_normalize)
            elif self.cfg.method == "olora":
                total = total + cm.olora_penalty(a, extras[f"past_a/{p}"], self.cfg.olora_norm)
        return total

    def loss(self, params, batch, rng, extras):
        cfg = self.cfg
        factors = self.factors(params["heads"]["continual"])
        deltas = {}
        if cfg.method == "ella":
            deltas = {s.path: extras[f"w_past/{s.path}"] for s in self.sites}
        elif cfg.method == "olora":
            deltas = {s.path: extras[f"merged/{s.path}"] for s in self.sites}
        adapted = with_adapters(model_params(params), self.sites, factors, deltas, self.scale)
        ce_sum, n_tokens, sums = self.lm(adapted, batch, rng, {})
        lam = {"ella": cfg.ella_lambda, "olora": cfg.olora_lambda}.get(cfg.method, 0.0)
        if not lam:
            return ce_sum, n_tokens, sums
        pen = self.penalty(factors, extras)
        # x tokens: the step divides by the token count, so the penalty counts once per step
        return ce_sum + lam * pen * n_tokens, n_tokens, {**sums, "penalty": pen * n_tokens}
