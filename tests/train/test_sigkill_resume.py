"""Exact resume: a run killed with SIGKILL mid-way and resumed gives a bit-identical loss
curve to a run that was never interrupted (CPU, same process layout)."""

import json
import signal
import subprocess
import time

import pytest

from cli_runner import REPO, TINY, cli_args, cli_env, run_cli

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"
STEPS = 40
COMMON = [*TINY, "model.d_model=128", "data.seq_len=128", f"train.steps={STEPS}", "train.log_every=1",
          "train.save_every=5", "train.eval_every=0", "train.sample_prompts=[]", "train.keep_checkpoints=2"]


def _curve(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r.get("l2")) for r in recs if r["split"] == "train"]


# The third case trains an objective with a frozen extra model of another depth, a frozen buffer,
# an objective-owned head and a per-row feature (tests/objectives_for_tests.py): the head is
# restored from the checkpoint, the extras are reloaded from their specs.
EXTRAS = ["objective.type=tests.objectives_for_tests:L2ToFrozen", "objective.teacher_layers=1"]


@pytest.mark.parametrize("devices,extra", [(1, []), (8, []), (1, EXTRAS)], ids=["1dev", "8dev", "1dev-extras"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, devices, extra, shakespeare_tokenizer):
    common = [*COMMON, f"data.tokenizer={shakespeare_tokenizer}", *extra]

    straight = tmp_path / "straight"
    r = run_cli("train", RECIPE, *common, f"train.run_dir={straight}", devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_args("train", RECIPE, *common, f"train.run_dir={killed}"),
                            env=cli_env(devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 17:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    logged = len(metrics.read_text().splitlines())
    assert logged < STEPS

    r = run_cli("train", RECIPE, *common, f"train.run_dir={killed}", "--resume", devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = int(r.stdout.split("at step ")[1].split()[0])
    assert 5 <= resumed_from < logged  # it really resumed from a checkpoint, past some lost steps

    assert _curve(killed) == _curve(straight)  # exact float equality, every step
    assert [s for s, *_ in _curve(killed)] == list(range(1, STEPS + 1))
