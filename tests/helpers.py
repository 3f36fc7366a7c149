"""Small shared builders for tests (tiny models and synthetic packed batches)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import ModelConfig


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0, n_docs: int = 1) -> dict:
    """A packed batch: each row holds `n_docs` documents of equal length, positions restart per doc."""
    rs = np.random.RandomState(seed)
    seg = np.repeat(np.arange(1, n_docs + 1), seq // n_docs)
    seg = np.pad(seg, (0, seq - len(seg)))  # trailing padding has segment 0
    pos = np.concatenate([np.arange(seq // n_docs)] * n_docs)
    pos = np.pad(pos, (0, seq - len(pos)))
    return {
        "inputs": rs.randint(1, vocab, (batch, seq)).astype(np.int32),
        "targets": rs.randint(1, vocab, (batch, seq)).astype(np.int32),
        "segment_ids": np.tile(seg, (batch, 1)).astype(np.int32),
        "positions": np.tile(pos, (batch, 1)).astype(np.int32),
        "loss_mask": np.tile(seg > 0, (batch, 1)).astype(np.float32),
    }


@functools.partial(jax.jit, static_argnums=0)
def logits_of(model, params, tokens, positions, segment_ids):
    """`model.apply(...)`'s logits under jit. Eager Flax runs op by op (slow on 2 cores); this one
    jitted function is shared by the tests, so an equal model at the same shapes compiles once."""
    return model.apply({"params": params}, tokens, positions, segment_ids)[0]


def reference_attention(q, k, v, mask):
    """Plain softmax attention, GQA by repeating the key/value heads: the independent reference
    the attention implementations are checked against. q [B, T, N, H], k/v [B, S, K, H], mask
    [B, 1, T, S] boolean."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
    logits = jnp.where(mask, logits, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
