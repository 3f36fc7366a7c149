"""Training throughput, MFU and memory of the reference config, on this machine, in one process.

    python benchmarks/train_throughput.py [--steps N] [--out benchmarks/results] [--variants a,b,...]

What it does, in order, all in the same Python process:
1. measures the peak float32 matmul FLOP/s of this machine (jitted `jnp.dot` at a few shapes,
   including the model's own, median of `--peak-reps` runs after a warm-up; the peak is the max);
2. for each variant, builds the reference config (configs/bench_reference.yaml) with jaxlearn's
   own `build_state` + `compile_train_step` on one device (mesh preset dp over jax.devices()[:1])
   and synthetic token batches, and times lower+compile;
3. times the steady-state step of every variant, interleaved in rounds (A B C A B C ...) so slow
   drift of the machine (other processes) hits every variant alike; each step blocks on its
   results; the step time is the median over all timed steps;
4. writes `train_throughput.json` and `train_throughput.md` into `--out`, atomically.

Variants (see VARIANTS): `current` is the library as it is; `reference` traces the model with the
seams as they were before the CPU performance work (benchmarks/reference_seams.py), so a change
to a seam is compared to its baseline measured in the same run. Others change one config knob.
XLA flags are read once per process: compare them by running the script twice with different
`XLA_FLAGS` (the flags are recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # jaxlearn is used from the checkout, installed or not
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlearn.config import MeshConfig, load_config  # noqa: E402
from jaxlearn.models.transformer import Transformer  # noqa: E402
from jaxlearn.objectives.lm import make_objective  # noqa: E402
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for  # noqa: E402
from jaxlearn.train.state import build_state  # noqa: E402
from jaxlearn.train.step import compile_train_step  # noqa: E402

# name -> (description, config overrides, use the reference seams)
VARIANTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "current": ("library as is (attention auto -> xla on CPU, scan, no remat)", (), False),
    "reference": ("seams before the CPU work (benchmarks/reference_seams.py)", (), True),
    "dpa": ("attention = jax.nn.dot_product_attention", ("model.attention=dot_product_attention",), False),
    "unrolled": ("layers unrolled (scan_layers=false)", ("model.scan_layers=false",), False),
    "remat_full": ("remat = full (recompute each layer in backward)", ("model.remat=full",), False),
    "remat_dots": ("remat = dots (save matmul outputs)", ("model.remat=dots",), False),
    "reference_unrolled": ("reference seams, layers unrolled", ("model.scan_layers=false",), True),
}

PEAK_SHAPES = ((2048, 2048, 2048), (2048, 512, 1408), (2048, 1408, 512), (2048, 512, 8192), (4096, 1024, 1024))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def max_rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Peak matmul FLOP/s


def measure_peak(reps: int) -> dict:
    """Median GFLOP/s of a jitted float32 matmul at each shape; the peak is the best shape."""
    dot = jax.jit(jnp.dot)
    rows = []
    for m, k, n in PEAK_SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        for _ in range(2):
            dot(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        gflops = 2 * m * k * n / statistics.median(times) / 1e9
        rows.append({"m": m, "k": k, "n": n, "median_s": statistics.median(times), "gflops": gflops})
        log(f"  matmul {m}x{k}x{n}: {gflops:.1f} GFLOP/s")
    return {"shapes": rows, "peak_gflops": max(r["gflops"] for r in rows)}


# ----------------------------------------------------------------------------------------------
# The training step


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """Random token ids, full loss mask, one segment per row, positions 0..T-1."""
    b, t, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rs = np.random.RandomState(seed)
    return {
        "inputs": rs.randint(0, v, (b, t)).astype(np.int32),
        "targets": rs.randint(0, v, (b, t)).astype(np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32),
    }


def _flops_of(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def _memory_of(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if ma is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n: int(getattr(ma, n)) for n in names if getattr(ma, n, None) is not None}


@dataclasses.dataclass
class Run:
    """One variant: its compiled step, live state and batch, and what was measured."""

    name: str
    description: str
    overrides: tuple[str, ...]
    reference_seams: bool
    step: object = None
    state: object = None
    batch: object = None
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)  # user + system CPU seconds of the process
    page_faults: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    def run_step(self, record: bool = False) -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if record:
            self.times.append(dt)
            self.cpu_times.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            self.page_faults.append(r1.ru_minflt - r0.ru_minflt)
        self.losses.append(float(metrics["loss"]))
        return dt


def build_run(name: str, config_path: Path, common: list[str], total_steps: int) -> Run:
    desc, overrides, ref = VARIANTS[name]
    run = Run(name, desc, overrides, ref)
    cfg = load_config(config_path, [*common, *overrides])
    run.info["model"] = dataclasses.asdict(cfg.model)
    devices = jax.devices()[:1]
    mesh = make_mesh(MeshConfig(preset="dp"), devices)
    rules = rules_for(MeshConfig(preset="dp"))
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    seams = contextlib.nullcontext()
    if ref:
        import reference_seams
        seams = reference_seams.patched()
    with seams:  # the seams are looked up while tracing, so the patch only needs to cover lower()
        objective = make_objective(model, cfg.objective)
        setup = build_state(model, cfg, mesh, rules, total_steps)
        batch_sharding = shard.batch_sharding()
        batch = jax.device_put(synthetic_batch(cfg), batch_sharding)
        jitted = compile_train_step(objective, setup, batch_sharding, cfg.optim.grad_accum)
        t0 = time.perf_counter()
        lowered = jitted.lower(setup.state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    run.step, run.state, run.batch = compiled, setup.state, batch
    run.info.update(
        lower_s=t1 - t0, compile_s=t2 - t1, lower_compile_s=t2 - t0, tokens_per_step=tokens,
        batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
        n_params=cfg.model.param_count(),
        model_flops_per_step=cfg.model.flops_per_token(cfg.data.seq_len) * tokens,
        xla_flops_per_step=_flops_of(compiled), memory_analysis=_memory_of(compiled),
    )
    return run


def summarise(run: Run, peak_gflops: float) -> dict:
    out = {"name": run.name, "description": run.description, "overrides": list(run.overrides),
           "reference_seams": run.reference_seams, "error": run.error, **run.info}
    out.pop("model", None)
    out["model_config"] = run.info.get("model")
    if run.times:
        step_s = statistics.median(run.times)
        tokens = run.info["tokens_per_step"]
        achieved = run.info["model_flops_per_step"] / step_s / 1e9
        out.update(
            steps_timed=len(run.times), step_s_median=step_s, step_s_min=min(run.times), step_s_max=max(run.times),
            step_times_s=run.times, cpu_s_median=statistics.median(run.cpu_times),
            minor_page_faults_median=statistics.median(run.page_faults), tokens_per_s=tokens / step_s, model_gflops_per_s=achieved,
            mfu=achieved / peak_gflops,
            xla_gflops_per_s=(run.info["xla_flops_per_step"] / step_s / 1e9) if run.info.get("xla_flops_per_step") else None,
            first_losses=run.losses[:3], last_loss=run.losses[-1] if run.losses else None,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    peak = result["peak"]
    lines = [
        "# Training throughput: reference config",
        "",
        f"{result['timestamp']} | jax {result['jax_version']} | {result['device']} | "
        f"{result['cpu_count']} CPUs | XLA_FLAGS=`{result['xla_flags'] or ''}`",
        "",
        f"Peak float32 matmul: **{peak['peak_gflops']:.1f} GFLOP/s** (max over shapes: "
        + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops']:.0f}" for r in peak["shapes"]) + ")",
        "",
        "| variant | compile s | step s (median) | CPU s/step | tokens/s | model GFLOP/s | MFU | model GFLOP/step "
        "| XLA GFLOP/step | XLA temp MiB | max RSS MiB | loss step 0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        if r.get("error") and not r.get("steps_timed"):
            lines.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:80]} |" + " |" * 11)
            continue
        mem = r.get("memory_analysis") or {}
        temp = mem.get("temp_size_in_bytes")
        lines.append(
            f"| {r['name']} | {_fmt(r.get('lower_compile_s'), '.1f')} | {_fmt(r.get('step_s_median'), '.3f')} "
            f"| {_fmt(r.get('cpu_s_median'), '.2f')} "
            f"| {_fmt(r.get('tokens_per_s'), '.0f')} | {_fmt(r.get('model_gflops_per_s'), '.1f')} "
            f"| {_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% "
            f"| {_fmt(r.get('model_flops_per_step') and r['model_flops_per_step'] / 1e9, '.1f')} "
            f"| {_fmt(r.get('xla_flops_per_step') and r['xla_flops_per_step'] / 1e9, '.1f')} "
            f"| {_fmt(temp and temp / 2**20, '.0f')} | {_fmt(r.get('max_rss_mib'), '.0f')} "
            f"| {_fmt(r.get('first_losses') and r['first_losses'][0], '.4f')} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{r['name']}`: {r['description']}" for r in result["variants"]]
    lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path) -> None:
    atomic_write(out_dir / "train_throughput.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write(out_dir / "train_throughput.md", markdown(result))


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling (default 2)")
    p.add_argument("--rounds", type=int, default=0,
                   help="interleave the timed steps of the variants in this many rounds (default: one step per round)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--config", default=str(REPO / "configs" / "bench_reference.yaml"))
    p.add_argument("--variants", default="current",
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: current)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every variant, e.g. data.batch_size=4")
    p.add_argument("--peak-reps", type=int, default=10)
    args = p.parse_args(argv)

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(args.out)
    result = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": args.config, "overrides": args.set,
        "steps": args.steps, "warmup": args.warmup, "complete": False,
    }

    log("measuring peak float32 matmul FLOP/s")
    result["peak"] = measure_peak(args.peak_reps)
    log(f"peak: {result['peak']['peak_gflops']:.1f} GFLOP/s")

    runs: list[Run] = []
    for name in names:
        log(f"building + compiling variant {name!r}")
        try:
            run = build_run(name, Path(args.config), args.set, total_steps=args.warmup + args.steps + 10)
            for _ in range(args.warmup):
                run.run_step()
            run.info["max_rss_mib"] = max_rss_mib()  # process high-water mark so far (see README)
            log(f"  compile {run.info['lower_compile_s']:.1f} s | XLA flops/step "
                f"{_fmt(run.info['xla_flops_per_step'] and run.info['xla_flops_per_step'] / 1e9, '.1f')} G | "
                f"warm-up losses {[round(x, 4) for x in run.losses]}")
        except Exception:  # noqa: BLE001 - one broken variant must not lose the others
            run = Run(name, VARIANTS[name][0], VARIANTS[name][1], VARIANTS[name][2], error=traceback.format_exc())
            log(f"  variant {name!r} failed:\n{run.error}")
        runs.append(run)

    live = [r for r in runs if r.error is None]
    rounds = args.rounds or args.steps
    per_round = [args.steps // rounds + (1 if i < args.steps % rounds else 0) for i in range(rounds)]
    for i, n in enumerate(per_round):
        for run in live:
            for _ in range(n):
                try:
                    run.run_step(record=True)
                except Exception:  # noqa: BLE001
                    run.error = traceback.format_exc()
                    log(f"  variant {run.name!r} failed while stepping:\n{run.error}")
                    break
        live = [r for r in live if r.error is None]
        log(f"round {i + 1}/{rounds}: " + " | ".join(
            f"{r.name} {statistics.median(r.times):.3f} s" for r in runs if r.times))

    # Re-measure the peak after the steps too: the machine may have been busier at the start.
    # MFU uses the better of the two, so a busy moment cannot flatter it.
    log("re-measuring peak float32 matmul FLOP/s")
    result["peak_start"] = result["peak"]
    result["peak_end"] = measure_peak(args.peak_reps)
    result["peak"] = max(result["peak_start"], result["peak_end"], key=lambda x: x["peak_gflops"])
    peak = result["peak"]["peak_gflops"]
    result["variants"] = [summarise(r, peak) for r in runs]
    result["complete"] = True
    write_outputs(result, out_dir)
    print()
    print(markdown(result))
    log(f"wrote {out_dir / 'train_throughput.json'} and {out_dir / 'train_throughput.md'}")
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
