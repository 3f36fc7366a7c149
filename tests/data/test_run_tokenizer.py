"""Choosing a run's tokenizer: configured, or the run directory's (trained once, never when reading a run)."""

import dataclasses
import json

import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data import run_tokenizer
from jaxlearn.data.errors import DataError
from jaxlearn.data.run_tokenizer import resolve_tokenizer


@pytest.fixture
def text_cfg(tmp_path):
    lines = [f"the {w} sat on the mat and the {w} ran away" for w in ("cat", "dog", "fox", "owl", "ant")] * 40
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return DataConfig(source="jsonl", paths=(str(path),), tokenizer_vocab_size=300)


def test_reading_a_run_never_trains_a_tokenizer(text_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="pass data.tokenizer=PATH"):
        resolve_tokenizer(text_cfg, run_dir, may_train=False)
    assert not (run_dir / "tokenizer.model").exists()
    trained = resolve_tokenizer(text_cfg, run_dir)  # a run being trained gets one, trained once
    assert (run_dir / "tokenizer.model").is_file() and trained.vocab_size == 300
    monkeypatch.setattr(run_tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("trained again"))
    again = resolve_tokenizer(text_cfg, run_dir, may_train=False)
    assert again.encode("the cat sat") == trained.encode("the cat sat")
    # A configured tokenizer wins over the run directory's, in both modes.
    given = dataclasses.replace(text_cfg, tokenizer=str(run_dir / "tokenizer.model"))
    assert resolve_tokenizer(given, tmp_path / "elsewhere", may_train=False).vocab_size == 300


def test_chat_data_needs_a_configured_tokenizer(tmp_path):
    cfg = DataConfig(source="jsonl", format="chat", paths=(str(tmp_path / "chat.jsonl"),))
    with pytest.raises(DataError, match="set data.tokenizer"):
        resolve_tokenizer(cfg, tmp_path / "run")
