"""Prompt and prefix tuning: the soft prompt behaves exactly as if prepended to each document,
the real tokens' positions and masks are untouched, prefixes survive finalisation and work
with the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import PeftConfig
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.models.transformer import Transformer, init_cache, init_params
from jaxlearn.peft.attach import attach, finalize_prefix
from jaxlearn.peft.filter import flat_paths

from helpers import logits_of, tiny_model_config


def _model(scan=True):
    cfg = tiny_model_config(init_std=0.3, scan_layers=scan)
    model = Transformer(cfg)
    return cfg, model, init_params(model, jax.random.key(0))


def _logits(model, params, tokens, pos=None, seg=None):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if pos is None else pos
    seg = jnp.ones((b, t), jnp.int32) if seg is None else seg
    return logits_of(model, params, tokens, pos, seg)


@pytest.mark.parametrize("scan", [True, False])
def test_soft_prompt_equals_explicit_prepending(scan):
    cfg, model, base = _model(scan)
    pc = PeftConfig(type="prompt", num_virtual_tokens=5)
    params = attach(base, pc, [], jax.random.key(1), init_ids=jnp.asarray([3, 4, 5]))
    soft = params["prompt"]["embedding"]
    np.testing.assert_array_equal(soft[:3], base["embed"]["embedding"][jnp.asarray([3, 4, 5])])  # init from tokens
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, 128, (2, 9)), jnp.int32)
    got = _logits(model, params, tokens)
    # Reference: embeddings [soft prompt ; tokens] at positions [-5..-1 ; 0..8], one sequence
    # (under jit: eagerly the model runs op by op, slow).
    @jax.jit
    def reference(base, soft, tokens):
        emb = model.apply({"params": base}, tokens, method=lambda m, t: m.embed(t))
        x = jnp.concatenate([jnp.broadcast_to(soft, (2, 5, cfg.d_model)), emb], axis=1)
        pos = jnp.broadcast_to(jnp.arange(-5, 9), (2, 14))
        seg = jnp.ones((2, 14), jnp.int32)
        h, _ = model.apply({"params": base}, x, pos, seg, init_cache(cfg, 2, 14),
                           method=lambda m, *a: m._layers_from_embeddings(*a))
        return model.apply({"params": base}, h, method=lambda m, h: m.logits(m.final_norm(h)))[:, 5:]

    ref = reference(base, soft, tokens)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert not np.allclose(got, _logits(model, base, tokens), atol=1e-3)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packed_documents_each_see_the_prefix(method):
    _, model, base = _model()
    params = attach(base, PeftConfig(type=method, num_virtual_tokens=4), [], jax.random.key(2))
    if method == "prefix":  # make the prefixes matter
        params["prefix"]["mlp_out"] = params["prefix"]["mlp_out"] * 50
    rs = np.random.RandomState(1)
    a, b = rs.randint(1, 128, 6), rs.randint(1, 128, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    seg = jnp.asarray([[1] * 6 + [2] * 7])
    pos = jnp.asarray([list(range(6)) + list(range(7))])
    out = _logits(model, params, packed, pos, seg)
    np.testing.assert_allclose(out[0, :6], _logits(model, params, jnp.asarray(a[None], jnp.int32))[0], atol=2e-5)
    np.testing.assert_allclose(out[0, 6:], _logits(model, params, jnp.asarray(b[None], jnp.int32))[0], atol=2e-5)


def test_prefix_finalisation_keeps_the_forward_and_generation_uses_the_cache():
    cfg, model, base = _model()
    params = attach(base, PeftConfig(type="prefix", num_virtual_tokens=4, prefix_hidden=32), [], jax.random.key(3))
    params["prefix"]["mlp_out"] = params["prefix"]["mlp_out"] * 50
    final = finalize_prefix(params, cfg)
    assert set(flat_paths(final["prefix"])) == {"kv"} and final["prefix"]["kv"].shape == (2, 2, 4, 2, 16)
    tokens = jnp.asarray(np.random.RandomState(2).randint(1, 128, (2, 8)), jnp.int32)
    np.testing.assert_allclose(_logits(model, final, tokens), _logits(model, params, tokens), atol=2e-5)
    prompts = [[1, 5, 6], [1, 9, 10, 11]]
    out = generate(model, final, prompts, SamplingConfig(max_new_tokens=6))
    forward = jax.jit(lambda t, s: _logits(model, final, t, jnp.arange(12)[None], s))
    for prompt, got in zip(prompts, out.tokens):  # reference: full recompute with the prefix, no cache
        seq = list(prompt)
        for _ in range(6):  # right-padded to a fixed length (segment 0): one compilation
            t = jnp.asarray([seq + [0] * (12 - len(seq))], jnp.int32)
            s = jnp.asarray([[1] * len(seq) + [0] * (12 - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(forward(t, s)[0, len(seq) - 1])))
        assert got == seq[len(prompt):]
    assert out.tokens != generate(model, base, prompts, SamplingConfig(max_new_tokens=6)).tokens
