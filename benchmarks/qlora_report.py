"""QLoRA on SmolLM2-135M-Instruct: memory saved and accuracy cost of int8 / NF4 frozen bases.

    python benchmarks/qlora_report.py [--limit 40] [--ppl-batches 2] [--out benchmarks/results]

For each base format (the model as loaded, int8 per-channel, NF4 with 64-row block scales)
the LoRA default targets (all attention and MLP projections) are attached with
`peft.quantize`, exactly as training would (LoRA B = 0, so any difference is the quantization):
  - bytes of the adapted kernels and of the whole parameter tree;
  - logits against the unquantized model on held-out Brown text: max / mean |diff|, mean
    KL(base || quantized) per token, top-1 agreement;
  - task scores: Brown perplexity and WordNet antonyms exact match / answer contained in the
    reply (`jaxlearn eval` tasks; a 135M model rarely answers with the bare word).
Runs the XLA path (CPU); the kernels compute the same math (tests/kernels).
Note: the preset's weights are GGUF Q4_1 dequantized to float32, so "base" is already a 4-bit
model; the numbers are the extra cost of re-quantizing it.
Writes qlora_report.{json,md} atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import DataConfig, PeftConfig
from jaxlearn.data.pipeline import eval_batches
from jaxlearn.data.sources import make_source
from jaxlearn.eval.models import EvalModel, load_eval_model
from jaxlearn.eval.tasks import run_tasks
from jaxlearn.models.transformer import abstract_params
from jaxlearn.peft.attach import attach, find_sites
from jaxlearn.peft.filter import flat_paths
from jaxlearn.peft.quantize import base_bytes


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _logits(em: EvalModel, params, batch):
    return jax.jit(lambda p: em.model.apply({"params": p}, batch["inputs"], batch["positions"],
                                            batch["segment_ids"])[0])(params)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=40, help="antonym examples")
    p.add_argument("--ppl-batches", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    em = load_eval_model("smollm2-135m-instruct")
    abstract, logical = abstract_params(em.model)
    batches = eval_batches(make_source(DataConfig(source="brown"), "eval"), em.tokenizer, seq_len=256,
                           batch_size=4, max_batches=1)
    ref_logits = _logits(em, em.params, batches[0])
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32))
    mask = np.asarray(batches[0]["loss_mask"]) > 0
    rows = []
    for fmt in ("none", "int8", "nf4"):
        pc = PeftConfig(type="lora", rank=args.rank, quantize=fmt)
        sites = find_sites(abstract, logical, pc)
        params = attach(em.params, pc, sites, jax.random.key(0))
        flat = flat_paths(params)
        dense_adapted = sum(int(np.prod(s.shape)) * 4 for s in sites)
        sizes = base_bytes(flat)
        total = sum(int(v.size) * v.dtype.itemsize for v in flat.values())
        logits = _logits(em, params, batches[0])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        diff = jnp.abs(logits - ref_logits)
        top1 = jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)
        variant = EvalModel(f"smollm2+{fmt}", em.model, params, em.tokenizer, {"quantize": fmt})
        tasks = run_tasks(variant, ["perplexity:brown", "antonyms"], limit=args.limit,
                          ppl_batches=args.ppl_batches, echo=lambda s: print(fmt, s, flush=True))
        rows.append({
            "quantize": fmt,
            "adapted_kernel_bytes": sizes["quantized"] if fmt != "none" else dense_adapted,
            "adapted_kernel_bytes_f32": dense_adapted,
            "param_bytes_total": total,
            "logit_max_abs_diff": float(jnp.max(diff[mask])), "logit_mean_abs_diff": float(jnp.mean(diff[mask])),
            "kl_mean": float(jnp.mean(kl[mask])), "top1_agreement": float(jnp.mean(top1[mask])),
            "brown_perplexity": tasks[0].metrics["perplexity"], "antonyms_exact_match": tasks[1].metrics["exact_match"],
            "antonyms_contains": tasks[1].metrics["contains"], "antonyms_n": tasks[1].metrics["n"],
        })
        print(rows[-1], flush=True)
    result = {"model": "smollm2-135m-instruct (GGUF Q4_1 dequantized)", "rank": args.rank, "rows": rows}
    _atomic_write(out / "qlora_report.json", json.dumps(result, indent=1) + "\n")
    lines = ["# QLoRA bases on SmolLM2-135M-Instruct (XLA path, CPU)", "",
             "| base | adapted kernels MiB | vs f32 | all params MiB | max abs logit diff | mean abs diff | "
             "KL mean | top-1 agree | Brown ppl | antonyms EM / contains |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantize']} | {r['adapted_kernel_bytes'] / 2**20:.1f} | "
                     f"{r['adapted_kernel_bytes'] / r['adapted_kernel_bytes_f32']:.3f} | {r['param_bytes_total'] / 2**20:.1f} | "
                     f"{r['logit_max_abs_diff']:.3f} | {r['logit_mean_abs_diff']:.4f} | {r['kl_mean']:.5f} | "
                     f"{r['top1_agreement']:.3f} | {r['brown_perplexity']:.2f} | {r['antonyms_exact_match']:.3f} / {r['antonyms_contains']:.3f} (n={r['antonyms_n']}) |")
    _atomic_write(out / "qlora_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
