"""Completion marker + checksums for a checkpoint step directory.

orbax commits a step by renaming its temporary directory, so a kill mid-save leaves nothing
half-written; but a file deleted, truncated or corrupted afterwards (a full disk, a bad copy,
a stray `rm`) is only found by a long traceback deep in the restore. Once a step is complete,
jaxlearn writes `jaxlearn_manifest.json` beside it: the size and SHA-256 of every file. The
manifest is written last (via a temporary file and a rename), so its presence is the completion
marker and its content the checksum that `verify_step` checks before a restore. Example::

    write_manifest(Path("runs/x/checkpoints/40"))
    verify_step(Path("runs/x/checkpoints/40"))   # None: intact; else what is wrong
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "jaxlearn_manifest.json"
FORMAT = "jaxlearn-checkpoint-manifest/1"


def _files(step_dir: Path) -> dict[str, Path]:
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def has_manifest(step_dir: Path) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def write_manifest(step_dir: Path) -> Path:
    """Record size and SHA-256 of every file under `step_dir`; returns the manifest's path.

    >>> write_manifest(Path("runs/x/checkpoints/40")).name   # doctest: +SKIP
    'jaxlearn_manifest.json'
    """
    step_dir = Path(step_dir)
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(step_dir).items()}
    out = step_dir / MANIFEST
    tmp = step_dir / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)  # the marker appears whole or not at all
    return out


def verify_step(step_dir: Path) -> str | None:
    """What is wrong with the step directory according to its manifest, or None when intact.

    A step without a manifest (written before manifests existed, or killed between orbax's
    commit and the manifest) returns None here: only a restore can tell, see
    `Checkpointer.restore_newest`.

    >>> verify_step(Path("runs/x/checkpoints/40"))   # doctest: +SKIP
    'state/_METADATA is missing'
    """
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for rel, want in listed.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None
