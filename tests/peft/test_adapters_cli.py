"""`jaxlearn adapters list|show|merge|export` on a LoRA run trained through the CLI; the merged
model and the PEFT export both reproduce the run's own logits in transformers/peft."""

import json
import os

import jax.numpy as jnp
import numpy as np

from cli_runner import REPO, TINY, run_cli

RECIPE = REPO / "configs" / "pretrain_shakespeare.yaml"


def test_lora_run_then_adapters_commands(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers

    from jaxlearn.run import open_run

    run_dir = tmp_path / "lora"
    r = run_cli("train", RECIPE, *TINY, "model.tie_embeddings=false", "peft.type=lora", "peft.rank=4",
                "optim.lr=0.02", f"train.run_dir={run_dir}", "train.steps=6", "train.eval_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adapter saved:" in r.stdout

    ls = run_cli("adapters", "list", run_dir)
    assert ls.returncode == 0 and "| v1 | lora | 4 | 6 |" in ls.stdout, ls.stdout + ls.stderr
    show = run_cli("adapters", "show", run_dir / "adapters")
    meta = json.loads(show.stdout)
    assert meta["method"] == "lora" and "layers/mlp/down" in meta["targets"] and "recipe" not in meta

    merged_dir, export_dir = tmp_path / "merged", tmp_path / "export"
    m = run_cli("adapters", "merge", run_dir, "--out", merged_dir)
    assert m.returncode == 0, m.stderr[-2000:]
    e = run_cli("adapters", "export", run_dir, "--out", export_dir)
    assert e.returncode == 0, e.stderr[-2000:]

    run = open_run(run_dir)
    tokens = np.asarray([[2, 40, 41, 42, 43, 44, 45, 46]], np.int32)
    pos = jnp.arange(8)[None]
    ours = np.asarray(run.model.apply({"params": run.params}, tokens, pos, jnp.ones_like(tokens))[0])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got_merged = merged(torch.tensor(tokens)).logits.numpy()
        base = transformers.AutoModelForCausalLM.from_pretrained(export_dir / "base", dtype=torch.float32).eval()
        got_peft = peft.PeftModel.from_pretrained(base, str(export_dir / "adapter")).eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - got_merged).max() < 1e-4
    assert np.abs(ours - got_peft).max() < 1e-4


def test_prefix_run_saves_only_the_prefixes(tmp_path):
    from jaxlearn.peft.files import load_adapter, read_metadata
    from jaxlearn.peft.filter import flat_paths, unflatten_paths
    from jaxlearn.run import open_run

    run_dir = tmp_path / "prefix"
    r = run_cli("train", RECIPE, *TINY, "peft.type=prefix", "peft.num_virtual_tokens=4", "peft.prefix_hidden=32",
                "optim.lr=0.02", f"train.run_dir={run_dir}", "train.steps=4", "train.eval_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_metadata(run_dir / "adapters" / "v1")
    assert list(meta["leaves"]) == ["prefix/kv"] and meta["leaves"]["prefix/kv"]["shape"] == [2, 2, 4, 2, 16]
    run = open_run(run_dir)  # the checkpoint keeps the training-time MLP form
    base = unflatten_paths({k: v for k, v in flat_paths(run.params).items() if not k.startswith("prefix/")})
    loaded, _ = load_adapter(run_dir / "adapters", base)
    tokens = np.asarray([[2, 40, 41, 42, 43]], np.int32)
    pos, seg = jnp.arange(5)[None], jnp.ones_like(tokens)
    a = run.model.apply({"params": run.params}, tokens, pos, seg)[0]
    b = run.model.apply({"params": loaded}, tokens, pos, seg)[0]
    np.testing.assert_allclose(a, b, atol=2e-5)
