"""HumanEval preference pairs: the AST mutator (valid, different, deterministic code), equivalent
mutants never emitted (the real sandbox path), real problems re-executed independently (chosen
passes, rejected fails), splits by task id, and the cache (round-trip; a new version rebuilds)."""

import ast
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxlearn.data import code_prefs
from jaxlearn.data.code_prefs import OPERATORS, build_pairs, cache_path, cached_pairs, mutants
from jaxlearn.data.instruct import CODE_PROMPT, FRACTIONS, SPLITS, Example, humaneval_examples, split_of
from jaxlearn.eval.scorers import execution_passes

SOURCE = '''def score(xs, n):
    """Sum of the positive items among the first n, doubled; -1 when there is none."""
    total = 0
    for i in range(1, n):  # why: item 0 is a header
        if xs[i] > 0 and not xs[i - 1] == 2:
            total += xs[i] * 2
    found = True
    return total + xs[:n][-1] if found else -1
'''


def _problem(task_id: str, prompt: str, solution: str, test: str, entry: str) -> Example:
    """A hand-made problem in the shape of `humaneval_examples` (prompt and reply as that task has them)."""
    msgs = ({"role": "user", "content": CODE_PROMPT.format(prompt)},
            {"role": "assistant", "content": f"```python\n{prompt}{solution}```"})
    return Example(task_id, msgs, (), {"split": split_of(f"humaneval:{task_id}", FRACTIONS["humaneval"]),
                                       "prompt": prompt, "test": test, "entry_point": entry,
                                       "canonical_solution": solution})


def _run(reply: str, e: Example):
    return execution_passes(reply, e.meta["prompt"], e.meta["test"], e.meta["entry_point"])


def test_each_operator_gives_valid_different_code_deterministically():
    original = ast.dump(ast.parse(SOURCE))
    for op in OPERATORS:
        ms = list(mutants(SOURCE, "score", "seed-1", operators=[op]))
        assert ms, op
        assert len({m.source for m in ms}) == len(ms)  # distinct
        for m in ms:
            assert m.operator == op and m.source != SOURCE
            compile(m.source, "<mutant>", "exec")
            assert ast.dump(ast.parse(m.source)) != original
            # one node changed: every other line is kept as written (comments included)
            changed = [a for a, b in zip(SOURCE.splitlines(), m.source.splitlines()) if a != b]
            assert len(changed) == 1 and len(SOURCE.splitlines()) == len(m.source.splitlines()), m.change
            assert "# why: item 0 is a header" in m.source and '"""Sum of the positive' in m.source
    changes = {op: [m.change for m in mutants(SOURCE, "score", "seed-1", operators=[op])] for op in OPERATORS}
    assert "line 5: `if xs[i] > 0 and not xs[i - 1] == 2:` -> `if xs[i] >= 0 and not xs[i - 1] == 2:`" \
        in changes["cmp_swap"]
    assert "line 6: `total += xs[i] * 2` -> `total += xs[i] // 2`" in changes["arith_swap"]
    assert ("line 4: `for i in range(1, n):  # why: item 0 is a header` -> "
            "`for i in range(1, n + 1):  # why: item 0 is a header`") in changes["off_by_one"]
    assert "line 8: `return total + xs[:n][-1] if found else -1` -> `return total + xs[:n][-2] if found else -1`" \
        in changes["off_by_one"]
    assert "line 7: `found = True` -> `found = False`" in changes["bool_swap"]
    assert changes["return_change"] == [  # parenthesised: `not total + ... if found else -1` would be another tree
        "line 8: `return total + xs[:n][-1] if found else -1` -> `return not (total + xs[:n][-1] if found else -1)`"]
    # deterministic for a seed; another seed gives another order of the same set
    a = [m.source for m in mutants(SOURCE, "score", "seed-1")]
    assert a == [m.source for m in mutants(SOURCE, "score", "seed-1")]
    b = [m.source for m in mutants(SOURCE, "score", "seed-2")]
    assert a != b and sorted(a) == sorted(b)


