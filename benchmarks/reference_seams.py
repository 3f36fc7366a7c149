"""The seams as they were before the CPU performance work (git 5cd41d7), kept for A/B runs.

`train_throughput.py --variants reference,current` patches these into the model so the old and
the new code are timed in the same process, on the same inputs, minutes apart. They are exact
copies of the original `attend`, `attention_mask`, `linear`, `token_cross_entropy` and the LM objective's loss.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def linear(x, w, n_in=1, w_transposed=False):
    w = w.astype(x.dtype)
    if w_transposed:
        dims = (((x.ndim - 1,), (w.ndim - 1,)), ((), ()))
    else:
        dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims)


def attention_mask(q_seg_bt, q_idx_bt, kv_seg_bs):
    kv_idx = jnp.arange(kv_seg_bs.shape[1])
    same = q_seg_bt[:, :, None] == kv_seg_bs[:, None, :]
    causal = kv_idx[None, None, :] <= q_idx_bt[:, :, None]
    return (same & causal)[:, None, :, :]


def attend(q_btnh, k_bskh, v_bskh, mask_b1ts, impl="auto", causal=False):
    del causal  # the original attended over every key
    b, t, n, h = q_btnh.shape
    kvh = k_bskh.shape[2]
    scale = h ** -0.5
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "dot_product_attention"
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
    g = n // kvh
    q = q_btnh.reshape(b, t, kvh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * scale
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask_b1ts[:, :, None, :, :], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


def token_cross_entropy(logits_btv, targets_bt):
    logits = logits_btv.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def lm_loss(self, params, batch, rng, extras):
    """The original LM objective's body, as `LMObjective.loss` (patched onto the class)."""
    del rng, extras
    cfg = self.cfg
    logits, _ = self.model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    ce, log_z = token_cross_entropy(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    loss = ce + cfg.z_loss * jnp.square(log_z) if cfg.z_loss else ce
    return jnp.sum(loss * mask), jnp.sum(mask), {"ce": jnp.sum(ce * mask)}


GROUPS = ("linear", "attention", "loss")


@contextlib.contextmanager
def patched(groups=GROUPS):
    """Trace the model with the reference seams of `groups` (patches the names the modules use)."""
    from jaxlearn.models import layers, transformer
    from jaxlearn.objectives import lm

    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown seam groups {sorted(unknown)}; known: {GROUPS}")
    targets = []
    if "linear" in groups:
        targets += [
            (layers, "linear", linear),  # `Linear` and the PEFT wrappers look `linear` up in layers' globals
            (transformer, "linear", linear),  # the tied LM head
        ]
    if "attention" in groups:
        targets += [(transformer, "attend", attend), (transformer, "attention_mask", attention_mask)]
    if "loss" in groups:
        targets += [
            (lm, "token_cross_entropy", token_cross_entropy),
            (lm.LMObjective, "loss", lm_loss),  # the objective's method, looked up at call time
        ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]
    try:
        for mod, name, fn in targets:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
