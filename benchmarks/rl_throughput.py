"""RL from feedback: where a GRPO/PPO step's time goes, rollout (sampling + rewards) vs update.

    python benchmarks/rl_throughput.py                                   # configs/grpo_smollm2_antonyms.yaml, 6 steps
    python benchmarks/rl_throughput.py --recipe configs/ppo_smollm2_antonyms.yaml --steps 4
    python benchmarks/rl_throughput.py --set model.n_layers=2 model.init_from=null ... --steps 3   # a smoke run

The recipe is built with the trainer's own `build_run` (the same feed, objective, sharded state
and compiled step `jaxlearn train` uses; evaluation, checkpoints and forgetting probes off, in a
temporary run directory). Each timed step is split where the loop splits it:

- **rollout**: `Run.next_batch` = the objective's `prepare` (the sampler from the current
  weights, the rewards on the host; for PPO also the value/reference forward and GAE), blocked
  on its outputs;
- **update**: the compiled training step on that batch, blocked on its loss.

Reported: the median seconds of each and their share of the step; sampling tokens/s (response
tokens generated, i.e. the rollout's `loss_mask` tokens, per rollout second, and the rows x
new-token slots the sampler ran); update tokens/s (the batch's rows x positions per update
second, as `jaxlearn train` counts tokens). The first `--warmup` steps (compiles) are not timed.
Writes `rl_throughput.json` and `rl_throughput.md` into `--out` (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def run(args) -> dict:
    import jax
    import numpy as np

    from jaxlearn.config import load_config
    from jaxlearn.train.build import build_run

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.set, f"train.run_dir={tmp}/run", "train.eval_every=0", "train.eval_at_start=false",
                     "train.save_every=0", "train.forgetting=false", f"train.steps={args.warmup + args.steps}"]
        cfg = load_config(args.recipe, overrides)
        if cfg.objective.type not in ("grpo", "ppo"):
            raise SystemExit(f"{args.recipe}: objective.type is {cfg.objective.type}; this benchmark times RL "
                             "objectives (grpo, ppo), whose batches are sampled by `prepare`.")
        t0 = time.perf_counter()
        r = build_run(cfg, echo=lambda s: None)
        build_s = time.perf_counter() - t0
        state, rows = r.state, []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            batch = r.next_batch(state)
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            state, metrics = r.step_fn(state, batch, r.extras.values)
            jax.block_until_ready(metrics["loss"])
            t2 = time.perf_counter()
            mask = np.asarray(jax.device_get(batch["loss_mask"]))
            row = {"step": i + 1, "rollout_s": t1 - t0, "update_s": t2 - t1, "generated": int(mask.sum()),
                   "rows": int(mask.shape[0]), "positions": int(mask.size),
                   "reward": float(np.mean(jax.device_get(batch["rewards"])))}
            rows.append(row)
            print(f"step {i + 1}{' (warm-up)' if i < args.warmup else ''}: rollout {row['rollout_s']:.2f} s, "
                  f"update {row['update_s']:.2f} s, {row['generated']} tokens generated", flush=True)
    timed = rows[args.warmup:]
    med = lambda k: statistics.median(x[k] for x in timed)  # noqa: E731
    rollout, update = med("rollout_s"), med("update_s")
    ocfg = cfg.objective
    new_slots = timed[0]["rows"] * ocfg.max_new_tokens
    return {
        "recipe": args.recipe, "overrides": args.set, "objective": ocfg.type, "group_size": ocfg.group_size,
        "prompts_per_step": cfg.data.batch_size, "max_new_tokens": ocfg.max_new_tokens, "peft": cfg.peft.type,
        "model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "vocab": cfg.model.vocab_size},
        "device": str(jax.devices()[0]), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "build_s": build_s, "warmup_steps": args.warmup, "steps": rows,
        "rollout_s": rollout, "update_s": update, "rollout_share": rollout / (rollout + update),
        "sampling_tokens_per_s": statistics.median(x["generated"] / x["rollout_s"] for x in timed),
        "sampler_slots_per_s": new_slots / rollout,
        "update_tokens_per_s": statistics.median(x["positions"] / x["update_s"] for x in timed),
    }


def markdown(res: dict) -> str:
    return "\n".join([
        f"`{res['recipe']}` ({res['objective']}, {res['prompts_per_step']} prompts x group {res['group_size']}, "
        f"{res['max_new_tokens']} new tokens, peft {res['peft']}; {res['device']}, median of "
        f"{len(res['steps']) - res['warmup_steps']} steps after {res['warmup_steps']} warm-up)", "",
        "| part | seconds per step | share | tokens/s |", "|---|---|---|---|",
        f"| rollout (sampling + rewards{' + value/reference forward' if res['objective'] == 'ppo' else ''}) | "
        f"{res['rollout_s']:.2f} | {100 * res['rollout_share']:.0f} % | {res['sampling_tokens_per_s']:.1f} generated "
        f"({res['sampler_slots_per_s']:.1f} sampler slots) |",
        f"| update (the compiled step) | {res['update_s']:.2f} | {100 * (1 - res['rollout_share']):.0f} % | "
        f"{res['update_tokens_per_s']:.1f} positions |", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="configs/grpo_smollm2_antonyms.yaml")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compiles)")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, key=value")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    from jaxlearn.train.metrics import atomic_write_text

    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rl_throughput.json", json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    atomic_write_text(out / "rl_throughput.md", table)
    print(table)


if __name__ == "__main__":
    main()
