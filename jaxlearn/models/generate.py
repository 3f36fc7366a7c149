"""Batched sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts are left-padded to a common length so every row decodes into the same cache slot;
padding has segment id 0 and is never attended to by real tokens. The whole decode loop is
one jitted `while_loop` that stops early once every row has hit a stop token. Example::

    out = generate(model, params, [[bos, 5, 6], [bos, 7]], SamplingConfig(max_new_tokens=16))
    out.tokens[0]  # the new tokens of the first prompt, stop token excluded
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

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


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _decode(model: Transformer, cfg: SamplingConfig, params: Any, tokens_bp, seg_bp, pos_bp, rng):
    b, p = tokens_bp.shape
    total = p + cfg.max_new_tokens
    cache = jax.tree.map(lambda a, axes: constrain(model.shard, a, axes),
                         init_cache(model.cfg, b, total), CACHE_AXES)
    logits, cache = model.apply({"params": params}, tokens_bp, pos_bp, seg_bp, cache=cache, cache_index=0)
    rng, sub = jax.random.split(rng)
    first = sample_logits(logits[:, -1], sub, cfg)
    out = jnp.full((b, cfg.max_new_tokens), cfg.pad_id, jnp.int32)
    stops = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    last_pos = pos_bp[:, -1]

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, done, out, rng = carry
        out = out.at[:, i].set(jnp.where(done, cfg.pad_id, tok))
        done = done | jnp.isin(tok, stops)
        pos = (last_pos + 1 + i)[:, None]
        logits, cache = model.apply({"params": params}, tok[:, None], pos, jnp.ones((b, 1), jnp.int32),
                                    cache=cache, cache_index=p + i)
        rng, sub = jax.random.split(rng)
        nxt = sample_logits(logits[:, -1], sub, cfg)
        return i + 1, nxt, cache, done, out, rng

    init = (jnp.int32(0), first, cache, jnp.zeros((b,), bool), out, rng)
    _, _, _, done, out, _ = jax.lax.while_loop(cond, body, init)
    return out, done


def generate(model: Transformer, params: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             rng: jax.Array | None = None) -> Generation:
    """Sample continuations of token-id prompts with a KV cache."""
    tokens, seg, pos = left_pad(prompts, cfg.pad_id)
    if tokens.shape[1] + cfg.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({tokens.shape[1]} padded) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"exceeds model.max_seq_len ({model.cfg.max_seq_len}); shorten one of them.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out, done = _decode(model, cfg, params, tokens, seg, pos, rng)
    out, done = np.asarray(out), np.asarray(done)
    result = []
    for row in out:
        toks = []
        for t in row.tolist():
            if t in cfg.stop_tokens:
                break
            toks.append(t)
        result.append(toks)
    return Generation(result, done.tolist())
