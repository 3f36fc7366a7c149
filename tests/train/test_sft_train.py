"""SFT through the ordinary training loop: a chat JSONL recipe on a tiny model, end to end."""

import json

import numpy as np
import pytest

from jaxlearn.config import load_config
from jaxlearn.data.errors import DataError
from jaxlearn.data.feed import make_feed, resolve_tokenizer
from jaxlearn.data.tokenizer import train_tokenizer
from jaxlearn.train.loop import train


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}"} for a in range(10) for b in range(6)]
    (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A SentencePiece tokenizer (no special-token parsing): chat markup is plain text to it.
    texts = [f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['response']}<|im_end|>\n"
             for r in rows]
    tok = train_tokenizer(texts * 5, d / "tok", vocab_size=320)
    return d, tok


def overrides(d, tok, run_dir):
    return [f"data.paths=[{d / 'sums.jsonl'}]", f"data.tokenizer={tok}", "data.source=jsonl", "data.format=chat",
            "data.seq_len=128", "data.batch_size=8", "data.eval_fraction=0.2", "data.tokenizer_vocab_size=320",
            "model.vocab_size=320", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
            "model.d_ff=64", "model.max_seq_len=128", "train.steps=3", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=2", "train.save_every=0", "train.progress=false", "train.async_checkpoint=false",
            "train.sample_prompts=[]", f"train.run_dir={run_dir}", "mesh.preset=dp"]


def test_chat_recipe_gives_loss_masked_packed_batches(chat_data, tmp_path):
    d, tok = chat_data
    cfg = load_config(None, overrides(d, tok, tmp_path / "run"))
    tokenizer = resolve_tokenizer(cfg.data, tmp_path / "run")
    feed = make_feed(cfg.data, tokenizer, max_eval_batches=2)
    batch = next(feed.train)
    assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    assert batch["segment_ids"].max() > 1  # packed
    # Only answers (digits and the end-of-turn text) are scored, never the question.
    scored = tokenizer.decode(batch["targets"][batch["loss_mask"] > 0].tolist())
    assert "plus" not in scored and any(c.isdigit() for c in scored)
    assert len(feed.eval_batches) >= 1


@pytest.mark.slow
def test_chat_recipe_trains_and_reports_its_data(chat_data, tmp_path):
    d, tok = chat_data
    cfg = load_config(None, overrides(d, tok, tmp_path / "run"))
    result = train(cfg, echo=lambda _m: None)
    assert np.isfinite(result.final_train_loss) and np.isfinite(result.final_eval["loss"])
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["examples"] + report["validation"]["examples"] <= 60
    assert report["train"]["kept"] == report["train"]["examples"] and report["train"]["dropped_too_long"] == 0
    # The task harness on the run: a SentencePiece chat model, generation and log-likelihood.
    from jaxlearn.cli import main

    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "run"), "--tasks", "antonyms,definitions", "--limit", "3", "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["tasks"]["antonyms"]["n"] == 3 and summary["tasks"]["definitions"]["nll_per_token"] > 0
    assert len((out / "examples" / "antonyms.jsonl").read_text().splitlines()) == 3
    assert main(["eval", str(tmp_path / "run"), "--tasks", "antonym"]) == 2  # unknown task: exit 2, no load


def test_chat_data_needs_the_models_tokenizer(chat_data, tmp_path):
    d, tok = chat_data
    cfg = load_config(None, [o for o in overrides(d, tok, tmp_path / "run") if not o.startswith("data.tokenizer=")])
    with pytest.raises(DataError, match="set data.tokenizer"):
        resolve_tokenizer(cfg.data, tmp_path / "run")
