"""Adapter files: save, list, load and swap adapters on their own, versioned, with metadata.

An adapter directory holds numbered versions `v1/`, `v2/`, ... each with `params/` (an orbax
checkpoint of exactly what the trainable filter selected: adapter leaves plus any extra
trainable weights such as `final_norm`) and `adapter.json` (method, hyperparameters, target
modules, the base model's fingerprint, jaxlearn version, training recipe, step). A version is
written into a temporary directory and renamed into place, so a crash never leaves half an
adapter. Loading onto a base whose fingerprint differs is refused. Example::

    path = save_adapter("runs/sft/adapters", trainable, frozen, peft_cfg, recipe=cfg_dict, step=500)
    params, meta = load_adapter(path, base_params)      # base untouched; adapters beside it
    params = swap_adapter(params, "runs/other/adapters/v2")
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.merge import ADAPTER_LEAF
from jaxlearn.perms import make_normal


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model."""


def fingerprint(params: dict, exclude: set[str] = frozenset()) -> str:
    """A stable hash of a parameter tree's paths, shapes, dtypes and values (16 hex digits).

    >>> fingerprint({"w": np.zeros(2)}) == fingerprint({"w": np.zeros(2)})
    True
    """
    h = hashlib.sha256()
    for path, leaf in sorted(flat_paths(params).items()):
        if path in exclude:
            continue
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{path}|{arr.shape}|{arr.dtype}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def _version() -> str:
    try:
        return importlib.metadata.version("jaxlearn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _versions(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in directory.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit())


def save_adapter(directory: str | Path, trainable: dict, frozen: dict, peft_cfg: Any, *,
                 recipe: dict | None = None, step: int | None = None) -> Path:
    """Write the next version under `directory`; returns its path (e.g. `.../v3`)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    version = (_versions(directory) or [0])[-1] + 1
    final = directory / f"v{version}"
    # The adapter is what trains plus the fixed adapter leaves beside it (the LoRA scale).
    frozen_flat = flat_paths(frozen)
    flat = {**{p: v for p, v in frozen_flat.items() if ADAPTER_LEAF.search(p)}, **flat_paths(trainable)}
    base_only = unflatten_paths({p: v for p, v in frozen_flat.items() if not ADAPTER_LEAF.search(p)})
    sites = sorted({p.rsplit("/", 1)[0] for p in flat if ADAPTER_LEAF.search(p)})
    meta = {
        "format": "jaxlearn-adapter/1",
        "method": peft_cfg.type,
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(peft_cfg).items()},
        "targets": sites,
        "leaves": {p: {"shape": list(np.shape(v)), "dtype": str(v.dtype)} for p, v in sorted(flat.items())},
        "base_fingerprint": fingerprint(base_only),
        "jaxlearn_version": _version(),
        "step": step,
        "recipe": recipe,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=directory))
    make_normal(tmp)  # mkdtemp makes it 0700; the renamed version directory must be readable like its files
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", jax.device_get(unflatten_paths(flat)))
        ckptr.wait_until_finished()
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    meta = path / "adapter.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a jaxlearn adapter (no adapter.json). Pass a version directory "
                                "such as runs/NAME/adapters/v1 (see `jaxlearn adapters list DIR`).")
    return json.loads(meta.read_text(encoding="utf-8"))


def list_adapters(directory: str | Path) -> list[tuple[Path, dict]]:
    """Every version under `directory`, oldest first, with its metadata."""
    directory = Path(directory)
    return [(directory / f"v{v}", read_metadata(directory / f"v{v}")) for v in _versions(directory)]


def resolve(path: str | Path) -> Path:
    """A version directory, or the latest version when given the adapters directory."""
    path = Path(path)
    if (path / "adapter.json").is_file():
        return path
    versions = _versions(path)
    if not versions:
        raise FileNotFoundError(f"no adapter versions (v1, v2, ...) under {path}.")
    return path / f"v{versions[-1]}"


def load_adapter(path: str | Path, base: dict) -> tuple[dict, dict]:
    """`base` with the adapter's leaves placed beside (or, for trained extras, over) its weights.

    Refused with `AdapterMismatchError` when the base's fingerprint differs from the one the
    adapter was trained on.
    """
    path = resolve(path)
    meta = read_metadata(path)
    base_flat = {p: v for p, v in flat_paths(base).items() if not ADAPTER_LEAF.search(p)}
    adapter_paths = set(meta["leaves"])
    got = fingerprint(unflatten_paths(base_flat), exclude=adapter_paths)
    if got != meta["base_fingerprint"]:
        raise AdapterMismatchError(
            f"adapter {path} was trained on a base with fingerprint {meta['base_fingerprint']}, but this base "
            f"has {got}. Load it onto the model it was trained from (recipe: "
            f"{(meta.get('recipe') or {}).get('model', 'unknown')}).")
    target = {p: jax.ShapeDtypeStruct(tuple(i["shape"]), np.dtype(i["dtype"])) for p, i in meta["leaves"].items()}
    restored = ocp.StandardCheckpointer().restore(path / "params", unflatten_paths(target))
    flat = dict(base_flat)
    flat.update(flat_paths(restored))
    return unflatten_paths(flat), meta


def swap_adapter(params: dict, path: str | Path, original_extras: dict | None = None) -> tuple[dict, dict]:
    """Replace the adapters on an already loaded base (no reload of the base weights).

    Adapter leaves are dropped and the new ones loaded; trained extras (e.g. a norm) can only
    be swapped back if `original_extras` holds the base's own values for them.
    """
    flat = {p: v for p, v in flat_paths(params).items() if not ADAPTER_LEAF.search(p)}
    if original_extras:
        flat.update(flat_paths(original_extras))
    return load_adapter(path, unflatten_paths(flat))
