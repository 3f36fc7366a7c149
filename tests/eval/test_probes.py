"""General-capability probes (jaxlearn/eval/probes.py): no SFT training word in any probe, real
WordNet facts, and the scoring on hand-labelled replies."""

import pytest

from jaxlearn.data.errors import DataError
from jaxlearn.eval.forgetting import forgetting_enabled, forgetting_section, markdown
from jaxlearn.eval.probes import (FORMAT_CHECKS, ProbeItem, build_probes, check_format, sample_items,
                                  score_fact, score_replies, sft_training_words)
from jaxlearn.eval.tasks import check_tasks


@pytest.fixture(scope="module")
def trained():
    return sft_training_words()


@pytest.fixture(scope="module")
def probes(trained):
    return build_probes(training_words=trained)


def test_no_probe_item_holds_an_sft_training_word(probes, trained):
    assert len(trained) > 10_000  # the real word sets, not an empty stand-in
    for name, items in probes.items():
        assert len(items) > 200, name
        for it in items:
            leaked = [w for w in (*it.subject, *it.answers) if w in trained]
            assert not leaked, (it.id, leaked)
            # every single word the prompt asks about is checked too (the yes/no hypernym)
            quoted = [w for w in it.prompt.lower().replace("?", " ").split() if w in trained and w in it.subject]
            assert not quoted, (it.id, quoted)
    # A capital whose name SFT trains on is no probe: `Define 'vienna'.` is a training example
    # ("the capital and largest city of Austria"), so the fact would be taught, not probed.
    assert "vienna" in trained
    assert not [it for it in probes["facts"] if "austria" in it.subject]


def test_capitals_are_real_pairs(probes):
    caps = {it.subject[0]: it for it in probes["facts"] if it.kind == "capital"}
    assert len(caps) >= 100
    assert "oslo" in caps["norway"].answers and caps["cuba"].answers == ("havana",)
    assert caps["kenya"].answers == ("nairobi",)
    assert caps["norway"].prompt == "What is the capital of Norway? Answer with one word or name."
    # lemmas that repeat the question ("capital of norway") are not accepted answers
    assert not any("capital" in a.split() or f" {s} " in f" {a} " for it in caps.values() for a in it.answers
                   for s in it.subject)
    # Ottawa is part of Ontario in WordNet: a province is not a country, so no "capital of Ontario"
    assert "ontario" not in caps
    kinds = {it.kind for it in probes["facts"]}
    assert kinds == {"capital", "kind", "part", "member"}
    assert {it.kind for it in probes["format"]} == set(FORMAT_CHECKS)


def test_fact_scoring_on_hand_labelled_replies():
    answers = ("christiania", "oslo")
    labelled = [  # reply, contains an accepted answer, bare one-word reply
        ("The capital of Norway is Oslo.", True, False),
        ("Oslo", True, True),
        ("oslo.", True, True),
        ("Norway", False, True),  # the failure the issue reports: the subject repeated
        ("Bergen is the capital.", False, False),
        ("Oslofjord", False, True),  # whole words only
        ("", False, False),
    ]
    for reply, contains, bare in labelled:
        assert score_fact(reply, answers) == {"contains": contains, "bare_word": bare}, reply
    items = [ProbeItem(f"capital/{i}", "capital", "?", answers) for i in range(len(labelled))]
    m, rows = score_replies("facts", items, [r for r, _, _ in labelled])
    assert m["contains"] == pytest.approx(3 / 7) and m["bare_word"] == pytest.approx(4 / 7)
    assert m["contains_capital"] == m["contains"] and m["n"] == 7 and rows[3]["contains"] is False


def test_format_checks_on_hand_labelled_replies():
    labelled = [
        ("three_words", "Loyal, furry, friendly.", True), ("three_words", "A loyal furry friend.", False),
        ("three_words", "", False), ("number", "5", True), ("number", "5.", True),
        ("number", "The word has 5 letters.", False), ("number", "five", False),
        ("yes_no", "Yes, it is.", True), ("yes_no", "no", True), ("yes_no", "It is, yes.", False),
        ("yes_no", "Yesterday", False), ("upper", "TABLE", True), ("upper", "Table", False),
        ("upper", "TABLE is the word", False), ("three_items", "wood, legs, food", True),
        ("three_items", "wood, legs, and food.", True), ("three_items", "wood and legs", False),
        ("three_items", "wood,, food", False), ("three_items", "", False),
    ]
    for check, reply, ok in labelled:
        assert check_format(check, reply, "table") is ok, (check, reply)
    with pytest.raises(DataError, match="unknown format check"):
        check_format("haiku", "x")
    items = [ProbeItem("format/table", "upper", "?", ("table",)), ProbeItem("format/x", "number", "?", ("x",))]
    m, _ = score_replies("format", items, ["TABLE", "many"])
    assert m == {"follows": 0.5, "follows_number": 0.0, "follows_upper": 1.0, "n": 2}


def test_sample_is_fixed_and_spread_over_relations(probes):
    a = sample_items(probes["facts"], 8)
    assert [i.id for i in a] == [i.id for i in sample_items(list(reversed(probes["facts"])), 8)]
    assert sorted(i.kind for i in a) == ["capital"] * 2 + ["kind"] * 2 + ["member"] * 2 + ["part"] * 2
    assert len(sample_items(probes["facts"], 0)) == len(probes["facts"])


def test_task_names_and_forgetting_section():
    check_tasks(["probes:facts", "probes:format", "perplexity:brown"])
    with pytest.raises(DataError, match="probes:facts"):
        check_tasks(["probes:fact"])
    base = {"probes:facts": {"contains": 0.5, "bare_word": 0.1, "contains_capital": 0.6, "n": 40},
            "probes:format": {"follows": 0.60, "n": 40}, "perplexity:brown": {"perplexity": 40.0, "loss": 3.7}}
    after = {"probes:facts": {"contains": 0.2, "bare_word": 0.7, "contains_capital": 0.1, "n": 40},
             "probes:format": {"follows": 0.59, "n": 40}, "perplexity:brown": {"perplexity": 44.0, "loss": 3.8}}
    s = forgetting_section(base, after, threshold=2.0)
    assert s["probes"]["probes:facts"]["contains"]["fell"] == pytest.approx(30.0)
    assert s["probes"]["probes:format"]["follows"]["fell"] == pytest.approx(1.0)  # within the threshold
    assert s["probes"]["perplexity:brown"]["perplexity"]["fell"] == pytest.approx(10.0)  # percent
    assert s["warnings"] == ["probes:facts contains fell 30.0 points (50.0% -> 20.0%)",
                             "perplexity:brown perplexity fell 10.0 % (40.00 -> 44.00)"]
    table = markdown(s, {"loss": 2.5})
    assert "| probes:facts | contains | 0.5000 | 0.2000 | -30.0 points **(fell)** | 40 |" in table
    assert "| probes:format | follows | 0.6000 | 0.5900 | -1.0 points | 40 |" in table


def test_report_is_on_for_fine_tuning_runs_only():
    from jaxlearn.config import load_config

    assert forgetting_enabled(load_config(None, ["model.init_from=smollm2-135m-instruct"]))
    assert not forgetting_enabled(load_config(None, []))
    assert not forgetting_enabled(load_config(None, ["model.init_from=x", "train.forgetting=false"]))
    assert forgetting_enabled(load_config(None, ["train.forgetting=true"]))
