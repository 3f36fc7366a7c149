"""The pretrained-model tests run `transformers` models on CPU next to JAX (the SmolLM2 fixtures
are session fixtures in tests/conftest.py, shared with the tokenizer tests in tests/data/)."""

import torch

# One torch thread: with XLA's 8 virtual CPU devices in the same process, two torch threads on
# this 2-core machine made transformers' generate 10x slower (measured: 20 s against 1.9 s).
torch.set_num_threads(1)
