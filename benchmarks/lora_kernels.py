"""Fused LoRA kernels: correctness on the real device (--check) and forward+backward timings.

    python benchmarks/lora_kernels.py --check           # kernels vs XLA reference on this device
    python benchmarks/lora_kernels.py                   # timings at realistic shapes (GPU/TPU)
    python benchmarks/lora_kernels.py --tiny            # tiny shapes: proves the script on CPU

Timed variants, each one jitted call returning y and the vjp of a random dy w.r.t. x, A and B
(W frozen, so no dW anywhere, the base included):
    base        y = x W alone (dx = dy W^T): the floor LoRA is measured against
    xla_lora    the unfused XLA path: x W + s (x A) B, autodiff backward
    kernel      the fused Pallas kernel (Triton on GPU, Mosaic on TPU; on CPU interpret mode,
                whose times mean nothing and are marked so)
    kernel_xa_pre  (GPU) the kernel with xa = x A precomputed by XLA instead of per out tile
    kernel_int8 / kernel_nf4 / xla_int8 / xla_nf4   (--quant) quantized bases

Columns: median ms over --iters after warm-up; TFLOP/s of the model FLOPs (forward 2TDO +
2Tr(D+O), backward the same again plus 2Tr(D+O) for dA/dB); GB/s of the minimum bytes
(x, W, A, B read; y written; dy read, dx written, xa/u residuals); and both as a fraction of
the device ceilings measured in the same process (a large bf16 matmul; a large array copy).
`lora/base` is the time ratio to the base matmul (target <= 1.05 at r = 16) and
`kernel/xla` the ratio to the unfused XLA LoRA (target < 1).

Writes benchmarks/results/lora_kernels.{json,md} atomically (or --out). --check exits 1 on a
mismatch and writes lora_kernels_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.kernels.dispatch import resolve
from jaxlearn.kernels.lora import lora_matmul, lora_matmul_flops
from jaxlearn.kernels.multi_lora import multi_lora_loop, multi_lora_matmul
from jaxlearn.kernels.quant import quantize

REALISTIC = [  # (tokens, d_in, d_out, r)
    (4096, 2048, 2048, 8),
    (8192, 4096, 4096, 16),
    (16384, 4096, 4096, 16),
    (8192, 4096, 11008, 16),
    (32768, 2048, 2048, 16),
    (8192, 8192, 8192, 16),
    (8192, 4096, 4096, 64),
]
TINY = [(256, 128, 256, 8), (200, 136, 72, 4)]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _time(fn, args, iters: int, warmup: int = 2) -> float:
    """Median seconds of fn(*args), blocking on the result each call."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(tiny: bool) -> dict:
    """Measured matmul TFLOP/s (bf16) and copy GB/s of this device."""
    n = 1024 if tiny else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t = _time(mm, (a,), 3 if tiny else 10)
    big = jnp.ones(((1 << 22) if tiny else (1 << 28),), jnp.float32)  # 16 MiB / 1 GiB
    cp = jax.jit(lambda x: x * 2.0)
    tc = _time(cp, (big,), 3 if tiny else 10)
    return {"matmul_tflops": 2 * n ** 3 / t / 1e12, "copy_gbs": 2 * big.nbytes / tc / 1e9,
            "matmul_shape": n}


def _operands(t, d_in, d_out, r, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (t, d_in), jnp.float32).astype(dtype)
    w = (jax.random.normal(ks[1], (d_in, d_out), jnp.float32) / np.sqrt(d_in)).astype(dtype)
    a = (jax.random.normal(ks[2], (d_in, r), jnp.float32) / np.sqrt(d_in)).astype(dtype)
    b = (jax.random.normal(ks[3], (r, d_out), jnp.float32) * 0.1).astype(dtype)
    return x, w, a, b


# Forward + backward as (y, vjp(dy)) with a given dy: returning y keeps the forward alive (the
# gradient of a linear map never needs it, so grad(sum(y)) would let XLA drop the forward of
# the XLA variants but not of the kernel's), and a random dy keeps XLA from simplifying dx.
def _grad_fn(impl, interpret, w, xa_mode="recompute"):
    def fwd_bwd(x, a, b, dy):
        y, vjp = jax.vjp(lambda x, a, b: lora_matmul(x, w, a, b, 2.0, impl=impl, interpret=interpret,
                                                     xa_mode=xa_mode), x, a, b)
        return y, vjp(dy)
    return jax.jit(fwd_bwd)


def _base_fn(w):
    def fwd_bwd(x, dy):
        y, vjp = jax.vjp(lambda x: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype), x)
        return y, vjp(dy)
    return jax.jit(fwd_bwd)


