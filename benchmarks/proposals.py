"""Changes to files outside the benchmark's remit, applied by patching while the step is traced,
so their effect can be measured side by side (`train_throughput.py --variants`).

`no_block_skip` (measurement only): jaxlearn/models/transformer.py passes `causal=True` to
`attend` in training (no KV cache), so the CPU attention skips the key blocks above the
diagonal. This variant traces the model with `causal=False` instead (attention over all keys),
the baseline of that skipping.
"""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def _attend_with(causal):
    from jaxlearn.models import layers, transformer

    saved = transformer.attend
    transformer.attend = functools.partial(layers.attend, causal=causal)
    try:
        yield
    finally:
        transformer.attend = saved


def no_block_skip():
    """Trace the model with attention over all keys (`causal=False`)."""
    return _attend_with(False)


PROPOSALS = {"no_block_skip": no_block_skip}
