"""`file:PATH.jsonl` eval tasks: generation rows scored on stubbed replies, multiple-choice
log-likelihoods against a direct forward pass of a tiny model, few-shot prompts, bad rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logits_of
from jaxlearn.data.chat import encode_prompt
from jaxlearn.data.corpora import stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.eval import file_tasks
from jaxlearn.eval.models import EvalModel, reference_nll
from jaxlearn.eval.tasks import HEADLINE, check_tasks, compare_table, run_tasks, write_report
from sft_helpers import CharChatTokenizer

TOK = CharChatTokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def quiet_run(em, names, **kw):
    return run_tasks(em, names, echo=lambda _m: None, **kw)


@pytest.fixture
def stub_replies(monkeypatch):
    """Replace generation: replies looked up by the last user message; every call is recorded."""
    calls = []

    def install(table: dict):
        def fake(em, conversations, *, max_new_tokens=16, batch_size=16):
            calls.append({"convs": [list(c) for c in conversations], "max_new_tokens": max_new_tokens})
            return [table[c[-1]["content"]] for c in conversations]

        monkeypatch.setattr(file_tasks, "generate_replies", fake)
        return calls

    return install


def test_generation_file_scores_known_replies(tmp_path, stub_replies):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris"},                      # exact + contains
        {"prompt": "Opposite of hot?", "answers": ["cold", "chilly"]},            # contains only
        {"id": "q3", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."},
                                  {"role": "user", "content": "Year of the moon landing?"}],
         "answer": "1969", "pattern": r"\b19\d\d\b"},                            # wrong answer, pattern matches
        "",                                                                        # blank lines are skipped
        {"prompt": "Pick a number.", "pattern": r"^\d+$"},                        # pattern fails
        {"prompt": "Train only?", "answer": "yes", "split": "train"},             # not scored (test split)
    ])
    calls = stub_replies({"Capital of France?": "The Paris!", "Opposite of hot?": "It is cold today.",
                          "Year of the moon landing?": "In 1968, I think.", "Pick a number.": "seven"})
    name = f"file:{path}?max_new_tokens=7"
    check_tasks([name])
    [res] = quiet_run("model", [name], limit=None, max_new_tokens=99, batch_size=4)
    m = res.metrics
    assert m == {"exact_match": 1 / 3, "contains": 2 / 3, "pattern": 0.5, "n": 4, "n_answers": 3, "n_pattern": 2}
    assert calls[0]["max_new_tokens"] == 7  # the file's option wins over --max-new-tokens
    # The multi-turn `messages` row is sent as written.
    assert [msg["content"] for msg in calls[0]["convs"][2]] == ["Say hi.", "Hi.", "Year of the moon landing?"]
    rows = {r["id"]: r for r in res.examples}
    assert set(rows) == {"line1", "line2", "q3", "line5"}
    assert rows["q3"]["line"] == 3 and rows["q3"]["pattern_match"] and not rows["q3"]["exact_match"]
    assert rows["line5"] == {"id": "line5", "line": 5, "reply": "seven", "pattern": r"^\d+$", "pattern_match": False,
                             "prompt": "Pick a number.", "shots": []}
    assert HEADLINE[name] == "exact_match" and HEADLINE.get(name) == "exact_match"

    # The usual report files, and --compare, work on a file task's name (a path with options).
    out = write_report([res], {"model": "tiny"}, tmp_path / "out", split="test", limit=None)
    summary = json.loads(out.read_text())
    assert summary["tasks"][name]["exact_match"] == pytest.approx(1 / 3)
    [examples] = (tmp_path / "out" / "examples").iterdir()
    assert examples.name.startswith("file_") and examples.name.endswith("max_new_tokens_7.jsonl")
    assert len(examples.read_text().splitlines()) == 4
    assert f"| {name} | exact_match | 0.3333 |" in compare_table([out])

    # --limit: a fixed sample by the hash of the ids.
    [small] = quiet_run("model", [name], limit=2)
    want = sorted(["line1", "line2", "q3", "line5"], key=stable_fraction)[:2]
    assert sorted(r["id"] for r in small.examples) == sorted(want)


@pytest.fixture(scope="module")
def em(tiny_model):
    model, params = tiny_model
    assert model.cfg.vocab_size == TOK.vocab_size and model.cfg.max_seq_len == 128
    return EvalModel("tiny", model, params, TOK, {"model": "tiny"})


def direct_choice_loglik(em, prompt_msgs, choices):
    """Log-likelihood of each choice's tokens (+ <|im_end|>) after the rendered prompt, by a plain
    forward pass and log_softmax: independent of the harness's masks and batching."""
    pre = encode_prompt(TOK, prompt_msgs)
    seqs = [pre + TOK.encode(c + "<|im_end|>", allow_special=True) for c in choices]
    length, rows = 128, 4  # one shape for every call: one compile
    assert len(seqs) <= rows and max(map(len, seqs)) <= length
    tokens = np.zeros((rows, length), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    segs = (np.arange(length)[None] < np.array([len(s) for s in seqs] + [0] * (rows - len(seqs)))[:, None]).astype(np.int32)
    logits = logits_of(em.model, em.params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(length), tokens.shape),
                       jnp.asarray(segs))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return [sum(logp[i, t - 1, s[t]] for t in range(len(pre), len(s))) for i, s in enumerate(seqs)]


