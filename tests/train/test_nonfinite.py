"""Non-finite guard (issue 15, item 1): a NaN/inf loss or gradient never reaches the weights, a
checkpoint, or a JSON file; `train.on_nonfinite: skip` counts the step and goes on, `stop` ends
the run with exit 2 before anything later is saved."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runner import REPO, TINY
from helpers import random_batch, tiny_model_config
from jaxlearn.cli import main
from jaxlearn.config import Config, MeshConfig, OptimConfig
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.registry import build_objective
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.batches import place_batch
from jaxlearn.train.checkpoint import Checkpointer
from jaxlearn.train.extras import build_extras
from jaxlearn.train.guard import NonFiniteError, state_is_finite
from jaxlearn.train.metrics import MetricsLog, dumps_json
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"


@pytest.fixture(scope="module")
def stepper():
    cfg = Config(model=tiny_model_config(), mesh=MeshConfig(preset="dp"), optim=OptimConfig(warmup_steps=0, lr=1e-2))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    shard = ShardingContext(mesh, rules_for(cfg.mesh))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, mesh, shard.rules, total_steps=10, objective=objective)
    extras = build_extras(objective.extras(), shard)
    first = place_batch(objective, shard, random_batch(4, 16, 128, seed=0), setup.state)
    step = compile_train_step(objective, setup, shard.batch_shardings(first), 1, extras.shardings)

    def run(state, batch):
        return step(state, place_batch(objective, shard, batch, state, shard.batch_shardings(first)), extras.values)

    return setup, run


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_a_nonfinite_step_changes_only_the_counter_and_rng(stepper):
    setup, run = stepper
    state, m = run(setup.state, random_batch(4, 16, 128, seed=1))  # a normal step first (Adam moments != 0)
    assert float(m["nonfinite"]) == 0.0
    before = _host(state)
    bad = random_batch(4, 16, 128, seed=2)
    bad["loss_mask"][0, 3] = np.nan  # the loss, its weight and every gradient become NaN
    state, m = run(state, bad)
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
    after = _host(state)
    for a, b in zip(jax.tree.leaves(before.trainable) + jax.tree.leaves(before.opt_state),
                    jax.tree.leaves(after.trainable) + jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(a, b)  # bit-identical: the update was skipped
    assert int(after.step) == int(before.step) + 1  # ... but the step and rng advance (exact resume)
    assert not np.array_equal(after.rng, before.rng)
    assert state_is_finite(state)
    state, m = run(state, random_batch(4, 16, 128, seed=3))  # and training goes on
    assert float(m["nonfinite"]) == 0.0
    assert not np.array_equal(_host(state.trainable)["final_norm"]["scale"], after.trainable["final_norm"]["scale"])


def test_a_nonfinite_state_is_never_saved_nor_rotates_a_finite_one_out(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    ckpt.save(2, {"w": jnp.ones(8), "step": jnp.int32(2)})
    broken = {"w": jnp.ones(8).at[3].set(jnp.inf), "step": jnp.int32(4)}
    with pytest.raises(NonFiniteError, match="step 4: the training state holds NaN/inf.*newest finite checkpoint is step 2"):
        ckpt.save(4, broken)
    ckpt.close()
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]  # keep=1 did not rotate step 2 out


def test_json_outputs_write_nonfinite_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write(3, "train", loss=float("nan"), grad_norm=float("inf"), lr=0.1)
    assert json.loads(log.path.read_text()) == {"step": 3, "split": "train", "loss": None, "grad_norm": None, "lr": 0.1}
    assert dumps_json({"a": [float("-inf"), 1.0]}) == '{"a": [null, 1.0]}'


# The reproduction: optim.lr=1e6 makes the gradients NaN from step 3 on.
NAN = [*TINY, "train.steps=8", "train.save_every=2", "optim.lr=1e6", "optim.warmup_steps=0", "train.eval_every=0",
       "train.sample_prompts=[]", "train.keep_checkpoints=2", "train.eval_batches=1", "mesh.preset=dp"]


def _checkpoint_arrays(run_dir):
    """{step: every array of that checkpoint's state}, read straight from the files."""
    import orbax.checkpoint as ocp

    reader = ocp.StandardCheckpointer()
    return {step: jax.tree.leaves(reader.restore(run_dir / "checkpoints" / str(step) / "state"))
            for step in Checkpointer(run_dir / "checkpoints").all_steps()}


@pytest.mark.slow  # an end-to-end run (~30 s on 2 busy cores); the step and checkpoint tests above are the fast guard
def test_skip_counts_the_steps_and_keeps_every_checkpoint_finite(tmp_path, shakespeare_tokenizer, capsys):
    run_dir = tmp_path / "nan"
    assert main(["train", str(RECIPE), *NAN, f"data.tokenizer={shakespeare_tokenizer}", "train.log_every=1",
                 f"train.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # valid JSON
    train = [r for r in recs if r["split"] == "train"]
    skipped = [r["step"] for r in train if r["nonfinite"]]
    assert [r["step"] for r in train] == list(range(1, 9)) and skipped and skipped[-1] == 8
    assert any(r["grad_norm"] is None or r["loss"] is None for r in train if r["nonfinite"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nonfinite_steps"] == len(skipped)
    assert f"{len(skipped)} non-finite steps skipped" in out
    saved = _checkpoint_arrays(run_dir)
    assert sorted(saved) == [6, 8]  # saved on schedule, and every value in them is finite
    assert all(np.isfinite(np.asarray(a)).all() for leaves in saved.values() for a in leaves
               if np.issubdtype(np.asarray(a).dtype, np.floating))


@pytest.mark.slow
def test_stop_ends_the_run_before_a_later_save(tmp_path, shakespeare_tokenizer, capsys):
    run_dir = tmp_path / "stop"
    # log_every=4: step 3's NaN is seen at the host sync before step 4's save, and nothing is saved after it
    rc = main(["train", str(RECIPE), *NAN, f"data.tokenizer={shakespeare_tokenizer}", "train.log_every=4",
               "train.on_nonfinite=stop", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "is not finite" in err and "train.on_nonfinite=stop" in err and "last checkpoint (step 2)" in err
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [2]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and max(steps) <= 4
