"""Resume records (issue 15, items 2 and 3), through `jaxlearn train --resume` in-process:
a finished run is left alone; a damaged newest checkpoint is named and skipped, and the resumed
run matches the uninterrupted one; a run killed before its first checkpoint restarts from 0
saying so; nothing in the run directory changes when no checkpoint can be restored; no step
is ever logged twice."""

import json
import shutil

import pytest

from finished_run import train_args
from jaxlearn.cli import main
from jaxlearn.train.manifest import verify_step


def _train(run_dir, tokenizer, *extra):
    return main(train_args(run_dir, tokenizer, *extra))


def _train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["split"] == "train"]


def _snapshot(run_dir):
    """Every file of the run directory with its bytes and modification time."""
    return {p.relative_to(run_dir).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished(finished_run):
    return finished_run  # the session's finished tiny run (tests/train/conftest.py)


def test_resume_of_a_finished_run_changes_nothing(finished, shakespeare_tokenizer, capsys):
    before = _snapshot(finished)
    capsys.readouterr()
    assert _train(finished, shakespeare_tokenizer, "--resume") == 0
    assert "is complete: its newest checkpoint is step 6" in capsys.readouterr().out
    assert _snapshot(finished) == before  # summary.json, metrics, config.yaml: not even touched


def test_damaged_newest_checkpoint_falls_back_and_matches_the_straight_run(finished, shakespeare_tokenizer,
                                                                            tmp_path, capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished, run_dir)
    (run_dir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    capsys.readouterr()
    assert _train(run_dir, shakespeare_tokenizer, "--resume") == 0
    out = capsys.readouterr().out
    assert "checkpoint step 6 is damaged (state/_METADATA is missing)" in out
    assert "falling back to step 4" in out and f"resumed {run_dir} at step 4" in out
    assert (run_dir / "damaged_checkpoints" / "6").is_dir() and verify_step(run_dir / "checkpoints" / "6") is None
    assert _train_records(run_dir) == _train_records(finished)  # steps 1..6 once each, bit-identical


def test_a_failed_restore_rewrites_nothing(finished, shakespeare_tokenizer, tmp_path, capsys):
    run_dir = tmp_path / "broken"
    shutil.copytree(finished, run_dir)
    for step in (2, 4, 6):
        (run_dir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    before = _snapshot(run_dir)
    # train.log_every=3 would change config.yaml, were it written before the restore
    assert _train(run_dir, shakespeare_tokenizer, "train.steps=8", "train.log_every=3", "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no checkpoint under" in err and "step 6: state/_METADATA is missing" in err
    assert _snapshot(run_dir) == before


@pytest.mark.slow  # a full 6-step run (~15 s on 2 busy cores)
def test_kill_before_the_first_checkpoint_restarts_from_zero_without_duplicates(finished, shakespeare_tokenizer,
                                                                                 tmp_path, capsys):
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    # what a run killed at step 3 (before its first save) leaves: its config, tokenizer-less, 3 records
    shutil.copy(finished / "config.yaml", run_dir / "config.yaml")
    lines = (finished / "metrics.jsonl").read_text().splitlines()[:3]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 4, \"spl")  # and a torn last line
    capsys.readouterr()
    assert _train(run_dir, shakespeare_tokenizer, "--resume") == 0
    out = capsys.readouterr().out
    assert "has no checkpoint yet" in out and "starting again from step 0" in out
    assert "dropped 4 records past step 0" in out
    assert _train_records(run_dir) == _train_records(finished)


@pytest.mark.slow
def test_raising_train_steps_continues_a_finished_run(finished, shakespeare_tokenizer, tmp_path, capsys):
    run_dir = tmp_path / "longer"
    shutil.copytree(finished, run_dir)
    assert _train(run_dir, shakespeare_tokenizer, "train.steps=7", "--resume") == 0
    assert f"resumed {run_dir} at step 6" in capsys.readouterr().out
    steps = [s for s, *_ in _train_records(run_dir)]
    assert steps == list(range(1, 8))
