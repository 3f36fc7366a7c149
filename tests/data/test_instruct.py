"""Instruction datasets: fixed, disjoint splits by stable hash; your own chat files; clear errors."""

import json

import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data.errors import DataError
from jaxlearn.data.instruct import (SPLITS, chat_examples, chat_record_messages, humaneval_examples, load_examples,
                                    split_of, wordnet_antonyms)
from jaxlearn.data.sft import chat_examples_for


def test_split_of_is_stable_and_follows_the_fractions():
    # Values fixed by SHA-256, independent of the process and of PYTHONHASHSEED.
    assert [split_of(k) for k in ("able", "hot", "cold")] == [split_of(k) for k in ("able", "hot", "cold")]
    counts = {s: 0 for s in SPLITS}
    for i in range(4000):
        counts[split_of(f"k{i}", (0.7, 0.1, 0.2))] += 1
    assert abs(counts["train"] / 4000 - 0.7) < 0.03 and abs(counts["test"] / 4000 - 0.2) < 0.03
    with pytest.raises(DataError, match="sum"):
        split_of("x", (0.5, 0.2, 0.2))


@pytest.fixture(scope="module")
def antonyms():
    return wordnet_antonyms()


def test_antonym_groups_never_cross_splits(antonyms):
    split = {e.meta["word"]: e.meta["split"] for e in antonyms}
    assert {e.meta["split"] for e in antonyms} == set(SPLITS)
    assert len(antonyms) > 5000
    for e in antonyms:
        for a in e.answers:  # a test word's antonyms are never training prompts either
            assert split.get(a, e.meta["split"]) == e.meta["split"], (e.id, a)
    hot = next(e for e in antonyms if e.meta["word"] == "hot")
    assert "cold" in hot.answers and hot.messages[0]["content"] == "Give an antonym of 'hot'."


def test_humaneval_test_problems_are_never_trained_on():
    probs = humaneval_examples()
    assert len(probs) == 164
    by_split = {s: {p.id for p in probs if p.meta["split"] == s} for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == 164
    assert not (by_split["train"] & by_split["test"]) and len(by_split["test"]) >= 30
    train = chat_examples_for(DataConfig(source="humaneval"), "train")
    assert {e.id for e in train} == by_split["train"]
    assert [e.id for e in load_examples("humaneval", "test")] == sorted(by_split["test"], key=lambda t: int(t.split("/")[1]))


def test_your_own_chat_files(tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30)] + [{"prompt": f"p{i}", "response": f"r{i}", "system": "s"} for i in range(30)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "pp", "response": "rr"}]), tmp_path / "chat.parquet")
    exs = chat_examples([jsonl, tmp_path / "chat.parquet"])
    assert len(exs) == 61 and exs[30].messages[0] == {"role": "system", "content": "s"}
    assert exs[-1].messages[-1]["content"] == "rr"
    cfg = DataConfig(source="jsonl", format="chat", paths=(str(jsonl),), eval_fraction=0.2)
    parts = {s: {e.id for e in chat_examples_for(cfg, s)} for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == 60 and not (parts["train"] & (parts["validation"] | parts["test"]))
    # The split of a record depends on its content, not on its line number.
    jsonl.write_text("\n".join(json.dumps(r) for r in reversed(rows)) + "\n")
    again = {e.messages[-1]["content"] for e in chat_examples_for(cfg, "test")}
    assert again == {e.messages[-1]["content"] for e in chat_examples_for(
        DataConfig(source="jsonl", format="chat", paths=(str(jsonl),), eval_fraction=0.2), "test")}


@pytest.mark.parametrize("record,match", [
    ({"text": "x"}, "needs 'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant"),
    ({"prompt": 1, "response": "x"}, "strings"),
])
def test_bad_chat_records_name_the_place(record, match):
    with pytest.raises(DataError, match=match) as e:
        chat_record_messages(record, "data.jsonl:7")
    assert "data.jsonl:7" in str(e.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        chat_examples([f])
