"""RLAIF: the judge's A/B log-probs against a direct forward pass of a tiny model, two-order
debiasing with stubbed judges (always-A; content-aware), agreement metrics, judged labels that
`file_pairs` reads back, the atomic write, candidate sampling, and the `jaxlearn rlaif` CLI.

The tiny model uses the character tokenizer of tests/sft_helpers.py: "A" and "B" are single
tokens (ids 68 and 69), the case `Judge` documents (first token of each letter)."""

import json
import math
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import logits_of
from sft_helpers import CharChatTokenizer

from jaxlearn.cli import build_parser, main
from jaxlearn.data.chat import encode_prompt
from jaxlearn.data.preference import PreferencePair, file_pairs
from jaxlearn.eval.models import EvalModel
from jaxlearn.models.generate import Generation
from jaxlearn.rlaif import commands, labels
from jaxlearn.rlaif.judge import (
    ANTONYM_RUBRIC,
    GENERAL_RUBRIC,
    Judge,
    agreement,
    check_rubric,
    judge_pairs,
    render_rubric,
)
from jaxlearn.rlaif.labels import (
    Candidates,
    label_candidates,
    sample_candidates,
    write_jsonl_atomic,
)

TOK = CharChatTokenizer()
SHORT = "{prompt}|A:{a}|B:{b}|A or B?"  # fits the tiny model's 128 positions
NEG = -math.inf


@pytest.fixture(scope="module")
def em(tiny_model):
    model, params = tiny_model
    assert model.cfg.vocab_size == TOK.vocab_size and model.cfg.max_seq_len == 128
    return EvalModel("tiny", model, params, TOK, {"model": "tiny"})


