"""Which LoRA matmul runs: the `kernels: auto|pallas|xla` switch resolved against the platform
the program is compiled for (the *target*), which is not always the host's backend: the TPU fit
check (jaxlearn/pod/compile.py) compiles for TPU devices on a CPU-only machine.

    auto    Pallas on TPU (Mosaic) and GPU (Triton), the XLA reference on CPU
    pallas  Pallas everywhere; on CPU the TPU kernel in interpret mode (slow: for debugging)
    xla     the plain XLA path, everywhere

    plan = resolve("auto", "tpu")    # ("tpu", False): the Mosaic kernels, compiled
    plan = resolve("auto")           # by the host's backend; on this CPU: ("xla", False)

The model asks with its mesh's platform (`ShardingContext.platform`), so a step built over TPU
devices resolves for TPU wherever it is traced; `None` (a model without a mesh) means the host.
"""

from __future__ import annotations

import jax

CHOICES = ("auto", "pallas", "xla")


def resolve(kernels: str, backend: str | None = None) -> tuple[str, bool]:
    """(impl, interpret) for `lora_matmul`: impl in {"xla", "tpu", "gpu"}. `backend`: the
    target platform ("cpu", "tpu", "gpu", "cuda", "rocm"); None: `jax.default_backend()`.

    >>> resolve("auto", "tpu"), resolve("auto", "cpu"), resolve("pallas", "cpu")
    (('tpu', False), ('xla', False), ('tpu', True))
    """
    if kernels not in CHOICES:
        raise ValueError(f"model.kernels: {kernels!r} is not one of {CHOICES}; use auto (Pallas on TPU/GPU, "
                         f"XLA on CPU), pallas or xla.")
    backend = backend or jax.default_backend()
    if kernels == "xla":
        return "xla", False
    if backend == "tpu":
        return "tpu", False
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return ("tpu", True) if kernels == "pallas" else ("xla", False)


def describe(kernels: str, backend: str | None = None) -> str:
    """What `kernels` runs on `backend`, in words (the fit check's report).

    >>> describe("auto", "tpu"), describe("auto", "cpu"), describe("pallas", "cpu")
    ('pallas-tpu (Mosaic)', 'xla', 'pallas-tpu (interpret)')
    """
    impl, interpret = resolve(kernels, backend)
    if impl == "xla":
        return "xla"
    return f"pallas-{impl} ({'interpret' if interpret else 'Mosaic' if impl == 'tpu' else 'Triton'})"
