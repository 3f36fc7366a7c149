"""Where the time of one training step goes, per compiled XLA operation, grouped.

    python benchmarks/profile_step.py [--variant current] [--steps 2] [--top 40] [--set KEY=VALUE]

Builds the reference step exactly as `train_throughput.py` does, traces `--steps` steps with
`jax.profiler` (XLA:CPU thunk events need `--xla_cpu_enable_xprof_traceme=true`, which this
script adds to XLA_FLAGS before JAX starts), reads the trace back with `jax.profiler.ProfileData`
and joins every event to its HLO instruction, so each line says what it is: a matmul through
YNNPACK or Eigen, an elementwise fusion, a copy/transpose, a buffer initialisation, ... and which
part of the model it belongs to (forward or backward, attention, MLP, LM head + loss, optimizer).

Two operations can run at once (the XLA:CPU runtime runs independent operations concurrently),
so each moment of wall time is shared among the operations running then: the per-operation
figures add up to the busy wall time of the step, not to more.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402

from train_throughput import VARIANTS, build_run  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\S+) (?P<op>[\w\-]+)\((?P<rest>.*)$")


def hlo_index(text: str) -> dict[str, dict]:
    """instruction name -> {shape, op, kind, op_name} from the compiled module's text."""
    out = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        rest = m["rest"]
        op_name = re.search(r'op_name="([^"]*)"', rest)
        kind = m["op"]
        if kind == "fusion":
            fk = re.search(r'"kind":"(__\w+)"', rest) or re.search(r"kind=(k\w+)", rest)
            kind = f"fusion:{fk.group(1) if fk else '?'}"
        out[m["name"]] = {"shape": m["shape"], "op": m["op"], "kind": kind,
                          "op_name": op_name.group(1) if op_name else ""}
    return out


def classify(name: str, info: dict | None) -> tuple[str, str, str]:
    """(phase, part, kind) of one thunk."""
    if info is None:
        return "?", "?", name.split(".")[0]
    op_name, kind = info["op_name"], info["kind"]
    if "transpose(jvp(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    elif op_name:
        phase = "update"
    else:
        phase = "?"
    part = "other"
    for key, label in (("/attn/", "attention"), ("attn_norm", "norms"), ("mlp_norm", "norms"), ("/mlp/", "mlp"),
                       ("final_norm", "norms"), ("logits", "lm head"), ("Transformer.logits", "lm head"),
                       ("embed", "embedding"), ("adam", "optimizer"), ("clip", "optimizer"), ("optax", "optimizer")):
        if key in op_name:
            part = label
            break
    else:
        if phase in ("forward", "backward") and "Transformer" not in op_name:
            part = "loss"
        elif phase == "update":
            part = "optimizer"
    if "__ynn" in kind:
        k = "matmul (YNNPACK)"
    elif info["op"] in ("dot", "convolution") or "dot" in name.split(".")[0]:
        k = "matmul (Eigen)"
    elif "broadcast" in name and "fusion" not in name.replace("wrapped_", ""):
        k = "buffer init (broadcast)"
    elif "dynamic-update-slice" in name or "dynamic_update_slice" in name:
        k = "dynamic-update-slice"
    elif name.startswith(("copy", "wrapped_copy", "transpose", "wrapped_transpose")) or "copy_bitcast" in name:
        k = "copy / transpose"
    elif "reduce" in name:
        k = "reduction"
    else:
        k = "elementwise fusion"
    return phase, part, k


def attribute_wall_time(events: list[tuple[float, float, str]], steps: int) -> collections.Counter:
    """ms per step of each operation, where time shared by k concurrent operations counts 1/k to
    each: the totals add up to the busy wall time, so concurrent operations are not counted twice."""
    edges = sorted([(s, 1, n) for s, _, n in events] + [(e, -1, n) for _, e, n in events])
    active: collections.Counter = collections.Counter()
    out: collections.Counter = collections.Counter()
    last = None
    for t, kind, name in edges:
        if last is not None and active:
            k = sum(active.values())
            for n, c in active.items():
                out[n] += (t - last) * c / k / 1e6 / steps
        last = t
        active[name] += kind
        if active[name] == 0:
            del active[name]
    return out


def trace_ops(call, steps: int, trace_dir: str = "") -> tuple[collections.Counter, collections.Counter]:
    """Run `call()` `steps` times under the profiler: (ms per call of each XLA operation, events per call)."""
    from jax.profiler import ProfileData

    keep = bool(trace_dir)
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxlearn_profile_")
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        call()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)[-1]
    events = []  # (start_ns, end_ns, name) of every XLA operation, on any thread
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):
                events.extend((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events
                              if not ev.name.startswith(("end: ", "ThunkExecutor", "Slinky", "Threadpool")))
    if not keep:
        shutil.rmtree(trace_dir, ignore_errors=True)
    count = collections.Counter()
    for _, _, name in events:
        count[name] += 1 / steps
    return attribute_wall_time(events, steps), count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="current", choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--config", default=str(REPO / "configs" / "bench_reference.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--trace-dir", default="")
    args = p.parse_args(argv)

    run = build_run(args.variant, Path(args.config), args.set, total_steps=args.steps + 10)
    for _ in range(2):
        run.run_step()
    index = hlo_index(run.step.as_text())
    times = []
    per_thunk, count = trace_ops(lambda: times.append(run.run_step()), args.steps, args.trace_dir)
    per_thunk = collections.Counter({k: v for k, v in per_thunk.items() if k in index})
    step_ms = 1e3 * sum(times) / len(times)
    total = sum(per_thunk.values())
    groups: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    for name, ms in per_thunk.items():
        phase, part, kind = classify(name, index.get(name))
        groups[(phase, part, kind)] += ms
        kinds[kind] += ms

    print(f"\nvariant {args.variant!r}: step {step_ms:.0f} ms (traced), busy time of XLA operations {total:.0f} ms "
          f"({len(per_thunk)} distinct operations); XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    print("\nby kind of operation:")
    for k, ms in kinds.most_common():
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {k}")
    print("\nby phase / part / kind:")
    for (phase, part, kind), ms in groups.most_common(30):
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {phase:8s} {part:10s} {kind}")
    print(f"\ntop {args.top} operations (ms per step, calls per step, shape, op_name):")
    for name, ms in per_thunk.most_common(args.top):
        info = index.get(name, {})
        op_name = info.get("op_name", "").replace("jit(step)/", "")
        op_name = op_name.replace("Transformer.hidden/while/body/closed_call/", "")
        print(f"  {ms:8.1f}  {round(count[name]):3d}x  {name:40s} {info.get('shape', ''):28s} {op_name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
