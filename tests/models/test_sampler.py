"""The rollout sampler: greedy == a naive decode without a cache, log-probs == a forward pass
over the sampled sequence, sharded == unsharded on 8 CPU devices, one compilation per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import MeshConfig
from jaxlearn.models.generate import Rollout, SamplingConfig, generate, left_pad, rollout_batch, sample
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for, tree_shardings

# Different lengths, one needing two blocks of 16 after left padding.
PROMPTS = [[1, 5, 6, 7], [1, 9], list(range(1, 20)), [1, 3, 3, 8, 2]]
N = 12


def _naive_greedy(model, params, prompt, n):
    """Reference: argmax of a full forward pass (no cache) over the growing sequence, right-padded
    to a fixed length (causal attention: padding after position i is never seen by i).
    Returns the n tokens and their log-probs."""
    total = len(prompt) + n
    forward = jax.jit(lambda t, s: model.apply({"params": params}, t, jnp.arange(total)[None], s)[0][0])
    seq, logps = list(prompt), []
    for _ in range(n):
        t = np.zeros((1, total), np.int32)
        t[0, :len(seq)] = seq
        logp_v = np.asarray(jax.nn.log_softmax(forward(t, (np.arange(total) < len(seq))[None].astype(np.int32))[len(seq) - 1]))
        seq.append(int(logp_v.argmax()))
        logps.append(float(logp_v.max()))
    return seq[len(prompt):], logps


def _forward_logprobs(model, params, batch):
    """log p(target) at every position of a training batch (0 off the loss mask), and the
    largest log-prob there (the greedy choice's)."""
    logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp_btv = jax.nn.log_softmax(logits, axis=-1)
    logp_bt = jnp.take_along_axis(logp_btv, batch["targets"][..., None], axis=-1)[..., 0]
    return np.asarray(logp_bt * batch["loss_mask"]), np.asarray(logp_btv.max(-1) * batch["loss_mask"])


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(tiny_model_config(init_std=0.5))  # peaked logits: unambiguous argmaxes
    return model, init_params(model, jax.random.key(1))


def test_greedy_equals_naive_decode_with_stop_tokens(tiny):
    model, params = tiny
    want = [_naive_greedy(model, params, p, N) for p in PROMPTS]
    # A stop token row 0 really emits (at step 3) and some other row never does.
    stop = next(t for t in want[0][0][3:] if any(t not in w for w, _ in want[1:]))
    cfg = SamplingConfig(max_new_tokens=N, stop_tokens=(stop,), pad_id=0)
    tokens, seg, pos = left_pad(PROMPTS, cfg.pad_id)
    ro = jax.device_get(sample(model, params, tokens, seg, pos, jax.random.PRNGKey(0), cfg))
    assert ro.done.any() and not ro.done.all()
    for i, (w_tokens, w_logps) in enumerate(want):
        k = w_tokens.index(stop) + 1 if stop in w_tokens else N  # generated up to and including the stop
        assert ro.done[i] == (stop in w_tokens)
        assert ro.tokens[i].tolist() == w_tokens[:k] + [cfg.pad_id] * (N - k)
        assert ro.mask[i].tolist() == [1.0] * k + [0.0] * (N - k)
        np.testing.assert_allclose(ro.logprobs[i], w_logps[:k] + [0.0] * (N - k), atol=1e-5)
    # generate() is the host wrapper over the same call: stop token dropped, same rows.
    out = generate(model, params, PROMPTS, cfg)
    assert out.stopped == ro.done.tolist()
    assert out.tokens == [w[:w.index(stop)] if stop in w else w for w, _ in want]


def test_rollout_batch_layout():
    """P = 3 (one left pad), N = 3; row 0 stops at its second token, row 1 never stops."""
    tokens = np.array([[0, 1, 5], [1, 7, 8]], np.int32)
    seg = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    pos = np.array([[0, 0, 1], [0, 1, 2]], np.int32)
    ro = Rollout(tokens=jnp.array([[9, 2, 0], [4, 4, 6]], jnp.int32),
                 logprobs=jnp.array([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]]),
                 mask=jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), done=jnp.array([True, False]))
    b = jax.device_get(jax.jit(rollout_batch)(tokens, seg, pos, ro))
    assert b["inputs"].tolist() == [[0, 1, 5, 9, 2, 0], [1, 7, 8, 4, 4, 6]]
    assert b["targets"].tolist() == [[1, 5, 9, 2, 0, 0], [7, 8, 4, 4, 6, 0]]
    assert b["segment_ids"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b["positions"].tolist() == [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert {k: v.dtype for k, v in b.items()} == {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                                  "positions": np.int32, "loss_mask": np.float32}


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=N, temperature=1.0, stop_tokens=tuple(range(3, 128, 16))),
                                 SamplingConfig(max_new_tokens=N, temperature=0.7, top_p=0.8, stop_tokens=(17, 50))],
                         ids=["t1", "t0.7_top_p"])
