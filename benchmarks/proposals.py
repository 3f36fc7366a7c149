"""Changes to files outside the benchmark's remit, applied by patching while the step is traced,
so their effect can be measured before anyone edits those files (`train_throughput.py --variants`).

`causal_hint` (proposed): jaxlearn/models/transformer.py, `Attention.__call__`, would call
    out = attend(q, k, v, mask, cfg.attention, causal=True if layer_cache is None else None)
instead of `attend(q, k, v, mask, cfg.attention)`. Without a KV cache the mask is causal (with
a PEFT prefix, the P prefix keys are visible to all and the rest causal: still "no key after
slot i + S - T"), so the CPU attention may skip the key blocks above the diagonal without
checking the mask at run time first (which it otherwise does, `causal=None`).

`no_block_skip` (measurement only): `causal=False`, attention over all keys, the baseline of
the block skipping.
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


def causal_hint():
    """Trace the model as if transformer.py passed `causal=True` (training has no KV cache)."""
    return _attend_with(True)


def no_block_skip():
    """Trace the model with attention over all keys (`causal=False`)."""
    return _attend_with(False)


PROPOSALS = {"causal_hint": causal_hint, "no_block_skip": no_block_skip}