def test_layout_is_kept_and_parentheses_added_only_where_precedence_needs_them():
    src = "def g(a, b, c):\n    x = (a +\n         b)  # keep\n    return a and b or c<x\n"
    got = {m.change: m.source for m in mutants(src, "g", "s")}
    assert got["line 2: `x = (a +` -> `x = (a -`"] == src.replace("a +", "a -")  # the token, in place
    assert "line 4: `return a and b or c<x` -> `return a and b or c>=x`" not in got  # `<` swaps to `<=` only
    assert "line 4: `return a and b or c<x` -> `return a and b or c<=x`" in got
    # `and` -> `or` inside `a and b or c`: `a or b or c` would be a flat `or`, another tree
    assert "line 4: `return a and b or c<x` -> `return (a or b) or c<x`" in got
    assert "line 4: `return a and b or c<x` -> `return (a and b) and c<x`" in got


def test_only_the_solution_is_mutated():
    prompt = 'def f(x):\n    """True if x < 3."""\n'
    ms = list(mutants(prompt + "    return x < 3\n", "f", "s", start=len(prompt)))
    assert ms and all(m.source.startswith(prompt) and m.line == 3 for m in ms)
    with pytest.raises(ValueError, match="no top-level function 'g'"):
        next(mutants(prompt, "g", "s"))


def test_equivalent_mutants_are_never_emitted():
    # `x > 0` -> `x >= 0` is equivalent here (both return 0 at x == 0); the only other mutants
    # (`return x` -> `return not x`, `return 0` -> `return 1`) fail.
    prompt = 'def relu(x: int) -> int:\n    """max(x, 0)."""\n'
    solution = "    if x > 0:\n        return x\n    return 0\n"
    test = "def check(f):\n    assert f(5) == 5\n    assert f(-3) == 0\n    assert f(0) == 0\n"
    problems = [_problem(f"Toy/{i}", prompt, solution, test, "relu") for i in range(4)]
    equivalent = (prompt + solution).replace("x > 0", "x >= 0")
    assert _run(f"```python\n{equivalent}```", problems[0]).ok  # it really is equivalent
    firsts = [next(mutants(prompt + solution, "relu", p.id, start=len(prompt))).source for p in problems]
    assert equivalent in firsts  # some seed tries the equivalent mutant first ...
    pairs, stats, records = build_pairs(problems)
    assert stats.pairs == 4 and stats.equivalent_mutants >= 1
    for p, rec, first in zip(pairs, records, firsts):
        assert equivalent not in p.rejected  # ... and it is skipped for one that fails
        assert rec["tried"] == 1 + (first == equivalent)
        assert not _run(p.rejected, problems[0]).ok


def test_no_failing_mutant_and_failing_canonical_are_skipped_and_counted():
    prompt = 'def one() -> int:\n    """1."""\n'
    weak = _problem("Toy/weak", prompt, "    return 1\n", "def check(f):\n    f()\n", "one")  # no test can fail
    broken = _problem("Toy/broken", prompt, "    return 2\n", "def check(f):\n    assert f() == 1\n", "one")
    pairs, stats, _ = build_pairs([weak, broken])
    assert pairs == [] and stats.problems == 2 and stats.canonical_passes == 1
    assert stats.skipped_no_failing_mutant == 1 and stats.skipped_canonical_fails == 1


REAL = ("HumanEval/0", "HumanEval/12", "HumanEval/35", "HumanEval/55")


def test_real_problems_chosen_passes_rejected_fails_when_re_executed():
    examples = [e for e in humaneval_examples() if e.id in REAL]
    pairs, stats, _ = build_pairs(examples)
    assert stats.pairs == len(REAL) == len(pairs) and stats.canonical_passes == len(REAL)
    by_id = {e.id: e for e in examples}
    for p in pairs:
        _, task, number, op = p.id.split("/")
        e = by_id[f"{task}/{number}"]
        assert p.id.startswith("humaneval-pref/HumanEval/") and op in OPERATORS
        assert list(p.prompt) == e.prompt and p.chosen == e.reference  # the HumanEval task's own format
        assert p.chosen != p.rejected and p.rejected.startswith("```python\n" + e.meta["prompt"])
        assert _run(p.chosen, e).ok
        assert not _run(p.rejected, e).ok
        assert p.split == e.meta["split"] == split_of(f"humaneval:{e.id}", FRACTIONS["humaneval"])
    ids = {s: {p.id.rsplit("/", 1)[0] for p in pairs if p.split == s} for s in SPLITS}
    assert sum(len(v) for v in ids.values()) == len(REAL) and not (ids["train"] & ids["test"])


