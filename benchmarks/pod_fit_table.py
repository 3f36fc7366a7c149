"""The pod fit table: `jaxlearn compile` over recipes x TPU topologies, as JSON + markdown.

    python benchmarks/pod_fit_table.py                       # the default cases below (long: tens of minutes on 2 cores)
    python benchmarks/pod_fit_table.py --from-json a.json b.json   # render reports written by `jaxlearn compile --json`

Writes benchmarks/results/pod_fit_table.{json,md}. Columns: per-device GiB (XLA total) against
the chip's HBM, fits, XLA FLOPs per step over the analytic 6N (+ attention) model FLOPs, and
the ideal step time at the chip's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

_8K = ["data.batch_size=32", "data.seq_len=8192"]  # one 8192-token sequence per chip on v5p-64
CASES = [  # (name, recipe, topology, count XLA FLOPs, overrides)
    ("Llama-3-8B full FT", "configs/pod/llama3_8b_full_ft.yaml", "v5p:4x4x4", True, []),
    ("Llama-3-8B LoRA r16", "configs/pod/llama3_8b_lora.yaml", "v5e:2x4", True, []),
    ("Llama-3-8B LoRA r16", "configs/pod/llama3_8b_lora.yaml", "v5e:4x4", False, []),
    ("Llama-3-70B FSDP", "configs/pod/llama3_70b_fsdp.yaml", "v5p:8x8x4", False, []),
    # MaxText's AOT reference case (1 x 8192 per chip, full remat) and the long-context rows
    ("Llama-3-8B full FT, 8k (MaxText ref.)", "configs/pod/llama3_8b_full_ft.yaml", "v5p:4x4x2", True, _8K),
    ("Llama-3-8B full FT, 8k, XLA attention", "configs/pod/llama3_8b_full_ft.yaml", "v5p:4x4x2", False,
     [*_8K, "model.attention=dot_product_attention"]),
    ("Llama-3-8B full FT, 32k", "configs/pod/llama3_8b_full_ft.yaml", "v5p:4x4x2", False,
     ["data.batch_size=32", "data.seq_len=32768", "model.max_seq_len=32768"]),
    ("Llama-3-70B FSDP, 8k", "configs/pod/llama3_70b_fsdp.yaml", "v5p:4x4x8", False,
     ["data.batch_size=128", "data.seq_len=8192"]),
]
OUT = Path(__file__).resolve().parent / "results"


def markdown(rows: list[dict]) -> str:
    head = ("| case | topology | chips | per-device GiB (args + temp) | HBM GiB | fits | XLA FLOPs / 6N | "
            "step at 100 % MFU (s) | compile (s) |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ratio = r["flops_ratio"]
        lines.append(
            f"| {r.get('case', '')} | {r['topology']} ({r['accelerator']}) | {r['n_chips']} | "
            f"{r['total_bytes'] / 2**30:.2f} ({r['argument_bytes'] / 2**30:.2f} + {r['temp_bytes'] / 2**30:.2f}) | "
            f"{r['hbm_bytes'] / 2**30:.0f} | {'yes' if r['fits'] else 'NO'} | "
            f"{'n/a' if ratio != ratio else f'{ratio:.2f}'} | {r['step_seconds_at_peak']:.3f} | {r['compile_seconds']:.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-json", nargs="*", default=None)
    args = ap.parse_args()
    rows = []
    if args.from_json:
        for p in args.from_json:
            rows.append(json.loads(Path(p).read_text()))
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from jaxlearn.config import load_config
        from jaxlearn.pod.compile import fit_check

        for name, recipe, topo, flops, overrides in CASES:
            r = fit_check(load_config(recipe, overrides), topo, count_flops=flops)
            print(r.text(), flush=True)
            rows.append({"case": name, "recipe": recipe, "overrides": overrides, **r.to_dict()})
    OUT.mkdir(exist_ok=True)
    (OUT / "pod_fit_table.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (OUT / "pod_fit_table.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
