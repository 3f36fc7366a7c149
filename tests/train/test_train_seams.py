"""`jaxlearn train` with methods that are not in the library (tests/objectives_for_tests.py):
the seams of the one step, end to end on real data (Shakespeare), in-process."""

import json

import numpy as np

from cli_runner import REPO, TINY
from jaxlearn.cli import main
from jaxlearn.run import open_run

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"


def _train(tmp_path, tok, *overrides, steps=6):
    run_dir = tmp_path / "run"
    argv = ["train", str(RECIPE), *TINY, f"data.tokenizer={tok}", f"train.steps={steps}", "train.log_every=1",
            "train.eval_every=3", "train.save_every=3", "train.sample_prompts=[]", "train.async_checkpoint=false",
            "mesh.preset=fsdp", f"train.run_dir={run_dir}", *overrides]
    assert main(argv) == 0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, [r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "eval"]


def test_frozen_extra_model_head_and_row_feature_train_through_jaxlearn_train(tmp_path, shakespeare_tokenizer):
    run_dir, train, evals = _train(tmp_path, shakespeare_tokenizer,
                                   "objective.type=tests.objectives_for_tests:L2ToFrozen",
                                   "objective.teacher_layers=1", "optim.warmup_steps=0")
    assert [r["step"] for r in train] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in train)
    assert train[-1]["l2"] < train[0]["l2"]  # the head + student move towards the frozen teacher
    # the held-out evaluation reports the objective's own metrics on the same cadence
    assert [r["step"] for r in evals] == [3, 6] and all({"ce", "l2", "weight"} <= set(r) for r in evals)
    assert "perplexity" not in evals[0]
    # the head is a parameter of the run: checkpointed and restored with the rest
    run = open_run(run_dir)
    assert run.step == 6 and run.params["heads"]["proj"]["kernel"].shape == (64, 64)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval"]["l2"] == evals[-1]["l2"]


def test_rollout_seam_samples_from_the_current_weights(tmp_path, shakespeare_tokenizer):
    from jaxlearn.models.generate import sample

    before = sample._cache_size()
    run_dir, train, evals = _train(tmp_path, shakespeare_tokenizer,
                                   "objective.type=tests.objectives_for_tests:SelfSampled", "optim.lr=3e-2",
                                   "optim.warmup_steps=0", "data.batch_size=8")
    # every batch was sampled from exactly the weights the step then differentiated: the
    # importance ratio to the behaviour log-probs is 1 (to float32 rounding) at every step,
    # although the weights change every step
    for r in train:
        assert r["ratio_dev"] < 1e-4, r
    assert len({round(r["grad_norm"], 6) for r in train}) == len(train)
    assert all("ratio_dev" in r and "reward" in r for r in evals)
    assert sample._cache_size() - before <= 1  # one sampler compile for training and evaluation alike
