"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts are left-padded to a common length so every row decodes into the same cache slot;
padding has segment id 0 and is never attended to by real tokens. The whole decode loop is
one jitted `while_loop` that stops early once every row has hit a stop token.

Two entry points over the same loop:

- `sample` is the device-side sampler an RL batch source calls inside training: arrays in, a
  `Rollout` of device arrays out (tokens, their policy log-probs, masks), and `rollout_batch`
  turns prompt + rollout into the five token features of a training batch.
- `generate` is the host-side convenience: token-id lists in, token-id lists out. Example::

    out = generate(model, params, [[bos, 5, 6], [bos, 7]], SamplingConfig(max_new_tokens=16))
    out.tokens[0]  # the new tokens of the first prompt, stop token excluded
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.models.transformer import CACHE_AXES, Transformer, init_cache
from jaxlearn.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (stop token excluded)
    stopped: list[bool]  # whether each row hit a stop token


@flax.struct.dataclass
class Rollout:
    """What `sample` returns: device arrays, B rows, N = cfg.max_new_tokens columns.

    tokens    int32   [B, N]  sampled tokens, the stop token included; pad_id after it
    logprobs  float32 [B, N]  log p(token) under the model at temperature 1, without top-k/top-p
                              filtering: the policy log-prob a PPO/GRPO ratio needs, whatever
                              the sampling settings were. 0 where mask is 0
    mask      float32 [B, N]  1.0 on generated tokens up to and including the stop token
    done      bool    [B]     whether the row hit a stop token
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    done: jax.Array


def sample_logits(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Pick one token per row from float32 logits [B, V]."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / cfg.temperature
    neg = jnp.finfo(logits.dtype).min
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= cfg.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, ...]:
    """Left-pad to a length rounded up to `multiple` (fewer recompiles across prompt lengths).

    Returns tokens, segment ids (0 on padding) and positions (0 at each prompt's first token).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. the BOS token).")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    seg = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        seg[i, length - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, positions


def _pick(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Sample a token per row and its log-prob under the untempered, unfiltered logits."""
    tok_b = sample_logits(logits_bv, rng, cfg)
    logp_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bv, axis=-1), tok_b[:, None], axis=-1)[:, 0]
    return tok_b, logp_b


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def sample(model: Transformer, params: Any, tokens_bp: jax.Array, segment_ids_bp: jax.Array,
           positions_bp: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> Rollout:
    """Sample `cfg.max_new_tokens` tokens after left-padded prompts [B, P], all on device.

    One compiled prefill + `while_loop` over a KV cache (no host round trip per token), stopping
    early once every row has emitted a stop token. `params` are used as given, in whatever
    sharding they live (the current training weights, FSDP-sharded: no copy). The last prompt
    column must be a real token in every row (`left_pad` does this). Compiles once per
    (model, cfg, shapes). Example::

        tokens, seg, pos = left_pad([[bos, 5, 6], [bos, 7]], pad_id=0)
        ro = sample(model, params, tokens, seg, pos, jax.random.key(0), SamplingConfig(max_new_tokens=8))
        ro.tokens.shape, ro.logprobs.shape  # (2, 8), (2, 8)
    """
    b, p = tokens_bp.shape
    n = cfg.max_new_tokens
    if p + n > model.cfg.max_seq_len:
        raise ValueError(f"sampling: prompt ({p} padded) + max_new_tokens ({n}) "
                         f"exceeds model.max_seq_len ({model.cfg.max_seq_len}); shorten one of them.")
    cache = jax.tree.map(lambda a, axes: constrain(model.shard, a, axes), init_cache(model.cfg, b, p + n), CACHE_AXES)
    logits, cache = model.apply({"params": params}, tokens_bp, positions_bp, segment_ids_bp, cache=cache, cache_index=0)
    rng, sub = jax.random.split(rng)
    first = _pick(logits[:, -1], sub, cfg)
    stops = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    last_pos_b = positions_bp[:, -1]

    def cond(carry):
        i, _, _, done_b, _, _, _, _ = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        # Record the token picked last step, then feed it through the cache to pick the next.
        i, (tok_b, logp_b), cache, done_b, length_b, out_bn, logp_bn, rng = carry
        out_bn, logp_bn = out_bn.at[:, i].set(tok_b), logp_bn.at[:, i].set(logp_b)
        length_b = length_b + ~done_b  # rows already done stop growing (their writes get masked)
        done_b = done_b | jnp.isin(tok_b, stops)
        pos = (last_pos_b + 1 + i)[:, None]
        logits, cache = model.apply({"params": params}, tok_b[:, None], pos, jnp.ones((b, 1), jnp.int32),
                                    cache=cache, cache_index=p + i)
        rng, sub = jax.random.split(rng)
        return i + 1, _pick(logits[:, -1], sub, cfg), cache, done_b, length_b, out_bn, logp_bn, rng

    init = (jnp.int32(0), first, cache, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), rng)
    _, _, _, done_b, length_b, out_bn, logp_bn, _ = jax.lax.while_loop(cond, body, init)
    mask_bn = jnp.arange(n)[None, :] < length_b[:, None]
    return Rollout(tokens=jnp.where(mask_bn, out_bn, cfg.pad_id), logprobs=jnp.where(mask_bn, logp_bn, 0.0),
                   mask=mask_bn.astype(jnp.float32), done=done_b)


def rollout_batch(tokens_bp: jax.Array, segment_ids_bp: jax.Array, positions_bp: jax.Array,
                  rollout: Rollout) -> dict[str, jax.Array]:
    """Prompt + rollout as a training batch of the five token features, each [B, P + N].

    `inputs` is prompt then sampled tokens; `targets` is `inputs` shifted left by one (the last
    column's target is 0, masked). `loss_mask` is 1.0 exactly where the target is a
    generated token (`rollout.mask`), so `loss_mask[:, P - 1 + j]` scores `rollout.tokens[:, j]`.
    Segment id and position are 0 on left padding and on tokens after a stop. Jittable. Example::

        batch = rollout_batch(tokens, seg, pos, sample(model, params, tokens, seg, pos, rng, cfg))
        logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    """
    tokens_bp, segment_ids_bp, positions_bp = map(jnp.asarray, (tokens_bp, segment_ids_bp, positions_bp))
    b, n = rollout.tokens.shape
    live_bn = rollout.mask > 0
    inputs = jnp.concatenate([tokens_bp, rollout.tokens], axis=1)
    gen_pos_bn = positions_bp[:, -1:] + 1 + jnp.arange(n)[None, :]
    zero = jnp.zeros((b, 1), jnp.int32)
    return {
        "inputs": inputs,
        "targets": jnp.concatenate([inputs[:, 1:], zero], axis=1),
        "segment_ids": jnp.concatenate([segment_ids_bp, jnp.where(live_bn, segment_ids_bp[:, -1:], 0)], axis=1),
        "positions": jnp.concatenate([positions_bp, jnp.where(live_bn, gen_pos_bn, 0)], axis=1),
        # Target t is input t + 1: the first generated token is the target of the last prompt column.
        "loss_mask": jnp.concatenate([jnp.zeros((b, tokens_bp.shape[1] - 1), jnp.float32), rollout.mask,
                                      jnp.zeros((b, 1), jnp.float32)], axis=1),
    }


def generate(model: Transformer, params: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             rng: jax.Array | None = None) -> Generation:
    """Sample continuations of token-id prompts with a KV cache (host lists over `sample`)."""
    tokens, seg, pos = left_pad(prompts, cfg.pad_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    ro = jax.device_get(sample(model, params, tokens, seg, pos, rng, cfg))
    # A stopped row's last unmasked token is its stop token, which callers never see.
    lengths = ro.mask.sum(axis=1).astype(int) - ro.done
    return Generation([row[:k].tolist() for row, k in zip(ro.tokens, lengths)], ro.done.tolist())
