"""`jaxlearn continual SEQUENCE.yaml`: train an ordered list of tasks, re-evaluating every task after each.

The runner only orchestrates. Each task is an ordinary `jaxlearn.train.loop.train(cfg)` run (its
own run directory `<out_dir>/task<i>_<name>/`) whose objective is `continual`
(`jaxlearn/objectives/continual.py`) and whose `objective.state` is the sequence state after the
previous task. After a task the runner reads the trained adapter heads from the run's final
checkpoint, folds them into the sequence state (`jaxlearn/continual/state.py`, `state_<i>.npz`),
evaluates every task with the model that now serves it (`row_<i>.json`) and finally writes the
accuracy matrix, BWT/FWT, the general-capability probe and the sizes (`continual.json`,
`continual.md`, `continual.png`). Every file is written atomically, so after a kill the sequence
resumes at task granularity: finished tasks (state and row on disk) are skipped, a task killed
mid-training resumes from its newest checkpoint (`train.resume`), and the matrix comes out the
same as an uninterrupted run's.

A sequence file is an ordinary recipe (`model`, `data`, `optim`, `mesh`, `train` blocks, shared
by every task: the same steps for every task and method) plus a `continual` block::

    continual:
      method: share            # sequential | per_task | olora | share | ella
      out_dir: runs/continual_share
      tasks: [antonyms, definitions, hypernyms, "brown:fiction"]   # or {name, data, eval} mappings
      eval_limit: 50           # examples per task evaluation (a fixed sample)
      general: [perplexity:brown]
      rank: 8                  # ... and the other keys of the `continual` objective block

Example::

    spec = load_sequence("configs/continual_smollm2_wordnet.yaml", ["continual.method=ella"])
    report = run_sequence(spec)
    report["summary"]["bwt"]
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxlearn.config import Config, ConfigError, config_from_dict, merge_mappings, parse_overrides, read_yaml_mapping
from jaxlearn.continual import metrics as cmetrics
from jaxlearn.continual.state import after_task, save_state, served, state_size
from jaxlearn.continual.tasks import TaskSpec, builtin_task, evaluate_task, resolve_data
from jaxlearn.objectives.continual import CONTINUAL_TRAINABLE, METHODS, ContinualConfig, load_state
from jaxlearn.train.metrics import atomic_write_text, dumps_json

RUNNER_KEYS = {"method": "sequential", "out_dir": "runs/continual", "tasks": None, "eval_limit": 50,
               "general": ["perplexity:brown"], "eval_batch_size": 16, "max_new_tokens": 0, "ppl_batches": 4}
OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(ContinualConfig) if f.name not in ("type", "method", "task",
                                                                                            "state"))
RECIPE_BLOCKS = ("model", "data", "optim", "mesh", "train")


@dataclasses.dataclass
class SequenceSpec:
    """A parsed sequence file: the shared recipe, the method, its objective keys and the tasks."""

    path: str
    recipe: dict
    method: str
    objective: dict
    tasks: list[TaskSpec]
    out_dir: Path
    eval_limit: int
    general: list[str]
    eval_batch_size: int
    max_new_tokens: int
    ppl_batches: int


def _err(path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"sequence {path}: {key}: {msg}")


def load_sequence(path: str | Path, overrides: list[str] = ()) -> SequenceSpec:
    """Read and check a sequence file (+ dotted overrides such as `continual.method=ella`). Every
    task's recipe is built and checked here, so a bad key fails before anything trains.

    >>> load_sequence("configs/continual_tiny.yaml").method          # doctest: +SKIP
    'share'
    """
    p = Path(path)
    data = read_yaml_mapping(p, "sequence", "configs/continual_smollm2_wordnet.yaml")
    data = merge_mappings(data, parse_overrides(list(overrides)))
    unknown = [k for k in data if k not in RECIPE_BLOCKS + ("continual",)]
    for k in unknown:
        hint = ("; the continual objective owns the adapters and objective (set their keys under `continual:`)"
                if k in ("peft", "objective") else "")
        close = difflib.get_close_matches(str(k), list(RECIPE_BLOCKS) + ["continual"], n=1)
        raise _err(p, k, f"not allowed here{hint}{f'; did you mean {close[0]!r}?' if close else ''}. Valid blocks: "
                   f"{', '.join(RECIPE_BLOCKS)}, continual.")
    block = data.get("continual")
    if not isinstance(block, dict):
        raise _err(p, "continual", "missing or not a mapping; add `continual: {method: share, tasks: [antonyms, "
                   "definitions], out_dir: runs/NAME}`.")
    runner = {k: block.get(k, v) for k, v in RUNNER_KEYS.items()}
    objective = {k: v for k, v in block.items() if k in OBJECTIVE_KEYS}
    for k in block:
        if k not in RUNNER_KEYS and k not in OBJECTIVE_KEYS:
            close = difflib.get_close_matches(str(k), list(RUNNER_KEYS) + list(OBJECTIVE_KEYS), n=1)
            raise _err(p, f"continual.{k}", f"unknown key{f'; did you mean continual.{close[0]}?' if close else ''}. "
                       f"Valid keys: {', '.join(list(RUNNER_KEYS) + list(OBJECTIVE_KEYS))}.")
    if runner["method"] not in METHODS:
        raise _err(p, "continual.method", f"{runner['method']!r} is not a method; use one of {', '.join(METHODS)}.")
    raw_tasks = runner["tasks"]
    if not isinstance(raw_tasks, list) or len(raw_tasks) < 2:
        raise _err(p, "continual.tasks", "give a list of at least 2 tasks, e.g. [antonyms, definitions, hypernyms].")
    tasks = []
    for i, t in enumerate(raw_tasks):
        where = f"continual.tasks[{i}]"
        if isinstance(t, str):
            tasks.append(builtin_task(t, f"sequence {p}: {where}"))
        elif isinstance(t, dict) and set(t) <= {"name", "data", "eval"} and "name" in t and "eval" in t:
            if not isinstance(t.get("data", {}), dict):
                raise _err(p, f"{where}.data", "must be a mapping of data block keys (source, paths, format, ...).")
            tasks.append(TaskSpec(str(t["name"]), dict(t.get("data", {})), str(t["eval"])))
        else:
            raise _err(p, where, f"{t!r} is not a task; use a built-in name (antonyms) or a mapping "
                       "{name: NAME, data: {...}, eval: chat_nll}.")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise _err(p, "continual.tasks", f"task names must be distinct, got {names}.")
    for key in ("eval_limit", "eval_batch_size", "max_new_tokens", "ppl_batches"):
        if not isinstance(runner[key], int) or runner[key] < 0:
            raise _err(p, f"continual.{key}", f"{runner[key]!r} must be a whole number >= 0.")
    if isinstance(runner["general"], str):
        runner["general"] = [runner["general"]]
    spec = SequenceSpec(str(p), {k: v for k, v in data.items() if k in RECIPE_BLOCKS}, runner["method"], objective,
                        tasks, Path(runner["out_dir"]), runner["eval_limit"], list(runner["general"] or []),
                        runner["eval_batch_size"], runner["max_new_tokens"], runner["ppl_batches"])
    for i in range(len(tasks)):  # every task's recipe is checked now (data placeholders unresolved)
        task_config(spec, i, "", resolve=False)
    return spec


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_dir_of(spec: SequenceSpec, i: int) -> Path:
    return spec.out_dir / f"task{i:02d}_{_slug(spec.tasks[i].name)}"


def task_config(spec: SequenceSpec, i: int, state_path: str, resolve: bool = True) -> Config:
    """The recipe of task `i`: the shared blocks + the task's data + the continual objective."""
    task = spec.tasks[i]
    d = copy.deepcopy(spec.recipe)
    data = resolve_data(task, spec.out_dir) if resolve else {k: v for k, v in task.data.items() if k != "paths"}
    d["data"] = {**d.get("data", {}), **data}
    if not resolve and "paths" in task.data and not any(str(x).startswith("<") for x in task.data["paths"]):
        d["data"]["paths"] = task.data["paths"]
    d["objective"] = {"type": "continual", "method": spec.method, "task": i, "state": state_path, **spec.objective}
    d["peft"] = {"type": "none", "trainable": [CONTINUAL_TRAINABLE]}
    d["train"] = {**d.get("train", {}), "run_dir": str(run_dir_of(spec, i)), "resume": True}
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"sequence {spec.path}: task {i} ({task.name}): {e}") from None


