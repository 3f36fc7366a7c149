"""The data feed: one format dispatch, the same batches as the per-format pipelines, and
data shards (`data.shards`) honoured for SFT as for pretraining, with exact per-shard resume.

Text uses the toy documents of conftest.py (a token tells its document); chat uses the
character tokenizer of tests/sft_helpers.py, with answers `a000`, `a001`, ... so a scored span
tells its example. Nothing touches the network.
"""

import dataclasses
import json

import numpy as np
import pytest

from jaxlearn.config import ConfigError, DataConfig
from jaxlearn.data import pipeline, sft
from jaxlearn.data.batching import TOKEN_FEATURES
from jaxlearn.data.errors import DataError
from jaxlearn.data.feed import FORMATS, Feed, HostFeed, make_feed, make_train_feed, owned_shards
from sft_helpers import CharChatTokenizer

CHAT_TOK = CharChatTokenizer()


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == sorted(TOKEN_FEATURES)
        for k in TOKEN_FEATURES:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture
def text_cfg(tmp_path, make_toy_documents):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_toy_documents(40, max_len=60)))
    return DataConfig(source="jsonl", paths=(str(path),), seq_len=32, batch_size=4, eval_fraction=0.2)


@pytest.fixture(scope="module")
def chat_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i:03d}"}) + "\n" for i in range(48)))
    return DataConfig(source="jsonl", format="chat", paths=(str(path),), seq_len=64, batch_size=4,
                      eval_fraction=0.2)


