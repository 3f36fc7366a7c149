"""Unpaired KTO data (`data.format: unpaired`): single labelled replies, packed two to a row.

Records `{prompt, completion, label}` are read with errors naming file and line, packed with a
desirable example in slot 0 and an undesirable one in slot 1 while both kinds last (each slot
with its own prompt; an odd one out gets an empty slot), fed through the pairs' feed, and KTO's
loss on such a batch equals the per-example formula over the real slots. Every pairwise
objective is refused such data when it is built.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model_config

from jaxlearn.config import Config, ConfigError, DataConfig, MeshConfig, OptimConfig
from jaxlearn.data.errors import DataError
from jaxlearn.data.feed import make_feed
from jaxlearn.data.preference import UnpairedExample, encode_pairs, unpaired_examples, unpaired_pairs
from jaxlearn.data.tokenizer import Tokenizer, train_tokenizer
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.preference import DPOConfig, KTOConfig
from jaxlearn.objectives.registry import build_objective
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state

WORDS = ["hot", "cold", "up", "down", "big", "small", "fast", "slow"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("ktotok")
    texts = [f"<|im_start|>user\nGive an antonym of '{a}'.<|im_end|>\n<|im_start|>assistant\n{b}<|im_end|>\n"
             for a in WORDS for b in WORDS]
    return Tokenizer.load(train_tokenizer(texts * 3, d / "tok", vocab_size=300))


def _records(n_good: int, n_bad: int) -> list[dict]:
    pairs = list(zip(WORDS[::2], WORDS[1::2]))
    good = [{"id": f"g{i}", "prompt": f"Give an antonym of '{a}'.", "completion": b, "label": True}
            for i, (a, b) in enumerate((pairs * 20)[:n_good])]
    bad = [{"id": f"b{i}", "prompt": f"Give an antonym of '{a}'.", "completion": a, "label": "undesirable"}
           for i, (a, _) in enumerate((pairs * 20)[:n_bad])]
    return good + bad


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_records_are_read_and_bad_rows_name_file_line_and_fix(tmp_path):
    ex = unpaired_examples([_write(tmp_path / "kto.jsonl", _records(3, 2))], 0.0)
    assert [e.desirable for e in ex] == [True, True, True, False, False] and ex[0].prompt[0]["role"] == "user"
    bad = tmp_path / "bad.jsonl"
    for line, match in [('{"prompt": "a", "label": true}', r"bad.jsonl:2: an unpaired record needs .*'completion'"),
                        ('{"prompt": "a", "completion": "b", "label": "maybe"}',
                         r"bad.jsonl:2: 'label' is 'maybe'; use true"),
                        ('{"prompt": "a", "completion": "b", "label": 0.5}', r"bad.jsonl:2: 'label' is 0.5"),
                        ('{"completion": "b", "label": 1}', r"bad.jsonl:2: 'prompt' must be a non-empty string")]:
        bad.write_text('{"prompt": "a", "completion": "b", "label": 1}\n' + line + "\n")
        with pytest.raises(DataError, match=match):
            unpaired_examples([bad], 0.0)


def test_packing_puts_desirable_against_undesirable_and_keeps_each_prompt(tok):
    q = lambda w: ({"role": "user", "content": f"Give an antonym of '{w}'."},)  # noqa: E731
    ex = [UnpairedExample("g1", q("hot"), "cold", True), UnpairedExample("g2", q("up"), "down", True),
          UnpairedExample("g3", q("big"), "small", True), UnpairedExample("b1", q("fast"), "fast", False)]
    pairs = unpaired_pairs(ex)
    assert [p.labels for p in pairs] == [(1.0, 0.0), (1.0, 1.0)]
    assert [p.id for p in pairs] == ["g1+b1", "g2+g3"]
    rows, stats = encode_pairs(tok, pairs + unpaired_pairs(ex[:1]), seq_len=64)
    assert stats.kept == 3 and [r["pref_labels"].tolist() for r in rows] == [[1, 0], [1, 1], [1, -1]]
    # slot 1 is its own example: its prompt, not slot 0's
    scored = lambda r, i: tok.decode(r["inputs"][i][: int(np.argmax(r["loss_mask"][i])) + 1].tolist())  # noqa: E731
    assert "hot" in scored(rows[0], 0) and "fast" in scored(rows[0], 1) and "hot" not in scored(rows[0], 1)
    empty = rows[2]  # the odd one out: slot 1 holds nothing and scores nothing
    assert empty["loss_mask"][1].sum() == 0 and empty["inputs"][1].sum() == 0 and empty["loss_mask"][0].sum() > 0


def test_feed_serves_unpaired_rows_in_the_pairs_layout(tok, tmp_path):
    path = _write(tmp_path / "kto.jsonl", _records(30, 12))
    cfg = DataConfig(source="jsonl", format="unpaired", paths=(path,), seq_len=64, batch_size=4, eval_fraction=0.3)
    feed = make_feed(cfg, tok, max_eval_batches=4, process_index=0, process_count=1)
    batch = next(feed.train)
    assert batch["inputs"].shape == (4, 2, 64) and batch["pref_labels"].shape == (4, 2)
    assert set(np.unique(batch["pref_labels"])) <= {-1.0, 0.0, 1.0}
    assert sum(b["pair_mask"].sum() for b in feed.eval_batches) == feed.report["validation"]["kept"] > 0
    with pytest.raises(DataError, match="data.format=unpaired reads your JSONL/Parquet"):
        make_feed(dataclasses.replace(cfg, source="wordnet_antonym_prefs"), tok, process_index=0, process_count=1)


def _setup(tok, objective_cfg, data_cfg):
    cfg = Config(model=tiny_model_config(vocab_size=tok.vocab_size, max_seq_len=96), mesh=MeshConfig(preset="dp"),
                 objective=objective_cfg, data=data_cfg, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    shard = ShardingContext(make_mesh(cfg.mesh, jax.devices()[:1]), rules_for(cfg.mesh))
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, shard.mesh, shard.rules, total_steps=2, objective=objective)
    return objective, setup, build_extras(objective.extras(), shard)


def test_kto_on_unpaired_rows_equals_the_per_example_formula(tok, tmp_path):
    data = DataConfig(source="jsonl", format="unpaired", paths=(_write(tmp_path / "k.jsonl", _records(5, 2)),),
                      seq_len=64, batch_size=4, eval_fraction=0.0)
    kcfg = KTOConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    objective, setup, extras = _setup(tok, kcfg, data)
    rows, _ = encode_pairs(tok, unpaired_pairs(unpaired_examples(data.paths, 0.0)), 64)
    assert [r["pref_labels"].tolist() for r in rows] == [[1, 0], [1, 0], [1, 1], [1, -1]]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    batch["pair_mask"] = jnp.ones(4, jnp.float32)
    # a policy that differs from the reference (the frozen starting weights), so ratios are not 0
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
                          setup.state.params)
    loss, n, _ = jax.jit(lambda p, b, e: objective(p, b, None, e))(params, batch, extras.values)
    logps = jax.jit(lambda p, b: objective.sequence_logps(p, b, None)[0])
    pol = np.asarray(logps(params, batch), np.float64)
    ref = np.asarray(logps(extras.values["reference"], batch), np.float64)
    ratio, labels = pol - ref, np.asarray(batch["pref_labels"])
    assert np.abs(ratio[labels >= 0]).min() > 1e-4 and (ratio[labels < 0] == 0).all()
    z0 = max(ratio.mean(), 0.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = sum(1.0 * (1 - sig(0.5 * (r - z0))) if lab == 1 else 1.5 * (1 - sig(0.5 * (z0 - r))) if lab == 0 else 0.0
               for r, lab in zip(ratio.ravel(), labels.ravel()))
    assert float(n) == 4.0
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_pairwise_objectives_refuse_unpaired_data():
    data = DataConfig(source="jsonl", format="unpaired", paths=("x.jsonl",))
    cfg = Config(model=tiny_model_config(), objective=DPOConfig(), data=data)
    with pytest.raises(ConfigError, match="data.format=unpaired .* objective.type=dpo cannot use.*objective.type=kto"):
        build_objective(Transformer(cfg.model), cfg)
    assert build_objective(Transformer(cfg.model), dataclasses.replace(cfg, objective=KTOConfig())).reads_unpaired
    with pytest.raises(ConfigError, match="objective.reference=stored .* unpaired records carry none"):
        build_objective(Transformer(cfg.model), dataclasses.replace(cfg, objective=KTOConfig(reference="stored")))