def _eval_model(model, params, tokenizer, desc):
    from jaxlearn.eval.models import EvalModel

    return EvalModel(desc, model, params, tokenizer, {"model": desc})


def _evaluate_all(spec: SequenceSpec, em_for_task: Callable[[int], Any], general_em) -> dict:
    scores = []
    for j, task in enumerate(spec.tasks):
        data = resolve_data(task, spec.out_dir)
        scores.append(evaluate_task(em_for_task(j), task, data, limit=spec.eval_limit,
                                    batch_size=spec.eval_batch_size, max_new_tokens=spec.max_new_tokens,
                                    ppl_batches=spec.ppl_batches))
    general = {}
    for g in spec.general:
        r = evaluate_task(general_em, TaskSpec(g, {}, g), {}, limit=spec.eval_limit, batch_size=spec.eval_batch_size,
                          max_new_tokens=spec.max_new_tokens, ppl_batches=spec.ppl_batches)
        general[g] = r["score"]
    return {"scores": scores, "general": general}


def run_sequence(spec: SequenceSpec, echo: Callable[[str], None] = print, stop_after: int | None = None) -> dict:
    """Train and evaluate the sequence (resuming what is on disk); returns the report dict.
    `stop_after=i` stops once task i is done (the tests' stand-in for a kill)."""
    from jaxlearn.objectives.continual import ContinualObjective, with_adapters
    from jaxlearn.peft.merge import without_adapters
    from jaxlearn.run import open_run
    from jaxlearn.train.loop import train

    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sequence.json", dumps_json({"path": spec.path, "method": spec.method,
                                                        "tasks": [dataclasses.asdict(t) for t in spec.tasks],
                                                        "objective": spec.objective}, indent=2) + "\n")
    prev, rows = "", []
    base = None
    for i, task in enumerate(spec.tasks):
        state_path, row_path = out / f"state_{i:02d}.npz", out / f"row_{i:02d}.json"
        cfg = task_config(spec, i, prev)
        opened = None
        if not state_path.is_file():
            echo(f"[continual {spec.method}] task {i} ({task.name}): training")
            train(cfg, echo=echo)  # resumes a task killed mid-run from its newest checkpoint
            opened = open_run(cfg.train.run_dir)
            heads = opened.params["heads"]["continual"]
            obj = ContinualObjective(opened.model, cfg.objective, cfg)
            save_state(after_task(cfg.objective, obj.sites, load_state(prev), heads, i), state_path)
        state = load_state(state_path)
        if not row_path.is_file() or not (out / "base.json").is_file():
            opened = opened or open_run(cfg.train.run_dir)
            obj = ContinualObjective(opened.model, cfg.objective, cfg)
            base_params = without_adapters(opened.params)
            heads_flat = [(k, v) for k, v in _flat(opened.params["heads"]).items()]
            trainable = sum(int(np.size(v)) for k, v in heads_flat if "/basis_" not in k)

            def em_for(task_id, _state=state, _obj=obj, _o=opened, _bp=base_params):
                factors, deltas = served(cfg.objective, _obj.sites, _state, task_id)
                return _eval_model(_o.model, with_adapters(_bp, _obj.sites, factors, deltas, _obj.scale),
                                   _o.tokenizer, f"after task {i}, serving task {task_id}")

            if not (out / "base.json").is_file():  # the base, adapters off (same weights in every task run)
                echo(f"[continual {spec.method}] evaluating the base (adapters off)")
                em = _eval_model(opened.model, base_params, opened.tokenizer, "base")
                atomic_write_text(out / "base.json", dumps_json(_evaluate_all(spec, lambda _j: em, em)) + "\n")
            if not row_path.is_file():
                echo(f"[continual {spec.method}] task {i} ({task.name}): evaluating every task")
                # Task-id methods answer a task not seen yet with the newest adapter (forward transfer).
                row = _evaluate_all(spec, lambda j: em_for(min(j, i)), em_for(i))
                params, nbytes = state_size(state)
                row.update({"task": task.name, "state_params": params, "state_bytes": nbytes,
                            "trainable_params": trainable})
                atomic_write_text(row_path, dumps_json(row) + "\n")
        rows.append(cmetrics.read_json(row_path))
        prev = str(state_path)
        if stop_after is not None and i >= stop_after:
            return {}
    base = cmetrics.read_json(out / "base.json")
    report = build_report(spec, base, rows)
    paths = cmetrics.write_reports(report, out)
    echo(f"[continual {spec.method}] avg accuracy {report['summary']['avg_accuracy']:.4f} | BWT "
         f"{report['summary']['bwt']:+.4f} | FWT {report['summary']['fwt']:+.4f} | {paths['md']}")
    return report


def _flat(tree) -> dict:
    from jaxlearn.peft.filter import flat_paths

    return flat_paths(tree)


def build_report(spec: SequenceSpec, base: dict, rows: list[dict]) -> dict:
    """The report dict from the base's and each task's evaluation rows."""
    metrics = [s["metric"] for s in base["scores"]]
    from jaxlearn.continual.tasks import HIGHER_IS_BETTER

    hib = [HIGHER_IS_BETTER.get(m, True) for m in metrics]
    matrix = [[s["score"] for s in r["scores"]] for r in rows]
    base_scores = [s["score"] for s in base["scores"]]
    return {"method": spec.method, "tasks": [t.name for t in spec.tasks], "metrics": metrics,
            "higher_is_better": hib, "matrix": matrix, "base": base_scores, "base_general": base["general"],
            "summary": cmetrics.transfer_metrics(matrix, base_scores, hib), "rows": rows,
            "objective": spec.objective}


