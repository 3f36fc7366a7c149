"""The training loop: `build_run`, then feed batches to the one compiled step, then the hooks.

Every method runs through this same loop. What differs between methods lives in the objective
(loss, frozen extras, heads, and `prepare`, the seam where a rollout may sample from the
current weights between "next batch" and "step"). Example::

    result = train(load_config("configs/pretrain_shakespeare.yaml", ["train.steps=20"]))
    result.final_eval["loss"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxlearn.config import Config
from jaxlearn.train.build import RunDirError, build_run, finished_step  # noqa: F401  (RunDirError: part of this API)
from jaxlearn.train.guard import NonFiniteError, nonfinite_message
from jaxlearn.train.hooks import END_OF_RUN


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    final_eval: dict
    tokens_per_sec: float
    compile_seconds: float
    samples: list[str]
    echo: Callable[[str], None] = dataclasses.field(default=print, repr=False)
    nonfinite_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient norm)
    complete_already: bool = False  # --resume of a finished run: nothing was done
    extra_summary: dict = dataclasses.field(default_factory=dict)  # sections hooks add to summary.json


def _already_complete(cfg: Config, step: int, echo: Callable[[str], None]) -> TrainResult:
    """--resume of a run whose checkpoints already reach train.steps: say so, change nothing."""
    run_dir = Path(cfg.train.run_dir)
    if jax.process_index() == 0:
        echo(f"{run_dir} is complete: its newest checkpoint is step {step} and train.steps is {cfg.train.steps}. "
             "Nothing was changed; raise train.steps to train further.")
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    loss = summary.get("final_train_loss")
    return TrainResult(run_dir, step, float("nan") if loss is None else loss, summary.get("final_eval") or {},
                       summary.get("tokens_per_sec") or float("nan"), 0.0, [], echo,
                       summary.get("nonfinite_steps", 0), complete_already=True)


def train(cfg: Config, echo: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a training run as configured; returns the headline numbers.

    A step with a non-finite loss or gradient norm changes no weights (see jaxlearn/train/guard.py);
    with train.on_nonfinite=stop the run then ends with NonFiniteError, with `skip` it goes on and
    the skipped steps are counted (`nonfinite` in metrics.jsonl, `nonfinite_steps` in summary.json).
    """
    done_step = finished_step(cfg)
    if done_step is not None:
        return _already_complete(cfg, done_step, echo)
    run = build_run(cfg, echo)
    tc = cfg.train
    state, start = run.state, int(run.state.step)
    # token positions the step runs over: [B, T] rows, [B, 2, T] pairs, [B, P + N] rollouts alike
    tokens_per_step = math.prod(run.first_batch["inputs"].shape) if "inputs" in run.first_batch else \
        cfg.data.batch_size * cfg.data.seq_len
    bar = None
    if run.is_main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else (echo if run.is_main else (lambda _: None))
    pending: list[tuple[int, Any]] = []
    last_loss = float("nan")
    final_eval: dict = {}
    timed_steps, timed_s = 0, 0.0
    window = 0  # steps since the last log line
    skipped = 0  # non-finite steps in this session
    t_window = time.perf_counter()
    batch = run.first_batch
    if tc.eval_at_start and start == 0 and run.feed.eval_batches:
        ev = run.evaluate(state)
        run.log.write(0, "eval", **ev)
        say("before training: " + _eval_line(ev))
        t_window = time.perf_counter()
    for step in range(start, tc.steps):
        if step > start:
            batch = run.next_batch(state)
        state, metrics = run.step_fn(state, batch, run.extras.values)
        pending.append((step + 1, metrics))
        done, window = step + 1, window + 1
        is_log = done % tc.log_every == 0 or done == tc.steps
        is_save = bool(tc.save_every and done % tc.save_every == 0) or done == tc.steps
        if is_log or is_save:  # one host sync per log interval, and before every save
            fetched = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, fetched):
                run.log.write(s, "train", **m)
                if m.get("nonfinite", 0.0):
                    skipped += 1
                    if tc.on_nonfinite == "stop":  # before any later step is saved
                        _stop(run, bar, nonfinite_message(s, m, run.ckpt.latest_step()))
                    say(f"step {s}: non-finite loss or gradient norm; update skipped (train.on_nonfinite=skip)")
            last_loss = float(fetched[-1]["loss"])
            pending = []
        if is_log:
            elapsed = time.perf_counter() - t_window
            if step > start:  # the first interval includes the first step's dispatch warm-up
                timed_steps += window
                timed_s += elapsed
            tps = window * tokens_per_step / max(elapsed, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(window)
            else:
                say(f"step {done}/{tc.steps}: loss {last_loss:.4f}, {tps:,.0f} tokens/s")
            window = 0
            t_window = time.perf_counter()
        ev = None
        if ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps) and run.feed.eval_batches:
            ev = final_eval = run.evaluate(state)
            run.log.write(done, "eval", **ev)
            say(f"step {done}: {_eval_line(ev)}")
            t_window = time.perf_counter()  # evaluation time is not training time
        if is_save:
            run.ckpt.save(done, state, run.feed.train, metrics={f"eval_{k}": v for k, v in (ev or {}).items()},
                          force=done == tc.steps)
    if bar is not None:
        bar.close()
    run.ckpt.close()

    tps = timed_steps * tokens_per_step / timed_s if timed_s else float("nan")
    # counted from the log, so steps skipped before a resume count too
    nonfinite = sum(1 for r in run.log.records() if r["split"] == "train" and r.get("nonfinite"))
    result = TrainResult(run.run_dir, tc.steps, last_loss, final_eval, tps, run.compile_seconds, [], echo,
                         nonfinite if run.is_main else skipped)
    for hook in END_OF_RUN:
        hook(run, state, result)
    run.log.close()
    return result


def _stop(run, bar, message: str) -> None:
    """End the run for train.on_nonfinite=stop: finish pending saves (all finite), then raise."""
    if bar is not None:
        bar.close()
    run.ckpt.close()
    run.log.close()
    raise NonFiniteError(message)


def _eval_line(ev: dict) -> str:
    ppl = f", perplexity {ev['perplexity']:.2f}" if "perplexity" in ev else ""
    more = "".join(f", {k} {v:.4f}" for k, v in ev.items() if k not in ("loss", "perplexity", "tokens", "weight"))
    return f"held-out loss {ev['loss']:.4f}{ppl}{more}"
