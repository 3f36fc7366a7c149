"""Does any XLA:CPU flag (or allocator setting) speed up the training step? One process each.

    python benchmarks/xla_flags_sweep.py [--steps 6] [--repeats 2] [--settings a,b,...] [--out benchmarks/results]

XLA reads XLA_FLAGS once, when its CPU backend starts, so each setting runs
`train_throughput.py --variants <variant>` in its own process. The settings run round-robin
`--repeats` times, so a busy spell of the machine hits them alike; the peak matmul rate is
measured once, here, with no flags. Writes `xla_flags.json` and `xla_flags.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> (XLA_FLAGS to add, other environment variables, what it does)
SETTINGS: dict[str, tuple[str, dict, str]] = {
    "default": ("", {}, "no flags"),
    "vector512": ("--xla_cpu_prefer_vector_width=512", {}, "512-bit vectors in XLA's own loops (default 256)"),
    "ynn_dots_only": ("--xla_cpu_experimental_ynn_fusion_type=individual_dot", {},
                      "YNNPACK for single dots only; elementwise and reductions by XLA's emitters"),
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {}, "no YNNPACK at all: Eigen dots"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, "fast-math LLVM codegen (changes numerics)"),
    "malloc_thp": ("", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
                   "not XLA: glibc malloc asks for transparent huge pages (fewer page faults)"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--variant", default="current", help="the train_throughput.py variant to run")
    p.add_argument("--wait-quiet", type=float, default=0.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        p.error(f"unknown settings {bad}; choose from {', '.join(SETTINGS)}")

    from train_throughput import atomic_write, log, measure_peak

    log("measuring peak float32 matmul FLOP/s (no flags)")
    peak = max(measure_peak(10, args.wait_quiet)["peak_gflops"], measure_peak(10, args.wait_quiet)["peak_gflops"])
    log(f"peak {peak:.1f} GFLOP/s")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="xla_flags_") as tmp:
        for rep in range(args.repeats):
            for name in names:
                flags, env_extra, _ = SETTINGS[name]
                env = dict(os.environ, **env_extra)
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
                out = Path(tmp) / f"{name}_{rep}"
                cmd = [sys.executable, str(HERE / "train_throughput.py"), "--variants", args.variant, "--steps",
                       str(args.steps), "--out", str(out), "--peak-gflops", str(peak)]
                if args.wait_quiet:
                    cmd += ["--wait-quiet", str(args.wait_quiet)]
                log(f"[{rep + 1}/{args.repeats}] {name}: XLA_FLAGS={env['XLA_FLAGS']!r} {env_extra or ''}")
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                try:
                    r = json.loads((out / "train_throughput.json").read_text())["variants"][0]
                except (OSError, ValueError, KeyError, IndexError):
                    r = {"error": (proc.stderr or proc.stdout)[-2000:]}
                runs[name].append(r)
                if r.get("steps_timed"):
                    quiet, vs_probe = r["step_s_quiet_median"] or float("nan"), r.get("mfu_vs_probe") or float("nan")
                    log(f"   step {r['step_s_median']:.3f} s (uncontended {quiet:.3f} s, MFU vs probe "
                        f"{100 * vs_probe:.1f}%), CPU {r['cpu_s_median']:.2f} s")
                else:
                    log(f"   failed: {r.get('error', '')[-300:]}")

    rows = []
    for name in names:
        ok = [r for r in runs[name] if r.get("steps_timed")]
        times = [t for r in ok for t in r["step_times_s"]]
        quiet = [t for r in ok for t, c in zip(r["step_times_s"], r["contention_cores"]) if c is not None and c < 0.1]
        cpu = [r["cpu_s_median"] for r in ok]
        rows.append({
            "name": name, "xla_flags": SETTINGS[name][0], "env": SETTINGS[name][1], "what": SETTINGS[name][2],
            "step_s_median": statistics.median(times) if times else None,
            "step_s_min": min(times) if times else None,
            "step_s_quiet_median": statistics.median(quiet) if quiet else None, "quiet_steps": len(quiet),
            "cpu_s_median": statistics.median(cpu) if cpu else None,
            # steps against the matmul rate probed in the same process just before them
            "mfu_vs_probe": statistics.median(r["mfu_vs_probe"] for r in ok) if ok else None,
            "minor_page_faults_median": statistics.median([r["minor_page_faults_median"] for r in ok]) if ok else None,
            "loss_step0": ok[0]["first_losses"][0] if ok else None,
            "errors": [r["error"] for r in runs[name] if r.get("error") and not r.get("steps_timed")],
        })
    result = {"timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "peak_gflops": peak,
              "variant": args.variant, "steps": args.steps, "repeats": args.repeats, "settings": rows}
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = [f"# XLA:CPU flags on the training step (variant `{args.variant}`, one process per setting)", "",
             f"{result['timestamp']} | peak {peak:.1f} GFLOP/s | {args.repeats} x {args.steps} steps per setting", "",
             "| setting | step s (median) | step s (min) | uncontended step s (n) | MFU uncontended | MFU vs probe "
             "| CPU s/step | page faults/step | loss step 0 | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    flops = None
    for name in names:
        ok = [r for r in runs[name] if r.get("steps_timed")]
        if ok:
            flops = ok[0]["model_flops_per_step"]
            break
    for r in rows:
        mfu = flops / r["step_s_quiet_median"] / 1e9 / peak if flops and r["step_s_quiet_median"] else None
        lines.append(f"| `{r['name']}` | {fmt(r['step_s_median'], '.3f')} | {fmt(r['step_s_min'], '.3f')} "
                     f"| {fmt(r['step_s_quiet_median'], '.3f')} ({r['quiet_steps']}) "
                     f"| {fmt(mfu and 100 * mfu, '.1f')}% "
                     f"| {fmt(r['mfu_vs_probe'] and 100 * r['mfu_vs_probe'], '.1f')}% "
                     f"| {fmt(r['cpu_s_median'], '.2f')} | {fmt(r['minor_page_faults_median'], '.0f')} "
                     f"| {fmt(r['loss_step0'], '.4f')} | {r['what']}: `{r['xla_flags'] or ''}` {r['env'] or ''} |")
    lines.append("")
    atomic_write(Path(args.out) / "xla_flags.json", json.dumps(result, indent=2) + "\n")
    atomic_write(Path(args.out) / "xla_flags.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
