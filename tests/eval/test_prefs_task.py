"""`prefs:<source>`: held-out preference accuracy and margin, the sign convention checked with
known log-likelihoods, and unknown sources refused before any model loads."""

import pytest

from jaxlearn.data.errors import DataError


def test_pref_accuracy_and_margin_follow_the_chosen_reply(monkeypatch):
    import jaxlearn.eval.tasks as tasks

    seen = []

    def fake_nll(em, convs, batch_size=16):
        # conversations come as (chosen, rejected) per pair; NLL 1 for the first pair's chosen
        # reply and 3 for its rejected one (chosen more likely), the reverse for the second pair.
        seen.extend(c[-1]["content"] for c in convs)
        return [(1.0, 2), (3.0, 2), (5.0, 2), (2.0, 2)][:len(convs)]

    monkeypatch.setattr(tasks, "reference_nll", fake_nll)
    from jaxlearn.data import preference
    from jaxlearn.data.preference import PreferencePair

    def fake_pairs(data_cfg, split):  # WordNet's pairs take ~10 s to build; the scoring is what is tested
        assert data_cfg.source == "wordnet_antonym_prefs" and split == "test"
        q = ({"role": "user", "content": "Give an antonym of 'hot'."},)
        return [PreferencePair(f"p{i}", q, c, r, "test") for i, (c, r) in enumerate([("cold", "warm"), ("icy", "tepid"),
                                                                                     ("chilly", "boiling")])]

    monkeypatch.setattr(preference, "preference_pairs", fake_pairs)
    (res,) = tasks.run_tasks(object(), ["prefs:wordnet_antonym_prefs"], split="test", limit=2, echo=lambda _m: None)
    assert res.metrics["n"] == 2
    assert res.metrics["pref_accuracy"] == 0.5
    assert res.metrics["pref_margin"] == pytest.approx(((3.0 - 1.0) + (2.0 - 5.0)) / 2)
    first = res.examples[0]
    assert seen[:2] == [first["chosen"], first["rejected"]] and first["correct"] and first["margin"] == 2.0
    assert not res.examples[1]["correct"]
    assert tasks.HEADLINE["prefs:wordnet_antonym_prefs"] == "pref_accuracy"


def test_unknown_preference_source_is_refused_with_the_choices():
    from jaxlearn.eval.tasks import check_tasks

    with pytest.raises(DataError, match=r"unknown preference source in eval task 'prefs:antonyms'; use one of "
                                        r"prefs:wordnet_antonym_prefs, prefs:wordnet_definition_prefs"):
        check_tasks(["prefs:antonyms"])
