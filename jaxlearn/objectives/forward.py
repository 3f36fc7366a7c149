"""Forward helpers every objective and the evaluation share: hidden states, logits, per-token
log-probabilities of the targets, and sums over a mask.

All take a model, its parameters and a token batch (`inputs`, `positions`, `segment_ids`, and
`targets`/`loss_mask` where scored). `rng` drives LoRA dropout in training; None (evaluation,
reference models) is deterministic. With `chunk` > 0 and a bare LM head, the [tokens, vocab]
logits never exist whole: they are made `chunk` tokens at a time (and re-made in the backward),
so DPO, PPO and distillation on large vocabularies cost one [chunk, vocab] block. Example::

    lp_bt = token_logprobs(model, params, batch)                 # [B, T] log p(target)
    seq_lp_b = masked_sum(lp_bt, batch["loss_mask"])             # [B] per-sequence sums
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlearn.models.transformer import plain_lm_head


def _rngs(rng):
    return {"dropout": rng} if rng is not None else None


def model_params(params: dict) -> dict:
    """The model's own parameters: objective-owned heads (`params["heads"]`) are not the model's."""
    return {k: v for k, v in params.items() if k != "heads"} if "heads" in params else params


def hidden_states(model, params: dict, batch: dict, rng: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [B, T, D].

    >>> h = hidden_states(model, params, batch)                  # doctest: +SKIP
    """
    h, _ = model.apply({"params": model_params(params)}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], rngs=_rngs(rng), return_hidden=True)
    return h


def logits(model, params: dict, batch: dict, rng: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, vocab] (whole; prefer `token_logprobs` when only targets matter).

    >>> logits(model, params, batch).shape                       # doctest: +SKIP
    (2, 16, 128)
    """
    out, _ = model.apply({"params": model_params(params)}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], rngs=_rngs(rng))
    return out


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (both [B, T], float32).

    >>> ce, log_z = token_cross_entropy(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1), jnp.int32))
    >>> round(float(ce[0, 0]), 4)  # ln 4
    1.3863
    """
    logits_btv = logits_btv.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def token_logprobs(model, params: dict, batch: dict, rng: jax.Array | None = None, *, chunk: int = 0,
                   hidden: jax.Array | None = None) -> jax.Array:
    """log p(targets[b, t] | inputs[b, :t+1]) [B, T], float32, differentiable.

    With `chunk` > 0 and a bare head (tied embedding, or an `lm_head` without adapters) the
    head runs `chunk` tokens at a time under `jax.checkpoint`: the backward recomputes each
    chunk's logits instead of keeping [tokens, vocab] of them. `hidden`: this batch's
    `hidden_states` when the caller has them already (a value head reads the same ones), so
    the trunk runs once.

    >>> lp = token_logprobs(model, params, batch, chunk=256)     # doctest: +SKIP
    >>> h = hidden_states(model, params, batch)                  # doctest: +SKIP
    >>> lp = token_logprobs(model, params, batch, hidden=h)      # doctest: +SKIP
    """
    head = plain_lm_head(model.cfg, model_params(params)) if chunk else None
    if head is None:
        if hidden is None:
            lg = logits(model, params, batch, rng)
        else:
            lg = model.apply({"params": model_params(params)}, hidden, rngs=_rngs(rng), method="logits")
        ce, _ = token_cross_entropy(lg, batch["targets"])
        return -ce
    h_btd = hidden_states(model, params, batch, rng) if hidden is None else hidden
    b, t, d = h_btd.shape
    w, transposed = head
    n = b * t
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_cd = jnp.pad(h_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t_c = jnp.pad(batch["targets"].reshape(n), (0, pad)).reshape(n_chunks, chunk)

    @jax.checkpoint
    def one(xs):
        h, tgt = xs
        dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
        lg = jax.lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32)
        ce, _ = token_cross_entropy(lg, tgt)
        return -ce

    return jax.lax.map(one, (h_cd, t_c)).reshape(-1)[:n].reshape(b, t)


def masked_sum(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Per-row sum of `x` over `mask` [B] (e.g. a response's log-prob from token log-probs).

    >>> masked_sum(jnp.ones((2, 3)), jnp.asarray([[1, 1, 0], [0, 0, 1]])).tolist()
    [2.0, 1.0]
    """
    return jnp.sum(x_bt * mask_bt.astype(x_bt.dtype), axis=-1)
