"""A Llama-family decoder-only transformer in Flax, pure functional.

The forward pass is `Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)`:
a function of a parameter pytree and inputs, with no hidden state. A KV cache, when used, is
an explicit input and output. Example::

    model = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    params = init_params(model, jax.random.key(0))
    logits, _ = model.apply({"params": params}, tokens, positions, segment_ids)  # [B, T, vocab]

Parameter paths (with `scan_layers`, every layer weight has a leading `layers` axis)::

    embed/embedding                      [vocab, embed]
    layers/attn_norm/scale               [layers, embed]
    layers/attn/{q,k,v}/kernel           [layers, embed, heads|kv_heads, head_dim]
    layers/attn/o/kernel                 [layers, heads, head_dim, embed]
    layers/attn/{q,k,v}_bias             [layers, heads|kv_heads, head_dim]   (only with qkv_bias)
    layers/attn/{q,k}_norm/scale         [layers, head_dim]                   (only with qk_norm)
    layers/mlp_norm/scale                [layers, embed]
    layers/mlp/{gate,up}/kernel          [layers, embed, mlp]
    layers/mlp/down/kernel               [layers, mlp, embed]
    final_norm/scale                     [embed]
    lm_head/kernel                       [embed, vocab]   (absent with tied embeddings)

Without `scan_layers` the layers are `layers_0`, `layers_1`, ... with no leading axis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlearn.config import ModelConfig
from jaxlearn.models.layers import DTYPES, REMAT_POLICIES, Linear, RMSNorm, attend, attention_mask, linear, rope
from jaxlearn.sharding import ShardingContext, constrain, target_platform

Cache = dict[str, jax.Array]


class Attention(nn.Module):
    cfg: ModelConfig
    shard: ShardingContext | None = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, q_seg_bt, q_idx_bt, kv_seg_bs, layer_cache, cache_index, prefix=None):
        cfg = self.cfg
        hd = cfg.resolved_head_dim
        dt, pdt = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        proj = lambda feats, axes, n_in=1, std=cfg.init_std, name=None: Linear(  # noqa: E731
            feats, axes, n_in=n_in, init_std=std, dtype=dt, param_dtype=pdt, kernels=cfg.kernels,
            shard=self.shard, name=name)
        q = proj((cfg.n_heads, hd), ("embed", "heads", "head_dim"), name="q")(x_btd)
        k = proj((cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="k")(x_btd)
        v = proj((cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="v")(x_btd)
        if cfg.qkv_bias:  # Qwen2: biases on q/k/v only, added before RoPE
            bias = lambda name, axes, n: self.param(  # noqa: E731
                name, nn.with_logical_partitioning(nn.initializers.zeros, axes), (n, hd), pdt).astype(dt)
            q = q + bias("q_bias", ("heads", "head_dim"), cfg.n_heads)
            k = k + bias("k_bias", ("kv_heads", "head_dim"), cfg.n_kv_heads)
            v = v + bias("v_bias", ("kv_heads", "head_dim"), cfg.n_kv_heads)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's head_dim of q and k, after bias, before RoPE
            q = RMSNorm(cfg.norm_eps, dtype=dt, param_dtype=pdt, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, dtype=dt, param_dtype=pdt, name="k_norm")(k)
        pos_emb = lambda x: rope(x, positions_bt, cfg.rope_theta, cfg.rope_style,  # noqa: E731
                                 cfg.rope_scaling, cfg.max_seq_len)
        q = constrain(self.shard, pos_emb(q), ("act_batch", "act_seq", "act_heads", None))
        k = constrain(self.shard, pos_emb(k), ("act_batch", "act_seq", "act_kv_heads", None))
        v = constrain(self.shard, v, ("act_batch", "act_seq", "act_kv_heads", None))
        new_cache = None
        if layer_cache is not None:
            # Write this call's keys/values at cache_index, then attend over the whole cache.
            ck = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, cache_index, 0, 0))
            ck = constrain(self.shard, ck, ("act_batch", "act_cache_seq", "act_kv_heads", None))
            cv = constrain(self.shard, cv, ("act_batch", "act_cache_seq", "act_kv_heads", None))
            new_cache = {"k": ck, "v": cv}
            k, v = ck.astype(dt), cv.astype(dt)
        mask = attention_mask(q_seg_bt, q_idx_bt, kv_seg_bs)
        if prefix is not None:
            # Prefix/prompt tuning: P extra keys/values (already in rotated, post-RoPE space)
            # that every query sees; the real tokens' own keys, positions and mask are unchanged.
            b, n_pre = k.shape[0], prefix["k"].shape[1]
            pk = jnp.broadcast_to(prefix["k"].astype(k.dtype), (b,) + prefix["k"].shape[1:])
            pv = jnp.broadcast_to(prefix["v"].astype(v.dtype), (b,) + prefix["v"].shape[1:])
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            mask = jnp.concatenate([jnp.ones(mask.shape[:3] + (n_pre,), bool), mask], axis=-1)
        # Without a KV cache the mask never shows query i a key after slot i + S - T (causal, and
        # a prefix only adds keys in front), so the CPU attention may skip the blocks above the
        # diagonal (about a quarter of its work at T = 256).
        # `auto` resolves for the mesh's platform (the compile target), not the host's backend.
        # Without a cache or prefix, "same segment and causal" is the whole mask, which the
        # fused kernels (splash on TPU, flash on GPU) apply from the segment ids themselves.
        segments = (q_seg_bt, kv_seg_bs) if layer_cache is None and prefix is None else None
        out = attend(q, k, v, mask, cfg.attention, causal=layer_cache is None, platform=target_platform(self.shard),
                     segments=segments, shard=self.shard)
        out = constrain(self.shard, out, ("act_batch", "act_seq", "act_heads", None))
        # Output projections start smaller so the residual stream does not grow with depth (GPT-2).
        o = proj((cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2,
                 std=cfg.init_std / math.sqrt(2 * cfg.n_layers), name="o")(out)
        return o, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    shard: ShardingContext | None = None

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        dt, pdt = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        gate = Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, dtype=dt, param_dtype=pdt, kernels=cfg.kernels,
                      shard=self.shard, name="gate")(x_btd)
        up = Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, dtype=dt, param_dtype=pdt, kernels=cfg.kernels,
                    shard=self.shard, name="up")(x_btd)
        h = constrain(self.shard, nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return Linear((cfg.d_model,), ("mlp", "embed"), init_std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
                      dtype=dt, param_dtype=pdt, kernels=cfg.kernels, shard=self.shard, name="down")(h)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    shard: ShardingContext | None = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, q_seg_bt, q_idx_bt, kv_seg_bs, cache_index, layer_cache, prefix=None):
        cfg = self.cfg
        dt, pdt = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        norm = lambda name: RMSNorm(cfg.norm_eps, dtype=dt, param_dtype=pdt, name=name)  # noqa: E731
        a, new_cache = Attention(cfg, self.shard, name="attn")(
            norm("attn_norm")(x_btd), positions_bt, q_seg_bt, q_idx_bt, kv_seg_bs, layer_cache, cache_index, prefix)
        x = constrain(self.shard, x_btd + a, ("act_batch", "act_seq", "act_embed"))
        x = x + MLP(cfg, self.shard, name="mlp")(norm("mlp_norm")(x))
        x = constrain(self.shard, x, ("act_batch", "act_seq", "act_embed"))
        return x, new_cache


class Transformer(nn.Module):
    """Llama-family decoder. Returns (logits [B, T, vocab] float32, updated cache or None)."""

    cfg: ModelConfig
    shard: ShardingContext | None = None

    def setup(self):
        cfg = self.cfg
        dt, pdt = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                                 static_argnums=())
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = stack(cfg, self.shard)
        else:
            self.layers = [layer_cls(cfg, self.shard, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, dtype=dt, param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.lm_head = Linear((cfg.vocab_size,), ("embed", "vocab"), init_std=cfg.init_std, dtype=dt, param_dtype=pdt,
                                  kernels=cfg.kernels, shard=self.shard)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array,
                 cache: Cache | None = None, cache_index: jax.Array | int = 0, return_hidden: bool = False):
        h, new_cache = self.hidden(tokens_bt, positions_bt, segment_ids_bt, cache, cache_index)
        if return_hidden:
            return h, new_cache
        return self.logits(h), new_cache

    def hidden(self, tokens_bt, positions_bt, segment_ids_bt, cache=None, cache_index=0, prefix=None):
        """Final-norm hidden states [B, T, D] and the updated cache.

        `prefix` ({"k", "v"}: [layers, B or 1, P, kv_heads, head_dim]) adds keys/values every
        token sees; when None, it is derived from PEFT leaves (`prefix/kv`, `prefix/embedding`
        with its MLP, or a soft `prompt`) if the parameters hold any.
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        if prefix is None:
            prefix = self._peft_prefix(b)
        x = self.embed(tokens_bt)
        x = constrain(self.shard, x, ("act_batch", "act_seq", "act_embed"))
        if cache is None:
            q_idx = jnp.broadcast_to(jnp.arange(t), (b, t))
            kv_seg = segment_ids_bt
            layer_caches = None
        else:
            q_idx = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_bt.astype(cache["segment_ids"].dtype),
                                                  (0, cache_index))
            layer_caches = {"k": cache["k"], "v": cache["v"]}
        if cfg.scan_layers:
            x, stacked = self.layers(x, positions_bt, segment_ids_bt, q_idx, kv_seg, cache_index, layer_caches,
                                     prefix)
            new_layers = stacked
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                lc = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
                pre = None if prefix is None else jax.tree.map(lambda a: a[i], prefix)
                x, nc = layer(x, positions_bt, segment_ids_bt, q_idx, kv_seg, cache_index, lc, pre)
                outs.append(nc)
            new_layers = None if layer_caches is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        h = self.final_norm(x)
        new_cache = None if cache is None else {**new_layers, "segment_ids": kv_seg}
        return h, new_cache

    def _peft_prefix(self, batch: int) -> Cache | None:
        """Per-layer prefix keys/values from PEFT leaves, or None (see jaxlearn/peft/prefix.py)."""
        cfg = self.cfg
        params = self.variables.get("params", {})
        if "prefix" in params:
            pre = params["prefix"]
            if "kv" in pre:  # finalised prefix tuning: [layers, 2, P, kv_heads, head_dim]
                kv = pre["kv"]
            else:  # training-time reparametrisation: a small MLP maps P embeddings to all layers' K/V
                h = jnp.tanh(linear(pre["embedding"], pre["mlp_in"]))
                kv = linear(h, pre["mlp_out"]).reshape(
                    pre["embedding"].shape[0], cfg.n_layers, 2, cfg.n_kv_heads, cfg.resolved_head_dim)
                kv = kv.transpose(1, 2, 0, 3, 4)
            return {"k": kv[:, 0][:, None], "v": kv[:, 1][:, None]}
        if "prompt" in params:
            # Prompt tuning: the soft prompt only attends to itself, so its per-layer keys/values do
            # not depend on the input; compute them once (positions -P..-1, through the cache) and
            # let every document see them, as if the prompt were prepended to each document.
            soft = params["prompt"]["embedding"]  # [P, D]
            n = soft.shape[0]
            x = jnp.broadcast_to(soft.astype(self.embed.dtype), (batch, n, cfg.d_model))
            pos = jnp.broadcast_to(jnp.arange(-n, 0), (batch, n))
            seg = jnp.ones((batch, n), jnp.int32)
            _, cache = self._layers_from_embeddings(x, pos, seg, init_cache(cfg, batch, n))
            return {"k": cache["k"], "v": cache["v"]}
        return None

    def _layers_from_embeddings(self, x, positions_bt, segment_ids_bt, cache):
        """Run the layer stack on embeddings into an empty cache (for the soft prompt)."""
        b, t = segment_ids_bt.shape
        q_idx = jnp.broadcast_to(jnp.arange(t), (b, t))
        layer_caches = {"k": cache["k"], "v": cache["v"]}
        if self.cfg.scan_layers:
            x, new_layers = self.layers(x, positions_bt, segment_ids_bt, q_idx, segment_ids_bt, 0, layer_caches, None)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                x, nc = layer(x, positions_bt, segment_ids_bt, q_idx, segment_ids_bt, 0,
                              jax.tree.map(lambda a: a[i], layer_caches), None)
                outs.append(nc)
            new_layers = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, new_layers

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """LM head over hidden states, float32 logits [B, T, vocab]."""
        if self.cfg.tie_embeddings:
            out = linear(h_btd, self.embed.embedding, w_transposed=True)
        else:
            out = self.lm_head(h_btd)
        return constrain(self.shard, out.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))


