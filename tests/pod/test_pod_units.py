"""Fast checks of the pod layer: model sizes, TPU topologies, multi-slice meshes, abstract state.
(The host feed of multi-host runs is tested in tests/data/test_feed.py.)"""

from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_model_config
from jaxlearn.config import Config, MeshConfig, load_config
from jaxlearn.models.sizes import SIZES, model_config
from jaxlearn.models.transformer import Transformer
from jaxlearn.pod.topologies import TopologyError, chip_count, parse_topology, slice_name, topology_devices
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.state import build_state

POD = Path(__file__).resolve().parents[2] / "configs" / "pod"


@pytest.mark.parametrize("name", sorted(SIZES))
def test_param_counts_match_published(name):
    assert model_config(name).param_count() == pytest.approx(SIZES[name].params_published, rel=2e-3)


def test_pod_recipes_spell_out_a_known_size():
    recipes = sorted(POD.glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(path)
        matches = [n for n, s in SIZES.items() if all(getattr(cfg.model, k) == v for k, v in s.arch.items())]
        assert matches, f"{path.name}: model block matches no size in jaxlearn/models/sizes.py"


def test_topologies():
    gen, grid = parse_topology("v5p:4x4x4")
    assert gen.hbm_gib == 95 and grid == (4, 4, 4) and chip_count("v5p:8x8x4") == 256
    assert slice_name("v5p:4x4x4") == "v5p-128" and slice_name("v5e:2x4") == "v5litepod-8"
    with pytest.raises(TopologyError, match="GENERATION"):
        parse_topology("v5x:2x2")
    devs = topology_devices("v5e:2x4")
    assert len(devs) == 8 and len({d.process_index for d in devs}) == 2  # 4 chips per host
    assert devs[0].device_kind == parse_topology("v5e:2x4")[0].device_kind


def test_multislice_mesh_puts_slices_on_the_data_axis():
    cfg = MeshConfig(preset="fsdp", slices=2)
    tpu = make_mesh(cfg, topology_devices("v5e:2x2", slices=2))
    assert dict(tpu.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(tpu.devices)
    assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()  # only `data` crosses DCN
    cpu = make_mesh(cfg)  # the 8 CPU devices stand in: the same layout
    assert dict(cpu.shape) == dict(tpu.shape)
    assert [d.id for d in cpu.devices[1].ravel()] == [4, 5, 6, 7]


def test_abstract_state_matches_the_real_one():
    cfg = Config(model=tiny_model_config())
    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh)
    model = Transformer(cfg.model, ShardingContext(mesh, rules))
    real = build_state(model, cfg, mesh, rules, 10).state
    abstract = build_state(model, cfg, mesh, rules, 10, abstract=True).state
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
        assert isinstance(r, jax.Array) and isinstance(a, jax.ShapeDtypeStruct)
        assert (r.shape, r.dtype, r.sharding) == (a.shape, a.dtype, a.sharding)
