"""The sequence runner on the tiny model: reports, resume after a kill, config errors, and the
memory growth of Share and ELLA over 5 tasks."""

import json

import jax
import numpy as np
import pytest

from cli_runner import REPO
from jaxlearn.config import ConfigError

TINY = REPO / "configs" / "continual_tiny.yaml"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Three small chat tasks (JSONL) and a SentencePiece tokenizer trained on them."""
    from jaxlearn.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("continual")
    makers = {"sums": lambda a, b: (f"What is {a} plus {b}?", f"{a + b}"),
              "words": lambda a, b: (f"Spell {a} then {b}.", f"{a} {b}"),
              "order": lambda a, b: (f"Which is larger, {a} or {b}?", f"{max(a, b)}")}
    texts = []
    for name, make in makers.items():
        rows = [dict(zip(("prompt", "response"), make(a, b)), id=f"{name}{a}_{b}") for a in range(8) for b in range(5)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts += [f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['response']}<|im_end|>\n"
                  for r in rows]
    tok = train_tokenizer(texts * 4, d / "tok", vocab_size=320)
    task_list = [{"name": n, "data": {"source": "jsonl", "format": "chat", "paths": [str(d / f"{n}.jsonl")],
                                      "eval_fraction": 0.3}, "eval": "chat_nll"} for n in makers]
    return tok, task_list


def _overrides(tok, task_list, out_dir, method="share"):
    return [f"data.tokenizer={tok}", "data.tokenizer_vocab_size=320", "model.vocab_size=320",
            f"continual.out_dir={out_dir}", f"continual.method={method}", f"continual.tasks={json.dumps(task_list)}"]


def test_killed_sequence_resumes_to_the_same_matrix(tasks, tmp_path):
    from jaxlearn.continual.runner import load_sequence, run_sequence

    tok, task_list = tasks
    task_list = task_list[:2]  # two tasks keep the two sequences (4 short runs) affordable on 2 cores
    quiet = lambda _m: None  # noqa: E731
    full = run_sequence(load_sequence(TINY, _overrides(tok, task_list, tmp_path / "full")), echo=quiet)
    assert len(full["matrix"]) == 2 and all(len(r) == 2 for r in full["matrix"])
    assert all(np.isfinite(v) for r in full["matrix"] for v in r)
    for name in ("continual.json", "continual.md", "continual.png"):
        assert (tmp_path / "full" / name).is_file()
    assert "| after \\ on |" in (tmp_path / "full" / "continual.md").read_text()
    # Killed after task 0's state was written, before its evaluation row; task 1 never started.
    spec = load_sequence(TINY, _overrides(tok, task_list, tmp_path / "killed"))
    assert run_sequence(spec, echo=quiet, stop_after=0) == {}
    (tmp_path / "killed" / "row_00.json").unlink()
    resumed = run_sequence(spec, echo=quiet)
    assert resumed["matrix"] == full["matrix"] and resumed["base"] == full["base"]
    assert resumed["summary"] == full["summary"]


def test_sequence_errors_name_the_file_the_key_and_the_fix(tasks, tmp_path):
    from jaxlearn.continual.runner import load_sequence

    tok, task_list = tasks
    base = _overrides(tok, task_list, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"continual_tiny.yaml: continual.method: 'elal' .*use one of"):
        load_sequence(TINY, base + ["continual.method=elal"])
    with pytest.raises(ConfigError, match=r"continual_tiny.yaml: continual.shre_k: unknown key; did you mean "
                                          r"continual.share_k"):
        load_sequence(TINY, base + ["continual.shre_k=3"])
    with pytest.raises(ConfigError, match=r"continual_tiny.yaml: peft: not allowed here"):
        load_sequence(TINY, base + ["peft.type=lora"])
    with pytest.raises(ConfigError, match=r"task 0 \(sums\): unknown key 'train.stesp'"):
        load_sequence(TINY, base + ["train.stesp=3"])


@pytest.mark.parametrize("method", ["share", "ella"])
def test_share_and_ella_grow_by_at_most_the_task_coefficients_over_5_tasks(method):
    """The stored state after each of 5 tasks (trained heads stood in for by random ones)."""
    from helpers import tiny_model_config
    from jaxlearn.config import Config, PeftConfig
    from jaxlearn.continual.state import after_task, served, state_size
    from jaxlearn.models.transformer import Transformer
    from jaxlearn.objectives.continual import CONTINUAL_TRAINABLE, ContinualConfig, ContinualObjective
    from jaxlearn.peft.filter import flat_paths

    state, sizes, coef_sizes = {}, [], []
    for t in range(5):
        cfg = ContinualConfig(method=method, rank=2, share_k=4, task=t, targets=(r"attn/q$",))
        run = Config(model=tiny_model_config(), objective=cfg, peft=PeftConfig(type="none",
                                                                               trainable=(CONTINUAL_TRAINABLE,)))
        obj = ContinualObjective(Transformer(run.model), cfg, run)
        obj.carried = state
        obj.share_basis = method == "share" and bool(state)
        heads = jax.tree.map(np.asarray, obj.init_heads(jax.random.PRNGKey(t))["continual"])
        rs = np.random.RandomState(t)
        heads = {k: v + 0.1 * rs.standard_normal(v.shape).astype(np.float32) if "basis_" not in k else v
                 for k, v in flat_paths(heads).items()}
        from jaxlearn.peft.filter import unflatten_paths

        state = after_task(cfg, obj.sites, state, unflatten_paths(heads), t)
        sizes.append(state_size(state)[0])
        coef_sizes.append(sum(v.size for k, v in heads.items() if k.endswith(("/alpha", "/beta"))))
        for seen in range(t + 1):  # every task seen so far can be served
            factors, deltas = served(cfg, obj.sites, state, seen)
            assert factors or deltas
    growth = np.diff(sizes)
    if method == "ella":
        assert np.all(growth == 0), sizes  # one W_past per matrix, whatever the number of tasks
    else:
        # per task: the task's coefficients alpha [k, r] and beta [r, k] per matrix, nothing else
        assert np.all(growth <= np.asarray(coef_sizes[1:])), (sizes, coef_sizes)
        assert np.all(growth > 0)


def test_cli_continual_reports_a_bad_sequence_in_one_paragraph(tmp_path, capsys):
    from jaxlearn.cli import main

    assert main(["continual", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
