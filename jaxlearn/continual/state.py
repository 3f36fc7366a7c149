"""The sequence state: what a continual method keeps between tasks, and how a task's training updates it.

A state is a flat `{name: array}` saved as one `.npz` per task (`state_<i>.npz` under the
sequence directory, written atomically). Its names, by method (`<m>`: a module path such as
`layers/attn/q`, factors 2-D with the module's `layers` axis in front, stored unscaled):

| method | arrays | grows per task by |
|---|---|---|
| sequential | `lora/<m>/a`, `lora/<m>/b`: the one adapter | 0 |
| per_task | `task/<j>/<m>/a`, `task/<j>/<m>/b` | one LoRA |
| olora | `past_a/<m>` (past A's stacked), `merged/<m>` (sum of past updates) | the task's A |
| share | `basis_a/<m>`, `basis_b/<m>`; `coef/<j>/<m>/alpha`, `coef/<j>/<m>/beta` | the task's coefficients |
| ella | `w_past/<m>` (sum of past updates) | 0 |

Example::

    state = after_task(cfg, sites, {}, trained_heads, task=0)
    save_state(state, "runs/seq/state_0.npz")
    factors, deltas = served(cfg, sites, state, task=0)      # what answers task 0 now
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxlearn.peft import continual as cm
from jaxlearn.peft.filter import flat_paths


def save_state(state: dict, path: str | Path) -> Path:
    """Write `state` as `.npz` atomically (a temporary file renamed into place).

    >>> save_state({"w_past/q": np.zeros((2, 2))}, "/tmp/s.npz")       # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in state.items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def state_size(state: dict) -> tuple[int, int]:
    """(parameters, bytes) a state holds.

    >>> state_size({"a": np.zeros((2, 3), np.float32)})
    (6, 24)
    """
    return sum(int(np.size(v)) for v in state.values()), sum(int(np.asarray(v).nbytes) for v in state.values())


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _share_task_ids(state: dict) -> list[int]:
    return sorted({int(k.split("/")[1]) for k in state if k.startswith("coef/")})


def after_task(cfg, sites, state: dict, heads: dict, task: int) -> dict:
    """The state after training task `task`: `state` (before it) updated with the trained heads
    (`params["heads"]["continual"]` of the task's run). Pure: `state` is not changed.

    `cfg` is the task's `ContinualConfig`; `sites` its adapted modules.
    """
    flat = {k: _np(v) for k, v in flat_paths(heads).items()}
    scale = cfg.alpha / cfg.rank
    new = dict(state)
    method = cfg.method
    for site in sites:
        p = site.path
        if f"{p}/alpha" in flat:  # a Share task on an existing basis
            a, b = cm.share_factors(flat[f"{p}/basis_a"], flat[f"{p}/basis_b"], flat[f"{p}/alpha"], flat[f"{p}/beta"])
            if f"{p}/extra_a" in flat:  # the temporary extra rank joins the task's adapter
                a = jnp.concatenate([a, flat[f"{p}/extra_a"]], axis=-1)
                b = jnp.concatenate([b, flat[f"{p}/extra_b"]], axis=-2)
        else:
            a, b = flat[f"{p}/a"], flat[f"{p}/b"]
        a, b = _np(a), _np(b)
        if method == "sequential":
            new[f"lora/{p}/a"], new[f"lora/{p}/b"] = a, b
        elif method == "per_task":
            new[f"task/{task}/{p}/a"], new[f"task/{task}/{p}/b"] = a, b
        elif method == "ella":
            w = state.get(f"w_past/{p}")
            delta = cm.lora_delta(a, b, scale)
            new[f"w_past/{p}"] = _np(delta if w is None else cm.ella_update(w, delta))
        elif method == "olora":
            past = state.get(f"past_a/{p}")
            new[f"past_a/{p}"] = a if past is None else np.concatenate([past, a], axis=-1)
            merged = state.get(f"merged/{p}")
            delta = _np(cm.lora_delta(a, b, scale))
            new[f"merged/{p}"] = delta if merged is None else merged + delta
        elif method == "share":
            # Re-run the decomposition over every task's reconstructed adapter, then re-project
            # every task's coefficients onto the new bases (analytic; no replay of old data).
            old = [t for t in _share_task_ids(state) if t != task]
            a_list, b_list = [], []
            for t in old:
                ta, tb = cm.share_factors(state[f"basis_a/{p}"], state[f"basis_b/{p}"],
                                          state[f"coef/{t}/{p}/alpha"], state[f"coef/{t}/{p}/beta"])
                a_list.append(ta)
                b_list.append(tb)
            a_list.append(a)
            b_list.append(b)
            k = min(cfg.share_k, a.shape[-2], b.shape[-1])
            ua, ub, alphas, betas = cm.share_decompose(a_list, b_list, k)
            new[f"basis_a/{p}"], new[f"basis_b/{p}"] = _np(ua), _np(ub)
            for t, al, be in zip(old + [task], alphas, betas):
                new[f"coef/{t}/{p}/alpha"], new[f"coef/{t}/{p}/beta"] = _np(al), _np(be)
        else:
            raise ValueError(f"unknown continual method {method!r}")
    return new


def served(cfg, sites, state: dict, task: int) -> tuple[dict, dict]:
    """(factors {module: (a, b)}, merged deltas {module: dW}) that answer task `task` (a task seen
    so far) from `state`: its own adapter (per_task, Share: task id given), the one adapter
    (sequential) or every past update merged (O-LoRA, ELLA: no task id needed).

    >>> factors, deltas = served(cfg, sites, state, task=1)         # doctest: +SKIP
    """
    factors, deltas = {}, {}
    for site in sites:
        p = site.path
        if cfg.method == "sequential":
            factors[p] = (state[f"lora/{p}/a"], state[f"lora/{p}/b"])
        elif cfg.method == "per_task":
            factors[p] = (state[f"task/{task}/{p}/a"], state[f"task/{task}/{p}/b"])
        elif cfg.method == "share":
            factors[p] = tuple(_np(x) for x in cm.share_factors(
                state[f"basis_a/{p}"], state[f"basis_b/{p}"], state[f"coef/{task}/{p}/alpha"],
                state[f"coef/{task}/{p}/beta"]))
        elif cfg.method == "ella":
            deltas[p] = state[f"w_past/{p}"]
        elif cfg.method == "olora":
            deltas[p] = state[f"merged/{p}"]
    return factors, deltas
