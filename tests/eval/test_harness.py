"""The evaluation harness on a tiny model: log-likelihood, generation, adapters off, reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logits_of
from jaxlearn.config import PeftConfig
from jaxlearn.data.chat import encode_prompt
from jaxlearn.eval.models import EvalModel, generate_replies, reference_nll
from jaxlearn.peft.merge import without_adapters
from jaxlearn.eval.tasks import TaskResult, compare_table, write_report
from jaxlearn.models.transformer import abstract_params
from jaxlearn.peft.attach import attach, find_sites
from sft_helpers import CharChatTokenizer

TOK = CharChatTokenizer()
CONVS = [[{"role": "user", "content": f"Define '{w}'."}, {"role": "assistant", "content": d}]
         for w, d in [("cat", "a small feline"), ("ox", "a bovine"), ("sea", "salt water"), ("hat", "head cover")]]


@pytest.fixture(scope="module")
def em(tiny_model):
    model, params = tiny_model
    assert model.cfg.max_seq_len >= 128 and model.cfg.vocab_size == TOK.vocab_size
    return EvalModel("tiny", model, params, TOK, {"model": "tiny"})


def test_reference_nll_matches_a_direct_computation(em):
    got = reference_nll(em, CONVS, batch_size=3, bucket=16)
    for c, (nll, n) in zip(CONVS, got):
        ids = np.array(encode_prompt(TOK, c[:1]) + TOK.encode(c[1]["content"] + "<|im_end|>", allow_special=True))
        t = len(ids)
        logits = logits_of(em.model, em.params, jnp.asarray(ids[None]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        start = len(encode_prompt(TOK, c[:1]))  # first answer token
        want = -sum(logp[i - 1, ids[i]] for i in range(start, t))
        assert n == t - start
        np.testing.assert_allclose(nll, want, rtol=1e-4)


def test_generation_is_greedy_and_batch_invariant(em):
    prompts = [c[:1] for c in CONVS]
    a = generate_replies(em, prompts, max_new_tokens=5, batch_size=1)
    b = generate_replies(em, prompts, max_new_tokens=5, batch_size=3)
    assert a == b and all(isinstance(r, str) for r in a)
    # Against a plain greedy loop (full recompute, no cache) for the first prompt.
    ids = encode_prompt(TOK, prompts[0])
    out = []
    for _ in range(5):
        t = len(ids)
        logits = logits_of(em.model, em.params, jnp.asarray([ids]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
        nxt = int(jnp.argmax(logits[0, -1]))
        if nxt in (1, 2):
            break
        ids, out = ids + [nxt], out + [nxt]
    assert a[0] == TOK.decode(out).strip()


def test_adapters_disabled_gives_the_base_model(em):
    model, base = em.model, em.params
    abstract, logical = abstract_params(model)
    cfg = PeftConfig(type="lora", rank=2)
    adapted = attach(base, cfg, find_sites(abstract, logical, cfg), jax.random.key(0))
    # Make the adapters matter (LoRA starts as a no-op), then strip them off again.
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, adapted)
    tokens = jnp.arange(1, 9)[None]
    run = lambda p: logits_of(model, p, tokens, jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32))  # noqa: E731
    assert not np.allclose(run(adapted), run(base))
    np.testing.assert_array_equal(run(without_adapters(adapted)), run(base))


def test_report_files_and_comparison(tmp_path):
    res = [TaskResult("antonyms", {"exact_match": 0.25, "contains": 0.5, "n": 4},
                      [{"id": "antonym/hot", "reply": "cold", "exact_match": True}], 1.0),
           TaskResult("perplexity:brown", {"loss": 3.0, "perplexity": 20.1, "tokens": 512}, [], 2.0)]
    write_report(res, {"model": "base", "adapter": None, "adapters_disabled": False, "weights": "w"},
                 tmp_path / "a", split="test", limit=4)
    res[0].metrics["exact_match"] = 0.75
    write_report(res, {"model": "base", "adapter": "runs/x/adapters/v1", "adapters_disabled": False},
                 tmp_path / "b", split="test", limit=4)
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert summary["tasks"]["antonyms"]["exact_match"] == 0.25 and summary["limit"] == 4
    assert "| antonyms | exact_match | 0.2500 | 4 |" in (tmp_path / "a" / "results.md").read_text()
    lines = (tmp_path / "a" / "examples" / "antonyms.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["reply"] == "cold"
    table = compare_table([tmp_path / "a", tmp_path / "b" / "results.json"])
    assert "| antonyms | exact_match | 0.2500 | 0.7500 |" in table
    assert "base + x adapter" in table
