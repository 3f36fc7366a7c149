"""`jaxlearn pipeline PIPELINE.yaml`: train the stages in order, each from the previous stage's
weights, and re-run every stage's evaluations after each stage (the forgetting matrix).

The runner only orchestrates (`jaxlearn/pipeline/spec.py` says how a stage's recipe is built).
Each stage is an ordinary `jaxlearn.train.loop.train(cfg)` run in `<out_dir>/stage<i>_<name>/`.
After it trains, the runner writes the stage's **handoff**: its final weights with any LoRA, DoRA
or IA3 adapters **merged** into the kernels and objective heads (value, reward heads) dropped, as
a float Hugging Face directory `stage<i>_<name>/handoff/` (written to a temporary directory, then
renamed, so it exists only whole). The next stage's `model.init_from` is that directory, so full
fine-tuning and PEFT stages chain the same way, and a PEFT stage trains fresh adapters over the
merged weights of everything before it. (Why merged and not stacked: a stack of adapters would
make every later stage's forward pass pay for every earlier adapter, and the next stage's DPO
reference or KL anchor must be exactly the previous stage's model, which the merged weights are.)

The model evaluated after stage i is the handoff itself (loaded back from disk), so the matrix
scores exactly what the next stage starts from. Rows: `base.json` (the first stage's
`model.init_from`, when it has one) and `row_<i>.json`; reports: `pipeline.json`, `pipeline.md`,
`pipeline.png` (heatmap) and `pipeline_metrics.png` (each metric across stages). Every file is
written atomically, so after a kill the pipeline resumes at stage granularity: finished stages
(handoff and row on disk) are skipped, a stage killed mid-training resumes from its newest
checkpoint (`train.resume`).

Example::

    spec = load_pipeline("configs/pipeline_tiny.yaml")
    report = run_pipeline(spec)
    report["matrix"][-1]          # every column's score after the last stage
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from jaxlearn.continual.tasks import evaluate_task, resolve_data
from jaxlearn.pipeline import report as preport
from jaxlearn.pipeline.spec import PipelineSpec, handoff_dir, stage_config, stage_dir
from jaxlearn.train.metrics import atomic_write_text, dumps_json


def write_handoff(run_dir: str | Path, out: str | Path, extra: dict | None = None) -> dict:
    """Write a finished run's final weights, adapters merged and objective heads dropped, as a
    Hugging Face directory `out` (atomically: a temporary directory renamed into place), with
    `handoff.json` saying what was done. Returns that record.

    >>> write_handoff("runs/p/stage00_sft", "runs/p/stage00_sft/handoff")["merged"]   # doctest: +SKIP
    'lora'
    """
    from jaxlearn.models.hf import save_hf
    from jaxlearn.peft.merge import adapter_leaves, merge
    from jaxlearn.run import open_run

    out = Path(out)
    run = open_run(run_dir)
    params = {k: v for k, v in run.params.items() if k != "heads"}  # value/reward heads serve the objective only
    merged = run.cfg.peft.type if adapter_leaves(params) else "none"
    if merged != "none":
        params = merge(params)
    tok = run.tokenizer if hasattr(run.tokenizer, "hf_token_ids") else None
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(params, run.cfg.model, tmp, tokenizer=tok)
    record = {"run_dir": str(run_dir), "step": run.step, "peft": run.cfg.peft.type, "merged": merged,
              "objective": run.cfg.objective.type, **(extra or {})}
    atomic_write_text(tmp / "handoff.json", dumps_json(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # a stale one from an older run of this stage
    os.replace(tmp, out)
    return record


def _tokenizer_path(cfg, run_dir: Path) -> str:
    """The tokenizer a stage used, for later stages that name none (a pretraining stage trains one)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    own = run_dir / "tokenizer.model"
    return str(own.absolute()) if own.is_file() else ""


def _eval_model(weights: str, cfg, run_dir: Path, name: str):
    """An EvalModel of the weights in `weights` (a handoff directory or `model.init_from`), laid
    out as the stage's model block says, with the stage's tokenizer."""
    from jaxlearn.data.run_tokenizer import resolve_tokenizer
    from jaxlearn.eval.models import EvalModel
    from jaxlearn.models.presets import load_pretrained
    from jaxlearn.models.transformer import Transformer

    pre = load_pretrained(weights, cfg.model)
    tok = resolve_tokenizer(cfg.data, run_dir, may_train=False)
    return EvalModel(name, Transformer(pre.cfg), pre.params, tok, {"model": name, "weights": str(weights)})


