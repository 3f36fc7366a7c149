"""LoRA as augmented GEMMs (jaxlearn/models/lora_linear.py): the same values and gradients as
the unmerged x W + (x A)(s B), the path choice, and what remat policies keep of it."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.models.layers import PROJ_NAME, REMAT_POLICIES, adapted_linear
from jaxlearn.models.lora_linear import augmented_wins, lora_linear
from jaxlearn.peft.filter import flat_paths

from helpers import random_batch
from test_peft_invariants import _attached, _forward, _perturb

# (x shape, n_in, kernel shape): a plain projection, q-like (several output dims), o-like
# (two contracted input dims), and a ragged one.
SHAPES = [((4, 32, 24), 1, (24, 40)), ((2, 16, 24), 1, (24, 3, 8)), ((2, 16, 3, 8), 2, (3, 8, 24)),
          ((3, 7, 13), 1, (13, 5))]


def _operands(x_shape, n_in, w_shape, r=4, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], x_shape, dtype)
    w = jax.random.normal(ks[1], w_shape, dtype) * 0.2
    a = jax.random.normal(ks[2], w_shape[:n_in] + (r,), dtype) * 0.3
    b = jax.random.normal(ks[3], (r,) + w_shape[n_in:], dtype) * 0.3
    return x, w, a, b


def _unmerged(x, w, a, b, n_in):
    """The textbook form, differentiated by JAX itself (independent of the custom rule)."""
    n = x.ndim
    ax = list(range(n - n_in, n))
    xw = jnp.tensordot(x, w, axes=(ax, list(range(n_in))))
    xa = jnp.tensordot(x, a, axes=(ax, list(range(n_in))))
    return xw + jnp.tensordot(xa, b, axes=1)


@pytest.mark.parametrize("x_shape,n_in,w_shape", SHAPES)
def test_values_and_all_gradients_match_the_unmerged_form(x_shape, n_in, w_shape):
    x, w, a, b = _operands(x_shape, n_in, w_shape)
    cot = jax.random.normal(jax.random.key(9), x_shape[:len(x_shape) - n_in] + w_shape[n_in:])
    loss = lambda f: lambda *ops: jnp.sum(jnp.tanh(f(*ops, n_in)) * cot)  # noqa: E731
    np.testing.assert_allclose(lora_linear(x, w, a, b, n_in), _unmerged(x, w, a, b, n_in), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(loss(lora_linear), argnums=(0, 1, 2, 3)))(x, w, a, b)
    want = jax.jit(jax.grad(loss(_unmerged), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for name, g, h in zip("xwab", got, want):
        assert g.shape == h.shape, name
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_bfloat16_stays_close_to_float32():
    x, w, a, b = _operands((4, 32, 24), 1, (24, 40))
    ref = _unmerged(x, w, a, b, 1)
    got = lora_linear(*(t.astype(jnp.bfloat16) for t in (x, w, a, b)), 1)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_zero_b_is_the_base_layer():
    """Identity at attach (B = 0) holds on this path too: W + A 0 is W, bit for bit, and t's
    columns are separate outputs of the same GEMM (float32 rounding of the sum is allowed)."""
    x, w, a, b = _operands((4, 32, 24), 1, (24, 40))
    np.testing.assert_allclose(lora_linear(x, w, a, jnp.zeros_like(b)), x @ w, rtol=1e-6, atol=1e-6)


def test_adapted_linear_picks_the_path_by_traffic_and_both_agree():
    """Many tokens per step: the augmented GEMMs (one custom_vjp call); few tokens: the unmerged
    form. Both are the same function of the parameters."""
    x, w, a, b = _operands((4, 64, 24), 1, (24, 40))
    ad = {"lora_a": a, "lora_b": b, "lora_scale": jnp.float32(1.5)}
    assert augmented_wins(256, 24, 40) and not augmented_wins(4, 24, 40)
    big = jax.make_jaxpr(lambda x: adapted_linear(x, w, ad))(x)
    small = jax.make_jaxpr(lambda x: adapted_linear(x, w, ad))(x[:1, :4])
    assert "_lora_linear" in str(big) and "_lora_linear" not in str(small)
    want = _unmerged(x, w, a, b * 1.5, 1)
    np.testing.assert_allclose(adapted_linear(x, w, ad), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adapted_linear(x[:1, :4], w, ad), want[:1, :4], rtol=1e-5, atol=1e-5)
    # the scale reaches B's gradient through the fold (d/dB of s (xA) B is s (xA)^T dy)
    g = jax.grad(lambda bb: jnp.sum(adapted_linear(x, w, {**ad, "lora_b": bb}) ** 2))(b)
    h = jax.grad(lambda bb: jnp.sum(_unmerged(x, w, a, bb * 1.5, 1) ** 2))(b)
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-4)


def _saved(policy, f, *args):
    """[(shape, why)] of what the backward keeps, from JAX's own report of saved residuals."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=policy), *args)
    rows = []
    for line in out.getvalue().splitlines():
        m = re.match(r"\w+\[([\d,]*)\] (.*)", line.strip())
        if m:
            rows.append((tuple(int(v) for v in m.group(1).split(",") if v), m.group(2)))
    return rows


