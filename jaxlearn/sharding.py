"""Device meshes, logical-axis rules as data, and the helpers that turn names into shardings.

Every weight and key activation in jaxlearn is annotated with *logical* axis names drawn from a
small closed vocabulary. A preset's rules map those names onto the mesh axes
`("data", "fsdp", "tensor")`. Changing how a model is sharded means changing a table, never
the model code. Example::

    mesh = make_mesh(MeshConfig(preset="fsdp"))            # all devices on the fsdp axis
    rules = rules_for(MeshConfig(preset="fsdp"))
    spec = logical_to_spec(("embed", "mlp"), rules)         # PartitionSpec('fsdp', None)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlearn.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes: vocab, embed, mlp, heads, kv_heads, head_dim, layers, norm.
# Activation axes are prefixed `act_` so a weight's `embed` can be sharded (FSDP) while the
# activation's `act_embed` stays whole on each device.
LOGICAL_AXES = (
    "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm", "lora_rank", "adapter_dim",
    "lora_side",
    "act_batch", "act_seq", "act_embed", "act_mlp", "act_heads", "act_kv_heads", "act_vocab",
    "act_cache_seq",
)

Rules = tuple[tuple[str, Any], ...]

# `lora_side` is not a dimension name but a rule for LoRA factors (leaves with a `lora_rank`
# axis): lora_a [*in, r] and lora_b [r, *out] carry their base weight's names, so under fsdp
# (which shards only `embed`) half of them would stay replicated (q's B [r, heads, head_dim],
# o's A [heads, head_dim, r], ...). Its mesh axes go on the first dim of the factor's in/out
# side that has none yet and that they divide (never the rank, never `layers`); see
# `logical_to_spec`. On a big slice that is the difference between every chip holding every
# adapter and its optimizer moments, and 1/N of them. `mesh.rules: [[lora_side, null]]` turns it off.

# The presets. A logical axis missing from a table is replicated.
PRESET_RULES: dict[str, Rules] = {
    # Pure data parallel: weights replicated, the batch split over every device.
    "dp": (
        ("act_batch", ("data", "fsdp")),
    ),
    # ZeRO-3 style: weights and optimizer state sharded along `embed`, gathered per layer.
    "fsdp": (
        ("act_batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("lora_side", "fsdp"),
    ),
    # FSDP across one axis, Megatron-style tensor parallel across `tensor`: heads, the FFN
    # inner dimension and the vocabulary split; one all-reduce after attention and after the FFN.
    "fsdp_tp": (
        ("act_batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_vocab", "tensor"),
    ),
}


def rules_for(cfg: MeshConfig) -> Rules:
    """The preset's rules with the recipe's overrides in front (first match wins)."""
    extra = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.rules)
    for name, _ in extra:
        if name not in LOGICAL_AXES:
            raise ValueError(f"mesh.rules: unknown logical axis {name!r}; known axes: {', '.join(LOGICAL_AXES)}.")
    return extra + PRESET_RULES[cfg.preset]


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 entries so the product equals `n_devices`.

    dp puts every device on `data`; fsdp and fsdp_tp fill `fsdp` first.

    >>> mesh_shape(MeshConfig(preset="fsdp_tp", tensor=2), 8)
    {'data': 1, 'fsdp': 4, 'tensor': 2}
    """
    shape = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    if cfg.preset == "dp":
        shape["fsdp"] = 1 if shape["fsdp"] == -1 else shape["fsdp"]
        shape["tensor"] = 1 if shape["tensor"] == -1 else shape["tensor"]
    else:
        shape["data"] = 1 if shape["data"] == -1 else shape["data"]
    free = [k for k, v in shape.items() if v == -1]
    fixed = int(np.prod([v for v in shape.values() if v != -1]))
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}.")
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh: {n_devices} devices do not divide by the fixed axes {shape} (product {fixed}).")
        shape[free[0]] = n_devices // fixed
    if int(np.prod(list(shape.values()))) != n_devices:
        raise ValueError(f"mesh: shape {shape} needs {int(np.prod(list(shape.values())))} devices, have {n_devices}. "
                         "Set mesh.data/fsdp/tensor so their product is the device count, or use -1 for one of them.")
    return shape


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the mesh over `devices` (default: all), axes in `MESH_AXES` order.

    `devices` may be those of a TPU topology description (ahead-of-time compilation, see
    jaxlearn/pod/compile.py). With `cfg.slices > 1` the `data` axis spans the slices: the
    slow data-center network then only carries the data-parallel gradient all-reduce, while
    fsdp/tensor traffic stays on each slice's fast interconnect.

    >>> make_mesh(MeshConfig(preset="fsdp")).shape          # doctest: +SKIP
    OrderedDict([('data', 1), ('fsdp', 8), ('tensor', 1)])
    """
    devices = list(devices if devices is not None else jax.devices())
    if cfg.slices > 1:
        return _multislice_mesh(cfg, devices)
    shape = mesh_shape(cfg, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:  # topology-aware device order on TPU/GPU
        arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # CPU and unusual shapes: plain order is fine
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


def _multislice_mesh(cfg: MeshConfig, devices: list) -> Mesh:
    if len(devices) % cfg.slices:
        raise ValueError(f"mesh.slices={cfg.slices} does not divide the {len(devices)} devices.")
    per_slice = mesh_shape(cfg, len(devices) // cfg.slices)
    ici = tuple(per_slice[a] for a in MESH_AXES)
    dcn = (cfg.slices,) + (1,) * (len(MESH_AXES) - 1)  # only `data` crosses slices
    if all(hasattr(d, "slice_index") for d in devices):
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:  # CPU stand-ins have no slices: slice s is the s-th block of devices
        arr = np.asarray(devices).reshape(cfg.slices * ici[0], *ici[1:])  # as the hybrid mesh: s * data + i
    return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules, shape: Sequence[int] | None = None,
                    mesh_sizes: dict[str, int] | None = None) -> P:
    """Map logical axis names to a PartitionSpec. A mesh axis is used at most once per spec.

    A LoRA factor (axes holding `lora_rank`) also gets the `lora_side` rule's mesh axes on a
    dim of its in/out side (see PRESET_RULES): with `shape` and `mesh_sizes`, the first such dim
    they divide (none: replicated); without, the first such dim (what the dims' names imply).

    >>> fsdp = rules_for(MeshConfig(preset="fsdp"))
    >>> logical_to_spec(("layers", "lora_rank", "heads", "head_dim"), fsdp)
    P(None, None, 'fsdp', None)
    >>> logical_to_spec(("layers", "lora_rank", "heads", "head_dim"), fsdp, (2, 8, 4, 64), {"fsdp": 8})
    P(None, None, None, 'fsdp')
    """
    if axes is None:
        return P()
    table: dict[str, Any] = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = _mesh_names(target, used)
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    if "lora_rank" in axes:
        _shard_lora_side(axes, out, _mesh_names(table.get("lora_side"), used), shape, mesh_sizes)
    return P(*out)


def _mesh_names(target: Any, used: set[str]) -> tuple[str, ...]:
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(n for n in names if n not in used)


def _shard_lora_side(axes, out: list, names: tuple[str, ...], shape, mesh_sizes) -> None:
    """Put `names` (the `lora_side` rule's free mesh axes) on one unsharded dim of a LoRA
    factor's in/out side, in place: the first one they divide when the shape is known."""
    if not names:
        return
    free = [i for i, a in enumerate(axes) if a not in (None, "lora_rank", "layers") and out[i] is None]
    if shape is not None and mesh_sizes is not None:
        n = int(np.prod([mesh_sizes[m] for m in names]))
        free = [i for i in free if shape[i] % n == 0]
    if free:
        out[free[0]] = names[0] if len(names) == 1 else names


def named_sharding(mesh: Mesh, axes: Sequence[str | None] | None, rules: Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """`logical_to_spec` on `mesh`; with `shape`, rules that depend on sizes (`lora_side`) fit it."""
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, dict(mesh.shape)))


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x))


