"""What a user sees: a short run leaves plot, metrics, checkpoint and samples behind; bad input
gets one clear paragraph, exit status 2 and no half-written run directory.

Bad-input checks run `jaxlearn.cli.main` in this process (the same code path, minus a 4-second
interpreter start each); `test_missing_recipe` keeps one through a real subprocess."""

import json

import pytest

from cli_runner import REPO, TINY, run_cli
from jaxlearn.cli import main

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """One Shakespeare tokenizer for the module, trained through the CLI."""
    out = tmp_path_factory.mktemp("tok") / "shakespeare512.model"
    r = run_cli("tokenizer", "train", "--source", "shakespeare", "--vocab-size", 512, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    r = run_cli("train", RECIPE, *TINY, f"data.tokenizer={tokenizer}", f"train.run_dir={run_dir}",
                "train.steps=12", "train.eval_every=6", "train.save_every=6", "train.log_every=3")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


def test_a_short_run_its_outputs_and_what_users_do_next(trained_run, tokenizer, capsys):
    """One test over the trained run (why one: two tests on it land in two xdist workers, and each
    worker would train the run again, ~30 s): its outputs, generate/eval on it, a rerun into it
    refused, and a checkpoint of another shape refused."""
    run_dir, r = trained_run
    # --- the outputs a short run leaves behind
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "samples.txt", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["split"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [x for x in recs if x["split"] == "eval"]
    assert [x["step"] for x in evals] == [6, 12] and evals[-1]["perplexity"] > 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval"]["loss"] == evals[-1]["loss"]
    assert "--- sample ---" in r.stdout and "held-out loss" in r.stdout

    # --- generate and eval on it
    g = run_cli("generate", run_dir, "ROMEO:", "--max-new-tokens", 8, "--temperature", 0)
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.startswith("ROMEO:")
    e = run_cli("eval", run_dir, "--batches", 2)
    assert e.returncode == 0, e.stderr[-2000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 12 and result["loss"] > 0 and "| held-out loss |" in e.stdout

    # --- a new run into its directory is refused (resume is the way)
    rr = run_cli("train", RECIPE, *TINY, f"train.run_dir={run_dir}", "train.steps=12")
    assert rr.returncode == 2 and "already holds checkpoints" in rr.stderr and "train.resume=true" in rr.stderr

    # --- resuming it with another model shape is refused by the saved config ...
    capsys.readouterr()
    code = main(["train", str(RECIPE), *TINY, "model.d_model=96", f"data.tokenizer={tokenizer}",
                 f"train.run_dir={run_dir}", "train.steps=14", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "different 'model' block" in err and "d_model" in err
    # ... and bypassing the saved config (eval with another shape) reaches the checkpoint's own check.
    code = main(["eval", str(run_dir), "--set", "model.n_layers=3"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "does not fit this run's model" in err and "layers/attn/q/kernel" in err


def _bad(tmp_path, *args, capsys=None):
    """Train with bad input: exit status 2, no traceback, no run directory; the error text.
    With `capsys`, in this process; without, in a subprocess as a user runs it."""
    run_dir = tmp_path / "run"
    args = ["train", *map(str, args), f"train.run_dir={run_dir}", "train.steps=2"]
    if capsys is None:
        r = run_cli(*args)
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    assert not run_dir.exists(), "a failed start must not leave a run directory behind"
    return err


def test_missing_recipe(tmp_path):
    assert "does not exist" in _bad(tmp_path, tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: 64\n   n_layers: 2\n")
    err = _bad(tmp_path, p, capsys=capsys)
    assert "bad.yaml is not valid YAML (line 3" in err


def test_unknown_key_and_wrong_type(tmp_path, capsys):
    assert "Did you mean 'optim.lr'" in _bad(tmp_path, RECIPE, "optim.lrr=0.1", capsys=capsys)
    assert "train.log_every: expected an integer" in _bad(tmp_path, RECIPE, "train.log_every=many", capsys=capsys)


def test_missing_data_file(tmp_path, capsys):
    err = _bad(tmp_path, RECIPE, "data.source=text", f"data.paths=[{tmp_path}/missing.txt]", capsys=capsys)
    assert "missing.txt" in err


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    err = _bad(tmp_path, RECIPE, "data.source=text", f"data.paths=[{tmp_path}/empty.txt]", capsys=capsys)
    assert "empty" in err.lower() and "empty.txt" in err


def test_non_utf8_text(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    err = _bad(tmp_path, RECIPE, "data.source=text", f"data.paths=[{tmp_path}/latin1.txt]", capsys=capsys)
    assert "latin1.txt" in err and "UTF-8" in err


def test_keep_latest_and_best_checkpoints(tmp_path, tokenizer):
    run_dir = tmp_path / "best"
    r = run_cli("train", RECIPE, *TINY, f"data.tokenizer={tokenizer}", f"train.run_dir={run_dir}", "train.steps=12",
                "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=2",
                "train.best_metric=eval_loss", "optim.lr=0.05")
    assert r.returncode == 0, r.stderr[-2000:]
    evals = {x["step"]: x["loss"] for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if x["split"] == "eval"}
    best = sorted(sorted(evals, key=evals.get)[:2])
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted(set(best) | {10, 12})
