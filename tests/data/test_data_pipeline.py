"""grain pretraining pipelines: packing invariants, determinism, sharding, resume, eval.

Most tests use toy documents whose tokens come from distinct ranges (see conftest), so every
token tells which document it came from; a few run the real Shakespeare pipeline end to end.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data import pipeline, run_tokenizer
from jaxlearn.data.errors import DataError

SEQ = 32


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.FEATURES)


def check_row_invariants(batch, tok, doc_of):
    """Shapes, dtypes, and that every scored target comes from its input's document."""
    assert set(batch) == set(pipeline.FEATURES)
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[k].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    for seg, pos, inp, tgt, mask in zip(*(batch[k] for k in ("segment_ids", "positions", "inputs", "targets", "loss_mask"))):
        assert np.array_equal(mask, (seg > 0).astype(np.float32))
        n = int((seg > 0).sum())
        assert np.all(seg[n:] == 0) and np.all(inp[n:] == 0) and np.all(tgt[n:] == 0)  # padding at the end
        if n == 0:  # an all-padding row (the end of an eval pass)
            continue
        ids = seg[:n]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # 1, 2, 3 ...
        for s in np.unique(ids):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart per segment
            # Inside a segment the targets are the inputs shifted by one ...
            assert np.array_equal(tgt[where][:-1], inp[where][1:])
            # ... and all tokens belong to one document (BOS only as input, EOS only as target).
            docs = {doc_of(t) for t in np.concatenate([inp[where], tgt[where]])} - {-1}
            assert len(docs) <= 1
            assert tok.eos_id not in inp[where] and tok.bos_id not in tgt[where]
            bos = np.flatnonzero(inp[where] == tok.bos_id)
            assert len(bos) == 0 or (len(bos) == 1 and bos[0] == 0)  # BOS only starts a segment


def toy_dataset(docs, tok, **kw):
    kw = {"seq_len": SEQ, "batch_size": 4, "seed": 0, **kw}
    return pipeline.pretrain_dataset(docs, tok, **kw)


def test_tokenize_document(int_tokenizer):
    out = pipeline.TokenizeDocument(int_tokenizer).map("10 11 12")
    assert out["inputs"].tolist() == [1, 10, 11, 12] and out["targets"].tolist() == [10, 11, 12, 2]
    assert out["inputs"].dtype == np.int32
    empty = pipeline.TokenizeDocument(int_tokenizer).map("")
    assert empty["inputs"].tolist() == [1] and empty["targets"].tolist() == [2]


def test_packing_invariants(int_tokenizer, make_toy_documents, toy_doc_of):
    docs = make_toy_documents(60, max_len=100)
    batches = take(iter(toy_dataset(docs, int_tokenizer)), 40)
    for b in batches:
        assert b["inputs"].shape == (4, SEQ)
        check_row_invariants(b, int_tokenizer, toy_doc_of)
    # Packing concatenates: training rows have no padding while the stream lasts.
    assert all(b["loss_mask"].all() for b in batches)


def test_one_pass_reproduces_every_document(int_tokenizer, make_toy_documents, toy_doc_of):
    docs = make_toy_documents(25, max_len=70)
    ds = toy_dataset(docs, int_tokenizer, shuffle=False, num_epochs=1, batch_size=1)
    pieces = {}
    for b in ds:
        for seg in np.unique(b["segment_ids"][0][b["segment_ids"][0] > 0]):
            where = b["segment_ids"][0] == seg
            inp, tgt = b["inputs"][0][where], b["targets"][0][where]
            (doc,) = {toy_doc_of(t) for t in np.concatenate([inp, tgt])} - {-1}
            pieces.setdefault(doc, []).append(tgt)
    # Unshuffled, documents come in order and each is split into consecutive pieces: the
    # concatenated targets of a document are its tokens followed by EOS.
    for d, text in enumerate(docs):
        got = np.concatenate(pieces.pop(d))
        assert got.tolist() == [int(t) for t in text.split()] + [int_tokenizer.eos_id]
    assert not pieces


def test_same_seed_same_batches_other_seed_other_batches(int_tokenizer, make_toy_documents):
    docs = make_toy_documents(50)
    a = take(iter(toy_dataset(docs, int_tokenizer, seed=7)), 20)
    b = take(iter(toy_dataset(docs, int_tokenizer, seed=7)), 20)
    c = take(iter(toy_dataset(docs, int_tokenizer, seed=8)), 20)
    assert same(a, b) and not same(a, c)


