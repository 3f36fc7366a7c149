"""SFT data: loss masking, chat-template boundaries, truncation accounting, packing equivalence."""

import json
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logits_of
from jaxlearn.data.chat import encode_chat
from jaxlearn.data.errors import DataError
from jaxlearn.data.sft import SFTStats, encode_example, encode_examples, sft_dataset, sft_eval_batches
from jaxlearn.objectives.lm import LMConfig, LMObjective, token_cross_entropy
from sft_helpers import CharChatTokenizer

TOK = CharChatTokenizer()


def conv(prompt: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def as_batch(row: dict, length: int) -> dict:
    n = len(row["inputs"])
    b = {k: np.zeros((1, length), np.float32 if k == "loss_mask" else np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for k in ("inputs", "targets", "loss_mask"):
        b[k][0, :n] = row[k]
    b["segment_ids"][0, :n] = 1
    b["positions"][0, :n] = np.arange(n)
    return b


def test_mask_covers_exactly_the_answer_and_end_of_turn():
    row, status = encode_example(TOK, conv("Give an antonym of 'hot'.", "cold"), 128)
    assert status == "ok"
    scored = [t for t, m in zip(row["targets"], row["loss_mask"]) if m]
    assert TOK.decode(scored, skip_special=False) == "cold<|im_end|>"
    # inputs/targets are the same sequence shifted by one
    np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])


def test_multi_turn_loss_on_assistant_turns_only():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye"}]
    enc = encode_chat(TOK, msgs)
    ids, mask = np.array(enc.ids), np.array(enc.mask)
    # Exactly two contiguous masked spans, each one assistant message plus its <|im_end|>.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [TOK.decode(ids[a:b], skip_special=False) for a, b in zip(edges[::2], edges[1::2])]
    assert spans == ["Hello<|im_end|>", "Bye<|im_end|>"]
    # Role headers and the user/system text are outside the mask; the whole text round-trips.
    assert TOK.decode(ids, skip_special=False) == enc.text
    unmasked = TOK.decode(ids[mask == 0], skip_special=False)
    assert "<|im_start|>assistant\n" in unmasked and "Be brief." in unmasked and "Hello" not in unmasked


def test_prompt_tokens_do_not_change_the_loss(tiny_model):
    model, params = tiny_model
    objective = LMObjective(model, LMConfig())
    row, _ = encode_example(TOK, conv("Define 'cat'.", "a small feline"), 128)
    batch = as_batch(row, 64)
    loss, n, _ = objective(params, batch, None)
    assert float(n) == len("a small feline") + 1  # answer characters + <|im_end|>
    prompt = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
    changed = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % 128, batch["targets"]))
    assert float(objective(params, changed, None)[0]) == float(loss)
    # ...while changing an answer target does change it (the test can fail).
    answer = np.flatnonzero(batch["loss_mask"][0])[0]
    changed["targets"] = changed["targets"].copy()
    changed["targets"][0, answer] = (changed["targets"][0, answer] + 7) % 128
    assert float(objective(params, changed, None)[0]) != float(loss)
    # With train_on_prompt the prompt targets count too.
    row_all, _ = encode_example(TOK, conv("Define 'cat'.", "a small feline"), 128, train_on_prompt=True)
    assert row_all["loss_mask"].sum() == len(row_all["targets"])


def test_truncation_is_counted_and_never_cuts_the_answer():
    long_prompt = conv("x" * 200, "short")
    long_answer = conv("q", "y" * 200)
    no_answer = [{"role": "user", "content": "hello"}]
    rows, stats = encode_examples(TOK, [conv("a", "b"), long_prompt, long_answer, no_answer], 64)
    assert stats == SFTStats(examples=4, kept=2, truncated=1, dropped_too_long=1, dropped_no_target=1,
                             tokens=stats.tokens, target_tokens=stats.target_tokens)
    cut = rows[1]
    assert len(cut["inputs"]) == 64  # exactly seq_len after cutting the prompt's head
    scored = [t for t, m in zip(cut["targets"], cut["loss_mask"]) if m]
    assert TOK.decode(scored, skip_special=False) == "short<|im_end|>"
    assert stats.tokens == sum(len(r["inputs"]) for r in rows)
    assert stats.target_tokens == int(sum(r["loss_mask"].sum() for r in rows))
    # truncation="drop" keeps nothing that does not fit.
    _, dropped = encode_examples(TOK, [long_prompt], 64, truncation="drop")
    assert (dropped.kept, dropped.dropped_too_long) == (0, 1)
    with pytest.raises(DataError, match="truncation"):
        encode_examples(TOK, [long_prompt], 64, truncation="middle")


def test_packed_batch_gives_the_same_per_example_loss_as_unpacked(tiny_model):
    model, params = tiny_model
    convs = [conv(f"q{i}" * (i % 4 + 1), "answer " * (i % 3 + 1)) for i in range(9)]
    rows, _ = encode_examples(TOK, convs, 96)
    batches = sft_eval_batches(rows, seq_len=96, batch_size=4)
    # Several examples share a row (packing happened), and every example appears once.
    segs = np.concatenate([b["segment_ids"] for b in batches])
    assert segs.max() >= 2
    assert sum(len(np.unique(r[r > 0])) for r in segs) == len(rows)

    def per_token(batch):
        logits = logits_of(model, params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                           jnp.asarray(batch["segment_ids"]))
        ce, _ = token_cross_entropy(logits, jnp.asarray(batch["targets"]))
        return np.asarray(ce) * batch["loss_mask"]

    packed_losses = []
    for b in batches:
        ce = per_token(b)
        for r in range(ce.shape[0]):
            for s in range(1, b["segment_ids"][r].max() + 1):
                sel = b["segment_ids"][r] == s
                packed_losses.append((tuple(b["targets"][r][sel]), ce[r][sel].sum()))
    alone = {tuple(row["targets"]): per_token(as_batch(row, 96))[0].sum() for row in rows}
    assert len(packed_losses) == len(rows)
    for targets, loss in packed_losses:
        np.testing.assert_allclose(loss, alone[targets], rtol=2e-5, atol=2e-5)


def test_training_batches_have_the_batch_format_and_resume():
    rows, _ = encode_examples(TOK, [conv(f"p{i}", f"r{i}") for i in range(20)], 48)
    it = iter(sft_dataset(rows, seq_len=48, batch_size=4, seed=1))
    first = next(it)
    assert sorted(first) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    assert all(v.shape == (4, 48) for v in first.values())
    assert not first["loss_mask"][first["segment_ids"] == 0].any()
    next(it)
    # Through JSON, as grain's checkpoint handler stores it inside an orbax checkpoint.
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    again = iter(sft_dataset(rows, seq_len=48, batch_size=4, seed=1))
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
