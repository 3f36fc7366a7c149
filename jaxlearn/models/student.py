"""A shallower student built from a teacher's weights: which layers it keeps, and the copy.

`model.init_layers` (with `model.init_from` naming the teacher's checkpoint) selects them:

- `first`: the teacher's layers 0 .. n - 1 (n = the student's `model.n_layers`);
- `every_k`: every k-th layer, k = teacher depth // n: layers 0, k, 2k, ... (DistilBERT's
  "one layer out of two" at k = 2);
- `all`: no selection; the checkpoint's depth must equal the recipe's (the default).

The embedding, the final norm and the LM head are the teacher's. `student_params` copies
every leaf whose shape fits the student and keeps the student's own (fresh) init for the rest,
so a narrower student (another d_ff, say) still gets every leaf that matches. Example::

    ids = layer_ids("every_k", teacher_layers=30, student_layers=6)    # (0, 5, 10, 15, 20, 25)
    params = select_layers(teacher_params, ids, scan_layers=True)      # a 6-layer tree
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlearn.config import ConfigError

CHOICES = ("all", "first", "every_k")


def layer_ids(how: str, teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """The teacher layers a student of `student_layers` keeps (0-based, increasing).

    >>> layer_ids("every_k", 30, 6)
    (0, 5, 10, 15, 20, 25)
    >>> layer_ids("first", 30, 3)
    (0, 1, 2)
    """
    if how not in CHOICES:
        raise ConfigError(f"model.init_layers: {how!r} is not allowed; use one of {', '.join(map(repr, CHOICES))}.")
    if student_layers > teacher_layers or (how == "all" and student_layers != teacher_layers):
        raise ConfigError(f"model.n_layers={student_layers} cannot be taken from a checkpoint of {teacher_layers} "
                          f"layers with model.init_layers={how}; use model.n_layers<={teacher_layers} with "
                          "init_layers first or every_k.")
    if how == "every_k":
        k = teacher_layers // student_layers
        return tuple(i * k for i in range(student_layers))
    return tuple(range(student_layers))


def select_layers(params: dict, ids: tuple[int, ...], *, scan_layers: bool) -> dict:
    """`params` (a whole model's tree) with only the layers `ids`, renumbered 0.. in that order.

    With `scan_layers` the layer weights are stacked on a leading axis (`layers/...`), else they
    are `layers_0`, `layers_1`, ... Every other leaf (embedding, final norm, head) is kept.

    >>> p = {"layers": {"w": jnp.arange(4.0)[:, None]}, "final_norm": {"scale": jnp.ones(1)}}
    >>> select_layers(p, (0, 2), scan_layers=True)["layers"]["w"][:, 0].tolist()
    [0.0, 2.0]
    """
    if scan_layers:
        idx = jnp.asarray(ids, jnp.int32)
        return {k: (jax.tree.map(lambda a: jnp.take(a, idx, axis=0), v) if k == "layers" else v)
                for k, v in params.items()}
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out.update({f"layers_{j}": params[f"layers_{i}"] for j, i in enumerate(ids)})
    return out


def student_params(teacher_params: dict, ids: tuple[int, ...], fresh: dict, *, scan_layers: bool) -> tuple[dict, list[str]]:
    """(student params, paths kept from `fresh`): the teacher's layers `ids`, copied leaf by leaf
    wherever the shape equals the student's (`fresh`, its own init), else the fresh leaf.

    >>> t = {"layers": {"w": jnp.ones((4, 2))}, "embed": {"embedding": jnp.ones((8, 3))}}
    >>> f = {"layers": {"w": jnp.zeros((2, 2))}, "embed": {"embedding": jnp.zeros((8, 2))}}
    >>> p, kept = student_params(t, (0, 2), f, scan_layers=True)
    >>> float(p["layers"]["w"].sum()), kept
    (4.0, ['embed/embedding'])
    """
    picked = select_layers(teacher_params, ids, scan_layers=scan_layers)
    kept: list[str] = []

    def one(path, new):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        node = picked
        for k in path:
            node = node.get(getattr(k, "key", k)) if isinstance(node, dict) else None
        if node is not None and tuple(node.shape) == tuple(new.shape):
            return node.astype(new.dtype)
        kept.append(name)
        return new

    return jax.tree_util.tree_map_with_path(one, fresh), kept

