"""Scorers: how a model's output is judged against a reference.

- `normalize_answer`: lowercase, strip punctuation, articles and extra spaces (SQuAD-style).
- `exact_match`: the normalised prediction equals any normalised accepted answer (accept-set).
- `extract_code` / `humaneval_program` / `execution_passes`: the generated function is run with
  the problem's tests in the sandbox (`jaxlearn.eval.sandbox`), pass or fail.

Log-likelihood and perplexity scorers need the model, so they live in `jaxlearn.eval.models`.
Example::

    exact_match("Unable.", ("unable",))          # True
    exact_match("The answer is unable", ("unable",))   # False: exact, not substring
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from jaxlearn.eval.sandbox import SandboxResult, run_python

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "“”‘’")
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace.

    >>> normalize_answer("  The 'Unable'! ")
    'unable'
    """
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised accepted answer.

    >>> exact_match("Unable.", ["unable", "incapable"]), exact_match("not able", ["unable"])
    (True, False)
    """
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether an accepted answer appears in the prediction as whole words (after normalisation).

    >>> contains_answer("The capital of Norway is Oslo.", ["oslo"]), contains_answer("Oslofjord", ["oslo"])
    (True, False)
    """
    words = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in words for a in answers if normalize_answer(a))


def extract_code(text: str) -> str:
    """The first fenced code block of a reply (an unclosed fence runs to the end), else the reply.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    """
    m = _FENCE.search(text)
    return m.group(1) if m else text


def humaneval_program(reply: str, prompt: str, test: str, entry_point: str) -> str:
    """The program that checks a reply: the prompt, the reply's code, the problem's `check`, and
    `check(entry_point)`.

    A reply that only continues the body is appended to the prompt directly. A reply holding
    the whole function comes after the prompt's stub (completed with `pass`), so the prompt's
    imports and helper functions are defined and the reply's definition replaces the stub.

    >>> "check(add)" in humaneval_program("def add(a, b):\\n    return a + b\\n", "def add(a, b):\\n", "", "add")
    True
    """
    code = extract_code(reply)
    if not prompt.strip():
        pass  # nothing to put before the reply
    elif re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        code = f"{prompt.rstrip()}\n    pass\n\n\n{code}"  # `pass` keeps a stub without a docstring valid
    else:
        code = prompt + code  # a completion of the body only
    return f"{code}\n\n{test}\n\ncheck({entry_point})\n"


def execution_passes(reply: str, prompt: str, test: str, entry_point: str, *, timeout: float = 10.0,
                     memory_mb: int = 512) -> SandboxResult:
    """Run a HumanEval reply against its tests in the sandbox; `.ok` means every assert passed.

    >>> execution_passes("def add(a, b):\\n    return a + b", "", "def check(f):\\n    assert f(1, 2) == 3", "add").ok
    True
    """
    return run_python(humaneval_program(reply, prompt, test, entry_point), timeout=timeout, memory_mb=memory_mb)
