"""Which LoRA matmul runs: the `kernels: auto|pallas|xla` switch resolved against the backend.

    auto    Pallas on TPU (Mosaic) and GPU (Triton), the XLA reference on CPU
    pallas  Pallas everywhere; on CPU the TPU kernel in interpret mode (slow: for debugging)
    xla     the plain XLA path, everywhere

    plan = resolve("auto")           # on CPU: ("xla", False)
"""

from __future__ import annotations

import jax

CHOICES = ("auto", "pallas", "xla")


def resolve(kernels: str, backend: str | None = None) -> tuple[str, bool]:
    """(impl, interpret) for `lora_matmul`: impl in {"xla", "tpu", "gpu"}.

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
