"""`jaxlearn compile` of a distillation recipe (issue 14): the teacher, a frozen extra model of
the step with its own depth, is counted per chip, both in memory (its parameter shards under the
student's sharding rules) and in the step's FLOPs (its forward pass, unrolled in the FLOP
compiles). The compiles take minutes on 2 cores: `slow`. Every test compiles for itself (no
persistent compilation cache): the numbers are read off the compiled executables."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from cli_runner import REPO, run_cli
from helpers import tiny_model_config
from jaxlearn.config import Config, DataConfig, MeshConfig, ModelConfig, load_config
from jaxlearn.models.transformer import Transformer, abstract_params
from jaxlearn.objectives.distill import DistillConfig
from jaxlearn.pod.compile import fit_check
from jaxlearn.pod.topologies import topology_devices
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for, tree_shardings

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _own_compiles(fresh_compile):
    with fresh_compile():
        yield


def teacher_bytes_per_chip(teacher: ModelConfig, mesh_cfg: MeshConfig, topology: str) -> int:
    """Bytes of the largest shard of each teacher leaf on one device, summed: the teacher's
    parameters laid out by the student's sharding rules on `topology`."""
    shard = ShardingContext(make_mesh(mesh_cfg, topology_devices(topology)), rules_for(mesh_cfg))
    shapes, logical = abstract_params(Transformer(teacher, shard))
    shardings = tree_shardings(shard.mesh, logical, shard.rules)
    return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def _matmul_params(m: ModelConfig) -> int:
    hd = m.resolved_head_dim
    return m.n_layers * (m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff) \
        + m.vocab_size * m.d_model


def test_tiny_distillation_counts_the_teacher_per_chip():
    student = dataclasses.replace(tiny_model_config(vocab_size=1024, d_model=128, d_ff=256, n_layers=2),
                                  compute_dtype="bfloat16")
    teacher = dataclasses.replace(student, n_layers=6)  # deeper than the student
    mesh = MeshConfig(preset="fsdp")
    plain = Config(model=student, data=DataConfig(seq_len=64, batch_size=8), mesh=mesh)
    distill = dataclasses.replace(plain, objective=DistillConfig(teacher=teacher, ce_weight=0.5))
    base = fit_check(plain, "v5e:2x2")
    r = fit_check(distill, "v5e:2x2")
    assert r.n_devices == 4 and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and r.fits

    # memory: the teacher's parameter shards, exactly, and about 1/4 of the whole teacher
    expected = teacher_bytes_per_chip(teacher, mesh, "v5e:2x2")
    assert r.extra_model_bytes == expected > 0
    whole = teacher.param_count() * 4  # float32 weights
    assert whole / 4 <= r.extra_model_bytes <= whole / 4 * 1.05
    assert r.argument_bytes - base.argument_bytes >= r.extra_model_bytes  # an argument of the step
    assert r.trainable_bytes == base.trainable_bytes and r.opt_state_bytes == base.opt_state_bytes
    assert "frozen extra models" in r.text()

    # FLOPs: distillation adds the teacher's forward (2 N_teacher per token, + its attention and
    # the divergence's elementwise work) and, with `loss_chunk` (default 256), re-makes both
    # heads' logits in the backward (2 V d each per token). Measured here: 1.12x of those
    # (1.15x of 2 N_teacher with loss_chunk 0); a teacher left scanned in the FLOP compiles
    # counted one of its 6 layers (0.31x), the head's chunk loop counted once 0.97x.
    tokens = 8 * 64
    added = (r.xla_flops - base.xla_flops) * r.n_devices
    remade = 4 * teacher.vocab_size * teacher.d_model if distill.objective.loss_chunk else 0
    assert 1.0 <= added / ((2 * _matmul_params(teacher) + remade) * tokens) <= 1.35, added


def test_smollm2_distill_recipe_via_cli(tmp_path):
    """The shipped recipe: SmolLM2-135M (30 layers) teaching a 6-layer student, on v5e-4."""
    recipe = REPO / "configs" / "distill_smollm2_brown.yaml"
    out = tmp_path / "fit.json"
    r = run_cli("compile", recipe, "--topology", "v5e:2x2", "--no-flops", "--json", out, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "frozen extra models" in r.stdout and "verdict: FITS" in r.stdout
    rep = json.loads(out.read_text())
    cfg = load_config(recipe)
    teacher = cfg.objective.teacher
    assert rep["extra_model_bytes"] == teacher_bytes_per_chip(teacher, cfg.mesh, "v5e:2x2")
    whole = teacher.param_count() * 4
    assert whole / 4 <= rep["extra_model_bytes"] <= whole / 4 * 1.05  # ~0.13 GiB of 135 M float32 weights
