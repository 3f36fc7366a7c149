"""Run the `jaxlearn` CLI in a subprocess (a fresh interpreter, as a user would)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny model, fast enough for tests; the data is real (Shakespeare).
TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "data.tokenizer_vocab_size=512", "data.seq_len=64", "data.batch_size=8",
    "train.eval_batches=2", "train.sample_tokens=8", "train.progress=false",
]


def cli_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    # the device count of this CLI process, and the test session's other XLA flags (tests/conftest.py)
    rest = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *rest])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli_args(*args) -> list[str]:
    return [sys.executable, "-m", "jaxlearn.cli", *map(str, args)]


def run_cli(*args, devices: int = 1, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), env=cli_env(devices), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)
