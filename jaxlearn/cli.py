"""The `jaxlearn` command.

    jaxlearn train configs/pretrain_shakespeare.yaml optim.lr=3e-4 train.steps=300
    jaxlearn generate runs/shakespeare "ROMEO:" --max-new-tokens 100
    jaxlearn generate --model smollm2-135m-instruct "What is the capital of France?"
    jaxlearn convert smollm2-135m-instruct out/smollm2-hf
    jaxlearn eval runs/shakespeare
    jaxlearn continual configs/continual_smollm2_wordnet.yaml continual.method=share
    jaxlearn pipeline configs/pipeline_tiny.yaml
    jaxlearn compile configs/pod/llama3_8b_full_ft.yaml --topology v5p:4x4x4
    jaxlearn tokenizer train --source shakespeare --vocab-size 4096 --out tok.model
    jaxlearn data fetch shakespeare
    jaxlearn adapters list runs/lora_smollm2_shakespeare

Known bad input (missing file, malformed YAML, unknown key, wrong type, empty or non-UTF-8
data, a checkpoint from another model) prints one paragraph naming the problem and the fix,
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from jaxlearn.config import load_config
    from jaxlearn.train.loop import train

    cfg = load_config(args.recipe, args.overrides + (["train.resume=true"] if args.resume else []))
    if args.distributed or args.coordinator:  # before anything touches a device
        from jaxlearn.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    train(cfg)
    return 0


def _cmd_continual(args) -> int:
    from jaxlearn.continual.runner import load_sequence, run_sequence

    run_sequence(load_sequence(args.sequence, args.overrides))
    return 0


def _cmd_pipeline(args) -> int:
    from jaxlearn.pipeline.runner import run_pipeline
    from jaxlearn.pipeline.spec import describe, load_pipeline

    spec = load_pipeline(args.pipeline, args.overrides)
    print(describe(spec))
    run_pipeline(spec)
    return 0


def _cmd_compile(args) -> int:
    import os

    import jax

    from jaxlearn.config import load_config
    from jaxlearn.pod.compile import fit_check

    # The check compiles for a *described* topology and runs nothing, so it needs no local
    # accelerator: keep JAX on the CPU unless the user chose platforms. On a TPU VM this also
    # leaves the chips to a training job that may be holding them.
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    cfg = load_config(args.recipe, args.overrides)
    report = fit_check(cfg, args.topology, slices=args.slices, count_flops=not args.no_flops)
    print(report.text())
    if args.json:
        from jaxlearn.train.metrics import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 0 if report.fits else 1


def _cmd_generate(args) -> int:
    import jax

    from jaxlearn.models.generate import SamplingConfig, generate
    from jaxlearn.run import open_run

    if args.model:  # a pretrained model: every positional is a prompt
        return _generate_pretrained(args, [args.run] + args.prompts)
    if not args.prompts:
        raise ValueError("give at least one prompt after the run directory, e.g. jaxlearn generate runs/x \"ROMEO:\"")
    args.temperature = 0.8 if args.temperature is None else args.temperature
    run = open_run(args.run, args.overrides)
    tok = run.tokenizer
    prompts = [[tok.bos_id] + tok.encode(p) for p in args.prompts]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
    out = generate(run.model, run.params, prompts, sampling, jax.random.PRNGKey(args.seed))
    for p, t in zip(args.prompts, out.tokens):
        print(p + tok.decode(t))
        print("-----")
    return 0


def _generate_pretrained(args, prompts: list[str]) -> int:
    import jax

    from jaxlearn.models.generate import SamplingConfig
    from jaxlearn.models.presets import generate_text, load_pretrained

    pre = load_pretrained(args.model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                              top_k=args.top_k, top_p=args.top_p)
    answers = generate_text(pre, prompts, sampling, chat=not args.no_chat, system=args.system,
                            rng=jax.random.PRNGKey(args.seed))
    for p, a in zip(prompts, answers):
        print(a if not args.no_chat else p + a)
        print("-----")
    return 0


def _cmd_convert(args) -> int:
    from jaxlearn.models.hf import save_hf
    from jaxlearn.models.presets import load_pretrained

    pre = load_pretrained(args.source, strict=not args.allow_unused)
    print(pre.report.summary())
    out = save_hf(pre.params, pre.cfg, args.out, tokenizer=pre.tokenizer, dtype=args.dtype)
    print(f"wrote {out} (config.json, model.safetensors{', tokenizer.json' if pre.tokenizer else ''})")
    return 0


def _cmd_eval_tasks(args) -> int:
    from jaxlearn.eval.models import load_eval_model
    from jaxlearn.eval.tasks import check_tasks, compare_table, run_tasks, write_report

    if args.compare:
        print(compare_table(args.compare))
        return 0
    spec = args.model or args.run
    if not spec:
        raise ValueError("name the model: jaxlearn eval --model smollm2-135m-instruct --tasks ... (or a run directory).")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    check_tasks(tasks)  # before the (slow) model load
    em = load_eval_model(spec, adapter=args.adapter, no_adapters=args.no_adapters)
    opts = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "ppl_batches": args.ppl_batches}
    results = run_tasks(em, tasks, split=args.split, limit=args.limit or None, **opts)
    out = Path(args.out or (Path(args.run) / "eval_tasks" if args.run and not args.model else "eval_out"))
    path = write_report(results, em.description, out, split=args.split, limit=args.limit or None)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {path}, {out / 'results.md'} and per-example outputs in {out / 'examples'}")
    return 0


def _cmd_eval(args) -> int:
    if args.tasks or args.model or args.compare:  # the task harness (jaxlearn/eval/)
        return _cmd_eval_tasks(args)
    if not args.run:
        raise ValueError("give a run directory (held-out perplexity) or --model/--tasks (the task harness).")
    from jaxlearn.data.feed import host_eval_batches
    from jaxlearn.objectives.registry import build_objective
    from jaxlearn.run import open_run
    from jaxlearn.train.batches import make_evaluator
    from jaxlearn.train.extras import build_extras
    from jaxlearn.train.metrics import atomic_write_text, dumps_json
    from jaxlearn.train.state import build_state

    run = open_run(args.run, args.overrides)
    cfg = run.cfg
    batches = host_eval_batches(cfg.data, run.tokenizer, args.batches or cfg.train.eval_batches)
    shard = run.model.shard
    objective = build_objective(run.model, cfg)
    setup = build_state(run.model, cfg, shard.mesh, shard.rules, max(cfg.train.steps, 1), params=run.params,
                        objective=objective)
    evaluate = make_evaluator(objective, setup, shard, build_extras(objective.extras(), shard), batches)
    result = {"step": run.step, "data": cfg.data.source, **evaluate(setup.state)}
    text = dumps_json(result, indent=2)  # a NaN loss is written as null: eval.json stays JSON
    print(text)
    atomic_write_text(Path(args.run) / "eval.json", text + "\n")
    cols = [k for k in result if k not in ("step", "data")]  # loss, the objective's metrics, weight
    names = ["held-out loss" if k == "loss" else k for k in cols]
    print("\n| step | data | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(cols) + "\n"
          f"| {run.step} | {cfg.data.source} | " + " | ".join(f"{result[k]:.4f}" for k in cols) + " |")
    return 0


def _cmd_tokenizer_train(args) -> int:
    from jaxlearn.config import DataConfig
    from jaxlearn.data.sources import make_source
    from jaxlearn.data.tokenizer import train_tokenizer

    data = DataConfig(source=args.source, paths=tuple(args.paths), text_field=args.text_field)
    source = make_source(data, "train")
    out = Path(args.out)
    prefix = out.with_suffix("") if out.suffix == ".model" else out
    path = train_tokenizer((source[i] for i in range(len(source))), prefix, args.vocab_size)
    print(f"wrote {path}")
    return 0


def _cmd_data_fetch(args) -> int:
    from jaxlearn.data.corpora import fetch_corpus, fetch_donotanswer, fetch_humaneval, fetch_wordnet

    fetchers = {"wordnet": fetch_wordnet, "humaneval": fetch_humaneval, "donotanswer": fetch_donotanswer}
    for name in args.names:
        print(f"{name}: {fetchers[name]() if name in fetchers else fetch_corpus(name)}")
    return 0


def _cmd_adapters_list(args) -> int:
    from jaxlearn.peft.files import list_adapters

    directory = Path(args.dir)
    if (directory / "adapters").is_dir():  # a run directory
        directory = directory / "adapters"
    rows = list_adapters(directory)
    if not rows:
        print(f"no adapters under {directory}")
        return 0
    print("| version | method | rank | step | targets | trainable values | base fingerprint |\n|---|---|---|---|---|---|---|")
    for path, meta in rows:
        n = sum(math.prod(i["shape"]) for i in meta["leaves"].values())
        rank = meta["hyperparameters"].get("rank", "") if meta["method"] in ("lora", "dora") else ""
        print(f"| {path.name} | {meta['method']} | {rank} | {meta['step']} | {len(meta['targets'])} | {n:,} | "
              f"{meta['base_fingerprint']} |")
    return 0


def _cmd_adapters_show(args) -> int:
    from jaxlearn.peft.files import read_metadata, resolve

    meta = read_metadata(resolve(args.path))
    if not args.recipe:
        meta.pop("recipe", None)
    print(json.dumps(meta, indent=1))
    return 0


def _cmd_adapters_merge(args) -> int:
    from jaxlearn.config import ConfigError
    from jaxlearn.models.hf import save_hf
    from jaxlearn.peft.merge import adapter_leaves, merge
    from jaxlearn.peft.quantize import quantized_format
    from jaxlearn.run import open_run

    run = open_run(args.run)
    method = run.cfg.peft.type
    if method not in MERGEABLE or not adapter_leaves(run.params):
        why = ("it trained no adapters (peft.type: none): its weights are the full model already, so there is "
               "nothing to merge; use the run directory as it is") if method == "none" else (
               f"its {method} adapters are not a change of the weights and cannot be folded into them")
        raise ConfigError(f"cannot merge {args.run}: {why}. `adapters merge` folds {', '.join(MERGEABLE)} adapters.")
    # QLoRA: the int8/NF4 base is dequantised (to the model's param dtype) before the fold, so
    # the merged model is a float one; say so, since the quantized memory saving is gone.
    fmt = quantized_format(run.params)
    dtype = run.cfg.model.param_dtype
    merged = merge(run.params, dtype=dtype)
    tok = run.tokenizer if hasattr(run.tokenizer, "hf_token_ids") else None
    out = save_hf(merged, run.cfg.model, args.out, tokenizer=tok)
    print(f"merged {run.cfg.peft.type} adapters of {args.run} (step {run.step}) into {out}")
    if fmt:
        print(f"the base was stored {fmt} (QLoRA, peft.quantize={fmt}): it was dequantised from {fmt} to {dtype} "
              f"and the adapters folded in; the merged weights are {dtype} (float), not {fmt}")
    return 0


MERGEABLE = ("lora", "dora", "ia3")  # adapters that are a change of the weights they sit beside


def _cmd_adapters_export(args) -> int:
    from jaxlearn.models.hf import save_hf
    from jaxlearn.peft.hf_peft import export_peft, peft_logit_diff
    from jaxlearn.peft.merge import base_leaves
    from jaxlearn.peft.quantize import dequantize_tree, quantized_format
    from jaxlearn.run import open_run

    run = open_run(args.run)
    out = Path(args.out)
    base_dir = out / "base"
    tok = run.tokenizer if hasattr(run.tokenizer, "hf_token_ids") else None
    # QLoRA: PEFT's LoRA layers sit over a float base, so the base goes out dequantised (the
    # weights the adapter was trained against); the adapter tensors are plain LoRA's.
    fmt = quantized_format(run.params)
    dtype = run.cfg.model.param_dtype
    params = dequantize_tree(run.params, dtype) if fmt else run.params
    save_hf(base_leaves(params), run.cfg.model, base_dir, tokenizer=tok)
    adapter_dir = export_peft(params, run.cfg.model, run.cfg.peft, out / "adapter", base_name=str(base_dir))
    print(f"wrote {base_dir} (base, transformers) and {adapter_dir} (PEFT adapter)")
    if fmt:
        print(f"the base was stored {fmt} (QLoRA): {base_dir} holds it dequantised from {fmt} to {dtype} (float)")
        try:  # the check needs torch + transformers + peft, which jaxlearn itself does not
            diff = peft_logit_diff(run.model, run.params, base_dir, adapter_dir)
        except ImportError as e:
            print(f"PEFT logit check skipped ({e.name} is not installed)")
        else:
            print(f"max |logit difference|, jaxlearn QLoRA model vs peft.PeftModel over the dequantised base: {diff:.2e}")
    return 0


def _cmd_rlaif(args) -> int:
    from jaxlearn.rlaif.commands import run

    return run(args)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into one line and exit 2).

    >>> _positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 0 is not a positive number; give at least 1 (e.g. 100)
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one such as 100") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number; give at least 1 (e.g. 100)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlearn", description="Train and align language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe")
    t.add_argument("recipe", help="YAML recipe, e.g. configs/pretrain_shakespeare.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue the run in train.run_dir exactly")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: join the job JAX detects (Cloud TPU pod slice, SLURM, MPI); run on every host")
    t.add_argument("--coordinator", default="", help="multi-host elsewhere: process 0's host:port")
    t.add_argument("--num-processes", type=int, default=None, help="with --coordinator: processes in the job")
    t.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's id")
    t.set_defaults(fn=_cmd_train)

    cs = sub.add_parser("continual", help="train a sequence of tasks (continual learning); report the accuracy matrix")
    cs.add_argument("sequence", help="sequence YAML, e.g. configs/continual_smollm2_wordnet.yaml")
    cs.add_argument("overrides", nargs="*", help="dotted overrides, e.g. continual.method=ella train.steps=20")
    cs.set_defaults(fn=_cmd_continual)
    pl = sub.add_parser("pipeline", help="chain stages (pretrain, SFT, DPO, safety, ...) weight to weight; report "
                                         "the forgetting matrix after every stage")
    pl.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipeline_tiny.yaml")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.out_dir=runs/p train.steps=20")
    pl.set_defaults(fn=_cmd_pipeline)

    cp = sub.add_parser("compile", help="ahead-of-time fit check of a recipe on a TPU topology (no TPU needed)")
    cp.add_argument("recipe", help="YAML recipe, e.g. configs/pod/llama3_8b_full_ft.yaml")
    cp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=64 model.remat=full")
    cp.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x4 (v5e-8), v5p:4x4x4 (64 chips)")
    cp.add_argument("--slices", type=int, default=None, help="number of slices over DCN (default: mesh.slices)")
    cp.add_argument("--json", default="", help="also write the report as JSON to this file")
    cp.add_argument("--no-flops", action="store_true", help="skip the two small compiles that count XLA FLOPs")
    cp.set_defaults(fn=_cmd_compile)

    g = sub.add_parser("generate", help="sample from a trained run or a pretrained model (--model)")
    g.add_argument("run", help="run directory (train.run_dir); with --model, the first prompt")
    g.add_argument("prompts", nargs="*")
    g.add_argument("--model", help="a preset (smollm2-135m-instruct), a .gguf file or a Hugging Face directory; "
                                   "prompts are chat messages (greedy unless --temperature)")
    g.add_argument("--no-chat", action="store_true", help="with --model: continue plain text, no chat template")
    g.add_argument("--system", help="with --model: a system message")
    g.add_argument("--max-new-tokens", type=_positive_int, default=100)
    g.add_argument("--temperature", type=float, default=None, help="default 0.8 for runs, 0 (greedy) for --model")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    g.set_defaults(fn=_cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint (preset, .gguf, HF dir) to a Hugging Face directory")
    c.add_argument("source", help="smollm2-135m-instruct, a .gguf file, or a Hugging Face directory")
    c.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer files)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: keep float32")
    c.add_argument("--allow-unused", action="store_true", help="ignore checkpoint tensors the model does not use")
    c.set_defaults(fn=_cmd_convert)

    e = sub.add_parser("eval", help="held-out loss/perplexity of a run, or tasks (--tasks) on a run or --model")
    e.add_argument("run", nargs="?", help="run directory (without --tasks: its held-out loss and perplexity)")
    e.add_argument("--model", help="a preset (smollm2-135m-instruct), .gguf file or HF directory to evaluate")
    e.add_argument("--adapter", help="an adapter version directory (runs/NAME/adapters/v1) to put on --model")
    e.add_argument("--no-adapters", action="store_true", help="evaluate the base alone (adapters removed)")
    e.add_argument("--tasks", help="comma-separated: antonyms, definitions, definitions_gen, humaneval, "
                                   "perplexity:brown, perplexity:shakespeare, probes:facts, probes:format, safety, "
                                   "prefs:wordnet_antonym_prefs (or another preference source), "
                                   "file:PATH.jsonl[?shots=K&split=S] (your own QA or multiple-choice rows)")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--limit", type=int, default=0, help="a fixed sample of N examples per task (0: all)")
    e.add_argument("--out", help="report directory (results.json, results.md, examples/)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=0, help="0: the task's default")
    e.add_argument("--ppl-batches", type=int, default=4, help="perplexity tasks: batches of 8 x 256 tokens")
    e.add_argument("--compare", nargs="+", help="print a side-by-side table of results.json files and exit")
    e.add_argument("--batches", type=int, default=0, help="eval batches (default: train.eval_batches)")
    e.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. data.source=brown")
    e.set_defaults(fn=_cmd_eval)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tks.add_parser("train", help="train a SentencePiece BPE tokenizer")
    tt.add_argument("--source", default="shakespeare", help="shakespeare, brown, text, jsonl, parquet, arrayrecord")
    tt.add_argument("--paths", nargs="*", default=[], help="input files for file sources")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--out", required=True, help="output path (.model)")
    tt.set_defaults(fn=_cmd_tokenizer_train)

    a = sub.add_parser("adapters", help="PEFT adapters: list, show, merge into the base, export to HF PEFT")
    asub = a.add_subparsers(dest="adapters_command", required=True)
    al = asub.add_parser("list", help="versions under a run's adapters/ directory")
    al.add_argument("dir", help="run directory or adapters directory")
    al.set_defaults(fn=_cmd_adapters_list)
    ash = asub.add_parser("show", help="one adapter's metadata (a version dir, or the latest under a dir)")
    ash.add_argument("path")
    ash.add_argument("--recipe", action="store_true", help="include the training recipe")
    ash.set_defaults(fn=_cmd_adapters_show)
    am = asub.add_parser("merge", help="fold a run's LoRA/DoRA/IA3 adapters into the base; write a HF directory")
    am.add_argument("run")
    am.add_argument("--out", required=True)
    am.set_defaults(fn=_cmd_adapters_merge)
    ae = asub.add_parser("export", help="a run's base (HF safetensors) + LoRA/DoRA adapter (HF PEFT format)")
    ae.add_argument("run")
    ae.add_argument("--out", required=True)
    ae.set_defaults(fn=_cmd_adapters_export)

    d = sub.add_parser("data", help="data tools")
    ds = d.add_subparsers(dest="data_command", required=True)
    df = ds.add_parser("fetch", help="download a real corpus into the cache (JAXLEARN_CACHE)")
    df.add_argument("names", nargs="+", choices=["shakespeare", "brown", "wordnet", "humaneval", "donotanswer"])
    df.set_defaults(fn=_cmd_data_fetch)

    rl = sub.add_parser("rlaif", help="an AI judge labels preference pairs (agree: vs checkable labels; label: "
                                      "write DPO pairs)")
    rls = rl.add_subparsers(dest="rlaif_command", required=True)
    ra = rls.add_parser("agree", help="judge checkable pairs in both orders: accuracy, position bias; JSON report")
    rb = rls.add_parser("label", help="judge two candidates per prompt (sampled from --policy, or --candidates) "
                                      "-> preference JSONL for data.format: preference")
    for r in (ra, rb):
        r.add_argument("--judge", required=True, help="judge model: a preset (smollm2-135m-instruct), run or HF dir; "
                       "for `label` also reward:TERMS, a checkable scorer (reward:accept, reward:accept,format=0.1)")
        r.add_argument("--judge-adapter", help="an adapter version directory to put on the judge")
        r.add_argument("--rubric", help="general, antonym, a file, or a text with {prompt}, {a}, {b} "
                                        "(default: antonym for WordNet antonym sources, else general)")
        r.add_argument("--system", help="a system message for the judge (default: the chat template's)")
        r.add_argument("--split", choices=["train", "validation", "test", "all"], default=None,
                       help="default: test (agree), train (label); all records for files")
        r.add_argument("--limit", type=int, default=0, help="a fixed sample of N pairs/prompts (0: all)")
        r.add_argument("--batch-size", type=_positive_int, default=16)
    ra.add_argument("--source", default="wordnet_antonym_prefs",
                    help="wordnet_antonym_prefs, wordnet_definition_prefs, safety_pairs, or a preference .jsonl")
    ra.add_argument("--out", default="runs/rlaif/agree.json")
    rb.add_argument("--policy", help="sample two replies per prompt from this model or run directory")
    rb.add_argument("--policy-adapter", help="an adapter version directory to put on the policy")
    rb.add_argument("--candidates", help="instead of --policy: a JSONL of {prompt, responses: [x, y]}")
    rb.add_argument("--source", default="wordnet_antonym_prompts",
                    help="prompts for --policy: wordnet_antonym_prompts or a prompts .jsonl ({prompt | messages})")
    rb.add_argument("--samples", type=_positive_int, default=2,
                    help="replies sampled per prompt; with a reward:TERMS judge the best and the worst make the pair")
    rb.add_argument("--temperature", type=float, default=1.0)
    rb.add_argument("--top-p", type=float, default=1.0)
    rb.add_argument("--max-new-tokens", type=_positive_int, default=16)
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--drop-inconsistent", action="store_true", help="leave out pairs whose verdict flips with order")
    rb.add_argument("--out", default="runs/rlaif/pairs.jsonl")
    rl.set_defaults(fn=_cmd_rlaif)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, reported without a traceback."""
    from jaxlearn.config import ConfigError
    from jaxlearn.data import errors as data_errors
    from jaxlearn.models.hf import CheckpointImportError
    from jaxlearn.train.checkpoint import CheckpointDamagedError, CheckpointMismatchError
    from jaxlearn.peft.files import AdapterMismatchError
    from jaxlearn.train.build import RunDirError
    from jaxlearn.train.guard import NonFiniteError

    return (ConfigError, CheckpointMismatchError, RunDirError, FileNotFoundError, data_errors.DataError,
            CheckpointImportError, AdapterMismatchError, NonFiniteError, CheckpointDamagedError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (`compile R.yaml --topology v5e:2x4 data.batch_size=32`).
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                           for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known user errors get one paragraph, the rest a traceback
        if isinstance(e, _user_errors()) or type(e) is ValueError:
            print(f"jaxlearn {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
