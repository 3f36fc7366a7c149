"""Values that parse but make no sense (issue 15, item 4): each is one paragraph naming the key
and the fix, exit 2, and no run directory (or tokenizer) left behind; files written through
temporary files get normal permissions."""

import errno
import os
import stat

import jax.numpy as jnp
import pytest

from finished_run import RECIPE
from jaxlearn.cli import main
from jaxlearn.config import ConfigError, PeftConfig, load_config
from jaxlearn.perms import current_umask
from jaxlearn.train import build


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr: -1.0 is out of range; use a positive learning rate"),
    ("optim.lr=0", "optim.lr: 0.0 is out of range"),
    ("data.batch_size=0", "data.batch_size: 0 is out of range; use a positive number"),
    ("data.seq_len=-8", "data.seq_len: -8 is out of range"),
    ("optim.grad_accum=0", "optim.grad_accum: 0 is out of range"),
    ("optim.b2=1.5", "optim.b2: 1.5 is out of range; use a decay rate in [0, 1)"),
    ("train.log_every=0", "train.log_every: 0 is out of range"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: 0 is out of range"),
    ("model.n_kv_heads=3", "model.n_kv_heads: 3 is out of range; it must divide model.n_heads=4"),
    ("mesh.fsdp=0", "mesh.fsdp: 0 is out of range; use -1"),
])
def test_range_checks_name_the_key_and_the_fix(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(RECIPE, [override, "model.n_heads=4"])


def test_a_bad_value_fails_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(RECIPE), "data.batch_size=0", f"train.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 0 is out of range" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not run_dir.exists()  # no tokenizer files, no directory


def test_unwritable_run_dir_is_a_clear_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", str(RECIPE), f"train.run_dir={blocker}/run"]) == 2
    assert f"{blocker} is a file, not a directory" in capsys.readouterr().err
    # a read-only file system (simulated: statvfs reports ST_RDONLY for the nearest existing parent)
    real = os.statvfs
    monkeypatch.setattr(build.os, "statvfs", lambda p: type("V", (), {"f_flag": real(p).f_flag | os.ST_RDONLY})())
    assert main(["train", str(RECIPE), f"train.run_dir={tmp_path}/ro/run"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write train.run_dir={tmp_path}/ro/run: {tmp_path} is on a read-only file system" in err
    assert not (tmp_path / "ro").exists()


def test_mkdir_failure_is_a_run_dir_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(build.Path, "mkdir", refuse)
    with pytest.raises(build.RunDirError, match="cannot create train.run_dir=.*: a read-only file system"):
        build.make_run_dir(tmp_path / "run")


@pytest.mark.parametrize("n", ["-1", "0"])
def test_generate_needs_a_positive_token_count(n, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "x", "--max-new-tokens", n])
    assert e.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err


def test_merging_a_run_without_adapters_is_an_error(finished_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["adapters", "merge", str(finished_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot merge" in err and "peft.type: none" in err and "Traceback" not in err
    assert not out.exists()


def test_files_through_temporary_files_get_normal_permissions(shakespeare_tokenizer, tmp_path):
    normal_file, normal_dir = 0o666 & ~current_umask(), 0o777 & ~current_umask()
    assert stat.S_IMODE(shakespeare_tokenizer.stat().st_mode) == normal_file  # tokenizer: written via mkstemp
    from jaxlearn.peft.files import save_adapter

    trainable = {"layers": {"attn": {"q": {"lora_a": jnp.ones((2, 4, 2)), "lora_b": jnp.zeros((2, 2, 4))}}}}
    frozen = {"layers": {"attn": {"q": {"kernel": jnp.ones((2, 4, 4)), "lora_scale": jnp.ones((2,))}}}}
    version = save_adapter(tmp_path / "adapters", trainable, frozen, PeftConfig(type="lora"))
    assert stat.S_IMODE(version.stat().st_mode) == normal_dir  # the version dir: made with mkdtemp
    for p in version.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (normal_dir if p.is_dir() else normal_file), p


def test_run_directory_files_are_readable_by_others(finished_run):
    for p in finished_run.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p