def test_each_epoch_is_shuffled_differently(int_tokenizer, make_toy_documents, toy_doc_of):
    docs = make_toy_documents(30, min_len=5, max_len=5)  # 6 tokens per document with BOS
    ds = toy_dataset(docs, int_tokenizer, num_epochs=2, row_shuffle_window=1, batch_size=1)
    order = []
    for b in ds:
        inp = b["inputs"][0]
        order += [toy_doc_of(inp[i + 1]) for i in np.flatnonzero(inp == int_tokenizer.bos_id)]
    first, second = order[:30], order[30:60]
    assert sorted(first) == sorted(second) == list(range(30))  # every document once per epoch
    assert first != second and first != list(range(30))


def test_hosts_get_disjoint_covering_shares(int_tokenizer, make_toy_documents, toy_doc_of):
    docs = make_toy_documents(40)
    for count in (2, 3):
        seen = []
        for index in range(count):
            ds = toy_dataset(docs, int_tokenizer, num_epochs=1, batch_size=count,
                             shard_index=index, shard_count=count)
            got = set()
            for b in ds:
                assert b["inputs"].shape == (1, SEQ)  # per-host batch = global // hosts
                got |= {toy_doc_of(t) for t in b["targets"].ravel()} - {-1}
            seen.append(got)
        assert set().union(*seen) == set(range(40))
        assert sum(map(len, seen)) == 40  # disjoint


def test_batch_must_divide_over_hosts(int_tokenizer, make_toy_documents):
    with pytest.raises(DataError, match="batch_size=6 .* does not divide over 4 hosts"):
        toy_dataset(make_toy_documents(8), int_tokenizer, batch_size=6, shard_count=4)
    with pytest.raises(DataError, match="host 3 of 4 gets no documents"):
        toy_dataset(make_toy_documents(3), int_tokenizer, batch_size=4, shard_index=3, shard_count=4)


@pytest.mark.parametrize("skip", [0, 1, 9, 33])
def test_iterator_state_round_trip(int_tokenizer, make_toy_documents, skip):
    docs = make_toy_documents(40, max_len=150)  # long documents: states with a split remainder
    it = iter(toy_dataset(docs, int_tokenizer))
    take(it, skip)
    state = it.get_state()
    expected = take(it, 15)
    for restore in (state, json.loads(json.dumps(state))):  # grain checkpoints store JSON
        fresh = iter(toy_dataset(docs, int_tokenizer))
        fresh.set_state(restore)
        assert same(take(fresh, 15), expected)


def test_grain_checkpoint_resume(tmp_path, int_tokenizer, make_toy_documents):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    docs = make_toy_documents(40, max_len=150)
    it = iter(toy_dataset(docs, int_tokenizer))
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = take(it, 10)
        fresh = iter(toy_dataset(docs, int_tokenizer))
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert same(take(fresh, 10), expected)