def _bytes(t, d_in, d_out, r, item, w_bytes):
    acts = item * (t * d_in * 2 + t * d_out * 2)  # x read, y written; dy read, dx written
    return acts + w_bytes * 2 + item * 2 * r * (d_in + d_out) + 4 * 2 * t * r  # W twice, A/B, xa/u


def bench(shapes, impl, interpret, iters, quant, ceil, on_shape=lambda rows: None) -> list[dict]:
    """Time every variant at every shape; `on_shape(rows)` after each shape (partial results
    survive a time limit)."""
    rows = []
    for t, d_in, d_out, r in shapes:
        dt = jnp.bfloat16
        x, w, a, b = _operands(t, d_in, d_out, r, dt)
        dy = jax.random.normal(jax.random.key(1), (t, d_out), jnp.float32).astype(dt)
        item = 2
        flops = lora_matmul_flops(t, d_in, d_out, r)["total"]
        base_flops = 4.0 * t * d_in * d_out
        variants = {"base": (_base_fn(w), (x, dy), base_flops, w.nbytes),
                    "xla_lora": (_grad_fn("xla", False, w), (x, a, b, dy), flops, w.nbytes)}
        if impl != "xla":
            variants["kernel"] = (_grad_fn(impl, interpret, w), (x, a, b, dy), flops, w.nbytes)
        if impl == "gpu":
            variants["kernel_xa_pre"] = (_grad_fn(impl, interpret, w, "precompute"), (x, a, b, dy), flops, w.nbytes)
        if quant:
            for fmt in ("int8", "nf4"):
                qw = quantize(w, fmt)
                variants[f"xla_{fmt}"] = (_grad_fn("xla", False, qw), (x, a, b, dy), flops, qw.nbytes())
                if impl != "xla":
                    variants[f"kernel_{fmt}"] = (_grad_fn(impl, interpret, qw), (x, a, b, dy), flops, qw.nbytes())
        times = {}
        for name, (fn, args, fl, wb) in variants.items():
            s = _time(fn, args, iters)
            times[name] = s
            by = _bytes(t, d_in, d_out, r if name != "base" else 0, item, wb)
            rows.append({"tokens": t, "d_in": d_in, "d_out": d_out, "r": r, "variant": name,
                         "ms": s * 1e3, "tflops": fl / s / 1e12, "gbs": by / s / 1e9,
                         "frac_matmul_peak": fl / s / 1e12 / ceil["matmul_tflops"],
                         "frac_copy_bw": by / s / 1e9 / ceil["copy_gbs"],
                         "interpret": bool(interpret and name.startswith("kernel"))})
        for row in rows[-len(variants):]:
            row["lora/base"] = times[row["variant"]] / times["base"]
            row["kernel/xla"] = (times[row["variant"]] / times["xla_lora"]) if row["variant"] in ("kernel", "kernel_xa_pre") else None
        print(" ".join(f"{r_['variant']}={r_['ms']:.3f}ms" for r_ in rows[-len(variants):]), (t, d_in, d_out, r),
              flush=True)
        on_shape(rows)
    return rows


