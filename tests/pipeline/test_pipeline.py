"""The alignment pipeline on a tiny model: stages chained weight to weight, the forgetting matrix,
resume after a kill inside a stage, the exact handoff, and pipeline-file errors."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import yaml

from jaxlearn.config import ConfigError

MODEL = {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
         "max_seq_len": 128}
SHARED_TRAIN = {"log_every": 1, "eval_every": 0, "eval_batches": 1, "save_every": 0, "sample_prompts": [],
                "progress": False, "async_checkpoint": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text corpus, an SFT chat file, a preference file, and a SentencePiece tokenizer on them."""
    from jaxlearn.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("pipeline")
    sums = [{"id": f"s{a}_{b}", "prompt": f"What is {a} plus {b}?", "response": f"{a + b}"}
            for a in range(8) for b in range(6)]
    prefs = [{"id": f"p{a}_{b}", "prompt": f"Which is larger, {a} or {b}?", "chosen": f"{max(a, b)}",
              "rejected": f"{min(a, b)}"} for a in range(8) for b in range(6) if a != b]
    text = [f"The number {a} comes before {a + 1}, and {a} plus {b} is {a + b}." for a in range(8) for b in range(6)]
    (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sums))
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (d / "text.txt").write_text("\n\n".join(text) + "\n")
    chat = [f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['response']}<|im_end|>\n"
            for r in sums]
    tok = train_tokenizer((text + chat) * 4, d / "tok", vocab_size=320)
    return d, tok


