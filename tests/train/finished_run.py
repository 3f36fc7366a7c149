"""The tiny run the tests under tests/train resume, damage and inspect (see conftest.py)."""

from cli_runner import REPO, TINY

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"
# 6 steps, checkpoints at 2, 4 and 6, one metrics record per step
FINISHED = [*TINY, "train.steps=6", "train.save_every=2", "train.log_every=1", "train.eval_every=0",
            "train.sample_prompts=[]", "train.keep_checkpoints=3", "train.eval_batches=1", "mesh.preset=dp"]


def train_args(run_dir, tokenizer, *extra) -> list[str]:
    """`jaxlearn train` arguments for the finished run's recipe in `run_dir`."""
    return ["train", str(RECIPE), *FINISHED, f"data.tokenizer={tokenizer}", f"train.run_dir={run_dir}", *extra]
