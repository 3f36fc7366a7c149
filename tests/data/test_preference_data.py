"""Preference data: records -> paired rows that share the prompt's tokens, response-only masks,
whole-or-dropped truncation (counted), padded held-out batches, errors naming file:line, the
feed's shards, and WordNet pairs whose splits do not leak."""

import json

import numpy as np
import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data.errors import DataError
from jaxlearn.data.feed import make_feed
from jaxlearn.data.preference import (PreferencePair, encode_pair, encode_pairs, eval_batches, file_pairs,
                                      wordnet_antonym_pairs)
from jaxlearn.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("preftok")
    words = ["hot", "cold", "up", "down", "big", "small", "fast", "slow", "give", "antonym", "of"]
    texts = [f"<|im_start|>user\nGive an antonym of '{a}'.<|im_end|>\n<|im_start|>assistant\n{b}<|im_end|>\n"
             for a in words for b in words]
    return Tokenizer.load(train_tokenizer(texts * 3, d / "tok", vocab_size=320))


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = [{"id": i, "prompt": f"Give an antonym of '{a}'.", "chosen": b, "rejected": a}
            for i, (a, b) in enumerate([("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow")] * 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_rows_share_the_prompt_and_mask_only_the_responses(tok):
    pair = PreferencePair("x", ({"role": "user", "content": "Give an antonym of 'hot'."},), "cold", "hot and fast")
    row, status = encode_pair(tok, pair, 48)
    assert status == "ok" and row["inputs"].shape == (2, 48) and row["loss_mask"].shape == (2, 48)
    first = [int(np.argmax(row["loss_mask"][i])) for i in range(2)]  # first scored target of each reply
    assert first[0] == first[1]
    np.testing.assert_array_equal(row["inputs"][0, :first[0] + 1], row["inputs"][1, :first[1] + 1])  # same prompt
    scored = [tok.decode(row["targets"][i][row["loss_mask"][i] > 0].tolist()) for i in range(2)]
    assert scored[0].startswith("cold") and scored[1].startswith("hot and fast") and "antonym" not in "".join(scored)
    assert row["loss_mask"][1].sum() > row["loss_mask"][0].sum()


def test_pairs_are_dropped_whole_never_truncated(tok):
    long = PreferencePair("y", ({"role": "user", "content": "Give an antonym of 'hot'."},), "cold", "slow " * 40)
    short = PreferencePair("z", ({"role": "user", "content": "Give an antonym of 'up'."},), "down", "up")
    rows, stats = encode_pairs(tok, [long, short], seq_len=40)
    assert len(rows) == 1 and stats.kept == 1 and stats.dropped_too_long == 1 and stats.pairs == 2


def test_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a preference record needs .*'rejected'"):
        file_pairs([bad], 0.1)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logp": -1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: stored reference log-probs need both"):
        file_pairs([bad], 0.1)


def test_feed_shards_and_held_out_padding(tok, pref_file):
    cfg = DataConfig(source="jsonl", format="preference", paths=(str(pref_file),), seq_len=64, batch_size=4,
                     eval_fraction=0.5, shards=2)
    one = make_feed(cfg, tok, max_eval_batches=8, process_index=0, process_count=1)
    hosts = [make_feed(cfg, tok, max_eval_batches=8, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(3):  # two hosts together feed exactly the one-host global batch
        whole, parts = next(one.train), [next(h.train) for h in hosts]
        assert whole["inputs"].shape == (4, 2, 64) and whole["pair_mask"].tolist() == [1.0] * 4
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([p["inputs"] for p in parts]))
    rep = one.report
    assert rep["train"]["kept"] == rep["train"]["pairs"] > 0 and rep["validation"]["kept"] == rep["validation"]["pairs"] > 0
    assert rep["train"]["pairs"] + rep["validation"]["pairs"] < 40  # the test split is held back too
    evals = one.eval_batches
    n_pairs = one.report["validation"]["kept"]
    assert sum(b["pair_mask"].sum() for b in evals) == n_pairs  # every held-out pair once, padding masked
    assert all(b["inputs"].shape == (4, 2, 64) for b in evals)
    last = evals[-1]
    assert (last["loss_mask"][last["pair_mask"] == 0] == 0).all()


def test_eval_batches_split_over_hosts_like_training():
    rows = [{"inputs": np.full((2, 4), i, np.int32), "targets": np.zeros((2, 4), np.int32),
             "segment_ids": np.ones((2, 4), np.int32), "positions": np.zeros((2, 4), np.int32),
             "loss_mask": np.ones((2, 4), np.float32), "ref_logps": np.zeros(2, np.float32)} for i in range(6)]
    cfg = DataConfig(seq_len=4, batch_size=4)
    whole = eval_batches(cfg, rows, max_batches=None)
    halves = [eval_batches(cfg, rows, max_batches=None, shards=range(s, s + 1), shard_count=2) for s in (0, 1)]
    for w, a, b in zip(whole, *halves):
        np.testing.assert_array_equal(w["inputs"], np.concatenate([a["inputs"], b["inputs"]]))
    assert [b["pair_mask"].tolist() for b in whole] == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_wordnet_antonym_pairs_are_checkable_and_do_not_leak():
    pairs = wordnet_antonym_pairs()
    assert len(pairs) > 5000
    by_split = {}
    for p in pairs:
        by_split.setdefault(p.split, []).append(p)
        assert p.chosen != p.rejected
    # no word of a test pair's antonym group appears in any training pair (the group is the split key)
    test_words = {w for p in by_split["test"] for w in (p.prompt[-1]["content"].split("'")[1], p.chosen)}
    train_words = {w for p in by_split["train"] for w in (p.prompt[-1]["content"].split("'")[1], p.chosen)}
    assert not test_words & train_words
    assert len(by_split["test"]) > 300 and len(by_split["validation"]) > 300
