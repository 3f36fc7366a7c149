"""Soak (issue 15): 20 SIGKILLs of a small training run at random times (during start-up,
compile, steps and asynchronous saves), each followed by `--resume`. The final parameters equal
an uninterrupted run's bit for bit, and no step appears twice in metrics.jsonl. Minutes: slow.

    python -m pytest -q -m slow tests/train/test_soak.py -s
"""

import json
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli_runner import REPO, TINY, cli_args, cli_env, run_cli

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"
KILLS = 20
STEPS = 300
COMMON = [*TINY, f"train.steps={STEPS}", "train.log_every=1", "train.save_every=3", "train.eval_every=0",
          "train.sample_prompts=[]", "train.keep_checkpoints=2"]


def _final_arrays(run_dir):
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(STEPS) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _train_steps(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_twenty_random_kills_then_resume_is_bit_identical(tmp_path, shakespeare_tokenizer):
    common = [*COMMON, f"data.tokenizer={shakespeare_tokenizer}"]
    env = {**cli_env(1), "PYTHONUNBUFFERED": "1"}  # "step N/300" lines reach the file as they happen
    progress = f"/{STEPS}: loss"
    straight, log = tmp_path / "straight", tmp_path / "straight.txt"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cli_args("train", RECIPE, *common, f"train.run_dir={straight}"), env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and progress not in log.read_text():
            time.sleep(0.01)
        startup = time.monotonic() - t0  # imports, data, model, compile: until the first step is logged
        proc.wait(timeout=900)
    assert proc.returncode == 0, log.read_text()[-3000:]

    killed_dir = tmp_path / "killed"
    rng = random.Random(15)
    kills, resumed_at, mid_training = 0, [], 0
    while kills < KILLS:
        log = tmp_path / f"attempt{kills}.txt"
        with log.open("w") as out:
            proc = subprocess.Popen(cli_args("train", RECIPE, *common, f"train.run_dir={killed_dir}", "--resume"),
                                    env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
            # A third of the kills at a random time in start-up (restore, compile; at the latest at
            # the first step); the rest after 1-10 new steps plus up to 40 ms, which lands in steps
            # and in the asynchronous saves every 3 steps (some commit, some do not).
            if rng.random() < 1 / 3:
                deadline, steps_wanted = time.monotonic() + rng.uniform(0.2, startup), 1
            else:
                deadline, steps_wanted = time.monotonic() + 600, rng.randint(1, 10)
            extra = rng.uniform(0.0, 0.04)
            while proc.poll() is None and time.monotonic() < deadline:
                if steps_wanted and log.read_text().count(progress) >= steps_wanted:
                    time.sleep(extra)
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                mid_training += progress in log.read_text()
            proc.wait(timeout=120)
        text = log.read_text()
        assert proc.returncode in (0, -signal.SIGKILL), text[-3000:]
        resumed_at += [int(line.split("at step ")[1].split()[0]) for line in text.splitlines() if " at step " in line]
        if proc.returncode == 0:  # it finished before the kill
            break
    r = run_cli("train", RECIPE, *common, f"train.run_dir={killed_dir}", "--resume", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    steps = [s for s, _ in _train_steps(killed_dir)]
    assert steps == list(range(1, STEPS + 1))  # each step once, none lost
    assert _train_steps(killed_dir) == _train_steps(straight)  # the same losses, bit for bit
    for a, b in zip(_final_arrays(killed_dir), _final_arrays(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    print(f"\nsoak: {kills}/{KILLS} SIGKILLs ({mid_training} after training had started), resumed at steps "
          f"{resumed_at}; final parameters bit-identical, {len(steps)} metric steps, none twice")
    assert kills == KILLS, f"the run finished after {kills} kills; make it longer"