def test_eval_is_one_padded_pass(int_tokenizer, make_toy_documents, toy_doc_of):
    docs = make_toy_documents(23, max_len=60)
    batches = pipeline.eval_batches(docs, int_tokenizer, seq_len=SEQ, batch_size=4)
    n_tokens = sum(len(d.split()) + 1 for d in docs)  # every target once: tokens + EOS
    assert sum(b["loss_mask"].sum() for b in batches) == n_tokens
    assert len(batches) == -(-(-(-n_tokens // SEQ)) // 4)  # ceil(ceil(tokens / seq) / batch)
    for b in batches:
        assert b["inputs"].shape == (4, SEQ)
        check_row_invariants(b, int_tokenizer, toy_doc_of)
    assert batches[-1]["loss_mask"][-1].sum() == 0  # the last batch is padded with empty rows
    assert same(batches, pipeline.eval_batches(docs, int_tokenizer, seq_len=SEQ, batch_size=4))
    capped = pipeline.eval_batches(docs, int_tokenizer, seq_len=SEQ, batch_size=4, max_batches=2)
    assert same(capped, batches[:2])


def test_eval_sharding_splits_each_global_batch(int_tokenizer, make_toy_documents):
    docs = make_toy_documents(23, max_len=60)
    whole = pipeline.eval_batches(docs, int_tokenizer, seq_len=SEQ, batch_size=4)
    parts = [pipeline.eval_batches(docs, int_tokenizer, seq_len=SEQ, batch_size=4, shard_index=i, shard_count=2)
             for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)  # every host runs the same number of steps
    for w, a, b in zip(whole, *parts):
        assert all(np.array_equal(w[k], np.concatenate([a[k], b[k]])) for k in pipeline.FEATURES)


# --------------------------------------------------------------------------------------------
# The real thing: Shakespeare through DataConfig


@pytest.fixture(scope="module")
def shakespeare_cfg(shakespeare_tokenizer_path):
    return DataConfig(source="shakespeare", tokenizer=str(shakespeare_tokenizer_path), seq_len=128, batch_size=4)


def test_shakespeare_train_batches(shakespeare_cfg, shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    it = pipeline.make_train_iterator(shakespeare_cfg, tok)
    batches = take(it, 30)
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {k: (4, 128) for k in pipeline.FEATURES}
        assert b["inputs"].max() < tok.vocab_size and b["loss_mask"].all()
        assert np.array_equal(b["targets"][:, :-1][b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]],
                              b["inputs"][:, 1:][b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]])
    text = tok.decode(batches[0]["inputs"][0])
    assert len(text) > 200 and "\n" in text
    state = it.get_state()
    more = take(it, 5)
    again = pipeline.make_train_iterator(shakespeare_cfg, tok)
    again.set_state(json.loads(json.dumps(state)))
    assert same(take(again, 5), more)
    other_host = pipeline.make_train_iterator(shakespeare_cfg, tok, shard_index=1, shard_count=2)
    assert next(other_host)["inputs"].shape == (2, 128)


def test_shakespeare_eval_batches(shakespeare_cfg, shakespeare_tokenizer, shakespeare_eval):
    batches = pipeline.make_eval_batches(shakespeare_cfg, shakespeare_tokenizer, max_batches=None)
    scored = sum(b["loss_mask"].sum() for b in batches)
    expected = sum(len(shakespeare_tokenizer.encode(p)) + 1 for p in shakespeare_eval)
    assert scored == expected and batches[-1]["loss_mask"].sum() < 4 * 128
    assert len(pipeline.make_eval_batches(shakespeare_cfg, shakespeare_tokenizer, max_batches=3)) == 3


def test_ensure_tokenizer_trains_once_then_reuses(tmp_path, monkeypatch, shakespeare_tokenizer_path):
    cfg = DataConfig(source="shakespeare", tokenizer_vocab_size=512)
    tok = pipeline.ensure_tokenizer(cfg, tmp_path)
    assert (tmp_path / "tokenizer.model").exists() and tok.vocab_size == 512
    monkeypatch.setattr(run_tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("trained again"))
    assert pipeline.ensure_tokenizer(cfg, tmp_path).encode("ROMEO:") == tok.encode("ROMEO:")
    with pytest.raises(DataError, match="has vocab_size 512 but data.tokenizer_vocab_size is 1024"):
        pipeline.ensure_tokenizer(dataclasses.replace(cfg, tokenizer_vocab_size=1024), tmp_path)
    given = dataclasses.replace(cfg, tokenizer=str(shakespeare_tokenizer_path))
    assert pipeline.ensure_tokenizer(given, tmp_path / "elsewhere").vocab_size == 2048


def test_grain_worker_processes(shakespeare_cfg, shakespeare_tokenizer):
    cfg = dataclasses.replace(shakespeare_cfg, num_workers=1)  # each worker costs a process start
    it = pipeline.make_train_iterator(cfg, shakespeare_tokenizer)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    again = pipeline.make_train_iterator(cfg, shakespeare_tokenizer)
    again.set_state(json.loads(json.dumps(state)))
    assert same(take(again, 4), expected)
    it.close()
    again.close()


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import os, sys\n"
        "import jaxlearn.data.pipeline, jaxlearn.data.sources, jaxlearn.data.corpora, jaxlearn.data.tokenizer\n"
        "from absl import flags\n"
        "assert not flags.FLAGS.is_parsed(), 'flags parsed'\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'\n"
        "assert not os.path.exists(os.environ['JAXLEARN_CACHE']), 'cache touched'\n"
    )
    root = str(Path(pipeline.__file__).parents[2])  # works installed or from a checkout
    env = {**os.environ, "JAXLEARN_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