def plain_lm_head(cfg: ModelConfig, params) -> tuple[jax.Array, bool] | None:
    """(head matrix, transposed?) of `Transformer.logits` when the head is a bare matrix: the tied
    embedding ([vocab, embed], transposed) or an `lm_head` kernel without adapters. None when
    PEFT leaves sit on the head, so only `logits` itself applies it.

    >>> plain_lm_head(ModelConfig(), {"embed": {"embedding": jnp.zeros((4, 2))}})[1]
    True
    """
    if cfg.tie_embeddings:
        return params["embed"]["embedding"], True
    head = params.get("lm_head", {})
    return (head["kernel"], False) if set(head) == {"kernel"} else None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache: k/v [layers, B, max_len, kv_heads, head_dim], segment ids [B, max_len]."""
    dtype = dtype or DTYPES[cfg.compute_dtype]
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


CACHE_AXES = {
    "k": ("layers", "act_batch", "act_cache_seq", "act_kv_heads", None),
    "v": ("layers", "act_batch", "act_cache_seq", "act_kv_heads", None),
    "segment_ids": ("act_batch", "act_cache_seq"),
}


def _dummy_inputs(batch: int = 1, seq: int = 8):
    tokens = jnp.zeros((batch, seq), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(seq), (batch, seq)), jnp.ones((batch, seq), jnp.int32)


def abstract_params(model: Transformer) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree, logical-axes tree) of the parameters, without allocating them."""
    boxed = jax.eval_shape(lambda k: model.init(k, *_dummy_inputs())["params"], jax.random.key(0))
    logical = nn.get_partition_spec(boxed)
    logical = jax.tree.map(lambda s: tuple(s), logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return nn.meta.unbox(boxed), logical


def fresh_params(model: Transformer, key: jax.Array) -> Any:
    """Freshly initialised (unboxed) parameters; call under jit to place them."""
    return nn.meta.unbox(model.init(key, *_dummy_inputs())["params"])


def init_params(model: Transformer, key: jax.Array, shardings: Any = None) -> Any:
    """Initialise parameters directly into `shardings` when given (no unsharded copy).

    >>> params = init_params(Transformer(ModelConfig(n_layers=1)), jax.random.key(0))
    """
    return jax.jit(lambda k: fresh_params(model, k), out_shardings=shardings)(key)
