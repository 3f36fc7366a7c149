"""Multi-host on one machine: 2 processes x 4 CPU devices (gloo collectives) against 1 process
x 8 devices, through the real `jaxlearn train` command.

The global batch comes from `data.shards=2` document shards in both layouts, so the runs see
the same data and their loss curves must agree (up to the order of floating-point reductions).
Checkpoints written by 2 processes must resume in 1, and the other way round, continuing the
curve of a run that was never interrupted.
"""

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

from cli_runner import REPO, TINY, cli_args, cli_env, run_cli

pytestmark = pytest.mark.slow  # ~7 interpreter starts and compiles: well over a minute on 2 cores

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"
COMMON = [*TINY, "data.shards=2", "train.log_every=1", "train.save_every=3", "train.eval_every=0",
          "train.eval_batches=1", "train.keep_checkpoints=5", "train.sample_prompts=[]",
          "optim.decay=constant", "optim.warmup_steps=0", "train.async_checkpoint=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(*args, timeout=300):
    port = _free_port()
    procs = [subprocess.Popen(cli_args("train", *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                                       "--process-id", i),
                              env=cli_env(devices=4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _curve(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in recs if r["split"] == "train"}


def _assert_same(a: dict, b: dict, steps):
    for s in steps:
        np.testing.assert_allclose(a[s], b[s], rtol=2e-5, err_msg=f"step {s}")


def test_two_hosts_match_one_host_and_checkpoints_cross_over(tmp_path):
    tok = tmp_path / "tok.model"
    r = run_cli("tokenizer", "train", "--vocab-size", 512, "--out", tok)
    assert r.returncode == 0, r.stderr
    common = [*COMMON, f"data.tokenizer={tok}"]

    # 1 process x 8 devices, 9 steps straight (checkpoints at 3, 6, 9).
    one = tmp_path / "one"
    r = run_cli("train", RECIPE, *common, "train.steps=9", f"train.run_dir={one}", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = _curve(one)
    assert sorted(straight) == list(range(1, 10))

    # 2 processes x 4 devices, 6 steps: the same curve; only process 0 logs.
    two = tmp_path / "two"
    outs = _two_processes(RECIPE, *common, "train.steps=6", f"train.run_dir={two}")
    assert "done:" in outs[0][0] and "done:" not in outs[1][0]
    _assert_same(_curve(two), straight, range(1, 7))
    assert sorted(p.name for p in (two / "checkpoints" / "6" / "data").glob("shard_*")) == \
        ["shard_0-of-2.json", "shard_1-of-2.json"]

    # Written by 2 processes, resumed by 1: continues the straight curve (params, optimizer, data).
    r = run_cli("train", RECIPE, *common, "train.steps=9", f"train.run_dir={two}", "--resume", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout and "at step 6" in r.stdout
    _assert_same(_curve(two), straight, range(1, 10))

    # Written by 1 process (its step-6 checkpoint), resumed by 2.
    back = tmp_path / "back"
    shutil.copytree(one, back)
    shutil.rmtree(back / "checkpoints" / "9")
    _two_processes(RECIPE, *common, "train.steps=9", f"train.run_dir={back}", "--resume")
    _assert_same(_curve(back), straight, range(1, 10))
