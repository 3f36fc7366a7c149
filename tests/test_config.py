"""Recipes parse; bad keys, types and YAML give errors that name the key and the fix."""

from pathlib import Path

import pytest

from jaxlearn.config import Config, ConfigError, dump_config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    # the README's first command and one recipe per method family
    assert {"pretrain_shakespeare.yaml", "sft_lora_smollm2_wordnet.yaml", "dpo_smollm2_wordnet.yaml",
            "distill_smollm2_brown.yaml", "grpo_smollm2_antonyms.yaml", "continual_smollm2_wordnet.yaml",
            "safety_sft_smollm2.yaml", "pipeline_tiny.yaml", "pipeline_smollm2_lora.yaml",
            "pipeline_smollm2_full.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    if path.name.startswith("continual_"):  # a task sequence: every task's recipe is built and checked
        from jaxlearn.continual.runner import load_sequence, task_config

        spec = load_sequence(path)
        assert len(spec.tasks) >= 2
        for i in range(len(spec.tasks)):
            assert isinstance(task_config(spec, i, "state.npz", resolve=False), Config)
        return
    if path.name.startswith("pipeline_"):  # stages: every stage's recipe is built and checked
        from jaxlearn.pipeline.spec import load_pipeline, stage_config

        spec = load_pipeline(path)
        assert len(spec.stages) >= 3 and spec.columns
        for i in range(len(spec.stages)):
            assert isinstance(stage_config(spec, i, "tok.model"), Config)
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.d_model % cfg.model.n_heads == 0 and cfg.model.n_heads % cfg.model.n_kv_heads == 0


def test_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr=3e-4", "train.sample_prompts=[a, b]"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "train.steps=7", "model.scan_layers=false", "model.head_dim=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.model.scan_layers is False and cfg.model.head_dim is None
    assert parse_overrides(["a.b=1"]) == {"a": {"b": 1}}


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*Did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*Did you mean 'model'"):
        load_config(None, ["modle.d_model=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"model.remat: 'ful' is not allowed.*Did you mean 'full'"):
        load_config(None, ["model.remat=ful"])
    with pytest.raises(ConfigError, match=r"model.tie_embeddings: expected true or false"):
        load_config(None, ["model.tie_embeddings=3"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: 64\n n_layers: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML \(line \d+"):
        load_config(p)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'train.stpes'. Did you mean 'train.steps'"):
        load_config(p)


def test_fixed_length_tuples_are_typed_item_by_item():
    # (student layer, teacher layer) pairs: tuple[tuple[int, int], ...]; each item is coerced by
    # its own position's type, and a pair of the wrong length names its index.
    cfg = load_config(None, ["objective.type=distill", "objective.feature_layers=[[0, 1], [1, 3]]"])
    assert cfg.objective.feature_layers == ((0, 1), (1, 3))
    with pytest.raises(ConfigError, match=r"objective.feature_layers\[0\]: expected 2 items, got 3"):
        load_config(None, ["objective.type=distill", "objective.feature_layers=[[0, 1, 2]]"])
    with pytest.raises(ConfigError, match=r"objective.feature_layers\[0\]\[1\]: expected an integer"):
        load_config(None, ["objective.type=distill", "objective.feature_layers=[[0, x]]"])
