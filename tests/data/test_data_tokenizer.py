"""The SentencePiece tokenizer: trained in-process on real Shakespeare, lossless, deterministic."""

import pickle

import pytest

from jaxlearn.data.errors import DataError
from jaxlearn.data.tokenizer import Tokenizer, train_tokenizer


def test_special_ids_and_vocab(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    assert tok.vocab_size == 2048
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    ids = tok.encode("ROMEO:\nIs the day so young?")
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "ROMEO:\nIs the day so young?"


def test_round_trip_on_unseen_plays(shakespeare_tokenizer, shakespeare_eval):
    tok = shakespeare_tokenizer
    for play in shakespeare_eval:
        ids = tok.encode(play)
        assert tok.decode(ids) == play
        assert len(ids) < 0.4 * len(play)  # it really learned words, not characters


@pytest.mark.parametrize("text", ["", "  two  spaces\n\n\tand tabs ", "naïve café ☃ 😀 日本語", "\x00\x7f end"])
def test_round_trip_any_text(shakespeare_tokenizer, text):
    tok = shakespeare_tokenizer
    assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(text)  # byte fallback: nothing is unknown


def test_load_and_pickle(shakespeare_tokenizer_path, shakespeare_tokenizer):
    tok = Tokenizer.load(shakespeare_tokenizer_path)
    assert tok.encode("Good morrow") == shakespeare_tokenizer.encode("Good morrow")
    clone = pickle.loads(pickle.dumps(tok))  # grain worker processes receive a pickled copy
    assert clone.encode("Good morrow") == tok.encode("Good morrow") and clone.vocab_size == tok.vocab_size
    assert shakespeare_tokenizer_path.with_suffix(".vocab").read_text().startswith("<pad>\t0\n<unk>")


def test_training_is_deterministic_and_atomic(tmp_path, shakespeare_train):
    texts = shakespeare_train[:4]
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=600)
    b = train_tokenizer(texts, tmp_path / "b", vocab_size=600)
    assert a.read_bytes() == b.read_bytes()  # so every host trains the same model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "a.vocab", "b.model", "b.vocab"]


def test_vocab_too_large_names_the_maximum(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size=5000 is too large.*the maximum is \d+"):
        train_tokenizer(["to be or not to be, that is the question"] * 20, tmp_path / "t", vocab_size=5000)
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small_and_empty_texts(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size=100 is below the \d+ entries"):
        train_tokenizer(["hello world"], tmp_path / "t", vocab_size=100)
    with pytest.raises(DataError, match="training texts are empty"):
        train_tokenizer(["", "  \n\n "], tmp_path / "t", vocab_size=300)


def test_long_lines_are_chunked(tmp_path):
    # One 200k-character line with no breaks: the trainer only accepts bounded sentences.
    words = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake"]
    text = " ".join(words[(i * 7) % 10] + words[(i * 3) % 10] for i in range(20_000))
    tok = Tokenizer.load(train_tokenizer([text], tmp_path / "t", vocab_size=300))
    assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="cannot read tokenizer .*missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model is not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
