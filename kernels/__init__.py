"""Pallas kernels for jaxlearn, importable as `jaxlearn.kernels` (never as a top-level `kernels`:
a different PyPI project owns that name).

Every kernel will sit beside its plain-XLA reference with a `custom_vjp`, and the linear seam
(`jaxlearn.models.layers.linear`) dispatches to it by backend and config. No kernel is required:
the XLA path is always there. The fused LoRA / quantized-base kernels are tracked in the kernels
issue; this package is intentionally empty until they land.
"""
