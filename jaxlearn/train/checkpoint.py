"""Checkpoints: orbax CheckpointManager holding the whole TrainState plus the data iterator.

A checkpoint holds params (trainable and frozen), optimizer state, step, RNG and the grain
iterator position, so `--resume` continues exactly where the run stopped. orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves no
half-written checkpoint behind. Example::

    ckpt = Checkpointer(run_dir / "checkpoints", keep=3, async_save=True)
    ckpt.save(step, state, data_iter, metrics={"eval_loss": 2.1})
    state = ckpt.restore(ckpt.latest_step(), abstract_state, data_iter)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlearn.distributed import HostFeed
from jaxlearn.peft.filter import flat_paths


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model or training setup."""


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, metrics: dict | None = None,
             force: bool = False) -> bool:
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

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore `state` into the shardings of `abstract_state`; advance `data_iter` in place."""
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = FeedRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class FeedCheckpointHandler(ocp.CheckpointHandler):
    """Data position of a `HostFeed` (jaxlearn/distributed.py): one JSON file per document shard.

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
