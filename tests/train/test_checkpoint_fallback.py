"""Damaged checkpoints (issue 15, item 2): every finished step carries a manifest (sizes and
SHA-256 of its files) that the restore verifies; a damaged newest step is named, set aside, and
the run falls back to the newest intact one; nothing is moved when no step can be restored."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.train.checkpoint import CheckpointDamagedError, Checkpointer, abstract_like
from jaxlearn.train.manifest import MANIFEST, verify_step


def _state(step):
    return {"w": jnp.arange(64, dtype=jnp.float32) * step, "b": jnp.full((3,), float(step))}


def _abstract():
    s = _state(0)
    return abstract_like(s, {k: v.sharding for k, v in s.items()})


@pytest.fixture()
def saved(tmp_path):
    """checkpoints/2, 4, 6 written asynchronously, as the loop does, then closed (sealed)."""
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=True)
    for step in (2, 4, 6):
        ckpt.save(step, _state(step))
    ckpt.close()
    return tmp_path / "checkpoints"


def _biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


def test_every_step_is_sealed_and_verifies(saved):
    for step in (2, 4, 6):
        assert (saved / str(step) / MANIFEST).is_file() and verify_step(saved / str(step)) is None


def test_missing_metadata_falls_back_to_the_newest_intact_step(saved):
    (saved / "6" / "state" / "_METADATA").unlink()
    ckpt = Checkpointer(saved)
    found = ckpt.restore_newest(_abstract())
    assert found.step == 4 and found.damaged == {6: "state/_METADATA is missing"}
    np.testing.assert_array_equal(found.state["w"], np.arange(64) * 4)
    assert (saved / "6").is_dir()  # restore_newest moves nothing ...
    moved = ckpt.set_aside([6])  # ... the caller sets the damaged step aside once it has a state
    assert moved == [saved.parent / "damaged_checkpoints" / "6"] and ckpt.all_steps() == [2, 4]
    ckpt.save(6, _state(6))  # so the run can write that step again
    ckpt.close()
    assert verify_step(saved / "6") is None


def test_truncated_and_corrupted_files_are_found(saved):
    big = _biggest_file(saved / "6")
    with big.open("r+b") as f:
        f.truncate(big.stat().st_size // 2)
    assert "bytes" in verify_step(saved / "6")
    big4 = _biggest_file(saved / "4")
    data = bytearray(big4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    big4.write_bytes(bytes(data))
    assert "checksum" in verify_step(saved / "4")
    found = Checkpointer(saved).restore_newest(_abstract())
    assert found.step == 2 and sorted(found.damaged) == [4, 6]


def test_a_step_without_manifest_is_tried_and_skipped_when_its_restore_fails(saved):
    (saved / "6" / MANIFEST).unlink()  # e.g. killed between orbax's commit and the manifest
    shutil.rmtree(saved / "6" / "state")
    found = Checkpointer(saved).restore_newest(_abstract())
    assert found.step == 4 and "no manifest and its restore failed" in found.damaged[6]


def test_nothing_is_moved_when_no_step_can_be_restored(saved):
    for step in (2, 4, 6):
        (saved / str(step) / "state" / "_METADATA").unlink()
    before = sorted(os.listdir(saved))
    with pytest.raises(CheckpointDamagedError, match="step 6: state/_METADATA is missing; step 4: .*step 2"):
        Checkpointer(saved).restore_newest(_abstract())
    assert sorted(os.listdir(saved)) == before and not (saved.parent / "damaged_checkpoints").exists()
