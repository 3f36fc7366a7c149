"""The chunked LM head + cross-entropy (objective.loss_chunk) equals the whole-logits loss:
values, gradients of hidden states and head (tied and untied), z-loss, masks, ragged chunks,
and a frozen head; and the objective uses it end to end."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.config import ConfigError
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.objectives.chunked_loss import chunked_head_loss
from jaxlearn.objectives.lm import LMConfig, LMObjective, token_cross_entropy

from helpers import random_batch, tiny_model_config


def _reference(h, w, targets, mask, transposed, z_loss):
    logits = h @ (w.T if transposed else w)
    ce, log_z = token_cross_entropy(logits, targets)
    return jnp.sum(mask * (ce + z_loss * jnp.square(log_z))), jnp.sum(mask * ce)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [4, 7, 64])  # divides N, ragged last chunk, one chunk > N
def test_matches_whole_logits_values_and_gradients(transposed, z_loss, chunk):
    ks = jax.random.split(jax.random.key(0), 4)
    n, d, v = 28, 16, 50
    h = jax.random.normal(ks[0], (n, d))
    w = jax.random.normal(ks[1], (v, d) if transposed else (d, v)) * 0.5
    targets = jax.random.randint(ks[2], (n,), 0, v)
    mask = (jax.random.uniform(ks[3], (n,)) > 0.3).astype(jnp.float32)
    got = chunked_head_loss(h, w, targets, mask, w_transposed=transposed, chunk=chunk, z_loss=z_loss)
    want = _reference(h, w, targets, mask, transposed, z_loss)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    def combo(f):  # both outputs get a cotangent, as loss and a differentiated metric would
        return lambda h, w: (lambda a, b: a + 0.25 * b)(*f(h, w))

    fused = combo(lambda h, w: chunked_head_loss(h, w, targets, mask, w_transposed=transposed, chunk=chunk,
                                                 z_loss=z_loss))
    plain = combo(lambda h, w: _reference(h, w, targets, mask, transposed, z_loss))
    for g, r in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _head_sized_products(fn, *args, shape=(16, 50)):
    """Number of dot_general equations (at any depth) whose output has the head's shape."""
    def walk(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) == shape:
                n += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += walk(sub)
        return n
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_frozen_head_gets_no_head_gradient_work():
    """Differentiating only the hidden states (a PEFT step: the head is frozen) builds no
    head-sized gradient; differentiating the head as well does."""
    h, w = jnp.ones((32, 16)), jnp.ones((16, 50)) * 0.1
    t, m = jnp.zeros(32, jnp.int32), jnp.ones(32)
    loss = lambda h, w: chunked_head_loss(h, w, t, m, w_transposed=False, chunk=8)[0]  # noqa: E731
    dh = jax.grad(loss)(h, w)
    np.testing.assert_allclose(dh, jax.grad(lambda h: _reference(h, w, t, m, False, 0.0)[0])(h), rtol=1e-5, atol=1e-6)
    assert _head_sized_products(jax.grad(loss), h, w) == 0
    assert _head_sized_products(jax.grad(loss, argnums=(0, 1)), h, w) == 1  # dW, once (in the chunk loop's body)


@pytest.mark.parametrize("tie", [True, False])
def test_objective_with_loss_chunk_equals_whole_logits(tie):
    cfg = tiny_model_config(tie_embeddings=tie)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0))
    batch = random_batch(2, 16, cfg.vocab_size, n_docs=2)
    whole = LMObjective(model, LMConfig(z_loss=1e-3))
    chunked = LMObjective(model, LMConfig(z_loss=1e-3, loss_chunk=10))

    def values_and_grads(obj):
        # The plain call (evaluation: the chunked loss computes only its sums) and the gradient,
        # in one compile: eagerly the model runs op by op (slow).
        return jax.jit(lambda p: (obj(p, batch, None), jax.grad(lambda q: obj(q, batch, None)[0])(p)))(params)

    (a, ga), (b, gb) = values_and_grads(whole), values_and_grads(chunked)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1])
    np.testing.assert_allclose(a[2]["ce"], b[2]["ce"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_negative_loss_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_chunk"):
        LMConfig(loss_chunk=-1)