def test_multiple_choice_loglik_equals_a_direct_computation(tmp_path, em):
    rows = [
        {"prompt": "1+1?", "choices": ["2", "two"], "label": 0, "split": "train"},
        {"prompt": "Sky?", "choices": ["blue", "green"], "label": 0, "split": "train"},
        {"prompt": "2+3?", "choices": ["5", "five", "six"], "label": 1},
        {"prompt": "Cat says?", "choices": ["meow", "woof"], "label": 0, "system": "Hi."},
        {"prompt": "Ice is?", "choices": ["cold", "hot"], "label": 1},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    name = f"file:{path}?shots=1&suffix=One+word."
    [res] = quiet_run(em, [name], limit=None, batch_size=4)
    spec, scored, shots = file_tasks.prepare(name)
    assert [r.line for r in scored] == [3, 4, 5] and all(len(s) == 1 and s[0].split == "train" for s in shots)
    want_acc, want_norm = [], []
    for out, row, shot in zip(res.examples, scored, shots):
        # The prompt: the shot (its prompt with the suffix, its labelled choice), then the row.
        prompt = file_tasks.build_conversation(row, shot, spec)
        assert prompt[-1]["content"].endswith("\nOne word.") and prompt[-2]["content"] == shot[0].reference
        direct = direct_choice_loglik(em, prompt, list(row.choices))
        # Only the last turn is scored: the shot's reply is not part of any choice's score.
        np.testing.assert_allclose(out["loglik"], direct, rtol=1e-4, atol=1e-4)
        per_char = [d / len(c) for d, c in zip(direct, row.choices)]  # acc_norm: per character of the choice
        np.testing.assert_allclose(out["loglik_per_char"], per_char, rtol=1e-4, atol=1e-4)
        assert (out["pred"], out["pred_norm"]) == (int(np.argmax(direct)), int(np.argmax(per_char)))
        want_acc.append(int(np.argmax(direct)) == row.label)
        want_norm.append(int(np.argmax(per_char)) == row.label)
    assert res.metrics == {"acc": pytest.approx(np.mean(want_acc)), "acc_norm": pytest.approx(np.mean(want_norm)), "n": 3}
    assert scored[1].system == "Hi." and file_tasks.build_conversation(scored[1], [], spec)[0]["role"] == "system"
    assert HEADLINE[name] == "acc" and HEADLINE["antonyms"] == "exact_match"

    # Without shots (one assistant turn) the choice score is minus `reference_nll`.
    convs = [[{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": c}] for c in ("5", "five")]
    got = file_tasks.choice_logliks(em, convs, batch_size=4)
    ref = reference_nll(em, convs, batch_size=4)
    np.testing.assert_allclose([g for g, _ in got], [-r for r, _ in ref], rtol=1e-5)
    assert [n for _, n in got] == [n for _, n in ref] == [2, 5]


def test_few_shot_prompts_use_train_rows_never_the_scored_row(tmp_path, stub_replies):
    train = [{"id": f"t{i}", "prompt": f"T{i}?", "answers": [f"a{i}", "other"], "split": "train"} for i in range(5)]
    train.append({"id": "tp", "prompt": "TP?", "pattern": "x", "split": "train"})  # no reference: never a shot
    rows = train + [{"id": "v1", "prompt": "V1?", "answer": "b", "split": "validation"},
                    {"id": "e1", "prompt": "E1?", "answer": "c"}, {"id": "e2", "prompt": "E2?", "answer": "d"}]
    path = write_jsonl(tmp_path / "fs.jsonl", rows)
    calls = stub_replies({f"{p}?\nBe brief.": "x" for p in ["T0", "T1", "T2", "T3", "T4", "TP", "V1", "E1", "E2"]})

    [res] = quiet_run("model", [f"file:{path}?shots=2&system=You+are+terse.&suffix=Be+brief."], limit=None)
    by_hash = sorted((r for r in train if "answers" in r), key=lambda r: stable_fraction(r["id"]))
    for conv in calls[0]["convs"]:
        assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert conv[0]["content"] == "You are terse."
        # The 2 train rows with the smallest hash of their id, each with its first answer.
        assert [m["content"] for m in conv[1:5]] == [by_hash[0]["prompt"] + "\nBe brief.", by_hash[0]["answers"][0],
                                                     by_hash[1]["prompt"] + "\nBe brief.", by_hash[1]["answers"][0]]
    assert [c[-1]["content"] for c in calls[0]["convs"]] == ["E1?\nBe brief.", "E2?\nBe brief."]  # test rows only
    assert [r["shots"] for r in res.examples] == [[by_hash[0]["id"], by_hash[1]["id"]]] * 2

    # Scoring the train split: a row is never its own shot, so the two rows hashed first get others.
    [res] = quiet_run("model", [f"file:{path}?shots=4&split=train&suffix=Be+brief."], limit=None)
    shots = {r["id"]: r["shots"] for r in res.examples}
    assert set(shots) == {"t0", "t1", "t2", "t3", "t4", "tp"}
    for rid, s in shots.items():
        assert len(s) == 4 and rid not in s and "tp" not in s
    assert shots[by_hash[0]["id"]] != shots[by_hash[-1]["id"]]
    # Too few train rows for the shots asked for: said before any model loads.
    with pytest.raises(DataError, match=r"shots=5, but the file has only 4 other train row"):
        check_tasks([f"file:{path}?shots=5&split=train"])


MC = '{"prompt": "q", "choices": ["a", "b"], "label": 0}'
QA = '{"prompt": "q", "answer": "a"}'
BAD_ROWS = {
    "invalid_json": ([QA, '{"prompt": "q", '], 2, "not valid JSON"),
    "not_an_object": (['["q", "a"]'], 1, "not an object"),
    "no_prompt": ([QA, QA, '{"answer": "a"}'], 3, 'exactly one of "prompt"'),
    "empty_prompt": (['{"prompt": "  ", "answer": "a"}'], 1, '"prompt" must be a non-empty string'),
    "no_target": (['{"prompt": "q"}'], 1, "no answer, answers, pattern or choices"),
    "label_out_of_range": ([MC, '{"prompt": "q", "choices": ["a", "b"], "label": 2}'], 2, "0 to 1"),
    "empty_choices": (['{"prompt": "q", "choices": [], "label": 0}'], 1, "non-empty list of non-empty strings"),
    "bad_regex": ([QA, '{"prompt": "q", "pattern": "(unclosed"}'], 2, "not a valid regular expression"),
    "number_answer": (['{"prompt": "q", "answer": 4}'], 1, 'write numbers as strings'),
    "mixed_kinds": ([MC, QA], 2, "separate files"),
    "duplicate_id": (['{"id": "x", "prompt": "q", "answer": "a"}', '{"id": "x", "prompt": "r", "answer": "a"}'], 2,
                     "also used on line 1"),
    "last_turn_assistant": ([('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
                              ' "answer": "a"}')], 1, "must be the user's"),
    "unknown_key": (['{"prompt": "q", "answer": "a", "sufix": "x"}'], 1, "unknown key\\(s\\) 'sufix'"),
    "bad_split": (['{"prompt": "q", "answer": "a", "split": "dev"}'], 1, "split 'dev'"),
    "empty_file": ([], 1, "no rows"),
    "blank_lines_only": (["", "  "], 1, "no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_the_file_and_line(tmp_path, case):
    lines, lineno, fragment = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=fragment) as info:
        check_tasks([f"file:{path}"])
    assert f"{path}:{lineno}: " in str(info.value)


def test_non_utf8_missing_file_and_bad_options(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(QA.encode() + b"\n" + '{"prompt": "caf\xe9", "answer": "a"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text .*save the file as UTF-8"):
        check_tasks([f"file:{path}"])
    with pytest.raises(DataError, match=rf"eval task file {tmp_path}/nope.jsonl not found"):
        check_tasks(["antonyms", f"file:{tmp_path}/nope.jsonl"])
    good = write_jsonl(tmp_path / "good.jsonl", [QA])
    for query, fragment in [("shots=two", "shots='two' is not a whole number"), ("shot=2", "unknown option 'shot'"),
                            ("split=dev", "split='dev'"), ("shots", "cannot read the options")]:
        with pytest.raises(DataError, match=fragment):
            check_tasks([f"file:{good}?{query}"])
    with pytest.raises(DataError, match="no rows in split 'validation'"):
        check_tasks([f"file:{good}?split=validation"])
    check_tasks([f"file:{good}"])  # and the good file passes
