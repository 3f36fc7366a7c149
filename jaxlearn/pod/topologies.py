"""TPU generations and topologies: what a chip holds and computes, and its devices without a TPU.

With `libtpu` installed (`pip install 'jaxlearn[tpu]'`), JAX describes a real TPU slice on any
machine: `topology_devices("v5p:4x4x4")` returns the 64 devices of a v5p-128 slice (64 chips),
with their coordinates and hosts, over which a mesh can be built and a step compiled ahead of
time (jaxlearn/pod/compile.py). Example::

    gen = generation_of("v5e:2x4")     # TpuGeneration(name='v5e', hbm_gib=16, ...)
    devs = topology_devices("v5e:2x4") # 8 TPU v5 lite devices on 2 hosts

Numbers per chip, from Google's public Cloud TPU documentation (system architecture pages:
https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e and
https://cloud.google.com/tpu/docs/system-architecture-tpu-vm), as published in 2024-2025.
Usable HBM is slightly below the nominal figure (the runtime reserves some), so `compile`
warns above 90 % of it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxlearn.config import ConfigError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation. `chips_per_host`: chips per VM in multi-host slices."""

    name: str
    hbm_gib: float  # HBM per chip
    peak_bf16_tflops: float  # dense bf16 peak per chip
    chips_per_host: int
    ici_dims: int  # 3: 3-D torus (v4, v5p), 2: 2-D (v5e, v6e)
    device_kind: str  # what jax reports as `device.device_kind`
    pod_name: str  # how Cloud TPU names a slice: f"{pod_name}-{n}" (n: cores for v4/v5p, chips for v5e/v6e)

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GIB)


GENERATIONS: dict[str, TpuGeneration] = {
    # v4: 32 GiB HBM2, 275 TFLOP/s bf16, 4 chips per host, 3-D torus; slices named by cores (2 per chip).
    "v4": TpuGeneration("v4", 32, 275.0, 4, 3, "TPU v4", "v4"),
    # v5e: 16 GiB HBM2, 197 TFLOP/s bf16; multi-host slices have 4 chips per VM; 2-D torus.
    "v5e": TpuGeneration("v5e", 16, 197.0, 4, 2, "TPU v5 lite", "v5litepod"),
    # v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 4 chips per host, 3-D torus; slices named by cores.
    "v5p": TpuGeneration("v5p", 95, 459.0, 4, 3, "TPU v5", "v5p"),
    # v6e (Trillium): 32 GiB HBM, 918 TFLOP/s bf16; multi-host slices have 4 chips per VM.
    "v6e": TpuGeneration("v6e", 32, 918.0, 4, 2, "TPU v6 lite", "v6e"),
}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


class TopologyError(ConfigError):
    """A topology name jaxlearn cannot describe; the message lists valid ones."""


def parse_topology(name: str) -> tuple[TpuGeneration, tuple[int, ...]]:
    """`"v5p:4x4x4"` -> (the v5p facts, (4, 4, 4)): generation and chip grid.

    >>> parse_topology("v5e:2x4")[1]
    (2, 4)
    """
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise TopologyError(f"topology {name!r} is not GENERATION:AxB[xC]; e.g. v5e:2x4 (v5e-8), v5e:4x4 (v5e-16), "
                            f"v5p:4x4x4 (v5p-128, 64 chips), v4:2x2x1, v6e:4x4. Generations: {', '.join(GENERATIONS)}.")
    gen = GENERATIONS[m.group(1)]
    grid = tuple(int(x) for x in m.group(2).split("x"))
    if len(grid) != gen.ici_dims and not (gen.ici_dims == 3 and len(grid) == 2):
        raise TopologyError(f"topology {name!r}: {gen.name} chips form a {gen.ici_dims}-D grid; "
                            f"write {gen.ici_dims} sizes, e.g. {gen.name}:{'x'.join(['2'] * gen.ici_dims)}.")
    return gen, grid


def chip_count(name: str) -> int:
    """Chips in a topology: `chip_count("v5p:4x4x4") == 64`."""
    return math.prod(parse_topology(name)[1])


def slice_name(name: str, slices: int = 1) -> str:
    """The Cloud TPU accelerator type of a topology: `slice_name("v5p:4x4x4") == "v5p-128"`
    (v4/v5p count cores, two per chip; v5e/v6e count chips)."""
    gen, grid = parse_topology(name)
    n = math.prod(grid) * (2 if gen.name in ("v4", "v5p") else 1)
    return f"{gen.pod_name}-{n}" + (f" x {slices} slices" if slices > 1 else "")


def generation_of(name: str) -> TpuGeneration:
    return parse_topology(name)[0]


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of `slices` copies of topology `name`, described by libtpu (no TPU needed).

    Raises a clear error when libtpu is missing. The devices can build a `Mesh` and be the
    target of `jax.jit(...).lower(...).compile()`, but hold no memory and run nothing.
    """
    parse_topology(name)
    if slices < 1:
        raise TopologyError(f"slices must be >= 1, got {slices}.")
    try:
        import libtpu  # noqa: F401  (only to give a clear error; jax loads it itself)
    except ImportError:
        raise TopologyError("describing a TPU topology needs libtpu: pip install 'jaxlearn[tpu]' "
                            "(it installs jax[tpu]; no TPU is needed).") from None
    import os

    from jax.experimental import topologies

    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so two processes never drive one
    # TPU. Describing a topology drives nothing, so let it run beside a training job or another
    # check (and in parallel tests). Only effective before libtpu is first loaded here.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu's own message, e.g. an unsupported shape
        raise TopologyError(f"libtpu cannot describe topology {name!r}: {e}") from None
