"""A finished tiny run shared by the tests under tests/train (trained once per session)."""

import pytest

from finished_run import train_args


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, shakespeare_tokenizer):
    """A 6-step run (checkpoints 2, 4, 6) trained through `jaxlearn train` in-process; tests
    that change it work on a copy."""
    from jaxlearn.cli import main

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(run_dir, shakespeare_tokenizer)) == 0
    return run_dir