def answers(batch) -> list[str]:
    """The answer text of every packed example of a chat batch, row by row, segment by segment."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        for s in range(1, int(batch["segment_ids"][r].max()) + 1):
            sel = (batch["segment_ids"][r] == s) & (batch["loss_mask"][r] > 0)
            out.append(CHAT_TOK.decode(batch["targets"][r][sel]))
    return out


def test_the_formats_are_one_table():
    assert set(FORMATS) == {"text", "chat", "preference", "unpaired", "prompts"}
    with pytest.raises(DataError, match="data.format='rollouts' has no feed"):  # a format with no builder
        make_feed(dataclasses.replace(DataConfig(), format="rollouts"), CHAT_TOK, process_index=0, process_count=1)


def test_text_feed_gives_the_pretraining_batches(text_cfg, int_tokenizer):
    feed = make_feed(text_cfg, int_tokenizer, process_index=0, process_count=1)
    assert isinstance(feed, Feed) and isinstance(feed.train, HostFeed) and feed.report is None
    assert_same(take(feed.train, 6), take(pipeline.make_train_iterator(text_cfg, int_tokenizer), 6))
    old_eval = pipeline.make_eval_batches(text_cfg, int_tokenizer, None)
    assert len(old_eval) >= 2
    assert_same(feed.eval_batches, old_eval)
    capped = make_feed(text_cfg, int_tokenizer, max_eval_batches=1, process_index=0, process_count=1)
    assert_same(capped.eval_batches, old_eval[:1])


def test_chat_feed_gives_the_sft_batches_and_report(chat_cfg):
    feed = make_feed(chat_cfg, CHAT_TOK, max_eval_batches=2, process_index=0, process_count=1)
    old_it, train_stats = sft.make_sft_train_iterator(chat_cfg, CHAT_TOK)
    assert_same(take(feed.train, 6), take(old_it, 6))
    old_eval, eval_stats = sft.make_sft_eval_batches(chat_cfg, CHAT_TOK, 2)
    assert old_eval and not any(a.startswith("q") for b in old_eval for a in answers(b))
    assert_same(feed.eval_batches, old_eval)
    assert feed.report == {
        "train": dataclasses.asdict(train_stats), "validation": dataclasses.asdict(eval_stats),
        "summary": f"SFT data, train: {train_stats.summary()}\nSFT data, validation: {eval_stats.summary()}"}
    assert train_stats.kept > 30 and eval_stats.kept > 0


def test_sft_shards_over_two_hosts_read_disjoint_examples(chat_cfg):
    cfg = dataclasses.replace(chat_cfg, shards=2)
    rows, _ = sft.encode_split(cfg, CHAT_TOK, "train")
    ids = [CHAT_TOK.decode(r["targets"][r["loss_mask"] > 0]) for r in rows]
    one = make_feed(cfg, CHAT_TOK, max_eval_batches=2, process_index=0, process_count=1)
    hosts = [make_feed(cfg, CHAT_TOK, max_eval_batches=2, process_index=p, process_count=2) for p in (0, 1)]
    assert [list(h.train.owned) for h in hosts] == [[0], [1]] and list(one.train.owned) == [0, 1]
    n = 8  # more than one epoch of each shard (16 examples, about 4 a batch)
    per_host = [take(h.train, n) for h in hosts]
    whole = take(one.train, n)
    for b, b0, b1 in zip(whole, *per_host):
        assert b0["inputs"].shape == (2, 64)
        assert_same([b], [concat(b0, b1)])  # the global batch does not depend on the host layout
    seen = [{a for b in batches for a in answers(b)} for batches in per_host]
    assert seen[0] == set(ids[0::2]) and seen[1] == set(ids[1::2])  # example shard s reads examples s::2
    assert not seen[0] & seen[1]
    # data.shards is honoured, not ignored: one shard of the same data gives other batches.
    single = make_train_feed(chat_cfg, CHAT_TOK, process_index=0, process_count=1)
    assert not np.array_equal(next(single)["inputs"], whole[0]["inputs"])
    # The held-out batches are the same global batches in any layout, each host its block.
    assert_same(one.eval_batches, [concat(a, b) for a, b in zip(hosts[0].eval_batches, hosts[1].eval_batches)])
    assert_same(one.eval_batches, sft.make_sft_eval_batches(chat_cfg, CHAT_TOK, 2)[0])


def test_text_shards_over_two_hosts_read_disjoint_documents(text_cfg, int_tokenizer, toy_doc_of):
    cfg = dataclasses.replace(text_cfg, shards=4, shuffle=False)  # no 512-row shuffle window to fill 8 times
    one = make_feed(cfg, int_tokenizer, max_eval_batches=2, process_index=0, process_count=1)
    hosts = [make_feed(cfg, int_tokenizer, max_eval_batches=2, process_index=p, process_count=2) for p in (0, 1)]
    assert [list(h.train.owned) for h in hosts] == [[0, 1], [2, 3]]
    per_host = [take(h.train, 5) for h in hosts]
    for b, b0, b1 in zip(take(one.train, 5), *per_host):
        assert_same([b], [concat(b0, b1)])
    docs = [{toy_doc_of(t) for b in batches for t in b["targets"].ravel()} - {-1} for batches in per_host]
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    assert_same(one.eval_batches, [concat(a, b) for a, b in zip(hosts[0].eval_batches, hosts[1].eval_batches)])


def test_sft_feed_resumes_exactly_per_shard(chat_cfg):
    cfg = dataclasses.replace(chat_cfg, shards=2)
    feed = make_train_feed(cfg, CHAT_TOK, process_index=0, process_count=1)
    first = take(feed, 3)
    # Through JSON, as the checkpoint's per-shard files store them.
    states = {s: json.loads(json.dumps(st)) for s, st in feed.shard_states().items()}
    assert sorted(states) == [0, 1]
    expected = take(feed, 5)
    again = make_train_feed(cfg, CHAT_TOK, process_index=0, process_count=1)
    again.set_shard_states(states)
    assert_same(take(again, 5), expected)
    assert not np.array_equal(first[0]["inputs"], expected[0]["inputs"])  # a fresh feed starts elsewhere
    # Written by two hosts, restored on one (and the other way round): the states are per shard.
    hosts = [make_train_feed(cfg, CHAT_TOK, process_index=p, process_count=2) for p in (0, 1)]
    for h in hosts:
        h.set_shard_states({s: states[s] for s in h.owned})
    for want in expected:
        assert_same([want], [concat(next(hosts[0]), next(hosts[1]))])


def test_bad_layouts_and_counts_name_the_fix(chat_cfg):
    with pytest.raises(ConfigError, match="data.shards=3 does not divide over 2 hosts"):
        make_feed(dataclasses.replace(chat_cfg, shards=3), CHAT_TOK, process_index=0, process_count=2)
    with pytest.raises(DataError, match="batch_size=6 .* does not divide over 4"):
        make_feed(dataclasses.replace(chat_cfg, shards=4, batch_size=6), CHAT_TOK, process_index=0, process_count=1)
    with pytest.raises(DataError, match="train.eval_batches"):
        make_feed(chat_cfg, CHAT_TOK, max_eval_batches=0, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="process_index 2"):
        make_feed(chat_cfg, CHAT_TOK, process_index=2, process_count=2)


def test_host_feed_concatenates_owned_shards_and_checks_divisibility():
    assert list(owned_shards(4, 1, 2)) == [2, 3] and list(owned_shards(0, 1, 2)) == [1]
    with pytest.raises(ConfigError, match="multiple of 2"):
        owned_shards(3, 0, 2)

    class Counter:
        def __init__(self, s):
            self.s, self.i = s, 0

        def __next__(self):
            self.i += 1
            return {"x": np.full((2, 1), 10 * self.s + self.i)}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, st):
            self.i = st["i"]

    feed = HostFeed(lambda s, n: Counter(s), shards=4, process_index=1, process_count=2)
    assert next(feed)["x"].ravel().tolist() == [21, 21, 31, 31]
    states = feed.shard_states()
    assert states == {2: {"i": 1}, 3: {"i": 1}}
    again = HostFeed(lambda s, n: Counter(s), shards=4, process_index=1, process_count=2)
    again.set_shard_states(states)
    assert next(again)["x"].ravel().tolist() == [22, 22, 32, 32]