def evaluate_row(spec: PipelineSpec, em, echo: Callable[[str], None] = print) -> dict:
    """Every column's score for one model: `{"scores": {column key: value}, "results": {eval: ...}}`."""
    results, t0 = {}, time.perf_counter()
    for col in spec.columns:
        ev = col.eval
        if ev.name in results:
            continue
        r = evaluate_task(em, ev, resolve_data(ev, spec.out_dir), limit=spec.eval_limit,
                          batch_size=spec.eval_batch_size, max_new_tokens=spec.max_new_tokens,
                          ppl_batches=spec.ppl_batches)
        results[ev.name] = r
        echo(f"  {ev.name}: {r['metric']} {r['score']:.4f}")
    scores = {}
    for col in spec.columns:
        r = results[col.eval.name]
        scores[col.key] = float(r.get("metrics", {}).get(col.metric, r["score"] if r["metric"] == col.metric
                                                         else float("nan")))
    return {"scores": scores, "results": results, "eval_seconds": time.perf_counter() - t0}


def run_pipeline(spec: PipelineSpec, echo: Callable[[str], None] = print, stop_after: int | None = None) -> dict:
    """Train, hand off and evaluate every stage (resuming what is on disk); returns the report.
    `stop_after=i` stops once stage i is done (the tests' stand-in for a kill between stages)."""
    from jaxlearn.train.loop import train

    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline_spec.json", dumps_json(
        {"path": spec.path, "stages": [{"name": s.name, "recipe": s.source, "evals": [e.name for e in s.evals]}
                                       for s in spec.stages],
         "columns": [{"key": c.key, "owner": c.owner} for c in spec.columns]}, indent=2) + "\n")
    tokenizer, rows, base = "", [], None
    for i, stage in enumerate(spec.stages):
        cfg = stage_config(spec, i, tokenizer)
        sdir, hdir = stage_dir(spec, i), handoff_dir(spec, i)
        row_path = out / f"row_{i:02d}.json"
        tag = f"[pipeline] stage {i} ({stage.name})"
        if not (hdir / "handoff.json").is_file():
            echo(f"{tag}: training ({cfg.objective.type}, peft {cfg.peft.type}, {cfg.train.steps} steps, from "
                 f"{cfg.model.init_from or 'a fresh init'})")
            t0 = time.perf_counter()
            train(cfg, echo=echo)  # resumes a stage killed mid-run from its newest checkpoint
            rec = write_handoff(sdir, hdir, {"train_seconds": time.perf_counter() - t0,
                                             "init_from": cfg.model.init_from})
            echo(f"{tag}: handoff {hdir} (adapters merged: {rec['merged']})")
        tokenizer = _tokenizer_path(cfg, sdir)
        if i == 0 and cfg.model.init_from and not (out / "base.json").is_file():
            echo(f"[pipeline] evaluating the base {cfg.model.init_from}")
            row = evaluate_row(spec, _eval_model(cfg.model.init_from, cfg, sdir, "base"), echo)
            atomic_write_text(out / "base.json", dumps_json({"stage": "base", **row}, indent=2) + "\n")
        if not row_path.is_file():
            echo(f"{tag}: evaluating every column on the handoff")
            row = evaluate_row(spec, _eval_model(str(hdir), cfg, sdir, f"after {stage.name}"), echo)
            row["handoff"] = preport.read_json(hdir / "handoff.json")
            atomic_write_text(row_path, dumps_json({"stage": stage.name, **row}, indent=2) + "\n")
        rows.append(preport.read_json(row_path))
        if stop_after is not None and i >= stop_after:
            return {}
    if (out / "base.json").is_file():
        base = preport.read_json(out / "base.json")
    report = preport.build_report(spec, base, rows)
    paths = preport.write_reports(report, out)
    echo(f"[pipeline] forgetting matrix: {paths['md']} ({paths['png']}, {paths['plot']})")
    return report