def test_logprobs_equal_a_forward_pass_over_the_sample(cfg):
    """The untempered, unfiltered log-probs: what a PPO/GRPO ratio recomputes in the step."""
    model = Transformer(tiny_model_config(init_std=0.2))  # a spread distribution: varied samples
    params = init_params(model, jax.random.key(2))
    tokens, seg, pos = left_pad(PROMPTS, cfg.pad_id)
    ro = sample(model, params, tokens, seg, pos, jax.random.key(7), cfg)
    batch = jax.jit(rollout_batch)(tokens, seg, pos, ro)
    want, greedy = (a[:, tokens.shape[1] - 1:-1] for a in _forward_logprobs(model, params, batch))  # column j: token j
    ro = jax.device_get(ro)
    assert ro.done.any() and not ro.done.all()  # both kinds of row are covered
    assert (ro.logprobs[ro.mask > 0] < 0).all() and (ro.logprobs[ro.mask == 0] == 0).all()
    np.testing.assert_allclose(ro.logprobs, want, atol=1e-5)
    assert (ro.logprobs < greedy - 0.1).any()  # it really sampled: not always the argmax


def test_sharded_equals_unsharded_on_eight_devices():
    cfg = tiny_model_config(init_std=0.5)
    mc = MeshConfig(preset="fsdp")
    shard = ShardingContext(make_mesh(mc), rules_for(mc))
    sharded_model = Transformer(cfg, shard)
    params = init_params(Transformer(cfg), jax.random.key(3))
    shardings = tree_shardings(shard.mesh, abstract_params(sharded_model)[1], shard.rules)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    sc = SamplingConfig(max_new_tokens=N, temperature=0.8, top_k=20, stop_tokens=(5, 60))
    prompts = left_pad(PROMPTS * 2, sc.pad_id)  # 8 rows: one per device
    rng = jax.random.key(11)

    single = jax.device_get(sample(Transformer(cfg), params, *prompts, rng, sc))
    placed = [jax.device_put(a, shard.batch_sharding()) for a in prompts]
    ro = sample(sharded_model, sharded_params, *placed, rng, sc)
    assert ro.tokens.sharding.spec[0] is not None  # the rollout stays split over the batch
    ro = jax.device_get(ro)
    assert ro.tokens.tolist() == single.tokens.tolist()
    assert ro.done.tolist() == single.done.tolist() and ro.mask.tolist() == single.mask.tolist()
    # Sharded matmuls reorder float32 sums; with init_std 0.5 logits are large, hence ~2e-5.
    np.testing.assert_allclose(ro.logprobs, single.logprobs, atol=5e-5)


def test_new_prompts_of_the_same_padded_shape_do_not_recompile(tiny):
    model, params = tiny
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=8)
    before = sample._cache_size()
    first = sample(model, params, *left_pad([[1, 2, 3], [1, 4]], cfg.pad_id), jax.random.key(0), cfg)
    compiled = sample._cache_size()
    second = sample(model, params, *left_pad([[1, 9, 9, 9, 9, 9], [7]], cfg.pad_id), jax.random.key(1), cfg)
    assert compiled == before + 1 and sample._cache_size() == compiled
    assert first.tokens.shape == second.tokens.shape == (2, 5)
    # The host wrapper too (prompt lengths 2..15 all pad to 16).
    generate(model, params, [[1, 2]], cfg)
    n = sample._cache_size()
    generate(model, params, [list(range(1, 16))], cfg)
    assert sample._cache_size() == n


def test_prompt_plus_new_tokens_past_max_seq_len_is_explained(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate(model, params, [[1] * 100], SamplingConfig(max_new_tokens=40))