def _pipeline_file(d, tok, out, path, n_stages=3, steps=4, **stage_changes) -> str:
    """pretrain (full, text) -> sft (LoRA, chat) -> dpo (full, pairs); each stage `steps` steps."""
    nll = lambda name, f: {"name": name, "eval": "chat_nll", "data": {"paths": [str(d / f)],  # noqa: E731
                                                                     "eval_fraction": 0.3}}
    stages = [
        {"name": "pretrain", "data": {"source": "text", "paths": [str(d / "text.txt")], "format": "text",
                                      "eval_fraction": 0.2},
         "optim": {"lr": 1e-2}, "evals": [nll("sums", "sums.jsonl")]},
        {"name": "sft", "data": {"source": "jsonl", "format": "chat", "paths": [str(d / "sums.jsonl")],
                                 "eval_fraction": 0.3},
         "peft": {"type": "lora", "rank": 2, "alpha": 4.0}, "optim": {"lr": 1e-2},
         "set": ["train.save_every=2"], "evals": [nll("sums_after_sft", "sums.jsonl")]},
        {"name": "dpo", "data": {"source": "jsonl", "format": "preference", "paths": [str(d / "prefs.jsonl")],
                                 "eval_fraction": 0.3},
         "objective": {"type": "dpo", "beta": 0.1}, "optim": {"lr": 1e-3}, "set": ["data.seq_len=64"],
         "evals": []},
    ]
    for i, change in stage_changes.items():
        stages[int(i[1:])].update(change)
    stages = stages[:n_stages]
    doc = {"model": MODEL, "data": {"tokenizer": str(tok), "tokenizer_vocab_size": 320, "seq_len": 32,
                                    "batch_size": 8},
           "optim": {"warmup_steps": 0, "weight_decay": 0.0}, "mesh": {"preset": "dp"},
           "train": {**SHARED_TRAIN, "steps": steps},
           "pipeline": {"out_dir": str(out), "general": [], "eval_limit": 8, "eval_batch_size": 8,
                        "stages": stages}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


class _Killed(Exception):
    pass


def _assert_handoffs_exact(spec, tok):
    """Stage 2 (LoRA) froze its base, so its final base weights are its initial ones: they must be
    stage 1's final weights bit for bit. And what stage 3 starts from (its model.init_from, loaded
    as the training loop loads it) must be stage 2's final weights with the LoRA merged."""
    from jaxlearn.models.presets import init_params
    from jaxlearn.peft.filter import flat_paths
    from jaxlearn.peft.merge import merge, without_adapters
    from jaxlearn.pipeline.spec import handoff_dir, stage_config, stage_dir
    from jaxlearn.run import open_run

    run0, run1 = open_run(stage_dir(spec, 0)), open_run(stage_dir(spec, 1))
    base1 = flat_paths(without_adapters(run1.params))
    final0 = flat_paths(run0.params)
    assert set(base1) == set(final0)
    for k in final0:
        np.testing.assert_array_equal(np.asarray(base1[k]), np.asarray(final0[k]), err_msg=k)
    # the model block the next stage would load it with (stage_config sets init_from the same way)
    next_model = dataclasses.replace(stage_config(spec, 1, str(tok)).model,
                                     init_from=str(handoff_dir(spec, 1).absolute()))
    start2 = flat_paths(init_params(next_model))
    merged1 = flat_paths(merge(run1.params))
    assert set(start2) == set(merged1)
    for k in merged1:
        np.testing.assert_array_equal(np.asarray(start2[k]), np.asarray(merged1[k]), err_msg=k)
    assert any(np.abs(np.asarray(merged1[k]) - np.asarray(base1[k])).max() > 0 for k in merged1)  # LoRA did train


def test_one_lora_stage_fills_its_matrix_and_hands_off_the_merged_weights(data, tmp_path):
    """Default-suite cover of the slow 3-stage kill/resume test (the chain itself): one LoRA SFT
    stage of one step through the real runner: every cell, the reports, and a handoff that loads
    (as the next stage's `model.init_from` would) to exactly the stage's weights, LoRA merged."""
    from jaxlearn.models.presets import init_params
    from jaxlearn.peft.filter import flat_paths
    from jaxlearn.peft.merge import merge
    from jaxlearn.pipeline.runner import run_pipeline
    from jaxlearn.pipeline.spec import handoff_dir, load_pipeline, stage_config, stage_dir
    from jaxlearn.run import open_run

    d, tok = data
    out = tmp_path / "p"
    f = _pipeline_file(d, tok, out, tmp_path / "p.yaml", n_stages=1, steps=1, s0={"name": "sft", "data": {
        "source": "jsonl", "format": "chat", "paths": [str(d / "sums.jsonl")], "eval_fraction": 0.3},
        "peft": {"type": "lora", "rank": 2, "alpha": 4.0}, "optim": {"lr": 1e-2}})
    spec = load_pipeline(f)
    report = run_pipeline(spec, echo=lambda _m: None)
    assert report["stages"] == ["sft"] and len(report["matrix"]) == 1
    assert len(report["matrix"][0]) == 1 and np.isfinite(report["matrix"][0][0])
    assert [h["merged"] for h in report["handoff"]] == ["lora"]
    for name in ("pipeline.json", "pipeline.md", "pipeline.png", "pipeline_metrics.png", "row_00.json"):
        assert (out / name).is_file()
    run = open_run(stage_dir(spec, 0))
    merged = flat_paths(merge(run.params))
    start_next = flat_paths(init_params(dataclasses.replace(stage_config(spec, 0, str(tok)).model,
                                                            init_from=str(handoff_dir(spec, 0).absolute()))))
    assert set(start_next) == set(merged)
    for k in merged:
        np.testing.assert_array_equal(np.asarray(start_next[k]), np.asarray(merged[k]), err_msg=k)


@pytest.mark.slow
def test_pipeline_runs_resumes_inside_stage_2_and_hands_off_exactly(data, tmp_path, monkeypatch):
    """The issue's tests in one 3-stage run: a kill at step 3 of stage 2 (sft) resumes there from
    its step-2 checkpoint with stage 1 reused; the matrix has every cell; the handoffs are exact."""
    import jaxlearn.pipeline.runner as runner
    from jaxlearn.pipeline.spec import handoff_dir, load_pipeline

    d, tok = data
    out = tmp_path / "p"
    spec = load_pipeline(_pipeline_file(d, tok, out, tmp_path / "p.yaml"))
    trained = []
    import jaxlearn.train.loop as loop  # run_pipeline imports `train` from it at call time

    real_train = loop.train

    def counting_train(cfg, echo=print):
        trained.append(cfg.train.run_dir)
        return real_train(cfg, echo=echo)

    monkeypatch.setattr(loop, "train", counting_train)
    log = []

    def killing_echo(msg):
        log.append(msg)
        if "stage01_sft" in str(trained[-1:]) and msg.startswith("step 3/4"):
            raise _Killed()  # after the step-2 checkpoint, before step 4's

    with pytest.raises(_Killed):
        runner.run_pipeline(spec, echo=killing_echo)
    assert [t.endswith(n) for t, n in zip(trained, ("stage00_pretrain", "stage01_sft"))] == [True, True]
    assert (handoff_dir(spec, 0) / "handoff.json").is_file() and not handoff_dir(spec, 1).exists()

    trained.clear()
    log.clear()
    report = runner.run_pipeline(load_pipeline(tmp_path / "p.yaml"), echo=log.append)
    # stage 1 (pretrain) was reused; stage 2 resumed from its checkpoint, not from step 0
    assert [t.rsplit("/", 1)[-1] for t in trained] == ["stage01_sft", "stage02_dpo"]
    assert any("resum" in m and "step 2" in m for m in log), [m for m in log if "resum" in m.lower()]
    # every cell of the matrix
    assert report["stages"] == ["pretrain", "sft", "dpo"] and len(report["matrix"]) == 3
    assert all(len(r) == len(report["columns"]) == 2 and all(np.isfinite(v) for v in r) for r in report["matrix"])
    assert report["base"] is None  # stage 1 trains from a fresh init
    for name in ("pipeline.json", "pipeline.md", "pipeline.png", "pipeline_metrics.png"):
        assert (out / name).is_file()
    assert "| after \\ on |" in (out / "pipeline.md").read_text()
    # SFT learned its task: its own column improved (lower NLL) over the pretrained model's
    assert report["matrix"][1][1] < report["matrix"][0][1]
    assert [h["merged"] for h in report["handoff"]] == ["none", "lora", "none"]

    _assert_handoffs_exact(spec, tok)
    jax.clear_caches()


def test_pipeline_errors_name_the_file_the_key_and_the_fix(data, tmp_path):
    from jaxlearn.pipeline.spec import load_pipeline

    d, tok = data
    f = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match=r"p.yaml: pipeline.stagse: unknown key; did you mean pipeline.stages"):
        load_pipeline(f, ["pipeline.stagse=[]"])
    with pytest.raises(ConfigError, match=r"p.yaml: trian: not allowed here; did you mean 'train'"):
        load_pipeline(f, ["trian.steps=3"])
    bad = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "b1.yaml", s1={"peft": {"type": "prompt"}})
    with pytest.raises(ConfigError, match=r"stages\[1\].peft.type: 'prompt' adapters are not a change of the weights"):
        load_pipeline(bad)
    bad = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "b2.yaml", s2={"model": {"init_from": "x"}})
    with pytest.raises(ConfigError, match=r"stages\[2\].model.init_from: the pipeline sets it"):
        load_pipeline(bad)
    bad = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "b3.yaml", s2={"model": {"d_ff": 128}})
    with pytest.raises(ConfigError, match=r"stages\[2\] \(dpo\): every stage trains the same model, but "
                                          r"model.d_ff=128 \(stage 0 has 64\)"):
        load_pipeline(bad)
    bad = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "b4.yaml", s0={"evals": ["antonym"]})
    with pytest.raises(ConfigError, match=r"stages\[0\].evals\[0\]: unknown eval task 'antonym'"):
        load_pipeline(bad)
    bad = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "b5.yaml", s1={"stesp": 3})
    with pytest.raises(ConfigError, match=r"stages\[1\].stesp: unknown key"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match=r"stage 0 \(pretrain\): unknown key 'train.stesp'. Did you mean 'train.steps'"):
        load_pipeline(f, ["train.stesp=3"])


