"""The forgetting report of a run from pretrained weights: a tiny model saved as a Hugging Face
directory is `model.init_from`; `jaxlearn train` runs the probes on it and after training."""

import json

import jax
import pytest

from cli_runner import REPO, TINY
from jaxlearn.config import ModelConfig, load_config
from jaxlearn.models.hf import save_hf
from jaxlearn.models.transformer import Transformer, init_params
from jaxlearn.train.loop import train

ARCH = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
            tie_embeddings=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = ModelConfig(**ARCH)
    out = tmp_path_factory.mktemp("base") / "hf"
    save_hf(init_params(Transformer(cfg), jax.random.key(0)), cfg, out)
    return out


def _cfg(run_dir, base_dir, tokenizer, cache, *extra):
    return load_config(REPO / "configs" / "pretrain_shakespeare.yaml", [
        *TINY, "model.max_seq_len=128", f"model.init_from={base_dir}", f"data.tokenizer={tokenizer}",
        "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
        "train.sample_prompts=[]", "train.async_checkpoint=false", "mesh.preset=dp", f"train.run_dir={run_dir}",
        "train.forgetting_limit=4", f"train.forgetting_cache={cache}", *extra])


def test_fine_tuning_run_reports_forgetting_and_reuses_the_base_cache(base_dir, shakespeare_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    said: list[str] = []
    train(_cfg(tmp_path / "a", base_dir, shakespeare_tokenizer, cache, "optim.lr=0.3"), echo=said.append)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    rep = summary["forgetting"]
    assert rep["base_cached"] is False and rep["limit"] == 4 and rep["threshold"] == 2.0
    facts, fmt = rep["probes"]["probes:facts"], rep["probes"]["probes:format"]
    assert facts["n"] == 4 and fmt["n"] == 4
    for k in ("contains", "bare_word", "contains_capital", "contains_kind", "contains_part", "contains_member"):
        assert set(facts[k]) == {"base", "after", "fell", "unit"} and 0 <= facts[k]["base"] <= 1, k
    assert 0 <= fmt["follows"]["after"] <= 1
    assert summary["final_train_loss"] is not None  # the usual summary is still there
    md = (tmp_path / "a" / "forgetting.md").read_text()
    assert "| probes:facts | contains |" in md and "| probes:format | follows |" in md
    assert (tmp_path / "a" / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = list(cache.glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["metrics"]["probes:facts"]["n"] == 4
    assert any("probes on the base" in m for m in said)
    assert any("FORGETTING" in m or "no probe fell" in m for m in said)

    # A second run from the same base: the base's numbers come from the cache, unchanged.
    said.clear()
    train(_cfg(tmp_path / "b", base_dir, shakespeare_tokenizer, cache), echo=said.append)
    rep_b = json.loads((tmp_path / "b" / "summary.json").read_text())["forgetting"]
    assert rep_b["base_cached"] is True and rep_b["base_cache"] == str(cached[0])
    assert not any("probes on the base" in m for m in said)
    for task, rows in rep["probes"].items():
        assert {k: r["base"] for k, r in rows.items() if k != "n"} == \
               {k: r["base"] for k, r in rep_b["probes"][task].items() if k != "n"}

