"""The training loop: build everything once, then feed batches to the one compiled step.

Example::

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
import numpy as np
import yaml
from jax.experimental import multihost_utils

from jaxlearn.config import Config, config_to_dict, dump_config
from jaxlearn.data.pipeline import ensure_tokenizer, make_eval_batches, make_train_iterator
from jaxlearn.distributed import HostFeed, host_eval_batches
from jaxlearn.data.sft import is_chat, make_sft_eval_batches, make_sft_train_iterator
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.models.presets import init_params as init_pretrained
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.attach import finalize_prefix
from jaxlearn.peft.files import save_adapter
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.checkpoint import Checkpointer, abstract_like
from jaxlearn.train.metrics import MetricsLog, atomic_write_text
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_eval_step, compile_train_step


class RunDirError(ValueError):
    """The run directory holds another run, or a different configuration."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    final_eval: dict
    tokens_per_sec: float
    compile_seconds: float
    samples: list[str]


def _check_run_dir(cfg: Config, run_dir: Path) -> int | None:
    """Refuse to silently overwrite or mix runs. Returns the step to resume from, if any."""
    ckpt_dir = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
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


def _global_batch(local: dict, sharding) -> dict:
    """Assemble global arrays from this host's rows (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def evaluate(eval_step, state, batches: list[dict], sharding) -> dict:
    """Held-out loss (nats/token) and perplexity over a fixed list of batches."""
    total, weight = 0.0, 0.0
    for b in batches:
        t, w = eval_step(state.trainable, state.frozen, _global_batch(b, sharding))
        total += float(t)
        weight += float(w)
    loss = total / max(weight, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": weight}


def train(cfg: Config, echo: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a training run as configured; returns the headline numbers."""
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    is_main = jax.process_index() == 0
    resume_step = _check_run_dir(cfg, run_dir) if run_dir.exists() else None

    # Data first: bad paths, empty corpora and non-UTF-8 text fail before a run dir is written.
    tokenizer = ensure_tokenizer(cfg.data, run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
                         f"set model.vocab_size={tokenizer.vocab_size} (or larger).")
    n_proc, proc = jax.process_count(), jax.process_index()
    if cfg.data.batch_size % n_proc:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must divide over {n_proc} hosts.")
    data_report = None
    if is_chat(cfg.data):  # SFT: the same batches, plus counts of truncated/dropped examples
        train_iter, train_stats = make_sft_train_iterator(cfg.data, tokenizer, shard_index=proc, shard_count=n_proc)
        eval_batches, eval_stats = make_sft_eval_batches(cfg.data, tokenizer, tc.eval_batches,
                                                         shard_index=proc, shard_count=n_proc)
        data_report = {"train": dataclasses.asdict(train_stats), "validation": dataclasses.asdict(eval_stats)}
        echo(f"SFT data, train: {train_stats.summary()}\nSFT data, validation: {eval_stats.summary()}")
    else:  # each host feeds the document shards it owns (jaxlearn/distributed.py)
        train_iter = HostFeed.for_config(cfg.data, tokenizer)
        eval_batches = host_eval_batches(cfg.data, tokenizer, tc.eval_batches)

    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        if data_report is not None:
            atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2) + "\n")

    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh)
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    init_ids = tokenizer.encode(cfg.peft.init_text) if cfg.peft.type == "prompt" and cfg.peft.init_text else None
    # Start from a pretrained checkpoint (imported straight into the shardings) unless resuming.
    params = init_pretrained(cfg.model, mesh, rules) if cfg.model.init_from and resume_step is None else None
    setup = build_state(model, cfg, mesh, rules, tc.steps, params=params, prompt_init_ids=init_ids)
    batch_sharding = shard.batch_sharding()
    objective = make_objective(model, cfg.objective)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint,
                        best_metric=tc.best_metric)
    log = MetricsLog(run_dir, enabled=is_main)

    state = setup.state
    if resume_step is not None:
        state = ckpt.restore(resume_step, abstract_like(state, setup.shardings), train_iter)
        log.truncate_after(resume_step)
        if is_main:
            echo(f"resumed {run_dir} at step {resume_step}")

    # Compile once, ahead of time, so the compile cost is measured and never paid again.
    t0 = time.perf_counter()
    first_local = next(train_iter)
    first = _global_batch(first_local, batch_sharding)
    step_fn = compile_train_step(objective, setup, batch_sharding, cfg.optim.grad_accum).lower(state, first).compile()
    compile_s = time.perf_counter() - t0
    eval_step = compile_eval_step(objective, setup, batch_sharding)
    n_params = cfg.model.param_count()
    if is_main:
        echo(f"model: {n_params / 1e6:.2f} M params | mesh {dict(mesh.shape)} | compile {compile_s:.1f} s")

    start = int(state.step)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = None
    if is_main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
    pending: list[tuple[int, Any]] = []
    last_loss = float("nan")
    final_eval: dict = {}
    timed_steps, timed_s = 0, 0.0
    t_window = time.perf_counter()
    batch = first
    for step in range(start, tc.steps):
        if step > start:
            batch = _global_batch(next(train_iter), batch_sharding)
        state, metrics = step_fn(state, batch)
        pending.append((step + 1, metrics))
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            fetched = jax.device_get([m for _, m in pending])  # one host sync per log interval
            for (s, _), m in zip(pending, fetched):
                log.write(s, "train", **m)
            elapsed = time.perf_counter() - t_window
            if step > start:  # the first interval includes the first step's dispatch warm-up
                timed_steps += len(pending)
                timed_s += elapsed
            tps = len(pending) * tokens_per_step / max(elapsed, 1e-9)
            last_loss = float(fetched[-1]["loss"])
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(len(pending))
            elif is_main:
                echo(f"step {done}/{tc.steps}: loss {last_loss:.4f}, {tps:,.0f} tokens/s")
            pending = []
            t_window = time.perf_counter()
        eval_now = (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps
        ev = None
        if eval_now and eval_batches:
            ev = evaluate(eval_step, state, eval_batches, batch_sharding)
            log.write(done, "eval", **ev)
            final_eval = ev
            line = f"step {done}: held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}"
            if bar is not None:
                bar.write(line)
            elif is_main:
                echo(line)
            t_window = time.perf_counter()  # evaluation time is not training time
        if (tc.save_every and done % tc.save_every == 0) or done == tc.steps:
            ckpt.save(done, state, train_iter, metrics={f"eval_{k}": v for k, v in (ev or {}).items()},
                      force=done == tc.steps)
    if bar is not None:
        bar.close()
    ckpt.close()
    if cfg.peft.type != "none":
        # Prefix tuning keeps only the prefixes it produces; its reparametrisation MLP is dropped.
        adapter = finalize_prefix(state.trainable, cfg.model) if cfg.peft.type == "prefix" else state.trainable
        frozen = state.frozen
        if jax.process_count() > 1:  # every host joins the gather; host 0 writes the file
            adapter, frozen = multihost_utils.process_allgather((adapter, frozen), tiled=True)
        if is_main:
            path = save_adapter(run_dir / "adapters", adapter, frozen, cfg.peft,
                                recipe=config_to_dict(cfg), step=tc.steps)
            echo(f"adapter saved: {path}")

    samples = []
    if tc.sample_prompts:  # every host runs the (sharded) generation; host 0 writes and prints
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in tc.sample_prompts]
        sampling = SamplingConfig(max_new_tokens=tc.sample_tokens, temperature=tc.sample_temperature,
                                  top_p=0.95, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
        gen = generate(model, state.params, prompts, sampling, jax.random.PRNGKey(tc.seed))
        samples = [p + tokenizer.decode(t) for p, t in zip(tc.sample_prompts, gen.tokens)]
        if is_main:
            atomic_write_text(run_dir / "samples.txt", "\n\n-----\n\n".join(samples) + "\n")
            for s in samples:
                echo("--- sample ---\n" + s)

    tps = timed_steps * tokens_per_step / timed_s if timed_s else float("nan")
    result = TrainResult(run_dir, tc.steps, last_loss, final_eval, tps, compile_s, samples)
    if is_main:
        log.plot()
        summary = {"steps": tc.steps, "final_train_loss": last_loss, "final_eval": final_eval,
                   "tokens_per_sec": tps, "compile_seconds": compile_s, "params": n_params}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        echo(f"done: train loss {last_loss:.4f} | held-out loss {final_eval.get('loss', float('nan')):.4f} "
             f"(ppl {final_eval.get('perplexity', float('nan')):.2f}) | {tps:,.0f} tokens/s | run dir {run_dir}")
    log.close()
    return result
