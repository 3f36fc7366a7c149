"""KV-cache generation equals recomputing the full forward at every step; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import MeshConfig
from jaxlearn.models.generate import SamplingConfig, generate, left_pad, sample_logits
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for

from helpers import tiny_model_config

PROMPTS = [[1, 5, 6, 7], [1, 9], list(range(1, 20))]


def _recompute_greedy(model, params, prompt, n, stop=()):
    """Reference: the full forward over the whole sequence at every step, no cache.

    The sequence is right-padded to a fixed length (padding is segment 0, and attention is
    causal, so position i only sees tokens <= i): one compilation for every step.
    """
    total = len(prompt) + n
    forward = jax.jit(lambda t, s: model.apply({"params": params}, t, jnp.arange(total)[None], s)[0])
    seq = list(prompt)
    for _ in range(n):
        t = jnp.asarray([seq + [0] * (total - len(seq))], jnp.int32)
        seg = jnp.asarray([[1] * len(seq) + [0] * (total - len(seq))], jnp.int32)
        nxt = int(jnp.argmax(forward(t, seg)[0, len(seq) - 1]))
        if nxt in stop:
            break
        seq.append(nxt)
    return seq[len(prompt):]


def test_kv_cache_greedy_equals_full_recompute():
    model = Transformer(tiny_model_config(init_std=0.5))
    params = init_params(model, jax.random.key(1))
    out = generate(model, params, PROMPTS, SamplingConfig(max_new_tokens=12))
    for prompt, got in zip(PROMPTS, out.tokens):
        assert got == _recompute_greedy(model, params, prompt, 12)


def test_kv_cache_unrolled_layers_and_stop_tokens():
    model = Transformer(tiny_model_config(init_std=0.5, scan_layers=False))
    params = init_params(model, jax.random.key(2))
    free = generate(model, params, PROMPTS, SamplingConfig(max_new_tokens=10))
    stop = free.tokens[0][3]  # a token the first row really emits
    out = generate(model, params, PROMPTS, SamplingConfig(max_new_tokens=10, stop_tokens=(stop,)))
    assert out.stopped[0] and out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    for prompt, got in zip(PROMPTS, out.tokens):
        assert got == _recompute_greedy(model, params, prompt, 10, stop=(stop,))


def test_sharded_cache_generation_matches_single_device():
    cfg = tiny_model_config(init_std=0.5)
    mc = MeshConfig(preset="fsdp_tp", tensor=2)
    mesh = make_mesh(mc)
    model = Transformer(cfg, ShardingContext(mesh, rules_for(mc)))
    params = init_params(Transformer(cfg), jax.random.key(3))
    single = generate(Transformer(cfg), params, PROMPTS[:2] * 4, SamplingConfig(max_new_tokens=8))
    sharded = generate(model, params, PROMPTS[:2] * 4, SamplingConfig(max_new_tokens=8))
    assert single.tokens == sharded.tokens


def test_left_pad_positions():
    tokens, seg, pos = left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
    assert tokens.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert seg.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pos[:, -1].tolist() == [2, 0]


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 4)
    k2 = sample_logits(logits, keys[0], SamplingConfig(temperature=1.0, top_k=2))
    assert set(np.unique(k2).tolist()) == {0, 1}
    p = sample_logits(logits, keys[1], SamplingConfig(temperature=1.0, top_p=0.7))
    assert set(np.unique(p).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two
    p1 = sample_logits(logits, keys[2], SamplingConfig(temperature=1.0, top_p=0.4))
    assert set(np.unique(p1).tolist()) == {0}
    full = sample_logits(logits, keys[3], SamplingConfig(temperature=1.0))
    assert set(np.unique(full).tolist()) == {0, 1, 2, 3}


def test_single_prompt_on_eight_devices():
    """A batch the mesh cannot split (1 prompt, 8 devices) still generates, unsharded."""
    cfg = tiny_model_config(init_std=0.5)
    mc = MeshConfig(preset="fsdp")
    model = Transformer(cfg, ShardingContext(make_mesh(mc), rules_for(mc)))
    params = init_params(Transformer(cfg), jax.random.key(4))
    single = generate(Transformer(cfg), params, PROMPTS[:1], SamplingConfig(max_new_tokens=5))
    assert generate(model, params, PROMPTS[:1], SamplingConfig(max_new_tokens=5)).tokens == single.tokens
