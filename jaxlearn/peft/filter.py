"""The trainable filter: the one place that decides which parameters train.

Parameters are addressed by their path in the tree, joined with `/` (for example
`layers/attn/q/kernel`). A recipe lists regexes (`re.search` semantics; anchor with `^`/`$`);
a leaf trains if any pattern matches its path. The same split decides what is
differentiated, what has optimizer state and what a checkpoint of adapters holds. Example::

    trainable, frozen = split_params(params, ["lm_head", "final_norm"])
    params = merge_params(trainable, frozen)
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util


def flat_paths(tree: Any) -> dict[str, Any]:
    """`{"a/b/c": leaf}` for a nested dict of parameters."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten_paths(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def trainable_paths(paths: Sequence[str], patterns: Sequence[str]) -> set[str]:
    """Paths matched by any pattern. A pattern that matches nothing is an error.

    >>> sorted(trainable_paths(["a/kernel", "b/scale"], ["kernel$"]))
    ['a/kernel']
    """
    compiled = []
    for pat in patterns:
        try:
            compiled.append(re.compile(pat))
        except re.error as e:
            raise ValueError(f"trainable pattern {pat!r} is not a valid regex: {e}.") from None
    chosen = set()
    for pat, rx in zip(patterns, compiled):
        hits = {p for p in paths if rx.search(p)}
        if not hits:
            shown = "\n  ".join(sorted(paths)[:40])
            raise ValueError(f"trainable pattern {pat!r} matches no parameter. Available paths:\n  {shown}")
        chosen |= hits
    return chosen


def split_params(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """Split into (trainable, frozen) nested dicts with disjoint leaves."""
    flat = flat_paths(params)
    keep = trainable_paths(list(flat), patterns)
    trainable = {k: v for k, v in flat.items() if k in keep}
    frozen = {k: v for k, v in flat.items() if k not in keep}
    return unflatten_paths(trainable), unflatten_paths(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_params`."""
    flat = flat_paths(frozen)
    flat.update(flat_paths(trainable))
    return unflatten_paths(flat)