def test_cache_round_trips_and_a_new_version_rebuilds(tmp_path, monkeypatch):
    prompt = 'def double(x: int) -> int:\n    """2x."""\n'
    problems = [_problem("Toy/d", prompt, "    return x * 2\n", "def check(f):\n    assert f(3) == 6\n", "double")]
    runs = Counter()
    real = code_prefs._execute

    def counting(reply, meta, timeout):
        runs["n"] += 1
        return real(reply, meta, timeout)

    monkeypatch.setattr(code_prefs, "_execute", counting)
    first, s1 = cached_pairs(problems, tmp_path, progress=None)
    n = runs["n"]
    assert n >= 2 and not s1.cached and cache_path(problems, tmp_path).is_file()
    again, s2 = cached_pairs(problems, tmp_path, progress=None)
    assert again == first and s2.cached and runs["n"] == n  # read back: no execution
    assert (s2.pairs, s2.operators, s2.executions) == (s1.pairs, s1.operators, s1.executions)
    other, s3 = cached_pairs(problems, tmp_path, version="test-2", progress=None)
    assert not s3.cached and runs["n"] == 2 * n and other == first  # rebuilt, to the same pairs
    assert cache_path(problems, tmp_path, version="test-2") != cache_path(problems, tmp_path)
    assert not list(tmp_path.glob("prefs/.*"))  # no temporary file left behind
    path = cache_path(problems, tmp_path)
    path.write_text(path.read_text().replace('"outcome": "pair"', '"outcome": "maybe"'))
    _, s4 = cached_pairs(problems, tmp_path, progress=None)  # a damaged file is built again
    assert not s4.cached and runs["n"] == 3 * n and cached_pairs(problems, tmp_path, progress=None)[1].cached


@pytest.mark.slow
def test_full_build_over_all_problems(tmp_path):
    examples = humaneval_examples()
    pairs, stats = cached_pairs(examples, tmp_path, progress=None)  # built afresh, not read back
    assert stats.problems == 164 and stats.canonical_passes == 164
    assert stats.pairs == len(pairs) >= 150 and set(stats.operators) == set(OPERATORS)
    task = {p.id: p.id.removeprefix("humaneval-pref/").rsplit("/", 1)[0] for p in pairs}
    assert len(set(task.values())) == len(pairs)
    by_split = {s: {task[p.id] for p in pairs if p.split == s} for s in SPLITS}
    assert not (by_split["train"] & by_split["validation"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["validation"] & by_split["test"])
    assert by_split["test"] <= {e.id for e in examples if e.meta["split"] == "test"}  # the eval task's test split
    by_id = {e.id: e for e in examples}

    def verdicts(p):
        return _run(p.chosen, by_id[task[p.id]]).ok, _run(p.rejected, by_id[task[p.id]]).ok

    with ThreadPoolExecutor(2) as pool:  # every pair re-executed, independently of the build
        assert list(pool.map(verdicts, pairs)) == [(True, False)] * len(pairs)


def test_the_source_name_serves_the_pairs(monkeypatch):
    """`data.source: humaneval_prefs` reads these pairs, a split at a time (the build itself is
    covered above; here a stand-in list keeps it fast)."""
    from jaxlearn.config import DataConfig
    from jaxlearn.data import code_prefs
    from jaxlearn.data.formats import data_format
    from jaxlearn.data.preference import PreferencePair, preference_pairs

    q = ({"role": "user", "content": "Complete this Python function."},)
    fake = [PreferencePair(f"humaneval-pref/HumanEval/{i}/cmp_swap", q, "a", "b", s)
            for i, s in enumerate(["train", "test", "train", "validation"])]
    monkeypatch.setattr(code_prefs, "humaneval_pairs", lambda cache_dir=None: fake)
    cfg = DataConfig(source="humaneval_prefs")
    assert data_format(cfg) == "preference"
    assert [p.id[-12:] for p in preference_pairs(cfg, "train")] == ["l/0/cmp_swap", "l/2/cmp_swap"]
    assert len(preference_pairs(cfg, "test")) == 1
