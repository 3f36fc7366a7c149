"""`jaxlearn adapters list|show|merge|export` on a LoRA run trained through the CLI; the merged
model and the PEFT export both reproduce the run's own logits in transformers/peft.

The runs train in-process (tests/test_cli.py starts `jaxlearn train` in a subprocess) on the
session's Shakespeare tokenizer; `adapters list` runs in a subprocess, the other subcommands
in-process."""

import json

import jax.numpy as jnp
import numpy as np

from cli_runner import REPO, TINY, run_cli
from helpers import logits_of
from jaxlearn.cli import main

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"


def _train(run_dir, tokenizer, capsys, *overrides):
    assert main(["train", str(RECIPE), *TINY, f"data.tokenizer={tokenizer}", f"train.run_dir={run_dir}",
                 "train.eval_every=0", "train.sample_prompts=[]", "train.async_checkpoint=false", *overrides]) == 0
    return capsys.readouterr().out


def test_lora_run_then_adapters_commands(tmp_path, shakespeare_tokenizer, capsys):
    import peft
    import torch
    import transformers

    from jaxlearn.run import open_run

    run_dir = tmp_path / "lora"
    out = _train(run_dir, shakespeare_tokenizer, capsys, "model.tie_embeddings=false", "peft.type=lora",
                 "peft.rank=4", "optim.lr=0.02", "train.steps=6")
    assert "adapter saved:" in out

    ls = run_cli("adapters", "list", run_dir)  # the subprocess check of the `adapters` command
    assert ls.returncode == 0 and "| v1 | lora | 4 | 6 |" in ls.stdout, ls.stdout + ls.stderr
    assert main(["adapters", "show", str(run_dir / "adapters")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["method"] == "lora" and "layers/mlp/down" in meta["targets"] and "recipe" not in meta

    merged_dir, export_dir = tmp_path / "merged", tmp_path / "export"
    assert main(["adapters", "merge", str(run_dir), "--out", str(merged_dir)]) == 0
    assert main(["adapters", "export", str(run_dir), "--out", str(export_dir)]) == 0

    run = open_run(run_dir)
    tokens = np.asarray([[2, 40, 41, 42, 43, 44, 45, 46]], np.int32)
    pos = jnp.arange(8)[None]
    ours = np.asarray(logits_of(run.model, run.params, tokens, pos, jnp.ones_like(tokens)))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got_merged = merged(torch.tensor(tokens)).logits.numpy()
        base = transformers.AutoModelForCausalLM.from_pretrained(export_dir / "base", dtype=torch.float32).eval()
        got_peft = peft.PeftModel.from_pretrained(base, str(export_dir / "adapter")).eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - got_merged).max() < 1e-4
    assert np.abs(ours - got_peft).max() < 1e-4


def test_prefix_run_saves_only_the_prefixes(tmp_path, shakespeare_tokenizer, capsys):
    from jaxlearn.peft.files import load_adapter, read_metadata
    from jaxlearn.peft.filter import flat_paths, unflatten_paths
    from jaxlearn.run import open_run

    run_dir = tmp_path / "prefix"
    _train(run_dir, shakespeare_tokenizer, capsys, "peft.type=prefix", "peft.num_virtual_tokens=4",
           "peft.prefix_hidden=32", "optim.lr=0.02", "train.steps=4")
    meta = read_metadata(run_dir / "adapters" / "v1")
    assert list(meta["leaves"]) == ["prefix/kv"] and meta["leaves"]["prefix/kv"]["shape"] == [2, 2, 4, 2, 16]
    run = open_run(run_dir)  # the checkpoint keeps the training-time MLP form
    base = unflatten_paths({k: v for k, v in flat_paths(run.params).items() if not k.startswith("prefix/")})
    loaded, _ = load_adapter(run_dir / "adapters", base)
    tokens = np.asarray([[2, 40, 41, 42, 43]], np.int32)
    pos, seg = jnp.arange(5)[None], jnp.ones_like(tokens)
    a = logits_of(run.model, run.params, tokens, pos, seg)
    b = logits_of(run.model, loaded, tokens, pos, seg)
    assert not np.allclose(a, logits_of(run.model, base, tokens, pos, seg), atol=1e-3)  # the prefixes matter
    np.testing.assert_allclose(a, b, atol=2e-5)
