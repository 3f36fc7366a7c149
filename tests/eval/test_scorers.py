"""Scorers: normalisation, accept-sets, code extraction and execution against HumanEval tests."""

import pytest

from jaxlearn.data.instruct import load_examples
from jaxlearn.eval.scorers import exact_match, execution_passes, extract_code, humaneval_program, normalize_answer
from jaxlearn.eval.tasks import sample, token_f1


def test_normalisation_and_accept_sets():
    assert normalize_answer("  The  'Cold'!\n") == "cold"
    assert exact_match("Cold.", ["hot", "cold"])
    assert not exact_match("not hot", ["cold"])
    assert not exact_match("The antonym of hot is cold.", ["cold"])  # exact, not substring
    assert token_f1("a small cat", "small cat") == 1.0
    assert 0 < token_f1("a small dog", "small cat") < 1


def test_extract_code():
    assert extract_code("x\n```python\ndef f():\n    return 1\n```\ny") == "def f():\n    return 1\n"
    assert extract_code("```\nprint(1)\n") == "print(1)\n"  # unclosed fence
    assert extract_code("def f(): pass") == "def f(): pass"


@pytest.fixture(scope="module")
def problems():
    return sample(load_examples("humaneval", "test"), 3)


def test_canonical_solutions_pass_and_mutations_fail(problems):
    for p in problems:
        m = p.meta
        full = execution_passes(p.reference, m["prompt"], m["test"], m["entry_point"])
        assert full.ok, full.stderr
        body_only = execution_passes(m["canonical_solution"], m["prompt"], m["test"], m["entry_point"])
        assert body_only.ok, body_only.stderr
        wrong = execution_passes(f"def {m['entry_point']}(*args, **kwargs):\n    return None\n", m["prompt"], m["test"],
                                 m["entry_point"])
        assert not wrong.ok


def test_program_layout():
    prog = humaneval_program("```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n", "T", "add")
    assert "def add(a, b):\n    return a + b\n" in prog and prog.rstrip().endswith("check(add)")
    # A whole-function reply that relies on the prompt's imports (as models write them) runs.
    prompt = 'from typing import List\n\n\ndef first(xs: List[int]) -> int:\n    """First item."""\n'
    reply = "```python\ndef first(xs: List[int]) -> int:\n    return xs[0]\n```"
    test = "def check(f):\n    assert f([3, 4]) == 3\n"
    assert execution_passes(reply, prompt, test, "first").ok
    assert not execution_passes(reply.replace("xs[0]", "xs[1]"), prompt, test, "first").ok
