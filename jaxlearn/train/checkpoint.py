"""Checkpoints: orbax CheckpointManager holding the whole TrainState plus the data iterator.

A checkpoint holds params (trainable and frozen), optimizer state, step, RNG and the grain
iterator position, so `--resume` continues exactly where the run stopped. orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves no
half-written checkpoint behind. Each completed step then gets a manifest (sizes and SHA-256 of
its files, jaxlearn/train/manifest.py); `restore_newest` verifies it and falls back past a
damaged step to the newest intact one. A state holding NaN/inf is never saved. Example::

    ckpt = Checkpointer(run_dir / "checkpoints", keep=3, async_save=True)
    ckpt.save(step, state, data_iter, metrics={"eval_loss": 2.1})
    state = ckpt.restore(ckpt.latest_step(), abstract_state, data_iter)
    found = ckpt.restore_newest(abstract_state, data_iter)   # found.step, found.state, found.damaged
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlearn.data.feed import HostFeed
from jaxlearn.peft.filter import flat_paths
from jaxlearn.train.guard import NonFiniteError, state_is_finite
from jaxlearn.train.manifest import has_manifest, verify_step, write_manifest


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model or training setup."""


class CheckpointDamagedError(ValueError):
    """No checkpoint of the run can be restored: each one is damaged."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_newest` found: the step restored, its state, and the newer
    steps it had to skip as damaged ({step: what is wrong})."""

    step: int
    state: Any
    damaged: dict[int, str]


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: orbax restores straight into them."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with jaxlearn's items and error messages."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 best_metric: str = "", best_mode: str = "min"):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        # Always keep the latest `keep` (resume needs the newest); with a best metric, also
        # keep the `keep` best by it.
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        # Handlers named up front so metadata (shapes) can be read before a restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": FeedCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.is_main = jax.process_index() == 0
        self._saved = False  # a reader (generate, eval) never writes into the run directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Save `state` (and the data position) as `step`. Refuses (NonFiniteError) a state that
        holds NaN/inf: saving it would rotate out a finite checkpoint (keep=N)."""
        if not state_is_finite(state):
            raise NonFiniteError(
                f"step {step}: the training state holds NaN/inf values, so it was not saved to {self.directory} "
                f"(the newest finite checkpoint is step {self.latest_step()}). Lower optim.lr, raise "
                "optim.warmup_steps or set optim.clip_norm, then resume from it with --resume.")
        self.seal()  # orbax waits for the previous save here anyway; give it its manifest
        self._saved = True
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = FeedSave(data_iter)
        if self.best_metric and (metrics is None or self.best_metric not in metrics):
            metrics = None  # no metric yet: orbax keeps it only until a scored one exists
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Compare shapes with the checkpoint's metadata before restoring; explain a mismatch."""
        try:
            meta = self.manager.item_metadata(step)
            saved = meta["state"] if meta is not None and "state" in meta else None
        except Exception:  # metadata unreadable: let restore itself report
            return
        if saved is None:
            return
        saved_flat = _shapes(saved)
        want_flat = _shapes(abstract_state)
        is_param = lambda p: p.startswith(("trainable/", "frozen/"))  # noqa: E731
        problems = []
        for path, shape in want_flat.items():
            if path in saved_flat and saved_flat[path] != shape:
                problems.append(f"{path}: checkpoint {saved_flat[path]} vs this run {shape}")
            elif path not in saved_flat and is_param(path):
                problems.append(f"missing in checkpoint: {path} {shape}")
        extra = sorted(p for p in set(saved_flat) - set(want_flat) if is_param(p))
        problems += [f"not used by this run: {p} {saved_flat[p]}" for p in extra[:5]]
        problems.sort(key=lambda p: not is_param(p.split(":")[0].replace("missing in checkpoint: ", "")))
        if problems:
            listing = "\n  ".join(problems[:12])
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this run's model/training setup:\n  {listing}\n"
                "Use the same model, peft and optim blocks as the run that wrote it, or start a new run "
                "in a fresh train.run_dir (or without train.resume=true).")

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def seal(self) -> None:
        """Wait for pending saves, then write the manifest (completion marker + checksums) of
        every finished step that lacks one. Process 0 only: it sees every host's files."""
        self.manager.wait_until_finished()
        if not (self.is_main and self._saved):
            return
        for step in self.all_steps():
            if self.step_dir(step).is_dir() and not has_manifest(self.step_dir(step)):
                write_manifest(self.step_dir(step))

    def restore_newest(self, abstract_state: Any, data_iter: Any | None = None,
                       steps: list[int] | None = None) -> Restored:
        """Restore the newest intact checkpoint among `steps` (default: all), newest first.

        A step is skipped as damaged when its manifest does not match its files, or when it
        has no manifest and its restore fails. A step whose manifest matches but which does
        not fit this run (another model) is not damage: CheckpointMismatchError, no fallback.
        Nothing is moved or deleted here; see `set_aside`.

        >>> found = ckpt.restore_newest(abstract_state, feed)   # doctest: +SKIP
        >>> found.step, found.damaged
        (4, {6: 'state/_METADATA is missing'})
        """
        damaged: dict[int, str] = {}
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            reason = verify_step(self.step_dir(step))
            if reason is not None:
                damaged[step] = reason
                continue
            verified = has_manifest(self.step_dir(step))
            try:
                return Restored(step, self.restore(step, abstract_state, data_iter), damaged)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of an unverified step is damage
                if verified:
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:200]
                damaged[step] = f"it has no manifest and its restore failed ({type(e).__name__}: {first})"
        listing = "; ".join(f"step {s}: {r}" for s, r in damaged.items()) or "there is none"
        raise CheckpointDamagedError(
            f"no checkpoint under {self.directory} can be restored ({listing}). Start a new run in a fresh "
            "train.run_dir, or without train.resume=true after moving the checkpoints directory away.")

    def set_aside(self, steps: list[int]) -> list[Path]:
        """Move damaged steps out of the checkpoints directory (to `damaged_checkpoints/` beside
        it), so the run can write those steps again. Call only after a restore succeeded."""
        moved = []
        if self.is_main:
            for step in steps:
                dest = self.directory.parent / "damaged_checkpoints" / str(step)
                n = 1
                while dest.exists():
                    dest, n = dest.with_name(f"{step}.{n}"), n + 1
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.step_dir(step), dest)
                moved.append(dest)
        if jax.process_count() > 1:  # every host sees the move before it rescans the directory
            multihost_utils.sync_global_devices("jaxlearn-checkpoints-set-aside")
        self.manager.reload()
        return moved

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore `state` into the shardings of `abstract_state`; advance `data_iter` in place."""
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = FeedRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.seal()

    def close(self) -> None:
        self.seal()
        self.manager.close()


class FeedCheckpointHandler(ocp.CheckpointHandler):
    """Data position of a `HostFeed` (jaxlearn/data/feed.py): one JSON file per data shard.

    Every process writes the shards it feeds (`shard_3-of-4.json`) and reads the shards it
    feeds now, so a checkpoint written by 2 hosts restores on 1 host and vice versa (the
    `params` part is restored by orbax into whatever mesh the run has). Checkpoints written
    before shards existed hold `process_0-of-1.json` (grain's handler); that is shard 0 of 1.
    """

    def save(self, directory, args: "FeedSave"):
        feed = HostFeed.wrap(args.item)
        for s, state in feed.shard_states().items():
            (directory / f"shard_{s}-of-{feed.shards}.json").write_text(json.dumps(state, indent=1))

    def restore(self, directory, args: "FeedRestore"):
        feed = HostFeed.wrap(args.item)
        states = {}
        for s in feed.owned:
            path = directory / f"shard_{s}-of-{feed.shards}.json"
            legacy = directory / f"process_{s}-of-{feed.shards}.json"
            if not path.exists() and legacy.exists():
                path = legacy
            if not path.exists():
                written = sorted(p.name for p in directory.iterdir())
                raise CheckpointMismatchError(
                    f"{directory} has no data position for shard {s} of {feed.shards} (it holds {written}). "
                    "The run that wrote it used another data.shards; resume with the same data.shards.")
            states[s] = json.loads(path.read_text())
        feed.set_shard_states(states)
        return args.item

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(FeedCheckpointHandler, for_save=True)
@dataclasses.dataclass
class FeedSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(FeedCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class FeedRestore(ocp.args.CheckpointArgs):
    item: Any


def _shapes(tree: Any) -> dict[str, tuple]:
    """Flat {path: shape} for a state tree or orbax metadata tree."""
    if hasattr(tree, "__dataclass_fields__") or not isinstance(tree, dict):
        tree = _to_dict(tree)
    out = {}
    for path, leaf in flat_paths(tree).items():
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[path] = tuple(int(s) for s in shape)
    return out


def _to_dict(tree: Any) -> Any:
    """A nested dict view of a pytree (dataclass/struct fields by name), for path listings."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    out: dict = {}
    for keypath, leaf in leaves_with_path:
        node = out
        names = [_key_name(k) for k in keypath]
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1] if names else "value"] = leaf
    return out


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
