"""A shallower student from a teacher's layers (jaxlearn/models/student.py and the
`model.init_layers` hook of `presets.init_params`): which layers, the copy, the errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_model_config
from jaxlearn.config import ConfigError, load_config
from jaxlearn.models.hf import save_hf
from jaxlearn.models.presets import init_params as init_pretrained
from jaxlearn.models.student import layer_ids, select_layers, student_params
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.objectives.forward import hidden_states


def test_layer_ids():
    assert layer_ids("every_k", 30, 6) == (0, 5, 10, 15, 20, 25)
    assert layer_ids("every_k", 7, 3) == (0, 2, 4)
    assert layer_ids("first", 30, 4) == (0, 1, 2, 3)
    assert layer_ids("all", 4, 4) == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match="model.n_layers=5"):
        layer_ids("first", 4, 5)
    with pytest.raises(ConfigError, match="init_layers=all"):
        layer_ids("all", 4, 2)


@pytest.mark.parametrize("scan", [True, False])
def test_selected_student_runs_the_teachers_layers(scan):
    """A 2-layer student of layers (0, 2) of a 3-layer teacher computes exactly what the teacher's
    layers 0 and 2 compute, checked against a teacher whose layer 1 is made an identity (its
    output projections zeroed): the same forward through another path."""
    t_cfg = tiny_model_config(n_layers=3, scan_layers=scan)
    teacher = init_params(Transformer(t_cfg), jax.random.key(1))
    s_cfg = dataclasses.replace(t_cfg, n_layers=2)
    student = select_layers(teacher, (0, 2), scan_layers=scan)
    assert jax.tree.map(jnp.shape, student) == jax.tree.map(jnp.shape, init_params(Transformer(s_cfg), jax.random.key(0)))
    if scan:
        skip1 = jax.tree_util.tree_map_with_path(
            lambda p, a: a.at[1].set(0.0) if any(getattr(k, "key", "") in ("o", "down") for k in p) else a, teacher)
    else:
        skip1 = {**teacher, "layers_1": jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.zeros_like(a) if any(getattr(k, "key", "") in ("o", "down") for k in p) else a,
            teacher["layers_1"])}
    b = {k: jnp.asarray(v) for k, v in random_batch(2, 16, 128, n_docs=2).items()}
    h_s = hidden_states(Transformer(s_cfg), student, b)
    h_t = hidden_states(Transformer(t_cfg), skip1, b)
    np.testing.assert_allclose(np.asarray(h_s), np.asarray(h_t), atol=1e-5)
    assert not np.allclose(np.asarray(h_s), np.asarray(hidden_states(Transformer(t_cfg), teacher, b)), atol=1e-3)


def test_student_params_copy_where_shapes_allow():
    t_cfg = tiny_model_config(n_layers=4)
    teacher = init_params(Transformer(t_cfg), jax.random.key(1))
    s_cfg = dataclasses.replace(t_cfg, n_layers=2, d_ff=96)  # narrower MLP: those leaves stay fresh
    fresh = init_params(Transformer(s_cfg), jax.random.key(2))
    params, kept = student_params(teacher, layer_ids("every_k", 4, 2), fresh, scan_layers=True)
    assert sorted(kept) == ["layers/mlp/down/kernel", "layers/mlp/gate/kernel", "layers/mlp/up/kernel"]
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"], teacher["layers"]["attn"]["q"]["kernel"][::2])
    np.testing.assert_array_equal(params["layers"]["mlp"]["up"]["kernel"], fresh["layers"]["mlp"]["up"]["kernel"])
    np.testing.assert_array_equal(params["embed"]["embedding"], teacher["embed"]["embedding"])


def test_init_layers_hook_loads_a_shallower_student(tmp_path):
    """`model.init_from` + `model.init_layers` through the same `init_params` a run calls."""
    t_cfg = tiny_model_config(n_layers=4, vocab_size=256)
    teacher = init_params(Transformer(t_cfg), jax.random.key(3))
    save_hf(teacher, t_cfg, tmp_path / "teacher")
    cfg = load_config(None, ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=128", "model.max_seq_len=128",
                             f"model.init_from={tmp_path / 'teacher'}", "model.init_layers=every_k"]).model
    got = init_pretrained(cfg)
    np.testing.assert_allclose(got["layers"]["mlp"]["down"]["kernel"], teacher["layers"]["mlp"]["down"]["kernel"][::2],
                               atol=1e-6)
    first = init_pretrained(dataclasses.replace(cfg, init_layers="first"))
    np.testing.assert_allclose(first["layers"]["attn"]["o"]["kernel"], teacher["layers"]["attn"]["o"]["kernel"][:2],
                               atol=1e-6)
    with pytest.raises(ConfigError, match="model.n_layers=4"):  # without selection the depth must match
        init_pretrained(dataclasses.replace(cfg, init_layers="all"))
    with pytest.raises(ConfigError, match="model.d_ff=128"):  # selection keeps the widths
        init_pretrained(dataclasses.replace(cfg, d_ff=96))
    with pytest.raises(ConfigError, match="init_layers"):
        load_config(None, ["model.init_layers=every_2"])
