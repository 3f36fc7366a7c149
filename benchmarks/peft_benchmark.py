"""Full fine-tuning vs LoRA (r=8, 16) vs IA3 vs prompt tuning on the same model and batch.

For each method, in one process, on the same batch: compile time, median step time (the
methods' steps are timed interleaved, and the time ratio is the median of per-round ratios),
tokens/s, the compiled step's memory (XLA `memory_analysis`: arguments + outputs + temporaries
- aliased, i.e. what the step needs at its peak), trainable parameter count and optimizer-state
bytes. Every method runs with the same settings (`--remat`, `--loss-chunk`; defaults: the
`dots_no_batch` policy and the LM head + loss fused 256 tokens at a time). Writes JSON, a
markdown table with ratios to full fine-tuning, and a bar chart of those ratios against the
targets (memory <= 0.5x, step time <= 0.75x).

    python benchmarks/peft_benchmark.py                       # SmolLM2-135M (4-bit-quantized weights, dequantized)
    python benchmarks/peft_benchmark.py --remat none --loss-chunk 0   # without remat / chunked loss
    python benchmarks/peft_benchmark.py --model tiny --steps 3  # seconds, for a smoke run
    python benchmarks/peft_benchmark.py --only full lora_r8 --loss-chunks 0 256 1024   # the loss_chunk default

With `--loss-chunks`, every method runs once per chunk size (rows "lora_r8 chunk 256"), all timed
interleaved in the same rounds, and each row's ratios are to the same method's first chunk size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np


def _variants():
    from jaxlearn.config import PeftConfig

    return {
        "full": PeftConfig(),
        "lora_r8": PeftConfig(type="lora", rank=8, alpha=16.0),
        "lora_r16": PeftConfig(type="lora", rank=16, alpha=32.0),
        "ia3": PeftConfig(type="ia3"),
        "prompt_16": PeftConfig(type="prompt", num_virtual_tokens=16),
    }


def _model(name: str, remat: str):
    from jaxlearn.config import ModelConfig

    if name == "tiny":
        return ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                           remat=remat), None
    from jaxlearn.models.presets import load_pretrained

    pre = load_pretrained(name)
    return dataclasses.replace(pre.cfg, remat=remat), pre.params


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def run(args) -> dict:
    from jaxlearn.config import Config, MeshConfig, OptimConfig
    from jaxlearn.objectives.lm import LMConfig
    from jaxlearn.models.transformer import Transformer
    from jaxlearn.objectives.lm import make_objective
    from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
    from jaxlearn.train.state import build_state
    from jaxlearn.train.step import compile_train_step

    model_cfg, pretrained = _model(args.model, args.remat)
    mc = MeshConfig(preset="dp")
    mesh = make_mesh(mc, jax.devices()[:1])
    rules = rules_for(mc)
    shard = ShardingContext(mesh, rules)
    rs = np.random.RandomState(0)
    b, t = args.batch, args.seq
    batch = {
        "inputs": rs.randint(0, model_cfg.vocab_size, (b, t)).astype(np.int32),
        "targets": rs.randint(0, model_cfg.vocab_size, (b, t)).astype(np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "loss_mask": np.ones((b, t), np.float32),
    }
    # Build and compile every method first, then time their steps interleaved (full, lora_r8,
    # ..., full, lora_r8, ...): anything else loading the CPU then slows all methods alike, and
    # each ratio to full fine-tuning is taken within one round.
    runs, rows, refs = {}, {}, {}
    chunks = args.loss_chunks or [args.loss_chunk]
    variants = [(method if len(chunks) == 1 else f"{method} chunk {c}", method, peft, c)
                for method, peft in _variants().items() if not args.only or method in args.only for c in chunks]
    for name, method, peft, chunk in variants:
        # ratios: to full fine-tuning; with several chunk sizes, to the same method's first one
        refs[name] = "full" if len(chunks) == 1 else f"{method} chunk {chunks[0]}"
        print(f"[{name}] building state and compiling ...", flush=True)
        cfg = Config(model=model_cfg, peft=peft, mesh=mc, optim=OptimConfig(lr=1e-4, warmup_steps=0),
                     objective=LMConfig(loss_chunk=chunk))
        model = Transformer(model_cfg, shard)
        setup = build_state(model, cfg, mesh, rules, total_steps=100, params=pretrained)
        step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
        t0 = time.perf_counter()
        compiled = step.lower(setup.state, batch, {}).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) if mem is not None else float("nan")
        state = setup.state
        rows[name] = {
            "loss_chunk": chunk, "ratio_to": refs[name], "compile_s": compile_s, "step_memory_bytes": peak,
            "argument_bytes": mem.argument_size_in_bytes if mem else None,
            "temp_bytes": mem.temp_size_in_bytes if mem else None,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.trainable))),
            "optimizer_state_bytes": _bytes(state.opt_state), "times": [], "losses": [],
        }
        state, metrics = compiled(state, batch, {})  # untimed: the first call sets up buffers
        jax.block_until_ready(metrics["loss"])
        runs[name] = [compiled, state]
        del setup, step
        gc.collect()
    for i in range(args.steps):
        for name, run_ in runs.items():
            compiled, state = run_
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, {})
            jax.block_until_ready(metrics["loss"])
            dt = time.perf_counter() - t0
            run_[1] = state
            rows[name]["times"].append(dt)
            rows[name]["losses"].append(float(metrics["loss"]))
            print(f"[{name}] step {i + 1}/{args.steps}: {dt:.2f} s, loss {float(metrics['loss']):.4f}", flush=True)
    for name, r in rows.items():
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = b * t / r["step_s"]
    for r in rows.values():
        ref = rows.get(r["ratio_to"])
        if ref:
            # median over rounds of the ratio within each round (robust to drifting load)
            r["step_time_vs_full"] = statistics.median(x / f for x, f in zip(r["times"], ref["times"]))
            r["memory_vs_full"] = r["step_memory_bytes"] / ref["step_memory_bytes"]
    return {
        "model": args.model, "model_config": dataclasses.asdict(model_cfg), "batch": b, "seq_len": t,
        "remat": args.remat, "loss_chunk": chunks[0] if len(chunks) == 1 else chunks, "steps_timed": args.steps, "device": str(jax.devices()[0]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"Model `{result['model']}`, batch {result['batch']} x {result['seq_len']} tokens, remat "
             f"`{result['remat']}`, loss_chunk {result.get('loss_chunk', 0)}, {result['device']}, median of "
             f"{result['steps_timed']} steps.", "",
             "| method | trainable params | optimizer state | step memory (XLA) | memory vs ref. | step time | "
             "time vs ref. | ref. | tokens/s | compile |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | "
            f"{r['step_memory_bytes'] / 2**20:.0f} MiB | {r.get('memory_vs_full', float('nan')):.2f}x | "
            f"{r['step_s']:.2f} s | {r.get('step_time_vs_full', float('nan')):.2f}x | {r.get('ratio_to', 'full')} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{r['compile_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Bars of memory and step time relative to full fine-tuning, with the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["rows"] if n != "full"]
    mem = [result["rows"][n]["memory_vs_full"] for n in names]
    time_ = [result["rows"][n]["step_time_vs_full"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], mem, 0.4, label="step memory / full FT")
    ax.bar([x + 0.2 for x in xs], time_, 0.4, label="step time / full FT")
    ax.axhline(0.5, color="C0", ls="--", lw=1, label="memory target 0.5x")
    ax.axhline(0.75, color="C1", ls="--", lw=1, label="time target 0.75x")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{result['model']}, {result['batch']}x{result['seq_len']} tokens, remat {result['remat']}, "
                 f"loss_chunk {result.get('loss_chunk', 0)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a preset name, or 'tiny'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (each times one step of every method)")
    p.add_argument("--remat", default="dots_no_batch", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--loss-chunk", type=int, default=256,
                   help="objective.loss_chunk: LM head + loss fused over this many tokens at a time (0: off)")
    p.add_argument("--loss-chunks", type=int, nargs="*", default=None,
                   help="several loss_chunk values, each run for every method in the same timed rounds")
    p.add_argument("--only", nargs="*", help="subset of: full lora_r8 lora_r16 ia3 prompt_16")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "peft_benchmark.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    _atomic_write(out / "peft_benchmark.md", table)
    if "full" in result["rows"] and not args.loss_chunks:
        print(f"plot: {plot(result, out / 'peft_benchmark.png')}")
    print(table)


if __name__ == "__main__":
    main()
