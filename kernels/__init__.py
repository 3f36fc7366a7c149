"""Pallas kernels for jaxlearn, importable as `jaxlearn.kernels` (never as a top-level `kernels`:
a different PyPI project owns that name).

    lora.py        fused LoRA matmul y = x W + s (x A) B, forward + custom-VJP backward, TPU
                   (Mosaic) and GPU (Triton) kernels beside the XLA reference
    quant.py       int8 / NF4 quantized frozen bases (QLoRA): quantize, dequantize, tile dequant
    multi_lora.py  many adapters over one base, one per example (BGMV-style gather by index)
    dispatch.py    the `kernels: auto|pallas|xla` switch resolved against the backend

No kernel is required: the XLA reference is always there, and the linear seam
(`jaxlearn.models.layers.adapted_linear`) dispatches by backend and config. Modules import
nothing TPU- or GPU-specific at import time.
"""
