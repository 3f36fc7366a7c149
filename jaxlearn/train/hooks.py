"""End-of-run hooks: what a finished run leaves beside its checkpoints.

Each hook is `hook(run, state, result) -> None`, called in order by `jaxlearn.train.loop.train`
after the last step: the adapter file (PEFT runs), samples from the trained model, the
forgetting report (runs from pretrained weights), and the summary (JSON + loss-curve plot). A
method that wants another output adds a hook, not a branch in the loop. Example::

    for hook in END_OF_RUN:
        hook(run, state, result)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxlearn.config import config_to_dict
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.objectives.forward import model_params
from jaxlearn.peft.attach import finalize_prefix
from jaxlearn.peft.files import save_adapter
from jaxlearn.train.metrics import atomic_write_text, dumps_json


def export_adapter(run, state, result) -> None:
    """PEFT runs: the trained adapter (and objective heads) as a versioned adapter file."""
    cfg = run.cfg
    if cfg.peft.type == "none":
        return
    # Prefix tuning keeps only the prefixes it produces; its reparametrisation MLP is dropped.
    adapter = finalize_prefix(state.trainable, cfg.model) if cfg.peft.type == "prefix" else state.trainable
    frozen = state.frozen
    if jax.process_count() > 1:  # every host joins the gather; host 0 writes the file
        adapter, frozen = multihost_utils.process_allgather((adapter, frozen), tiled=True)
    if run.is_main:
        path = save_adapter(run.run_dir / "adapters", adapter, frozen, cfg.peft,
                            recipe=config_to_dict(cfg), step=cfg.train.steps)
        result.echo(f"adapter saved: {path}")


def write_samples(run, state, result) -> None:
    """Continuations of `train.sample_prompts` from the trained weights, into samples.txt."""
    tc, tokenizer = run.cfg.train, run.tokenizer
    if not tc.sample_prompts:
        return
    # every host runs the (sharded) generation; host 0 writes and prints
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in tc.sample_prompts]
    sampling = SamplingConfig(max_new_tokens=tc.sample_tokens, temperature=tc.sample_temperature,
                              top_p=0.95, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    gen = generate(run.model, model_params(state.params), prompts, sampling, jax.random.PRNGKey(tc.seed))
    result.samples = [p + tokenizer.decode(t) for p, t in zip(tc.sample_prompts, gen.tokens)]
    if run.is_main:
        atomic_write_text(run.run_dir / "samples.txt", "\n\n-----\n\n".join(result.samples) + "\n")
        for s in result.samples:
            result.echo("--- sample ---\n" + s)


def write_summary(run, state, result) -> None:
    """summary.json, the loss-curve PNG, and the closing line."""
    if not run.is_main:
        return
    run.log.plot()
    summary = {"steps": result.steps, "final_train_loss": result.final_train_loss, "final_eval": result.final_eval,
               "tokens_per_sec": result.tokens_per_sec, "compile_seconds": result.compile_seconds,
               "params": run.cfg.model.param_count(), "nonfinite_steps": result.nonfinite_steps,
               **result.extra_summary}  # sections earlier hooks added (e.g. `forgetting`)
    # NaN/inf (a diverged loss, no timed steps) are written as null: summary.json stays JSON
    atomic_write_text(run.run_dir / "summary.json", dumps_json(summary, indent=2) + "\n")
    ev = result.final_eval
    held_out = f"held-out loss {ev.get('loss', float('nan')):.4f}"
    if "perplexity" in ev:
        held_out += f" (ppl {ev['perplexity']:.2f})"
    skipped = f" | {result.nonfinite_steps} non-finite steps skipped" if result.nonfinite_steps else ""
    result.echo(f"done: train loss {result.final_train_loss:.4f} | {held_out} | {result.tokens_per_sec:,.0f} "
                f"tokens/s{skipped} | run dir {run.run_dir}")


def forgetting_report(run, state, result) -> None:
    """Fine-tuning runs (model.init_from): general probes on the base and after training
    (jaxlearn/eval/forgetting.py); imported here only when a run ends, so training never
    imports the eval package.

    >>> forgetting_report(run, state, result)          # doctest: +SKIP
    """
    from jaxlearn.eval.forgetting import forgetting_report as report

    report(run, state, result)


END_OF_RUN: tuple[Any, ...] = (export_adapter, write_samples, forgetting_report, write_summary)