def test_remat_policies_keep_lora_t_not_the_wide_product():
    """Under the `dots` policies the backward keeps x A ([T, r], by name), never the [T, r + d_out]
    GEMM output it is sliced from; under `full` it keeps nothing but the inputs."""
    x, w, a, b = _operands((4, 64, 24), 1, (24, 40))
    tokens, r = 4 * 64, a.shape[-1]

    def f(x, a, b):  # as in a layer: a named projection output feeding a nonlinearity
        y = jax.ad_checkpoint.checkpoint_name(lora_linear(jnp.cos(x), w, a, b), PROJ_NAME)
        return jnp.sum(jnp.sin(y))

    for name in ("dots", "dots_no_batch"):
        shapes = [s for s, _ in _saved(REMAT_POLICIES[name], f, x, a, b)]
        assert (tokens, r) in shapes, (name, shapes)
        assert (tokens, r + 40) not in shapes, (name, shapes)
        assert (4, 64, 40) in shapes, (name, shapes)
    shapes = [s for s, _ in _saved(REMAT_POLICIES["full"], f, x, a, b)]
    assert (tokens, r) not in shapes and (tokens, r + 40) not in shapes


def test_dots_policies_see_the_linear_seam():
    """The seam is a custom_vjp (opaque to JAX's dot policies); its named output is what the
    `dots` policies keep, so they do not silently turn into `full` remat."""
    from jaxlearn.models.layers import Linear

    lin = Linear((40,), ("embed", "mlp"))
    x = jax.random.normal(jax.random.key(0), (4, 64, 24))
    params = lin.init(jax.random.key(1), x)

    def f(x):
        return jnp.sum(jnp.sin(lin.apply(params, jnp.cos(x))))

    kept = _saved(REMAT_POLICIES["dots_no_batch"], f, x)
    assert any(s == (4, 64, 40) and PROJ_NAME in why for s, why in kept), kept
    assert not any(s == (4, 64, 40) for s, _ in _saved(REMAT_POLICIES["full"], f, x))


def test_model_loss_and_adapter_gradients_match_the_unmerged_path(monkeypatch):
    """A whole LoRA model at 4 x 32 tokens (every projection takes the augmented path): the
    output at attach is the base model's, and loss and adapter gradients after perturbing the
    adapters equal those of the same model forced onto the unmerged form."""
    from jaxlearn.models import layers

    model, base, params, _, _ = _attached("lora")
    batch = random_batch(4, 32, 128, n_docs=2)
    assert augmented_wins(4 * 32, 64, 64) and augmented_wins(4 * 32, 64, 128)
    # identity at attach: W + A 0 is W exactly; the wider GEMM may round differently (~1e-7)
    np.testing.assert_allclose(_forward(model, params, batch), _forward(model, base, batch), rtol=1e-5, atol=1e-5)
    params = _perturb(params)

    def loss(p):  # not the shared jitted `_forward`: each jit below must trace the model afresh
        logits = model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0])

    aug_loss, aug_grad = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(layers, "augmented_wins", lambda *a: False)
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(aug_loss, ref_loss, rtol=1e-6)
    got, want = flat_paths(aug_grad), flat_paths(ref_grad)
    lora = [k for k in got if "lora_a" in k or "lora_b" in k]
    assert len(lora) == 14  # A and B of 7 projections (scanned layers)
    for k in lora:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