def test_stage_recipes_layer_and_the_pipeline_owns_run_dir_init_and_tokenizer(data, tmp_path):
    from jaxlearn.pipeline.spec import handoff_dir, load_pipeline, stage_config

    d, tok = data
    f = _pipeline_file(d, tok, tmp_path / "x", tmp_path / "p.yaml", s1={"data": {
        "source": "jsonl", "format": "chat", "paths": [str(d / "sums.jsonl")], "tokenizer": "own.model"}})
    spec = load_pipeline(f, ["train.steps=7"])  # the command line wins over every stage's `set`
    c0, c1, c2 = (stage_config(spec, i, "inherited.model") for i in range(3))
    assert [c.train.steps for c in (c0, c1, c2)] == [7, 7, 7]
    assert c1.train.save_every == 2 and c0.train.save_every == 0  # the stage's `set` over the shared block
    assert c0.model.init_from == "" and c2.model.init_from == str(handoff_dir(spec, 1).absolute())
    assert c1.data.tokenizer == "own.model" and c2.data.tokenizer == "inherited.model"
    assert c2.train.run_dir.endswith("stage02_dpo") and c2.train.resume
    assert [c.key for c in spec.columns] == ["sums/nll_per_token", "sums_after_sft/nll_per_token"]
    assert [c.owner for c in spec.columns] == [0, 1]


def test_forgetting_summary_is_oriented():
    from jaxlearn.pipeline.report import forgetting

    # columns: accuracy (stage 0), perplexity (stage 1), a general probe (perplexity)
    m = [[0.50, 40.0, 30.0], [0.30, 20.0, 33.0], [0.40, 25.0, 36.0]]
    f = forgetting(m, [0.1, 50.0, 29.0], [0, 1, -1], [True, False, False])
    np.testing.assert_allclose(f["retained"], [-0.10, -5.0, -7.0])
    assert np.isnan(f["stage_cost"][0][0]) and np.isnan(f["stage_cost"][1][1])
    np.testing.assert_allclose(f["stage_cost"][0][2], -1.0)         # stage 0 vs the base, general probe
    np.testing.assert_allclose([f["stage_cost"][1][0], f["stage_cost"][1][2]], [-0.2, -3.0])
    np.testing.assert_allclose(f["stage_cost"][2], [0.1, -5.0, -3.0])
