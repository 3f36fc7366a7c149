"""Everything a run needs, built once from the recipe: `build_run(cfg) -> Run`.

The order is the point: checks that write nothing first (the run directory: another run's
checkpoints, a different recipe, not writable), then data (bad paths, empty corpora and bad
tokenizers fail before a run directory is written), then the mesh, the model, the objective
(which names its frozen extras and its own heads), the state in its shardings (or restored from
the newest intact checkpoint), and only then the run directory's records (config.yaml,
data_report.json, metrics.jsonl truncated to the step the run starts from): a failed start or a
failed restore leaves them as they were. Last, the ONE compiled step, lowered ahead of time on
the first batch so the compile is timed and never paid again. The loop (`jaxlearn/train/loop.py`)
only feeds it. Example::

    run = build_run(load_config("configs/pretrain_shakespeare.yaml", ["train.steps=20"]))
    state, metrics = run.step_fn(run.state, run.first_batch, run.extras.values)
    run.evaluate(state)["loss"]
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import yaml

from jaxlearn.config import Config, ConfigError, config_to_dict, dump_config
from jaxlearn.data.feed import Feed, make_feed, resolve_tokenizer
from jaxlearn.models.presets import init_params as init_pretrained
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.registry import build_objective
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.checkpoint import Checkpointer, abstract_like
from jaxlearn.train.manifest import verify_step
from jaxlearn.train.extras import Extras, build_extras
from jaxlearn.train.metrics import MetricsLog, atomic_write_text
from jaxlearn.train.state import StateSetup, TrainState, build_state
from jaxlearn.train.batches import make_evaluator, place_batch
from jaxlearn.train.step import compile_train_step


class RunDirError(ValueError):
    """The run directory holds another run, or a different configuration."""


@dataclasses.dataclass
class Run:
    """A built run: what the loop and the end-of-run hooks read."""

    cfg: Config
    run_dir: Path
    is_main: bool
    tokenizer: Any
    feed: Feed
    shard: ShardingContext
    model: Transformer
    objective: Any  # jaxlearn.objectives.base.Objective
    setup: StateSetup
    extras: Extras
    state: TrainState  # initial, or restored
    resumed_from: int | None
    ckpt: Checkpointer
    log: MetricsLog
    batch_shardings: Any
    step_fn: Any  # compiled (state, batch, extras) -> (state, metrics)
    evaluate: Callable[[TrainState], dict]
    first_batch: dict
    compile_seconds: float

    def next_batch(self, state: TrainState) -> dict:
        """The next training batch as the step sees it (the objective's `prepare` applied)."""
        return place_batch(self.objective, self.shard, next(self.feed.train), state, self.batch_shardings)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The checkpoint steps under `run_dir/checkpoints`, oldest first (no orbax needed)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


def newest_intact_step(run_dir: Path, at_least: int = 0) -> int | None:
    """The newest checkpoint step >= `at_least` whose manifest matches its files (or that has no
    manifest); only those steps are read (verifying one reads all its bytes)."""
    for step in reversed([s for s in checkpoint_steps(run_dir) if s >= at_least]):
        if verify_step(Path(run_dir) / "checkpoints" / str(step)) is None:
            return step
    return None


def check_writable(run_dir: Path) -> None:
    """A clear RunDirError now, rather than an OSError traceback later, when `run_dir` cannot
    be created or written. Creates nothing: it checks the nearest existing ancestor.

    >>> check_writable(Path("/proc/jaxlearn-run"))   # doctest: +SKIP
    RunDirError: cannot write train.run_dir=/proc/jaxlearn-run: /proc is on a read-only file system ...
    """
    here = Path(os.path.abspath(run_dir))
    while not here.exists() and here != here.parent:
        here = here.parent
    fix = "Choose a writable place with train.run_dir=..."
    if not here.is_dir():
        raise RunDirError(f"cannot write train.run_dir={run_dir}: {here} is a file, not a directory. {fix}")
    try:
        read_only = bool(os.statvfs(here).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise RunDirError(f"cannot write train.run_dir={run_dir}: {here} is on a read-only file system. {fix}")
    if not os.access(here, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write train.run_dir={run_dir}: no write permission on {here}. {fix}")


def make_run_dir(run_dir: Path) -> None:
    """`mkdir -p`, with an OSError (read-only, full disk, permissions) as a RunDirError."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a read-only file system" if e.errno == errno.EROFS else e.strerror
        raise RunDirError(f"cannot create train.run_dir={run_dir}: {why}. Choose a writable place with "
                          "train.run_dir=...") from None


def check_run_dir(cfg: Config, run_dir: Path) -> int | None:
    """Refuse to silently overwrite or mix runs. Returns the newest checkpoint step, if any."""
    steps = checkpoint_steps(run_dir)
    if steps and not cfg.train.resume:
        raise RunDirError(
            f"{run_dir} already holds checkpoints (latest step {steps[-1]}). Pass train.resume=true to continue "
            f"that run, or choose a new directory with train.run_dir=...")
    saved = run_dir / "config.yaml"
    if steps and saved.exists():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        new = config_to_dict(cfg)
        for block in ("model", "peft", "objective"):
            if old.get(block) != new.get(block):
                diff = {k: (old.get(block, {}).get(k), v) for k, v in new[block].items()
                        if old.get(block, {}).get(k) != v}
                raise RunDirError(
                    f"cannot resume {run_dir}: its config.yaml has a different '{block}' block "
                    f"(saved vs now: {diff}). Resume with the same recipe, or use a new train.run_dir.")
    return steps[-1] if steps else None


def finished_step(cfg: Config) -> int | None:
    """With train.resume: the newest intact checkpoint step when it already reaches
    train.steps (the run is complete: there is nothing to do), else None. Writes nothing.

    >>> finished_step(load_config("configs/pretrain_shakespeare.yaml", ["train.run_dir=runs/done", "train.steps=8",
    ...                                                                 "train.resume=true"]))  # doctest: +SKIP
    8
    """
    run_dir = Path(cfg.train.run_dir)
    if not (cfg.train.resume and run_dir.is_dir()):
        return None
    check_run_dir(cfg, run_dir)  # a different recipe is an error, also for a finished run
    return newest_intact_step(run_dir, at_least=cfg.train.steps)


def build_run(cfg: Config, echo: Callable[[str], None] = print) -> Run:
    """Build (or restore) everything `cfg` describes and compile the step. See the module doc."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    is_main = jax.process_index() == 0
    # Checks that write nothing come first: a failed start leaves no run directory behind.
    newest = check_run_dir(cfg, run_dir) if run_dir.exists() else None
    resume_step = newest if tc.resume else None
    check_writable(run_dir)
    if not cfg.data.tokenizer and cfg.data.tokenizer_vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer_vocab_size={cfg.data.tokenizer_vocab_size} is larger than "
                          f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size="
                          f"{cfg.data.tokenizer_vocab_size} (or larger), or a smaller data.tokenizer_vocab_size.")
    if cfg.data.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must divide over {jax.process_count()} hosts; "
                          f"use a multiple of {jax.process_count()}.")

    # Data next: bad paths, empty corpora and non-UTF-8 text fail before a run dir is written.
    tokenizer = resolve_tokenizer(cfg.data, run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size} (or larger).")
    feed = make_feed(cfg.data, tokenizer, max_eval_batches=tc.eval_batches)
    if feed.report is not None:
        echo(feed.report["summary"])
    make_run_dir(run_dir)

    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh)
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    init_ids = tokenizer.encode(cfg.peft.init_text) if cfg.peft.type == "prompt" and cfg.peft.init_text else None
    # Start from a pretrained checkpoint (imported straight into the shardings) unless resuming.
    params = init_pretrained(cfg.model, mesh, rules) if cfg.model.init_from and resume_step is None else None
    setup = build_state(model, cfg, mesh, rules, tc.steps, params=params, prompt_init_ids=init_ids,
                        objective=objective)
    extras = build_extras(objective.extras(), shard)  # frozen: reloaded, never checkpointed
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint,
                        best_metric=tc.best_metric)

    state = setup.state
    if resume_step is not None:
        found = ckpt.restore_newest(abstract_like(state, setup.shardings), feed.train)
        state, resume_step = found.state, found.step
        # Only now, with a state restored, is anything in the run directory changed.
        moved = ckpt.set_aside(sorted(found.damaged))
        for (step, why), dest in zip(sorted(found.damaged.items()), moved):
            echo(f"checkpoint step {step} is damaged ({why}); moved it to {dest}")
        if found.damaged and is_main:
            echo(f"falling back to step {resume_step}, the newest intact checkpoint")
    elif tc.resume and is_main:
        echo(f"train.resume: {run_dir} has no checkpoint yet (the run stopped before its first save); "
             "starting again from step 0")

    # The run's records, written only once the start (and any restore) has succeeded.
    log = MetricsLog(run_dir, enabled=is_main)
    if is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        if feed.report is not None:
            report = {k: v for k, v in feed.report.items() if k != "summary"}
            atomic_write_text(run_dir / "data_report.json", json.dumps(report, indent=2) + "\n")
        # Records past the start step are recomputed identically: drop them, so no step is
        # ever logged twice (also after a kill before the first checkpoint).
        dropped = log.truncate_after(resume_step or 0)
        if resume_step is not None:
            echo(f"resumed {run_dir} at step {resume_step}")
        if dropped:
            echo(f"metrics.jsonl: dropped {dropped} records past step {resume_step or 0} (they will be recomputed)")

    # Compile once, ahead of time, so the compile cost is measured and never paid again.
    t0 = time.perf_counter()
    first = place_batch(objective, shard, next(feed.train), state)
    batch_shardings = shard.batch_shardings(first)
    step_fn = compile_train_step(objective, setup, batch_shardings, cfg.optim.grad_accum,
                                 extras.shardings).lower(state, first, extras.values).compile()
    compile_s = time.perf_counter() - t0
    evaluate = make_evaluator(objective, setup, shard, extras, feed.eval_batches)
    if is_main:
        extra = f" | frozen extras {extras.nbytes() / 2**20:.1f} MiB" if extras.values else ""
        echo(f"model: {cfg.model.param_count() / 1e6:.2f} M params | mesh {dict(mesh.shape)}{extra} | "
             f"compile {compile_s:.1f} s")
    return Run(cfg, run_dir, is_main, tokenizer, feed, shard, model, objective, setup, extras, state, resume_step,
               ckpt, log, batch_shardings, step_fn, evaluate, first, compile_s)
