"""`objective.type` picks a typed config block: built-in names, `module:Class` for one's own,
and clear errors for unknown types and for keys the chosen objective does not take."""

import pytest

from jaxlearn.config import ConfigError, config_to_dict, dump_config, load_config
from jaxlearn.objectives.lm import LMConfig, LMObjective
from jaxlearn.objectives.registry import objective_class
from tests.objectives_for_tests import L2Config, L2ToFrozen

L2 = "tests.objectives_for_tests:L2ToFrozen"


def test_default_is_the_lm_objective_with_its_own_block():
    cfg = load_config(None, ["objective.loss_chunk=64"])
    assert isinstance(cfg.objective, LMConfig) and cfg.objective.loss_chunk == 64
    assert objective_class("lm") is LMObjective


def test_a_class_named_by_import_path_brings_its_own_config():
    cfg = load_config(None, [f"objective.type={L2}", "objective.teacher_layers=3"])
    assert isinstance(cfg.objective, L2Config) and cfg.objective.teacher_layers == 3
    assert objective_class(L2) is L2ToFrozen
    # the resolved config round-trips through the YAML a run directory keeps
    again = load_config(None, [f"objective.{k}={v}" for k, v in config_to_dict(cfg)["objective"].items()])
    assert again == cfg and "teacher_layers: 3" in dump_config(cfg)


def test_keys_of_another_objective_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'objective.teacher_layer'.*Did you mean 'objective.teacher_layers'"):
        load_config(None, [f"objective.type={L2}", "objective.teacher_layer=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'objective.loss_chunk'"):  # an lm key on another type
        load_config(None, [f"objective.type={L2}", "objective.loss_chunk=64"])


def test_unknown_types_are_errors_that_name_the_fix():
    with pytest.raises(ConfigError, match=r"objective.type: unknown objective 'ln'. Did you mean 'lm'\?"):
        load_config(None, ["objective.type=ln"])
    with pytest.raises(ConfigError, match=r"cannot import objective 'nowhere.mod:Thing'"):
        load_config(None, ["objective.type=nowhere.mod:Thing"])
    with pytest.raises(ConfigError, match=r"is not a jaxlearn.objectives.base.Objective subclass"):
        load_config(None, ["objective.type=tests.objectives_for_tests:L2Config"])
    with pytest.raises(ConfigError, match=r"objective: expected a mapping"):
        load_config(None, ["objective=lm"])
