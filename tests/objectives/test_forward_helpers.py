"""The shared forward helpers: per-token log-probs (whole and chunked head) and masked sums
agree with an independent log-softmax of the model's logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.objectives.forward import logits, masked_sum, token_logprobs


@pytest.mark.parametrize("tie", [True, False])
def test_token_logprobs_match_log_softmax_whole_and_chunked(tie):
    model = Transformer(tiny_model_config(tie_embeddings=tie))
    params = init_params(model, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(3, 10, 128, seed=1, n_docs=2).items()}
    # jitted: one compile per variant instead of many op-by-op ones
    ref = jax.jit(lambda p: jnp.take_along_axis(jax.nn.log_softmax(logits(model, p, batch)),
                                                batch["targets"][..., None], -1)[..., 0])(params)
    lp = jax.jit(lambda p, chunk: token_logprobs(model, p, batch, chunk=chunk), static_argnums=1)
    for chunk in (0, 7, 64):  # whole; ragged chunks over 30 tokens; one chunk
        np.testing.assert_allclose(lp(params, chunk), ref, atol=2e-5)

    def seq_lp(p, chunk):
        return jnp.sum(masked_sum(token_logprobs(model, p, batch, chunk=chunk), batch["loss_mask"]) * jnp.arange(1, 4))

    grad = jax.jit(jax.grad(seq_lp), static_argnums=1)
    g_whole, g_chunk = grad(params, 0), grad(params, 7)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_masked_sum_counts_only_the_mask():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(masked_sum(x, jnp.asarray([[1, 0, 1], [0, 0, 0]])), [2.0, 0.0])
