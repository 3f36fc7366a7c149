"""PEFT invariants: identity at attach, merged == unmerged, frozen base bit-identical, no
optimizer state or gradient FLOPs for frozen weights, adapters shard like their base weight."""


import jax
import numpy as np
import pytest

from jaxlearn.config import Config, MeshConfig, OptimConfig, PeftConfig
from jaxlearn.models.transformer import Transformer, abstract_params, init_params
from jaxlearn.objectives.lm import make_objective
from jaxlearn.peft.attach import attach, attach_axes, find_sites
from jaxlearn.peft.filter import flat_paths
from jaxlearn.peft.merge import adapter_leaves, base_leaves, merge, unmerge
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

from helpers import logits_of, random_batch, tiny_model_config

METHODS = ["lora", "dora", "ia3", "adapter"]


def _forward(model, params, batch):
    return logits_of(model, params, batch["inputs"], batch["positions"], batch["segment_ids"])


def _attached(method, scan=True, **kw):
    cfg = tiny_model_config(scan_layers=scan, init_std=0.2)
    model = Transformer(cfg)
    base = init_params(model, jax.random.key(0))
    abstract, logical = abstract_params(model)
    pc = PeftConfig(type=method, rank=4, **kw)
    sites = find_sites(abstract, logical, pc)
    return model, base, attach(base, pc, sites, jax.random.key(1)), attach_axes(logical, pc, sites), pc


def _perturb(params, key=2):
    """Give the adapters non-trivial values (as after training)."""
    flat = flat_paths(params)
    for i, (k, v) in enumerate(sorted(flat.items())):
        if any(k.endswith(s) for s in ("lora_b", "adapter_up", "ia3_in", "ia3_out", "dora_m")):
            noise = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(key), i), v.shape, v.dtype)
            flat[k] = v + noise
    from jaxlearn.peft.filter import unflatten_paths
    return unflatten_paths(flat)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scan", [True, False])
def test_identity_at_attach(method, scan):
    model, base, params, _, _ = _attached(method, scan)
    batch = random_batch(2, 16, 128, n_docs=2)
    assert len(flat_paths(params)) > len(flat_paths(base))
    a, b = _forward(model, base, batch), _forward(model, params, batch)
    if method == "dora":  # m / ||W|| is 1 up to float32 rounding of the norm
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("scan", [True, False])
def test_merged_equals_unmerged(method, scan):
    model, base, params, logical, _ = _attached(method, scan)
    params = _perturb(params)
    batch = random_batch(2, 16, 128, n_docs=2)
    merged = merge(params, logical)
    assert set(flat_paths(merged)) == set(flat_paths(base))
    unmerged_out = _forward(model, params, batch)
    assert not np.allclose(unmerged_out, _forward(model, base, batch), atol=1e-3)  # adapters matter
    np.testing.assert_allclose(_forward(model, merged, batch), unmerged_out, atol=2e-4)
    assert flat_paths(merge(params)).keys() == flat_paths(merged).keys()  # inferred layout agrees
    if method != "dora":
        back = unmerge(merged, adapter_leaves(params), logical)
        for k, v in flat_paths(params).items():
            np.testing.assert_allclose(v, flat_paths(back)[k], atol=1e-5, err_msg=k)


def test_bottleneck_adapter_refuses_merge():
    _, _, params, logical, _ = _attached("adapter")
    with pytest.raises(ValueError, match="nonlinear and cannot be merged"):
        merge(params, logical)


def test_unknown_target_lists_modules():
    cfg = tiny_model_config()
    abstract, logical = abstract_params(Transformer(cfg))
    with pytest.raises(ValueError, match=r"matches no linear layer. Available: layers/attn/k, layers/attn/o"):
        find_sites(abstract, logical, PeftConfig(type="lora", targets=("attn/qq$",)))


def _setup(peft: PeftConfig, mesh_cfg=MeshConfig(preset="dp"), devices=1):
    cfg = Config(model=tiny_model_config(), mesh=mesh_cfg, peft=peft, optim=OptimConfig(warmup_steps=0, lr=1e-2))
    mesh = make_mesh(mesh_cfg, jax.devices()[:devices])
    shard = ShardingContext(mesh, rules_for(mesh_cfg))
    model = Transformer(cfg.model, shard)
    setup = build_state(model, cfg, mesh, rules_for(mesh_cfg), total_steps=10)
    step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
    return cfg, model, setup, step


