"""The `safety` eval task: held-out disallowed and allowed prompts, replies from a stubbed
generator, refusal and false-refusal rates computed as the detector says, in the usual report."""

import pytest

from jaxlearn.data.safety import RISK_AREAS, safety_eval_sets
from jaxlearn.eval import tasks
from jaxlearn.eval.tasks import HEADLINE, check_tasks, markdown_table, run_tasks

REFUSE = "I'm sorry, but I can't help with that."
ANSWER = "Sure: here is a plain answer."


@pytest.fixture(autouse=True)
def light_sft_tasks(monkeypatch):
    """Stand-in WordNet task prompts (parsing WordNet takes seconds; tests/data/test_safety_data.py
    covers the real ones); the process-wide dataset cache is cleared before and after."""
    from jaxlearn.data import safety
    from jaxlearn.data.instruct import Example

    def fake(n_train, cache_dir):
        counts = {"train": 4, "validation": 3, "test": 5}
        return [Example(f"antonym/w{s}{i}", ({"role": "user", "content": f"Give an antonym of 'w{s}{i}'."},
                                             {"role": "assistant", "content": "x"}), ("x",),
                        {"split": s, "kind": "sft_task", "label": "allowed"}) for s, n in counts.items() for i in range(n)]

    safety._all_examples.cache_clear()
    monkeypatch.setattr(safety, "_sft_tasks", fake)
    yield
    safety._all_examples.cache_clear()


def test_safety_task_rates_on_a_stubbed_generator(monkeypatch):
    dis, allowed = safety_eval_sets("test")
    # The stub refuses every disallowed prompt of two risk areas and every allowed look-alike.
    refused_areas = set(RISK_AREAS[:2])
    refuse_prompts = {e.prompt[-1]["content"] for e in dis if e.meta["risk_area"] in refused_areas}
    refuse_prompts |= {e.prompt[-1]["content"] for e in allowed if e.meta["kind"] == "lookalike"}
    seen = []

    def stub(em, conversations, *, max_new_tokens=16, batch_size=16):
        assert em == "model" and max_new_tokens == 48
        seen.extend(c[-1]["content"] for c in conversations)
        return [REFUSE if c[-1]["content"] in refuse_prompts else ANSWER for c in conversations]

    monkeypatch.setattr(tasks, "generate_replies", stub)
    check_tasks(["safety"])
    [res] = run_tasks("model", ["safety"], split="test", limit=None, echo=lambda _: None)
    m = res.metrics
    assert len(seen) == len(dis) + len(allowed) == m["n"]
    assert (m["n_disallowed"], m["n_allowed"]) == (len(dis), len(allowed))
    want_refusal = sum(e.meta["risk_area"] in refused_areas for e in dis) / len(dis)
    want_false = sum(e.meta["kind"] == "lookalike" for e in allowed) / len(allowed)
    assert m["refusal_rate"] == pytest.approx(want_refusal) and m["false_refusal_rate"] == pytest.approx(want_false)
    for area in RISK_AREAS:
        assert m[f"refusal_rate_{area}"] == (1.0 if area in refused_areas else 0.0)
    assert (m["false_refusal_rate_lookalike"], m["false_refusal_rate_everyday"], m["false_refusal_rate_sft_task"]) == (1.0, 0.0, 0.0)
    rows = {r["id"]: r for r in res.examples}
    assert len(rows) == m["n"] and all(r["refused"] == (r["cue"] is not None) for r in rows.values())
    assert HEADLINE["safety"] == "refusal_rate"
    assert "| safety | refusal_rate |" in markdown_table([res]) and "| safety | false_refusal_rate |" in markdown_table([res])


def test_limit_takes_a_fixed_sample_of_each_set(monkeypatch):
    monkeypatch.setattr(tasks, "generate_replies", lambda em, convs, **kw: [ANSWER] * len(convs))
    a = run_tasks("model", ["safety"], split="validation", limit=7, echo=lambda _: None)[0]
    b = run_tasks("model", ["safety"], split="validation", limit=7, echo=lambda _: None)[0]
    assert (a.metrics["n_disallowed"], a.metrics["n_allowed"]) == (7, 7)
    # Spread evenly: every risk area and every allowed kind is represented.
    assert len({r["risk_area"] for r in a.examples if r["label"] == "disallowed"}) == len(RISK_AREAS)
    assert {r["kind"] for r in a.examples if r["label"] == "allowed"} == {"sft_task", "everyday", "lookalike"}
    assert [r["id"] for r in a.examples] == [r["id"] for r in b.examples]
    assert a.metrics["refusal_rate"] == 0.0 == a.metrics["false_refusal_rate"]
