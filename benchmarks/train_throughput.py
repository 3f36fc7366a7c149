"""Training throughput, MFU and memory of the reference config, on this machine, in one process.

    python benchmarks/train_throughput.py [--steps N] [--out benchmarks/results] [--variants a,b,...]

What it does, in order, all in the same Python process:
1. measures the peak float32 matmul FLOP/s of this machine (jitted `jnp.dot` at a few shapes,
   including the model's own, median of `--peak-reps` runs after a warm-up; the peak is the
   best shape, and the better of a measurement before and one after the steps);
2. for each variant, builds the reference config (configs/bench_reference.yaml) with jaxlearn's
   own `build_state` + `compile_train_step` on one device (mesh preset dp over jax.devices()[:1])
   and synthetic token batches (random ids, full loss mask, one segment per row), and times
   lower + compile;
3. times the steady-state step of every variant, interleaved (A B C A B C ...) so a busy spell
   of the machine hits every variant alike; each step blocks on its results; the step time is
   the median over the timed steps. Each step also records the CPU time of this process, its
   page faults, and how many cores other processes used meanwhile (from /proc/stat): steps
   during which others used < 0.1 core are "uncontended" and get their own median;
4. writes `train_throughput.json` and `train_throughput.md` into `--out`, atomically (a partial
   JSON after every round, the full one at the end).

Variants (VARIANTS below): `current` is the library as it is. `reference` traces the model with
the seams as they were before the CPU performance work (benchmarks/reference_seams.py), and
`ref_<seam>` puts back one seam only, so each change is compared with its baseline in the same
run. `no_block_skip` turns off the causal block skipping (benchmarks/proposals.py).
Others change one config knob. XLA reads XLA_FLAGS once per process: compare flags with
benchmarks/xla_flags_sweep.py (the flags in effect are recorded in the JSON).
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

# name -> (description, config overrides, seam groups traced with their reference versions,
#          proposed changes to other files applied by patching, see benchmarks/proposals.py)
REF_ALL = ("linear", "attention", "loss")
VARIANTS: dict[str, tuple] = {
    "current": ("library as is (attention auto -> xla on CPU, scan, no remat)", (), ()),
    "no_block_skip": ("current, but attention over all keys (causal=False; proposals.py)", (), (),
                      ("no_block_skip",)),
    "reference": ("all seams as before the CPU work (benchmarks/reference_seams.py)", (), REF_ALL),
    "ref_attention": ("current, but the reference attend/attention_mask", (), ("attention",)),
    "ref_linear": ("current, but the reference linear", (), ("linear",)),
    "dpa": ("attention = jax.nn.dot_product_attention", ("model.attention=dot_product_attention",), ()),
    "unrolled": ("layers unrolled (scan_layers=false)", ("model.scan_layers=false",), ()),
    "remat_full": ("remat = full (recompute each layer in backward)", ("model.remat=full",), ()),
    "remat_dots": ("remat = dots (save matmul outputs)", ("model.remat=dots",), ()),
    "reference_unrolled": ("reference seams, layers unrolled", ("model.scan_layers=false",), REF_ALL),
}

QUIET = 0.1  # a step counts as uncontended when other processes used < this many cores meanwhile
PEAK_SHAPES = ((2048, 2048, 2048), (2048, 512, 1408), (2048, 1408, 512), (2048, 512, 8192), (4096, 1024, 1024))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def max_rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def other_processes_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy (or stolen by the hypervisor) so far, minus
    this process's own: what everything else used. From /proc/stat, so short-lived processes
    count too. None where there is no /proc (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = resource.getrusage(resource.RUSAGE_SELF)
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy - own.ru_utime - own.ru_stime


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 0.5) -> float:
    """Wait (at most `max_wait_s`) until other processes use < `threshold` cores; returns their load."""
    t_end = time.perf_counter() + max_wait_s
    while True:
        a = other_processes_cpu_s()
        time.sleep(window_s)
        b = other_processes_cpu_s()
        load = 0.0 if a is None or b is None else max(b - a, 0.0) / window_s
        if load < threshold or time.perf_counter() >= t_end:
            return load


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Peak matmul FLOP/s


def probe_peak(reps: int = 10, shape: tuple[int, int, int] = PEAK_SHAPES[1]) -> float:
    """GFLOP/s of the model's own matmul shape right now (median of `reps`): the machine's speed
    drifts (other virtual machines on the host, clocks), so every round of steps is paired with
    a probe taken just before it."""
    m, k, n = shape
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def measure_peak(reps: int, wait_quiet: float = 0.0) -> dict:
    """Median GFLOP/s of a jitted float32 matmul at each shape; the peak is the best shape."""
    dot = jax.jit(jnp.dot)
    rows = []
    for m, k, n in PEAK_SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        for _ in range(2):
            dot(a, b).block_until_ready()
        if wait_quiet:
            wait_for_quiet(wait_quiet)
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
    reference_seams: tuple
    step: object = None
    state: object = None
    batch: object = None
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)  # user + system CPU seconds of the process
    contention: list = dataclasses.field(default_factory=list)  # cores used by other processes meanwhile
    probes: list = dataclasses.field(default_factory=list)  # matmul GFLOP/s probed just before the step's round
    page_faults: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    def run_step(self, record: bool = False) -> float:
        o0 = other_processes_cpu_s() if record else None
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch, {})
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        o1 = other_processes_cpu_s() if record else None
        if record:
            self.contention.append(None if o0 is None or o1 is None else round(max(o1 - o0, 0.0) / dt, 3))
            self.times.append(dt)
            self.cpu_times.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            self.page_faults.append(r1.ru_minflt - r0.ru_minflt)
        self.losses.append(float(metrics["loss"]))
        self.info.setdefault("first_grad_norm", float(metrics["grad_norm"]))
        return dt


def build_run(name: str, config_path: Path, common: list[str], total_steps: int) -> Run:
    desc, overrides, ref, *rest = VARIANTS[name]
    proposals = rest[0] if rest else ()
    run = Run(name, desc, overrides, ref)
    cfg = load_config(config_path, [*common, *overrides])
    run.info["model"] = dataclasses.asdict(cfg.model)
    devices = jax.devices()[:1]
    mesh = make_mesh(MeshConfig(preset="dp"), devices)
    rules = rules_for(MeshConfig(preset="dp"))
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    seams = contextlib.ExitStack()
    if ref:
        import reference_seams
        seams.enter_context(reference_seams.patched(ref))
    if proposals:
        import proposals as prop
        for p in proposals:
            seams.enter_context(prop.PROPOSALS[p]())
    with seams:  # the seams are looked up while tracing, so the patch only needs to cover lower()
        objective = make_objective(model, cfg.objective)
        setup = build_state(model, cfg, mesh, rules, total_steps)
        batch_sharding = shard.batch_sharding()
        batch = jax.device_put(synthetic_batch(cfg), batch_sharding)
        jitted = compile_train_step(objective, setup, batch_sharding, cfg.optim.grad_accum)
        t0 = time.perf_counter()
        lowered = jitted.lower(setup.state, batch, {})
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    run.step, run.state, run.batch = compiled, setup.state, batch
    n_trainable = sum(x.size for x in jax.tree.leaves(setup.state.trainable))
    if n_trainable != cfg.model.param_count():
        # Full training is what this benchmark measures; anything else would flatter it.
        raise RuntimeError(f"{n_trainable} trainable parameters, expected all {cfg.model.param_count()}: "
                           f"check the peft block of {config_path} and the trainable filter")
    run.info.update(
        trainable_params=n_trainable,
        lower_s=t1 - t0, compile_s=t2 - t1, lower_compile_s=t2 - t0, tokens_per_step=tokens,
        batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
        n_params=cfg.model.param_count(),
        model_flops_per_step=cfg.model.flops_per_token(cfg.data.seq_len) * tokens,
        xla_flops_per_step=_flops_of(compiled), memory_analysis=_memory_of(compiled),
    )
    return run


def summarise(run: Run, peak_gflops: float) -> dict:
    out = {"name": run.name, "description": run.description, "overrides": list(run.overrides),
           "reference_seams": list(run.reference_seams), "error": run.error, **run.info}
    out.pop("model", None)
    out["model_config"] = run.info.get("model")
    if run.times:
        step_s = statistics.median(run.times)
        quiet = [t for t, c in zip(run.times, run.contention) if c is not None and c < QUIET]
        tokens = run.info["tokens_per_step"]
        achieved = run.info["model_flops_per_step"] / step_s / 1e9
        out.update(
            steps_timed=len(run.times), step_s_median=step_s, step_s_min=min(run.times), step_s_max=max(run.times),
            step_times_s=run.times, cpu_s_median=statistics.median(run.cpu_times),
            minor_page_faults_median=statistics.median(run.page_faults),
            contention_cores=run.contention, quiet_steps=len(quiet),
            step_s_quiet_median=statistics.median(quiet) if quiet else None,
            tokens_per_s=tokens / step_s, model_gflops_per_s=achieved,
            mfu=achieved / peak_gflops,
            mfu_quiet=(run.info["model_flops_per_step"] / statistics.median(quiet) / 1e9 / peak_gflops
                       if quiet else None),
            # each step against the matmul rate probed just before its round: robust to drift
            mfu_vs_probe=statistics.median(run.info["model_flops_per_step"] / t / 1e9 / p
                                           for t, p in zip(run.times, run.probes)) if run.probes else None,
            probes_gflops=run.probes,
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
        f"{result['cpu_count']} CPUs | XLA_FLAGS=`{result['xla_flags'] or ''}` | "
        f"GLIBC_TUNABLES=`{result.get('glibc_tunables') or ''}`",
        "",
        f"Peak float32 matmul: **{peak['peak_gflops']:.1f} GFLOP/s** "
        + ("(given with --peak-gflops)" if peak.get("given") else "(best of two measurements, max over shapes: "
           + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops']:.0f}" for r in peak["shapes"]) + ")"),
        "",
        ("Matmul probes (model shape 2048x512x1408, one per round of steps): "
         + ", ".join(f"{p:.0f}" for p in result.get("probes_gflops", [])) + " GFLOP/s"),
        "",
        "| variant | compile s | step s (median) | tokens/s | model GFLOP/s | MFU | MFU vs probe "
        "| uncontended step s (n) | MFU uncontended | CPU s/step | model GFLOP/step | XLA GFLOP/step "
        "| XLA temp MiB | max RSS MiB | loss step 0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        if r.get("error") and not r.get("steps_timed"):
            lines.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:80]} |" + " |" * 14)
            continue
        mem = r.get("memory_analysis") or {}
        temp = mem.get("temp_size_in_bytes")
        lines.append(
            f"| {r['name']} | {_fmt(r.get('lower_compile_s'), '.1f')} | {_fmt(r.get('step_s_median'), '.3f')} "
            f"| {_fmt(r.get('tokens_per_s'), '.0f')} | {_fmt(r.get('model_gflops_per_s'), '.1f')} "
            f"| {_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% "
            f"| {_fmt(r.get('mfu_vs_probe') and 100 * r['mfu_vs_probe'], '.1f')}% "
            f"| {_fmt(r.get('step_s_quiet_median'), '.3f')} ({r.get('quiet_steps', 0)}) "
            f"| {_fmt(r.get('mfu_quiet') and 100 * r['mfu_quiet'], '.1f')}% "
            f"| {_fmt(r.get('cpu_s_median'), '.2f')} "
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--malloc-thp", action="store_true",
                   help="re-run this script with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so glibc backs "
                        "XLA's large per-step buffers with transparent huge pages (far fewer page faults); "
                        "an environment setting, recorded in the results, never set by jaxlearn itself")
    p.add_argument("--peak-gflops", type=float, default=0.0,
                   help="use this peak (GFLOP/s) for MFU instead of measuring it (e.g. one measured "
                        "once for a sweep of XLA flags)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed step (and each peak shape), wait up to this long for other "
                        "processes to go idle (default 0: do not wait)")
    args = p.parse_args(argv)

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.malloc_thp and "glibc.malloc.hugetlb" not in tunables:
        # glibc reads its tunables when the process starts: start again with it set.
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
        sys.stdout.flush()
        rest = argv if argv is not None else sys.argv[1:]
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *rest])
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(args.out)
    result = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "config": args.config, "overrides": args.set,
        "steps": args.steps, "warmup": args.warmup, "complete": False,
    }

    if args.peak_gflops:
        result["peak"] = {"shapes": [], "peak_gflops": args.peak_gflops, "given": True}
    else:
        log("measuring peak float32 matmul FLOP/s")
        result["peak"] = measure_peak(args.peak_reps, args.wait_quiet)
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
            run = Run(name, *VARIANTS[name][:3], error=traceback.format_exc())
            log(f"  variant {name!r} failed:\n{run.error}")
        runs.append(run)

    live = [r for r in runs if r.error is None]
    rounds = args.rounds or args.steps
    per_round = [args.steps // rounds + (1 if i < args.steps % rounds else 0) for i in range(rounds)]
    for i, n in enumerate(per_round):
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        probe = probe_peak()
        result.setdefault("probes_gflops", []).append(probe)
        for run in live:
            for _ in range(n):
                if args.wait_quiet:
                    wait_for_quiet(args.wait_quiet)
                try:
                    run.run_step(record=True)
                    run.probes.append(probe)
                except Exception:  # noqa: BLE001
                    run.error = traceback.format_exc()
                    log(f"  variant {run.name!r} failed while stepping:\n{run.error}")
                    break
        live = [r for r in live if r.error is None]
        result["variants"] = [summarise(r, result["peak"]["peak_gflops"]) for r in runs]
        write_outputs(result, out_dir)  # partial (complete: false), in case the run is cut short
        log(f"round {i + 1}/{rounds} (matmul probe {probe:.0f} GFLOP/s): " + " | ".join(
            f"{r.name} {r.times[-1]:.3f} s (median {statistics.median(r.times):.3f}, others used "
            f"{_fmt(r.contention[-1], '.2f')} cores)" for r in runs if r.times))

    # Re-measure the peak after the steps too: the machine may have been busier at the start.
    if not args.peak_gflops:
        # MFU uses the better of the two, so a busy moment cannot flatter it.
        log("re-measuring peak float32 matmul FLOP/s")
        result["peak_start"] = result["peak"]
        result["peak_end"] = measure_peak(args.peak_reps, args.wait_quiet)
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