@pytest.mark.parametrize("method", METHODS + ["prefix", "prompt"])
def test_training_moves_only_adapters(method):
    extra = ("final_norm",) if method == "lora" else ()  # LoRA plus a trainable norm: a wider filter
    _, _, setup, step = _setup(PeftConfig(type=method, rank=4, trainable=extra))
    state = setup.state
    trainable = set(flat_paths(state.trainable))
    assert trainable and all(("lora_" in p or "dora_m" in p or "ia3_" in p or "adapter_" in p or p == "final_norm/scale"
                              or p.startswith(("prefix/", "prompt/")))
                             and not p.endswith("lora_scale") for p in trainable), trainable
    assert ("final_norm/scale" in trainable) == (method == "lora")
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_train  # no optimizer state for any frozen weight
    frozen0 = jax.device_get(state.frozen)
    train0 = jax.device_get(state.trainable)
    losses = []
    for i in range(3):
        state, m = step(state, random_batch(4, 16, 128, seed=i), {})
        losses.append(float(m["loss"]))
    for k, v in flat_paths(jax.device_get(state.frozen)).items():
        np.testing.assert_array_equal(v, flat_paths(frozen0)[k], err_msg=k)
    moved = {k: not np.array_equal(v, flat_paths(train0)[k]) for k, v in flat_paths(jax.device_get(state.trainable)).items()}
    assert all(moved.values()), moved
    assert losses[-1] < losses[0]


def test_lora_removes_weight_gradient_flops(step_flops):
    flops = {"full": step_flops(PeftConfig()), "lora": step_flops(PeftConfig(type="lora", rank=4))}
    assert flops["lora"] < 0.85 * flops["full"], flops


def test_adapters_inherit_base_sharding():
    mc = MeshConfig(preset="fsdp_tp", tensor=2)
    _, _, setup, _ = _setup(PeftConfig(type="lora", rank=4), mc, devices=8)
    specs = {k: tuple(v.sharding.spec) for k, v in flat_paths(setup.state.trainable).items()}
    frozen = {k: tuple(v.sharding.spec) for k, v in flat_paths(setup.state.frozen).items()}
    # q kernel [layers, embed, heads, head_dim] -> (None, fsdp, tensor, None)
    assert frozen["layers/attn/q/kernel"] == (None, "fsdp", "tensor", None)
    assert specs["layers/attn/q/lora_a"] == (None, "fsdp", None)            # [layers, embed, rank]
    assert specs["layers/attn/q/lora_b"] == (None, None, "tensor", None)    # [layers, rank, heads, head_dim]
    assert specs["layers/mlp/down/lora_a"] == (None, "tensor", None)        # [layers, mlp, rank]
    assert specs["layers/mlp/down/lora_b"] == (None, None, "fsdp")          # [layers, rank, embed]


def test_adapter_save_load_swap_and_wrong_base(tmp_path):
    from jaxlearn.peft.files import AdapterMismatchError, list_adapters, load_adapter, save_adapter, swap_adapter

    peft = PeftConfig(type="lora", rank=4, trainable=("final_norm",))
    cfg, model, setup, step = _setup(peft)
    state = setup.state
    base = jax.device_get(base_leaves(setup.state.params))  # before training: the original base
    for i in range(2):
        state, _ = step(state, random_batch(4, 16, 128, seed=i), {})
    batch = random_batch(2, 16, 128, seed=9)
    trained_out = _forward(model, state.params, batch)
    v1 = save_adapter(tmp_path / "adapters", state.trainable, state.frozen, peft, recipe={"model": {}}, step=2)
    state2, _ = step(state, random_batch(4, 16, 128, seed=5), {})
    v2 = save_adapter(tmp_path / "adapters", state2.trainable, state2.frozen, peft, step=3)
    assert [p.name for p, _ in list_adapters(tmp_path / "adapters")] == ["v1", "v2"]
    meta = list_adapters(tmp_path / "adapters")[0][1]
    assert meta["method"] == "lora" and meta["hyperparameters"]["rank"] == 4
    assert "layers/attn/q" in meta["targets"] and "final_norm/scale" in meta["leaves"]

    loaded, _ = load_adapter(v1, base)
    np.testing.assert_array_equal(np.asarray(_forward(model, loaded, batch)), np.asarray(trained_out))
    # swap to v2 on the same loaded base, then back to v1
    swapped, _ = swap_adapter(loaded, v2, original_extras={"final_norm": base["final_norm"]})
    assert not np.allclose(_forward(model, swapped, batch), trained_out)
    back, _ = swap_adapter(swapped, v1, original_extras={"final_norm": base["final_norm"]})
    np.testing.assert_array_equal(np.asarray(_forward(model, back, batch)), np.asarray(trained_out))

    other = jax.tree.map(lambda x: x, base)
    other["embed"]["embedding"] = other["embed"]["embedding"] + 1e-3
    with pytest.raises(AdapterMismatchError, match="was trained on a base with fingerprint"):
        load_adapter(v1, other)
    assert not list((tmp_path / "adapters").glob(".v*"))  # no temporary leftovers