class StubJudge:
    """A judge whose log p(A), log p(B) is `fn(question, shown_a, shown_b)`; records its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def score(self, triples):
        self.calls.append(list(triples))
        return np.array([self.fn(*t) for t in triples], np.float64)


RIGHT = {"cold", "down", "small", "dark"}


def content_judge(q, a, b):
    """Prefers the right response, wherever it is shown."""
    return (0.0, -3.0) if a in RIGHT else (-3.0, 0.0)


def pairs_of(*triples):
    return [PreferencePair(f"p{i}", ({"role": "user", "content": q},), c, r, "test")
            for i, (q, c, r) in enumerate(triples)]


PAIRS = pairs_of(("Give an antonym of 'hot'.", "cold", "warm"), ("Give an antonym of 'up'.", "down", "upward"),
                 ("Give an antonym of 'big'.", "small", "large"))


# ------------------------------------------------------------------------------------------
# The judge on a real (tiny) model


def direct_letter_logprobs(em, text):
    """log_softmax of model.apply's logits at the prompt's last position, at "A" and "B"."""
    ids = encode_prompt(TOK, [{"role": "user", "content": text}])
    tokens = np.zeros((4, 128), np.int32)
    tokens[0, :len(ids)] = ids
    segs = np.zeros((4, 128), np.int32)
    segs[0, :len(ids)] = 1
    logits = logits_of(em.model, em.params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(128), tokens.shape),
                       jnp.asarray(segs))
    logp = np.asarray(jax.nn.log_softmax(logits[0, len(ids) - 1].astype(jnp.float32)))
    return logp[[TOK.encode("A")[0], TOK.encode("B")[0]]]


def test_letter_logprobs_equal_a_direct_forward(em):
    judge = Judge(em, rubric=SHORT, batch_size=4, bucket=64)
    assert judge.letter_ids == (68, 69)  # single-token letters of the character tokenizer
    # 5 prompts of different lengths: two batches (the second padded with empty rows), one shape.
    triples = [("hot?", "cold", "warm"), ("up?", "down", "upward sloping hill"), ("a?", "b", "c"),
               ("Give an antonym of 'big'.", "small", "large and wide"), ("dark?", "light", "dim")]
    got = judge.score(triples)
    want = np.stack([direct_letter_logprobs(em, f"{q}|A:{a}|B:{b}|A or B?") for q, a, b in triples])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(got < 0) and not np.allclose(got[0], got[1])  # real, distinct log-probs

    # judge_pairs on the real judge: p_ab / p_ba are these log-probs normalised over the letters.
    [v] = judge_pairs(judge, [("hot?", "cold", "warm")])
    (la1, lb1), (la2, lb2) = got[0], direct_letter_logprobs(em, "hot?|A:warm|B:cold|A or B?")
    assert v.p_ab == pytest.approx(1 / (1 + math.exp(lb1 - la1)), abs=1e-5)
    assert v.p_ba == pytest.approx(1 / (1 + math.exp(la2 - lb2)), abs=1e-5)
    assert v.letter_mass == pytest.approx((math.exp(la1) + math.exp(lb1) + math.exp(la2) + math.exp(lb2)) / 2,
                                          rel=1e-4)


def test_rubrics_render_question_and_both_responses(em):
    for rubric in (GENERAL_RUBRIC, ANTONYM_RUBRIC):
        [msg] = Judge(em, rubric=rubric).messages("Give an antonym of 'hot'.", "cold", "warm")
        assert msg["role"] == "user"
        text = msg["content"]
        assert "Give an antonym of 'hot'." in text and "Response A: cold" in text and "Response B: warm" in text
        assert text.index("Response A") < text.index("Response B")
        assert "single letter A or B" in text
    assert "helpful, correct and concise" in GENERAL_RUBRIC and "antonym" in ANTONYM_RUBRIC
    # Placeholders are filled in one pass: a response holding "{b}" is not filled again.
    assert render_rubric(SHORT, "q", "{b}", "x") == "q|A:{b}|B:x|A or B?"
    with pytest.raises(ValueError, match="missing: {b}"):
        check_rubric("{prompt} {a}")
    with pytest.raises(ValueError, match="exceed the judge's context"):
        Judge(em, rubric=SHORT).score([("q", "x" * 200, "y")])
    assert not Judge(em, rubric=SHORT).fits("q", "x" * 200, "y") and Judge(em, rubric=SHORT).fits("q", "x", "y")


# ------------------------------------------------------------------------------------------
# Both orders, debiasing, agreement


def test_always_a_judge_is_debiased_to_one_half_and_inconsistent():
    for fn in (lambda q, a, b: (0.0, NEG), lambda q, a, b: (math.log(0.8), math.log(0.1))):
        judge = StubJudge(fn)
        verdicts = judge_pairs(judge, [(p.prompt, p.chosen, p.rejected) for p in PAIRS])
        # Both orders of every pair went to the scorer, the swapped one right after the first.
        [triples] = judge.calls
        assert triples[:2] == [("Give an antonym of 'hot'.", "cold", "warm"), ("Give an antonym of 'hot'.", "warm", "cold")]
        assert len(triples) == 2 * len(PAIRS)
        for v in verdicts:
            assert v.p_ab > 0.85 and v.p_ba < 0.15
            assert v.p == pytest.approx(0.5, abs=1e-12) and v.prefers_x is None
            assert not v.consistent and v.said_a == (True, True)
    assert [v.p for v in judge_pairs(StubJudge(lambda q, a, b: (0.0, NEG)), [("q", "x", "y")])] == [0.5]  # exactly

    metrics, rows = agreement(StubJudge(lambda q, a, b: (math.log(0.8), math.log(0.1))), PAIRS)
    assert metrics["position_bias_rate"] == 1.0 and metrics["position_consistency"] == 0.0
    assert metrics["a_share_order1"] == metrics["a_share_order2"] == 1.0
    assert metrics["accuracy"] == 0.5 and metrics["accuracy_both_orders"] == 0.0
    assert metrics["accuracy_if_consistent"] is None and metrics["letter_mass"] == pytest.approx(0.9)
    assert len(rows) == 3 and not any(r["consistent"] for r in rows)


def test_content_judge_is_consistent_and_agrees_with_checkable_labels():
    metrics, rows = agreement(StubJudge(content_judge), PAIRS)
    assert metrics["n"] == 3 and metrics["accuracy"] == 1.0 and metrics["accuracy_both_orders"] == 1.0
    assert metrics["position_consistency"] == 1.0 and metrics["position_bias_rate"] == 0.0
    assert metrics["a_share_order1"] == 1.0 and metrics["a_share_order2"] == 0.0  # right is A, then B
    assert metrics["accuracy_if_consistent"] == 1.0
    p = 1 / (1 + math.exp(-3))
    assert all(r["p_ab"] == pytest.approx(p) and r["p_ba"] == pytest.approx(p) and r["consistent"] for r in rows)
    # A judge that prefers the WRONG content is consistent but always wrong: accuracy can fail.
    wrong, _ = agreement(StubJudge(lambda q, a, b: content_judge(q, b, a)), PAIRS)
    assert wrong["accuracy"] == 0.0 and wrong["position_consistency"] == 1.0


# ------------------------------------------------------------------------------------------
# Labels


def weak_a_judge(q, a, b):
    """Right at A: strongly A. Right at B: still A, weakly: a preference that flips with the order."""
    return (0.0, -4.0) if a in RIGHT else (-1.0, -2.0)


def test_labels_round_trip_through_file_pairs(tmp_path):
    sys_prompt = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Antonym of 'big'?"})
    multi = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Antonym of 'light'?"})
    cands = [Candidates("c1", ({"role": "user", "content": "Antonym of 'hot'?"},), "warm", "cold"),  # right second
             Candidates("c2", sys_prompt, "small", "huge"),                                        # right first
             Candidates("c3", multi, "bright", "dark"),
             Candidates("c4", ({"role": "user", "content": "Antonym of 'up'?"},), "same", "same2")]  # no right one
    judge = StubJudge(lambda q, a, b: content_judge(q, a, b) if {a, b} & RIGHT else (0.0, 0.0))
    records, stats = label_candidates(judge, cands)
    assert [r["chosen"] for r in records] == ["cold", "small", "dark"]
    assert [r["rejected"] for r in records] == ["warm", "huge", "bright"]
    assert stats.ties == 1 and stats.judged == 4 and stats.written == 3
    assert all(r["judge_p"] > 0.5 and r["consistent"] for r in records)
    assert set(records[0]) == {"id", "prompt", "chosen", "rejected", "judge_p", "consistent"}
    # The judge saw the multi-turn prompt as a transcript.
    assert any(t[0] == "User: Hi\nAssistant: Hello\nUser: Antonym of 'light'?" for t in judge.calls[0])

    path = write_jsonl_atomic(tmp_path / "sub" / "pairs.jsonl", records)
    pairs = file_pairs([path], 0.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("cold", "warm"), ("small", "huge"), ("dark", "bright")]
    assert [list(p.prompt) for p in pairs] == [[{"role": "user", "content": "Antonym of 'hot'?"}], list(sys_prompt),
                                               list(multi)]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "pairs.jsonl"]  # no temporary file left

    # Position-inconsistent pairs: kept (flagged) by default, left out with drop_inconsistent.
    flips = [Candidates("f1", ({"role": "user", "content": "q"},), "warm", "cold"),
             Candidates("f2", ({"role": "user", "content": "q"},), "cold", "warm")]
    kept, s1 = label_candidates(StubJudge(weak_a_judge), flips)
    assert [r["chosen"] for r in kept] == ["cold", "cold"] and [r["consistent"] for r in kept] == [False, False]
    assert s1.inconsistent == 2 and s1.dropped_inconsistent == 0
    none, s2 = label_candidates(StubJudge(weak_a_judge), flips, drop_inconsistent=True)
    assert none == [] and s2.dropped_inconsistent == 2 and s2.written == 0


def test_write_is_atomic(tmp_path):
    path = tmp_path / "pairs.jsonl"

    def failing():
        yield {"prompt": "a", "chosen": "b", "rejected": "c"}
        raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, failing())
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"bad": object()}])
    assert path.read_text() == "old\n" and list(tmp_path.iterdir()) == [path]


def test_sample_candidates(em, monkeypatch):
    from jaxlearn.data.prompts import PromptRecord

    prompts = [PromptRecord(f"r{i}", ({"role": "user", "content": f"Antonym of '{w}'?"},)) for i, w in
               enumerate(["hot", "up", "big"])]
    # Real sampling: two different samples per prompt (a random tiny model at temperature 1).
    cands, stats = sample_candidates(em, prompts, temperature=1.0, max_new_tokens=4, batch_size=4)
    assert stats.prompts == 3 and len(cands) + stats.identical + stats.empty == 3
    assert all(c.first != c.second and c.first and c.second for c in cands)
    assert [c.id for c in cands] == [p.id for p in prompts if p.id in {c.id for c in cands}]

    # Identical and empty pairs are skipped and counted (generation stubbed).
    replies = iter([[TOK.encode("x")[0]] * 2, [TOK.encode("x")[0]] * 2, [], [TOK.encode("y")[0]],
                    TOK.encode("ab"), TOK.encode("ba")])
    monkeypatch.setattr(labels, "generate", lambda model, params, batch, sampling, rng: Generation(
        [next(replies) if i < 6 else [] for i in range(len(batch))], [True] * len(batch)))
    cands, stats = sample_candidates(em, prompts, temperature=0.7, batch_size=6)
    assert (stats.identical, stats.empty, [(c.first, c.second) for c in cands]) == (1, 1, [("ab", "ba")])
    with pytest.raises(ValueError, match="temperature above 0"):
        sample_candidates(em, prompts, temperature=0.0)


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_parses():
    a = build_parser().parse_args(shlex.split("rlaif agree --judge smollm2-135m-instruct --source "
                                              "wordnet_antonym_prefs --split test --limit 100 --out runs/rlaif/agree.json"))
    assert (a.rlaif_command, a.judge, a.source, a.split, a.limit, a.out) == (
        "agree", "smollm2-135m-instruct", "wordnet_antonym_prefs", "test", 100, "runs/rlaif/agree.json")
    b = build_parser().parse_args(shlex.split("rlaif label --judge J --policy runs/sft --source wordnet_antonym_prompts "
                                              "--limit 8 --out pairs.jsonl --drop-inconsistent"))
    assert (b.policy, b.limit, b.drop_inconsistent, b.temperature, b.split) == ("runs/sft", 8, True, 1.0, None)
    assert commands.resolve_rubric(None, "wordnet_antonym_prompts") == ("antonym", ANTONYM_RUBRIC)


def test_cli_agree_and_label_with_a_stubbed_judge(tmp_path, monkeypatch, em, capsys):
    loaded, use = [], {"fn": weak_a_judge}

    def fake_load_judge(spec, *, adapter=None, rubric, system=None, batch_size=16):
        loaded.append((spec, rubric))
        judge = StubJudge(use["fn"])
        judge.em = em  # the policy when --policy names the judge
        return judge

    monkeypatch.setattr(commands, "load_judge", fake_load_judge)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt[0]["content"], "chosen": p.chosen,
                                         "rejected": p.rejected}) + "\n" for p in PAIRS))
    out = tmp_path / "agree.json"
    assert main(["rlaif", "agree", "--judge", "stub", "--source", str(prefs), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["n"] == 3 and report["metrics"]["accuracy"] == 1.0
    assert report["metrics"]["position_bias_rate"] == 1.0 and report["split"] == "all"
    assert loaded[-1] == ("stub", GENERAL_RUBRIC) and "| position_bias_rate | 1.0000 |" in capsys.readouterr().out

    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"id": "k1", "prompt": "q", "responses": ["warm", "cold"]}) + "\n" +
                     json.dumps({"prompt": "q2", "system": "s", "responses": ["dark", "bright"]}) + "\n")
    pairs_out = tmp_path / "rl" / "pairs.jsonl"
    # Consistent on the hot/cold pair, position-biased (A twice, weakly right) on the other.
    use["fn"] = lambda q, a, b: content_judge(q, a, b) if {a, b} == {"warm", "cold"} else weak_a_judge(q, a, b)
    assert main(["rlaif", "label", "--judge", "stub", "--candidates", str(cands), "--rubric", "antonym",
                 "--out", str(pairs_out)]) == 0
    assert [(p.chosen, p.rejected) for p in file_pairs([pairs_out], 0.0)] == [("cold", "warm"), ("dark", "bright")]
    assert loaded[-1][1] == ANTONYM_RUBRIC
    summary = json.loads((tmp_path / "rl" / "pairs.summary.json").read_text())
    assert summary["stats"]["written"] == 2 and summary["stats"]["inconsistent"] == 1
    # --drop-inconsistent drops the flipping pair; the file is replaced whole.
    assert main(["rlaif", "label", "--judge", "stub", "--candidates", str(cands), "--out", str(pairs_out),
                 "--drop-inconsistent"]) == 0
    assert [p.chosen for p in file_pairs([pairs_out], 0.0)] == ["cold"]

    # --policy: prompts from a file, two samples each from the (tiny) policy, judged by a stub
    # that prefers the alphabetically later reply (consistent, so every distinct pair is written).
    use["fn"] = lambda q, a, b: (0.0, -3.0) if a > b else (-3.0, 0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Antonym of '{w}'?"}) + "\n" for w in ("hot", "up", "big")))
    assert main(["rlaif", "label", "--judge", "stub", "--policy", "stub", "--source", str(prompts), "--limit", "2",
                 "--max-new-tokens", "4", "--batch-size", "4", "--out", str(pairs_out)]) == 0
    summary = json.loads((tmp_path / "rl" / "pairs.summary.json").read_text())
    assert summary["stats"]["prompts"] == 2 and summary["policy"] == "stub" and summary["stats"]["written"] >= 1
    written = file_pairs([pairs_out], 0.0)
    assert len(written) == summary["stats"]["written"] and all(p.chosen > p.rejected for p in written)

    # Neither --policy nor --candidates: one line, exit status 2.
    assert main(["rlaif", "label", "--judge", "stub", "--out", str(pairs_out)]) == 2
    assert "exactly one of --policy" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Pairs sampled from the policy, labelled by a checkable scorer (no judge model)


def test_reward_labels_pick_the_best_and_worst_sample(em, monkeypatch, tmp_path):
    from jaxlearn.data.prompts import PromptRecord

    q = lambda w: ({"role": "user", "content": f"Give an antonym of '{w}'."},)  # noqa: E731
    prompts = [PromptRecord("hot", q("hot"), ("cold",)), PromptRecord("up", q("up"), ("down",)),
               PromptRecord("big", q("big"), ("small",))]
    samples = {0: ["warm", "cold", "cold", "hot"], 1: ["left", "right", "", "top"], 2: ["tiny", "tiny", "", "tiny"]}
    replies = [TOK.encode(r) for i in range(3) for r in samples[i]]
    monkeypatch.setattr(labels, "generate", lambda model, params, batch, sampling, rng: Generation(
        [replies[i] if i < len(replies) else [] for i in range(len(batch))], [True] * len(batch)))
    got = labels.sample_replies(em, prompts, 4, temperature=1.0, batch_size=12)
    assert [s.replies for s in got] == [tuple(samples[i]) for i in range(3)]
    assert got[0].record["answers"] == ["cold"]  # what the reward reads
    scorer = commands.reward_judge("reward:accept")
    records, stats = labels.label_by_reward(scorer, got)
    # hot: a right reply beats the first wrong one; up: every reply wrong (a tie); big: one distinct reply
    assert [(r["id"], r["chosen"], r["rejected"]) for r in records] == [("hot", "cold", "warm")]
    assert (records[0]["reward_chosen"], records[0]["reward_rejected"]) == (1.0, 0.0)
    assert (stats.prompts, stats.judged, stats.ties, stats.identical, stats.written) == (3, 2, 1, 1, 1)
    # through the CLI, on a candidates file whose records carry the accept-set
    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"prompt": "Give an antonym of 'hot'.", "answers": ["cold"],
                                 "responses": ["warm", "cold"]}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["rlaif", "label", "--judge", "reward:accept,format=0.1", "--candidates", str(cands),
                 "--out", str(out)]) == 0
    assert [(p.chosen, p.rejected) for p in file_pairs([out], 0.0)] == [("cold", "warm")]
    with pytest.raises(ValueError, match="not a number"):
        commands.reward_judge("reward:accept=high")
