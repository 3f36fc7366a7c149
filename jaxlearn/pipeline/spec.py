"""Reading a pipeline file: the stages, their recipes, and the evaluations re-run after each.

A pipeline file has a `pipeline` block and, optionally, recipe blocks (`model`, `data`, `optim`,
`mesh`, `train`, `peft`, `objective`) shared by every stage::

    train: {progress: false}            # laid over every stage's recipe
    pipeline:
      out_dir: runs/pipeline_smollm2_lora
      general: [perplexity:brown, probes:facts]   # re-run after every stage, owned by none
      eval_limit: 40
      stages:
        - name: sft
          recipe: configs/sft_lora_smollm2_wordnet.yaml
          set: [train.steps=40]          # dotted overrides, as on the command line
          evals: [antonyms, definitions]
        - name: dpo
          recipe: configs/dpo_smollm2_wordnet.yaml
          evals: [antonyms]
        - name: safety
          recipe: configs/safety_sft_smollm2.yaml
          evals: [safety]

A stage's recipe is, in order of precedence (last wins): its `recipe` file, the shared blocks,
its own inline blocks (`model:`, `peft:` ... under the stage), its `set` overrides, the command
line's recipe overrides (`jaxlearn pipeline P.yaml train.steps=5` shortens every stage), and what
the pipeline owns: `train.run_dir` (`<out_dir>/stage<i>_<name>`), `train.resume` (true) and, from
stage 1 on, `model.init_from` (the previous stage's handoff) and `data.tokenizer` (the previous
stage's: a stage trains the model it is given with that model's tokenizer, whatever its recipe
file names, unless the stage itself sets `data.tokenizer` inline or in `set`). An eval is a `jaxlearn eval` task
(`antonyms`, `definitions`, `safety`, `humaneval`, `perplexity:brown`, `probes:facts`, ...), a
continual task (`hypernyms`, `brown:<genre>`), a preference accuracy (`prefs:wordnet_antonym_prefs`,
`prefs:wordnet_definition_prefs`, `prefs:safety_pairs`) or a mapping `{name, data: {paths: [...]}, eval:
chat_nll}`. `safety` gives two columns (refusal rate and false-refusal rate).

Example::

    spec = load_pipeline("configs/pipeline_tiny.yaml", ["pipeline.out_dir=/tmp/p"])
    [s.name for s in spec.stages]      # ['pretrain', 'sft', 'dpo', 'safety']
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from pathlib import Path

from jaxlearn.config import Config, ConfigError, config_from_dict, merge_mappings, parse_overrides, read_yaml_mapping
from jaxlearn.continual.tasks import BUILTIN, HIGHER_IS_BETTER, TaskSpec, builtin_task

BLOCKS = ("model", "data", "optim", "mesh", "train", "peft", "objective")
RUNNER_KEYS = {"out_dir": "runs/pipeline", "stages": None, "general": [], "eval_limit": 50, "eval_batch_size": 16,
               "max_new_tokens": 0, "ppl_batches": 4}
STAGE_KEYS = ("name", "recipe", "set", "evals") + BLOCKS
# Adapters that are a change of the weights they sit beside: they fold into the handoff.
MERGEABLE = ("none", "lora", "dora", "ia3")
# Evaluations that give more than their headline column.
COLUMNS = {"safety": ("refusal_rate", "false_refusal_rate")}
# What must agree between stages (a handoff is loaded by the next stage's model block).
_ARCH = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "d_ff", "tie_embeddings",
         "qkv_bias", "qk_norm", "rope_theta", "norm_eps")


@dataclasses.dataclass
class Column:
    """One column of the forgetting matrix: an evaluation's metric, and the stage that owns it
    (the first stage that lists the evaluation; -1 for a general probe)."""

    eval: TaskSpec
    metric: str
    owner: int

    @property
    def key(self) -> str:
        return f"{self.eval.name}/{self.metric}"

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER.get(self.metric, True)


@dataclasses.dataclass
class StageSpec:
    """One stage: its name, the merged recipe dict (pipeline-owned keys not yet set) and its evals."""

    name: str
    recipe: dict
    evals: list[TaskSpec]
    source: str  # the recipe file, or "" when the stage is inline only
    own_tokenizer: bool = False  # the stage itself (inline or `set`) names data.tokenizer


@dataclasses.dataclass
class PipelineSpec:
    """A parsed pipeline file."""

    path: str
    stages: list[StageSpec]
    general: list[TaskSpec]
    out_dir: Path
    eval_limit: int
    eval_batch_size: int
    max_new_tokens: int
    ppl_batches: int
    columns: list[Column]


def _err(path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"pipeline {path}: {key}: {msg}")


def _headline(name: str) -> tuple[str, ...]:
    from jaxlearn.eval.tasks import HEADLINE

    if name in COLUMNS:
        return COLUMNS[name]
    if name == "hypernyms":
        return ("contains",)
    if name == "chat_nll":
        return ("nll_per_token",)
    if name.startswith("brown:"):
        return ("perplexity",)
    return (HEADLINE[name],)


def parse_eval(raw, where: str) -> TaskSpec:
    """An evaluation entry: a task name, or `{name, data, eval: chat_nll}`.

    >>> parse_eval("safety", "x").eval
    'safety'
    """
    from jaxlearn.data.errors import DataError
    from jaxlearn.eval.tasks import check_tasks

    if isinstance(raw, dict):
        if not ({"name", "eval"} <= set(raw) <= {"name", "data", "eval"}) or not isinstance(raw.get("data", {}), dict):
            raise ConfigError(f"{where}: {raw!r} is not an evaluation; give a task name (antonyms) or "
                              "{name: NAME, data: {paths: [file.jsonl]}, eval: chat_nll}.")
        if raw["eval"] != "chat_nll":
            raise ConfigError(f"{where}: eval {raw['eval']!r}: a mapping evaluation scores its own data with "
                              "`eval: chat_nll`; name a built-in evaluation as a plain string instead.")
        return TaskSpec(str(raw["name"]), dict(raw.get("data", {})), "chat_nll")
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: {raw!r} is not an evaluation; give a task name such as antonyms.")
    if raw in ("hypernyms",) or raw.startswith("brown:"):
        return builtin_task(raw, where)
    try:
        check_tasks([raw])
    except DataError as e:
        raise ConfigError(f"{where}: {e} Continual tasks work too: {', '.join(BUILTIN)}.") from None
    return TaskSpec(raw, {}, raw)


def _stage_recipe(p: Path, i: int, raw: dict, shared: dict) -> tuple[dict, str]:
    where = f"stages[{i}]"
    source = ""
    data: dict = {}
    if "recipe" in raw:
        rp = Path(str(raw["recipe"]))
        if not rp.is_file() and (p.parent / rp).is_file():  # relative to the pipeline file
            rp = p.parent / rp
        data = read_yaml_mapping(rp, f"recipe of pipeline {p} {where}", "configs/sft_lora_smollm2_wordnet.yaml")
        source = str(rp)
    data = merge_mappings(data, shared)
    data = merge_mappings(data, {k: v for k, v in raw.items() if k in BLOCKS})
    sets = raw.get("set", [])
    if isinstance(sets, str):
        sets = [sets]
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise _err(p, f"{where}.set", "give a list of dotted overrides, e.g. [train.steps=40, optim.lr=5e-4].")
    data = merge_mappings(data, parse_overrides(sets))
    if i > 0 and ("init_from" in raw.get("model", {}) or any(s.startswith("model.init_from=") for s in sets)):
        raise _err(p, f"{where}.model.init_from", "the pipeline sets it: every stage after the first starts from "
                   "the previous stage's handoff. Remove it (or start a new pipeline at this stage).")
    return data, source


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    """Read and check a pipeline file (+ dotted overrides: `pipeline.out_dir=runs/p` sets the
    pipeline block, `train.steps=5` is laid over every stage's recipe). Every stage's recipe is built and checked here,
    so a bad key fails before anything trains.

    >>> load_pipeline("configs/pipeline_tiny.yaml").stages[0].name     # doctest: +SKIP
    'pretrain'
    """
    p = Path(path)
    data = read_yaml_mapping(p, "pipeline", "configs/pipeline_tiny.yaml")
    cli = parse_overrides(list(overrides))
    # Command-line recipe overrides come last, over every stage (`train.steps=5` shortens them all).
    data = merge_mappings(data, {k: v for k, v in cli.items() if k not in BLOCKS})
    cli = {k: v for k, v in cli.items() if k in BLOCKS}
    for k in data:
        if k not in BLOCKS + ("pipeline",):
            close = difflib.get_close_matches(str(k), list(BLOCKS) + ["pipeline"], n=1)
            raise _err(p, k, f"not allowed here{f'; did you mean {close[0]!r}?' if close else ''}. Valid blocks: "
                       f"{', '.join(BLOCKS)}, pipeline.")
    block = data.get("pipeline")
    if not isinstance(block, dict):
        raise _err(p, "pipeline", "missing or not a mapping; add `pipeline: {out_dir: runs/NAME, stages: [{name: sft, "
                   "recipe: configs/sft_lora_smollm2_wordnet.yaml, evals: [antonyms]}, ...]}`.")
    for k in block:
        if k not in RUNNER_KEYS:
            close = difflib.get_close_matches(str(k), list(RUNNER_KEYS), n=1)
            raise _err(p, f"pipeline.{k}", f"unknown key{f'; did you mean pipeline.{close[0]}?' if close else ''}. "
                       f"Valid keys: {', '.join(RUNNER_KEYS)}.")
    runner = {k: block.get(k, v) for k, v in RUNNER_KEYS.items()}
    for key in ("eval_limit", "eval_batch_size", "max_new_tokens", "ppl_batches"):
        if not isinstance(runner[key], int) or isinstance(runner[key], bool) or runner[key] < 0:
            raise _err(p, f"pipeline.{key}", f"{runner[key]!r} must be a whole number >= 0.")
    raw_stages = runner["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _err(p, "pipeline.stages", "give a list of stages, e.g. [{name: sft, recipe: configs/"
                   "sft_lora_smollm2_wordnet.yaml, evals: [antonyms]}, {name: dpo, ...}].")
    shared = {k: v for k, v in data.items() if k in BLOCKS}
    # Defaults the pipeline prefers: its own matrix replaces each run's forgetting report.
    shared = merge_mappings({"train": {"forgetting": False}}, shared)
    stages: list[StageSpec] = []
    columns: list[Column] = []
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise _err(p, where, "each stage is a mapping with a name, e.g. {name: sft, recipe: configs/x.yaml, "
                       "evals: [antonyms]}.")
        for k in raw:
            if k not in STAGE_KEYS:
                close = difflib.get_close_matches(str(k), list(STAGE_KEYS), n=1)
                raise _err(p, f"{where}.{k}", f"unknown key{f'; did you mean {close[0]!r}?' if close else ''}. "
                           f"Valid keys: {', '.join(STAGE_KEYS)}.")
        recipe, source = _stage_recipe(p, i, raw, shared)
        recipe = merge_mappings(recipe, cli)
        own_tok = "tokenizer" in (raw.get("data") or {}) or any(
            str(x).startswith("data.tokenizer=") for x in (raw.get("set") or []))
        evals_raw = raw.get("evals", [])
        if not isinstance(evals_raw, list):
            raise _err(p, f"{where}.evals", "give a list of evaluations, e.g. [antonyms, safety].")
        evals = [parse_eval(e, f"pipeline {p}: {where}.evals[{j}]") for j, e in enumerate(evals_raw)]
        stages.append(StageSpec(str(raw["name"]), recipe, evals, source, own_tok))
        for ev in evals:
            for metric in _headline(ev.eval):
                if not any(c.eval.name == ev.name and c.metric == metric for c in columns):
                    columns.append(Column(ev, metric, i))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise _err(p, "pipeline.stages", f"stage names must be distinct, got {names}.")
    general_raw = runner["general"] if isinstance(runner["general"], list) else [runner["general"]]
    general = [parse_eval(g, f"pipeline {p}: pipeline.general[{j}]") for j, g in enumerate(general_raw)]
    for ev in general:
        for metric in _headline(ev.eval):
            if not any(c.eval.name == ev.name and c.metric == metric for c in columns):
                columns.append(Column(ev, metric, -1))
    if not columns:
        raise _err(p, "evals", "no stage lists an evaluation and pipeline.general is empty: the forgetting matrix "
                   "would have no columns. Add `evals: [antonyms]` to a stage or `general: [perplexity:brown]`.")
    spec = PipelineSpec(str(p), stages, general, Path(runner["out_dir"]), runner["eval_limit"],
                        runner["eval_batch_size"], runner["max_new_tokens"], runner["ppl_batches"], columns)
    first = None
    for i in range(len(stages)):  # every stage's recipe is checked now
        cfg = stage_config(spec, i)
        if cfg.peft.type not in MERGEABLE:
            raise _err(p, f"stages[{i}].peft.type", f"{cfg.peft.type!r} adapters are not a change of the weights, so "
                       f"they cannot be handed to the next stage as merged weights; use one of {', '.join(MERGEABLE)}.")
        if first is None:
            first = cfg
        else:
            bad = [f"model.{f}={getattr(cfg.model, f)} (stage 0 has {getattr(first.model, f)})" for f in _ARCH
                   if getattr(cfg.model, f) != getattr(first.model, f)]
            if bad:
                raise _err(p, f"stages[{i}] ({stages[i].name})", "every stage trains the same model, but "
                           + ", ".join(bad) + "; make the model blocks agree (or put one model block at the top).")
    return spec


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def stage_dir(spec: PipelineSpec, i: int) -> Path:
    """`<out_dir>/stage<i>_<name>`: the stage's run directory (its handoff is `handoff/` inside)."""
    return spec.out_dir / f"stage{i:02d}_{_slug(spec.stages[i].name)}"


def handoff_dir(spec: PipelineSpec, i: int) -> Path:
    """Where stage i's output weights (adapters merged) are written as a Hugging Face directory."""
    return stage_dir(spec, i) / "handoff"


def stage_config(spec: PipelineSpec, i: int, tokenizer: str = "") -> Config:
    """Stage i's recipe with what the pipeline owns set: run directory, resume, and, after the
    first stage, `model.init_from` (the previous handoff) and the inherited `data.tokenizer`
    (`tokenizer`, the previous stage's; "" while it is not known yet)."""
    d = copy.deepcopy(spec.stages[i].recipe)
    d.setdefault("train", {}).update(run_dir=str(stage_dir(spec, i)), resume=True)
    if i > 0:
        d.setdefault("model", {})["init_from"] = str(handoff_dir(spec, i - 1).absolute())
        if tokenizer and not spec.stages[i].own_tokenizer:
            d.setdefault("data", {})["tokenizer"] = tokenizer
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"pipeline {spec.path}: stage {i} ({spec.stages[i].name}): {e}") from None


def describe(spec: PipelineSpec) -> str:
    """One line per stage (name, recipe, objective, PEFT, steps) for the log and the report.

    >>> print(describe(load_pipeline("configs/pipeline_tiny.yaml")))   # doctest: +SKIP
    stage 0 pretrain: configs/pretrain_shakespeare.yaml, lm, peft none, 300 steps
    """
    lines = []
    for i, s in enumerate(spec.stages):
        cfg = stage_config(spec, i)
        lines.append(f"stage {i} {s.name}: {s.source or 'inline'}, {cfg.objective.type}, peft {cfg.peft.type}, "
                     f"{cfg.train.steps} steps")
    return "\n".join(lines)

