"""Test set-up: 8 virtual CPU devices (sharding tests), set before JAX initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare_tokenizer(tmp_path_factory):
    """A 512-token SentencePiece model trained once per session on the real Shakespeare corpus."""
    from jaxlearn.cli import main

    out = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    assert main(["tokenizer", "train", "--vocab-size", "512", "--out", str(out)]) == 0
    return out