def check(impl, interpret) -> list[dict]:
    """Kernel vs reference on this device: forward and every gradient, several shapes (ragged
    included), f32 and bf16, int8/NF4 bases, and a multi-adapter batch vs a per-example loop."""
    results = []

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))

    def vg(impl_, w, x, a, b):
        def loss(x, a, b, s):
            y = lora_matmul(x, w, a, b, s, impl=impl_, interpret=interpret and impl_ != "xla")
            return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
        (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, 1.5)
        return (y, *g)

    def vg_pre(w, x, a, b):
        def loss(x, a, b, s):
            y = lora_matmul(x, w, a, b, s, impl="gpu", interpret=interpret, xa_mode="precompute")
            return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
        (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, 1.5)
        return (y, *g)

    cases = [(256, 512, 384, 16, jnp.float32), (300, 520, 200, 5, jnp.float32), (1000, 1024, 1536, 16, jnp.bfloat16),
             (77, 260, 130, 8, jnp.bfloat16)]
    # f32 on GPU tensor cores runs as TF32 (10-bit mantissa) unless told otherwise; bf16 has 8 bits.
    tol = {jnp.float32: 5e-3, jnp.bfloat16: 3e-2}
    for t, d_in, d_out, r, dt in cases:
        x, w, a, b = _operands(t, d_in, d_out, r, dt, seed=t)
        for base_name, base in [("dense", w), ("int8", quantize(w.astype(jnp.float32), "int8")),
                                ("nf4", quantize(w.astype(jnp.float32), "nf4"))]:
            if base_name != "dense" and dt == jnp.float32 and t != 256:
                continue
            got, want = vg(impl, base, x, a, b), vg("xla", base, x, a, b)
            if impl == "gpu" and base_name == "dense":  # the other forward variant, same checks
                pre = vg_pre(base, x, a, b)
                errs_pre = {n: rel(g, w_) for n, g, w_ in zip(("y", "dx", "dA", "dB", "dscale"), pre, want)}
                ok = all(e < tol[dt] for e in errs_pre.values())
                results.append({"case": f"xa_pre dense T{t} {d_in}x{d_out} r{r} {jnp.dtype(dt).name}", "ok": ok, **errs_pre})
                print(("ok  " if ok else "FAIL"), results[-1], flush=True)
            errs = {n: rel(g, w_) for n, g, w_ in zip(("y", "dx", "dA", "dB", "dscale"), got, want)}
            ok = all(e < tol[dt] for e in errs.values())
            results.append({"case": f"{base_name} T{t} {d_in}x{d_out} r{r} {jnp.dtype(dt).name}", "ok": ok, **errs})
            print(("ok  " if ok else "FAIL"), results[-1], flush=True)
    # multi-adapter batch
    ks = jax.random.split(jax.random.key(7), 4)
    xb = jax.random.normal(ks[0], (4, 96, 256))
    wb = jax.random.normal(ks[1], (256, 192)) / 16
    ab = jax.random.normal(ks[2], (3, 256, 16)) / 16
    bb = jax.random.normal(ks[3], (3, 16, 192)) * 0.1
    sc, ids = jnp.array([0.5, 1.0, 2.0]), jnp.array([2, 0, 2, 1])
    got = jax.jit(lambda x: multi_lora_matmul(x, wb, ab, bb, sc, ids, impl=impl, interpret=interpret))(xb)
    err = rel(got, multi_lora_loop(xb, wb, ab, bb, sc, ids))
    results.append({"case": "multi-adapter B4 S96 256x192 r16 float32", "ok": err < 5e-3, "y": err})
    print(("ok  " if err < 5e-3 else "FAIL"), results[-1], flush=True)
    return results


def _markdown(rows, ceil, device) -> str:
    lines = [f"# LoRA kernels, forward+backward (bf16, f32 accumulation) on {device}", "",
             f"Ceilings measured here: matmul {ceil['matmul_tflops']:.1f} TFLOP/s (bf16 {ceil['matmul_shape']}^3), "
             f"copy {ceil['copy_gbs']:.0f} GB/s.", "",
             "| tokens | d_in | d_out | r | variant | ms | TFLOP/s | % matmul peak | GB/s | % copy bw | lora/base | kernel/xla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kx = f"{r['kernel/xla']:.3f}" if r["kernel/xla"] is not None else ""
        note = " (interpret: not a speed)" if r["interpret"] else ""
        lines.append(f"| {r['tokens']} | {r['d_in']} | {r['d_out']} | {r['r']} | {r['variant']}{note} | {r['ms']:.3f} | "
                     f"{r['tflops']:.2f} | {100 * r['frac_matmul_peak']:.0f} | {r['gbs']:.0f} | {100 * r['frac_copy_bw']:.0f} | "
                     f"{r['lora/base']:.3f} | {kx} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="correctness on this device, then exit")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--quant", action="store_true", help="also time int8 / NF4 bases")
    p.add_argument("--kernels", default="auto", choices=("auto", "pallas", "xla"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--shapes", default="", help="T,D,O,R;T,D,O,R ... (default: the realistic sweep)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    impl, interpret = resolve(args.kernels)
    if args.tiny and impl == "xla" and args.kernels == "auto":
        impl, interpret = resolve("pallas")  # on CPU: the TPU kernel interpreted, to prove the path
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), kernel impl {impl}" + (" interpret" if interpret else "")
    print(device, flush=True)
    if args.check:
        res = check(impl, interpret)
        _atomic_write(out / "lora_kernels_check.json", json.dumps({"device": device, "results": res}, indent=1) + "\n")
        bad = [r["case"] for r in res if not r["ok"]]
        print("CHECK", "FAILED: " + ", ".join(bad) if bad else f"passed ({len(res)} cases)")
        return 1 if bad else 0
    shapes = TINY if args.tiny else REALISTIC
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    ceil = ceilings(args.tiny)
    print("ceilings", ceil, flush=True)
    def write(rows):
        result = {"device": device, "ceilings": ceil, "rows": rows, "jax": jax.__version__}
        _atomic_write(out / "lora_kernels.json", json.dumps(result, indent=1) + "\n")
        _atomic_write(out / "lora_kernels.md", _markdown(rows, ceil, device))

    bench(shapes, impl, interpret, 3 if args.tiny else args.iters, args.quant, ceil, on_shape=write)
    print((out / "lora_kernels.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
