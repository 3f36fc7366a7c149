"""A multi-adapter batch equals running each example with its own adapter attached."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import PeftConfig
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.peft.attach import attach, find_sites
from jaxlearn.peft.filter import flat_paths, unflatten_paths
from jaxlearn.peft.merge import adapter_leaves
from jaxlearn.peft.multi import select_adapters, stack_adapters

from helpers import logits_of, random_batch, tiny_model_config


@pytest.mark.parametrize("scan", [True, False])
def test_multi_adapter_batch_equals_per_example_loop(scan):
    cfg = tiny_model_config(scan_layers=scan, init_std=0.2)
    model = Transformer(cfg)
    base = init_params(model, jax.random.key(0))
    abstract, logical = abstract_params(model)
    adapters = []
    for i, alpha in enumerate([8.0, 16.0, 32.0]):
        pc = PeftConfig(type="lora", rank=4, alpha=alpha)
        p = attach(base, pc, find_sites(abstract, logical, pc), jax.random.key(10 + i))
        flat = flat_paths(p)
        for j, k in enumerate(sorted(flat)):  # trained-looking adapters: B non-zero, fixed keys
            if k.endswith("lora_b"):
                flat[k] = 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(100 + i), j), flat[k].shape)
        adapters.append(unflatten_paths(flat))
    bank = stack_adapters([adapter_leaves(a) for a in adapters])
    ids = jnp.asarray([2, 0, 1, 2])
    batch = random_batch(4, 12, 128, seed=3, n_docs=2)
    mixed = select_adapters(base, bank, ids)
    out = logits_of(model, mixed, batch["inputs"], batch["positions"], batch["segment_ids"])
    for b, i in enumerate(ids.tolist()):
        ref = logits_of(model, adapters[i], batch["inputs"][b:b + 1], batch["positions"][b:b + 1],
                        batch["segment_ids"][b:b + 1])
        np.testing.assert_allclose(out[b], ref[0], atol=2e-5)


def test_stacking_refuses_mismatched_adapters():
    with pytest.raises(ValueError, match="different leaves"):
        stack_adapters([{"a": {"lora_a": jnp.zeros(2)}}, {"b": {"lora_a": jnp.zeros(2)}}])