def tree_shardings(mesh: Mesh, logical_tree: Any, rules: Rules, shapes: Any = None) -> Any:
    """A tree of NamedShardings from a tree of logical-axis tuples (leaves are tuples or None).

    `shapes`: the same tree with arrays or ShapeDtypeStructs as leaves. Pass it whenever the
    tree may hold LoRA factors: the `lora_side` rule then only uses dims the mesh divides
    (without it, a factor's dim is chosen by name alone and jit refuses a size it does not divide).
    """
    if shapes is None:
        return jax.tree.map(lambda a: named_sharding(mesh, a, rules), logical_tree, is_leaf=_is_axes)
    return jax.tree.map(lambda a, x: named_sharding(mesh, a, rules, tuple(x.shape)), logical_tree, shapes,
                        is_leaf=_is_axes)


class ShardingContext:
    """What the model needs to constrain activations: the mesh and the rules, passed explicitly.

    `None` in place of a context means "no constraints" (single device, tests).
    """

    def __init__(self, mesh: Mesh, rules: Rules):
        self.mesh = mesh
        self.rules = rules

    @property
    def platform(self) -> str:
        """The platform the model is compiled for: that of the mesh's devices ("cpu", "gpu",
        "tpu"). Backend-dependent choices in the forward (`model.kernels`, `model.attention`)
        resolve against it, not against the host's backend: the fit check (jaxlearn/pod/compile.py)
        builds its mesh over TPU devices on a CPU-only machine and must compile the TPU program.
        """
        return self.mesh.devices.flat[0].platform

    def __hash__(self):
        return hash((self.mesh, self.rules))

    def __eq__(self, other):
        return isinstance(other, ShardingContext) and self.mesh == other.mesh and self.rules == other.rules

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Constrain by logical names. A dimension the mesh axes do not divide (a batch of 1
        on 8 devices when generating, say) is left unsharded rather than failing."""
        spec = logical_to_spec(axes, self.rules)
        fitted = []
        for dim, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            size = int(np.prod([self.mesh.shape[n] for n in names])) if names else 1
            fitted.append(entry if dim % size == 0 else None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*fitted)))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Sharding of a [batch, ...] array: split on the batch axes, rest replicated (a scalar:
        replicated)."""
        if ndim == 0:
            return NamedSharding(self.mesh, P())
        return named_sharding(self.mesh, ("act_batch",) + (None,) * (ndim - 1), self.rules)

    def batch_shardings(self, batch: Any) -> Any:
        """A sharding per batch leaf, from its rank alone: token rows [B, T], paired rows
        [B, 2, T] and per-row scalars [B] (rewards, labels) all split on the batch axis.

        >>> ctx.batch_shardings({"inputs": np.zeros((8, 16)), "reward": np.zeros(8)})   # doctest: +SKIP
        """
        return jax.tree.map(lambda x: self.batch_sharding(len(x.shape) if hasattr(x, "shape") else np.ndim(x)), batch)


def target_platform(ctx: ShardingContext | None) -> str | None:
    """`ctx.platform`, or None (the host's backend) for a model without a mesh."""
    return None if ctx is None else ctx.platform


def constrain(ctx: ShardingContext | None, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when there is no context."""
    return x if ctx is None else ctx.constrain(x, axes)
