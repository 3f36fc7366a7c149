"""HumanEval preference pairs whose rejected reply is a small bug, verified by execution.

For each HumanEval problem: prompt = the HumanEval SFT/eval task's instruction (the prompt and
reply format of `jaxlearn.data.instruct.humaneval_examples`), chosen = its reference reply (the
whole canonical function in a ```python block), rejected = the same reply with ONE node of the
canonical solution mutated through `ast`. Both replies are run in the sandbox exactly as the
`humaneval` eval task scores a reply (`jaxlearn.eval.scorers.execution_passes`: prompt stub,
reply, the problem's `check`, `check(entry_point)`); a pair is kept only if the chosen reply
passes and the rejected one fails. A mutant that passes (an equivalent mutant, or one the tests
cannot tell apart) is never emitted: the next one is tried.

Mutation operators (`OPERATORS`), each changing one node of the solution (never the prompt's
signature, docstring or helpers):

| operator | change |
|---|---|
| `cmp_swap` | `<` <-> `<=`, `>` <-> `>=`, `==` <-> `!=`, `in` <-> `not in`, `is` <-> `is not` |
| `arith_swap` | `+` <-> `-`, `*` <-> `//`, `/` -> `*`, `%` -> `//` (also in `+=` etc.; never on a string literal) |
| `off_by_one` | a `range()` argument, slice bound or index `n` -> `n + 1` / `n - 1` |
| `bool_swap` | `True` <-> `False`, `and` <-> `or`, `not x` -> `x` |
| `return_change` | `return X` -> `return not X`; a returned number `k` -> `k + 1`, a returned bool flipped |

Each mutant changes only the text of the mutated node (the operator token in place, or the
node's `ast.unparse` with its unchanged parts as written), so the rejected reply differs from
the chosen one by the bug alone, comments and layout kept; it is re-parsed and must give exactly
the mutated tree (`ast.dump`), so it is valid Python that does what its operator says.

Which mutant is tried first is deterministic per problem: the operators are taken round-robin
in an order seeded by the task id (`return_change`, the bluntest, always last), each operator's
sites in an order seeded the same way (why: one global order would make nearly every pair the
same kind of bug). A mutant that fails with a wrong answer (`check`'s `AssertionError`) is taken
at once; one that only crashes (e.g. a `TypeError`) is kept only if no wrong-answer mutant turns
up within `MAX_TRIES` runs (why: a plausible wrong answer is the more useful negative); one that
times out is never taken (slow, and a timeout under load is not a reliable verdict).

Splits are HumanEval's own (`humaneval:<task id>` hashed with `FRACTIONS["humaneval"]`, 0.6 /
0.1 / 0.3: the split of the SFT data and of the `humaneval` eval task), so a problem of the
eval task's test split is never a training pair. Verified results are cached as JSONL in
`<cache>/prefs/humaneval-<MUTATOR_VERSION>-<digest>.jsonl` (the digest covers the problems and
the build settings; a change of either, or of `MUTATOR_VERSION`, builds again).

Example::

    pairs, stats = humaneval_pairs_and_stats()   # ~40 s the first time (2 sandbox workers), cached after
    stats.summary()                              # '164 pairs from 164 problems (test 46, train 94, ...'
    p = pairs[0]
    p.id                                         # 'humaneval-pref/HumanEval/0/arith_swap'
    p.prompt[-1]["content"][:40]                 # 'Complete this Python function. Reply wit'
    # p.chosen:   "```python\nfrom typing import List ... distance = abs(elem - elem2) ...```"
    # p.rejected: the same text with `distance = abs(elem + elem2)`
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jaxlearn.data.corpora import cache_root, stable_fraction
from jaxlearn.data.instruct import Example, humaneval_examples
from jaxlearn.data.preference import PreferencePair
from jaxlearn.eval.scorers import execution_passes
from jaxlearn.perms import make_normal

# Bump when the mutators, their order or the acceptance rules change: cached pairs built by
# other code are then never read (the version is part of the cache file's name).
MUTATOR_VERSION = "1"
OPERATORS = ("cmp_swap", "arith_swap", "off_by_one", "bool_swap", "return_change")
MAX_TRIES = 12  # mutants executed per problem at most (each is a sandbox subprocess)
WORKERS = 2  # concurrent sandbox runs
CANONICAL_TIMEOUT = 10.0  # seconds, as the humaneval eval task's default
MUTANT_TIMEOUT = 5.0  # canonical solutions run in ~0.2 s: a mutant this slow is looping, not verified

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Div: ast.Mult,
          ast.Mod: ast.FloorDiv}
_SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
           ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
           ast.FloorDiv: "//", ast.Div: "/", ast.Mod: "%", ast.And: "and", ast.Or: "or"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One mutated program: the whole `source` with one node changed (`change` says where and how)."""

    operator: str
    source: str
    line: int  # the first changed line (1-based)
    lines: str  # "`old` -> `new`": the changed lines, stripped

    @property
    def change(self) -> str:
        return f"line {self.line}: {self.lines}"


@dataclasses.dataclass
class CodePrefStats:
    """What a build did: problems seen, canonical solutions passing, pairs built, what was skipped."""

    problems: int = 0
    canonical_passes: int = 0
    pairs: int = 0
    skipped_canonical_fails: int = 0
    skipped_no_failing_mutant: int = 0
    equivalent_mutants: int = 0  # mutants that passed the tests: tried, never emitted
    timeouts: int = 0  # mutants that ran past MUTANT_TIMEOUT: never emitted
    executions: int = 0  # sandbox runs (canonical + mutants)
    operators: Counter = dataclasses.field(default_factory=Counter)  # operator -> pairs
    failures: Counter = dataclasses.field(default_factory=Counter)  # "wrong_answer" / "crash" -> pairs
    splits: Counter = dataclasses.field(default_factory=Counter)  # split -> pairs
    seconds: float = 0.0
    cached: bool = False

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.operators.items()))
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        return (f"{self.pairs} pairs from {self.problems} problems ({splits}); {self.canonical_passes} canonical "
                f"solutions pass; skipped: {self.skipped_canonical_fails} canonical fails, "
                f"{self.skipped_no_failing_mutant} without a failing mutant; operators: {ops}; "
                f"failures: {dict(sorted(self.failures.items()))}; {self.equivalent_mutants} equivalent and "
                f"{self.timeouts} timed-out mutants discarded; {self.executions} executions in {self.seconds:.1f} s"
                + (" (cached)" if self.cached else ""))


# --------------------------------------------------------------------------------------------
# Mutation


def _paths(node: ast.AST, path: tuple = ()) -> Iterator[tuple[tuple, ast.AST]]:
    """Every node under `node` with its path of (field, index) steps, in source (pre-)order."""
    yield path, node
    for field, value in ast.iter_fields(node):
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    yield from _paths(item, path + ((field, i),))
        elif isinstance(value, ast.AST):
            yield from _paths(value, path + ((field, None),))


def _node_at(tree: ast.AST, path: tuple) -> ast.AST:
    node = tree
    for field, i in path:
        node = getattr(node, field) if i is None else getattr(node, field)[i]
    return node


def _replaced(tree: ast.AST, path: tuple, new: ast.AST) -> ast.AST:
    """A copy of `tree` with the node at `path` replaced by `new` (the original is untouched:
    CPython shares operator nodes such as `ast.Add()` between trees, so nothing is mutated in place)."""
    tree = copy.deepcopy(tree)
    parent = _node_at(tree, path[:-1])
    field, i = path[-1]
    if i is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[i] = new
    return tree


def _is_int(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _int_expr(k: int) -> ast.expr:
    # A negative literal parses as USub(k): build it that way so the round-trip check holds.
    return ast.Constant(k) if k >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-k))


def _shifted(e: ast.expr, d: int) -> ast.expr:
    """`e + d`, folded: `3` -> `4`, `-1` -> `0`, `n - 1` -> `n` / `n - 2`, `n` -> `n + 1`."""
    if _is_int(e):
        return _int_expr(e.value + d)
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub) and _is_int(e.operand):
        return _int_expr(-e.operand.value + d)
    if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub)) and _is_int(e.right):
        k = (e.right.value if isinstance(e.op, ast.Add) else -e.right.value) + d
        if k == 0:
            return e.left
        return ast.BinOp(e.left, ast.Add() if k > 0 else ast.Sub(), ast.Constant(abs(k)))
    return ast.BinOp(e, ast.Add() if d > 0 else ast.Sub(), ast.Constant(abs(d)))


def _is_text(e: ast.AST) -> bool:
    return isinstance(e, ast.JoinedStr) or (isinstance(e, ast.Constant) and isinstance(e.value, (str, bytes)))


def _sites(op: str, path: tuple, node: ast.AST) -> list[tuple[tuple, ast.AST]]:
    """The (path, replacement node) candidates of operator `op` at `node`. A replacement shares
    the original's unchanged children, and targets the smallest node that changes (an index,
    a bound, a returned value), so the rendered mutant keeps the rest of the line as written."""
    out = []
    if op == "cmp_swap" and isinstance(node, ast.Compare):
        for i, o in enumerate(node.ops):
            if type(o) in _CMP:
                ops = list(node.ops)
                ops[i] = _CMP[type(o)]()
                out.append((path, ast.Compare(node.left, ops, node.comparators)))
    elif op == "arith_swap" and isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        if not (_is_text(node.left) or _is_text(node.right)):  # "a" - "b" only crashes: a weak negative
            out.append((path, ast.BinOp(node.left, _ARITH[type(node.op)](), node.right)))
    elif op == "arith_swap" and isinstance(node, ast.AugAssign) and type(node.op) in _ARITH:
        if not _is_text(node.value):
            out.append((path, ast.AugAssign(node.target, _ARITH[type(node.op)](), node.value)))
    elif op == "off_by_one":
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            for j, arg in enumerate(node.args):
                if not isinstance(arg, ast.Starred):
                    out += [(path + (("args", j),), _shifted(arg, d)) for d in (1, -1)]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            for bound in ("lower", "upper"):
                e = getattr(node.slice, bound)
                if e is not None and not _is_text(e):
                    out += [(path + (("slice", None), (bound, None)), _shifted(e, d)) for d in (1, -1)]
        elif isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Tuple) and not _is_text(node.slice) \
                and not (isinstance(node.slice, ast.Constant) and node.slice.value is None):
            if isinstance(node.value, ast.Name) and node.value.id[:1].isupper():
                return out  # a type annotation (List[int]), not an index
            out += [(path + (("slice", None),), _shifted(node.slice, d)) for d in (1, -1)]
    elif op == "bool_swap":
        if isinstance(node, ast.Constant) and type(node.value) is bool:
            out.append((path, ast.Constant(not node.value)))
        elif isinstance(node, ast.BoolOp):
            out.append((path, ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((path, node.operand))
    elif op == "return_change" and isinstance(node, ast.Return) and node.value is not None:
        v, vpath = node.value, path + (("value", None),)
        if isinstance(v, ast.Constant) and type(v.value) is bool:
            out.append((vpath, ast.Constant(not v.value)))
        elif isinstance(v, ast.Constant) and type(v.value) in (int, float):
            out.append((vpath, ast.Constant(v.value + 1)))
        elif isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub) and _is_int(v.operand):
            out.append((vpath, _shifted(v, 1)))
        elif isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.Not):
            out.append((vpath, v.operand))
        elif not isinstance(v, ast.Constant):  # None and strings: no meaningful "not"
            out.append((vpath, ast.UnaryOp(ast.Not(), v)))
    return out


class _Source:
    """The source as UTF-8 bytes with line offsets (ast positions are byte offsets)."""

    def __init__(self, text: str):
        self.text, self.raw = text, text.encode("utf-8")
        self.starts = [0]
        for line in self.raw.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def begin(self, node: ast.AST) -> int:
        return self.starts[node.lineno - 1] + node.col_offset

    def end(self, node: ast.AST) -> int:
        return self.starts[node.end_lineno - 1] + node.end_col_offset

    def segment(self, node: ast.AST) -> str:
        return self.raw[self.begin(node):self.end(node)].decode("utf-8")

    def edited(self, edits: list[tuple[int, int, str]]) -> str:
        """The source with byte ranges [a, b) replaced (non-overlapping edits)."""
        out = self.raw
        for a, b, text in sorted(edits, reverse=True):
            out = out[:a] + text.encode("utf-8") + out[b:]
        return out.decode("utf-8")


def _word(symbol: str) -> str:
    return r"\s+".join(re.escape(w) for w in symbol.split())


def _operator_edits(src: _Source, old: ast.AST, new: ast.AST) -> list[tuple[int, int, str]] | None:
    """For an operator swap, the edits that change just the operator token(s) between the
    operands, layout and comments kept; None where the gap is not plain `( ) whitespace op`, or
    where more than the operator changed."""
    if type(old) is not type(new) or any(
            f not in ("op", "ops") and not (a is b or isinstance(a, list) and len(a) == len(b)
                                            and all(x is y for x, y in zip(a, b)))
            for (f, a), (_, b) in zip(ast.iter_fields(old), ast.iter_fields(new))):
        return None
    if isinstance(old, ast.Compare):
        gaps = [(old.left if i == 0 else old.comparators[i - 1], old.comparators[i], o, n)
                for i, (o, n) in enumerate(zip(old.ops, new.ops)) if type(o) is not type(n)]
    elif isinstance(old, ast.BinOp):
        gaps = [(old.left, old.right, old.op, new.op)]
    elif isinstance(old, ast.BoolOp):
        gaps = [(a, b, old.op, new.op) for a, b in zip(old.values, old.values[1:])]
    elif isinstance(old, ast.AugAssign):
        gaps = [(old.target, old.value, old.op, new.op)]
    else:
        return None
    edits = []
    for a, b, o, n in gaps:
        i, j = src.end(a), src.begin(b)
        gap = src.raw[i:j].decode("utf-8")
        sym = _SYMBOL[type(o)] + ("=" if isinstance(old, ast.AugAssign) else "")
        m = re.fullmatch(rf"([\s()\\]*){_word(sym)}([\s()\\]*)", gap)
        if m is None:
            return None
        new_sym = _SYMBOL[type(n)] + ("=" if isinstance(old, ast.AugAssign) else "")
        edits.append((i, j, m.group(1) + new_sym + m.group(2)))
    return edits


def _renderings(src: _Source, tree: ast.AST, old: ast.AST, new: ast.AST) -> Iterator[str]:
    """Candidate texts of the mutated source, most faithful to the original layout first:
    the operator token swapped in place; else the new node unparsed with its unchanged
    children kept as written (each bare or parenthesised); else the plain `ast.unparse`."""
    edits = _operator_edits(src, old, new)
    if edits:
        yield src.edited(edits)
    span = (src.begin(old), src.end(old))
    originals = {id(n) for n in ast.walk(tree) if isinstance(n, ast.expr)}
    if id(new) in originals:  # `not x` -> `x`: the operand, as written
        texts = [src.segment(new)]
    else:
        holes: dict[str, str] = {}

        def hole(child):
            if isinstance(child, ast.AST) and id(child) in originals:
                name = f"__jaxlearn_kept_{len(holes)}__"
                holes[name] = src.segment(child)
                return ast.Name(name, ast.Load())
            return child

        fields = {f: [hole(x) for x in v] if isinstance(v, list) else hole(v) for f, v in ast.iter_fields(new)}
        template = ast.unparse(type(new)(**fields))
        texts = []
        combos = itertools.product((False, True), repeat=len(holes)) if len(holes) <= 4 else \
            [(False,) * len(holes), (True,) * len(holes)]
        for parens in sorted(combos, key=sum):  # as few added parentheses as will do
            t = template
            for (name, seg), p in zip(holes.items(), parens):
                t = t.replace(name, f"({seg})" if p else seg)
            texts.append(t)
        texts.append(ast.unparse(new))
    for t in texts:
        yield src.edited([(*span, t)])
        yield src.edited([(*span, f"({t})")])


def _line_change(before: str, after: str) -> tuple[int, str]:
    """(first changed line, "`old lines` -> `new lines`"), the lines that differ, stripped.

    >>> _line_change("a\\nb < 1\\nc\\n", "a\\nb <= 1\\nc\\n")
    (2, '`b < 1` -> `b <= 1`')
    """
    a, b = before.splitlines(), after.splitlines()
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    s = 0
    while s < min(len(a), len(b)) - k and a[-1 - s] == b[-1 - s]:
        s += 1
    old, new = (" ".join(x.strip() for x in lines) for lines in (a[k:len(a) - s], b[k:len(b) - s]))
    return k + 1, f"`{old}` -> `{new}`"


def mutants(source: str, function: str, seed: str, *, start: int = 0,
            operators: Sequence[str] = OPERATORS) -> Iterator[Mutant]:
    """The distinct single-node mutants of function `function` in `source`, in a deterministic
    order seeded by `seed`; only nodes starting at character `start` or later are changed
    (HumanEval: the canonical solution, after the prompt).

    Each mutant is the whole `source` with only the changed node's text replaced (the operator
    token, or the node's `ast.unparse` with its unchanged parts as written), so the rest keeps
    its comments and layout and the chosen and rejected replies differ by the bug alone. The
    text is re-parsed and must give exactly the mutated tree (`ast.dump` equal; parenthesised
    where precedence needs it, else the mutant is dropped), so every mutant is valid Python
    that does what its operator says.

    >>> src = "def f(x):\\n    return x < 3  # small\\n"
    >>> [m.source.splitlines()[1] for m in mutants(src, "f", "s", operators=["cmp_swap", "off_by_one"])]
    ['    return x <= 3  # small']
    """
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise ValueError(f"unknown mutation operators {sorted(unknown)}; use some of {', '.join(OPERATORS)}.")
    tree = ast.parse(source)
    fn = next((i for i, s in enumerate(tree.body) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
               and s.name == function), None)
    if fn is None:
        raise ValueError(f"no top-level function {function!r} in the source.")
    src = _Source(source)
    first = len(source[:start].encode("utf-8"))
    by_op: dict[str, list] = {op: [] for op in operators}
    for path, node in _paths(tree.body[fn], (("body", fn),)):
        if isinstance(node, (ast.expr, ast.stmt)) and src.begin(node) >= first:
            for op in operators:
                by_op[op].extend(_sites(op, path, node))
    # Why seeded: every problem gets its own operator order and site order, so the pairs mix
    # kinds of bug; why round-robin: an operator whose sites are all equivalent costs one try each.
    # `return_change` comes last (why: nearly every function has a return, and `return not X` is
    # the bluntest bug: seeded with the others, it made 43% of the pairs).
    order = sorted(operators, key=lambda op: (op == "return_change", stable_fraction(f"{seed}:operator:{op}")))
    for op in order:
        by_op[op] = [s for _, s in sorted(enumerate(by_op[op]), key=lambda t: stable_fraction(f"{seed}:{op}:{t[0]}"))]
    original = ast.dump(tree)
    seen = {source}
    for r in range(max((len(v) for v in by_op.values()), default=0)):
        for op in order:
            if r >= len(by_op[op]):
                continue
            path, new = by_op[op][r]
            old = _node_at(tree, path)
            expected = ast.dump(_replaced(tree, path, new))
            if expected == original:
                continue
            for out in _renderings(src, tree, old, new):
                try:
                    if ast.dump(ast.parse(out)) == expected:
                        compile(out, "<mutant>", "exec")
                        break
                except (SyntaxError, ValueError):
                    pass
            else:
                continue  # no faithful rendering: drop it
            if out not in seen:
                seen.add(out)
                line, change = _line_change(source, out)
                yield Mutant(op, out, line, change)


# --------------------------------------------------------------------------------------------
# Verification by execution


def _failure(result) -> str:
    """Why a run failed: "timeout", "wrong_answer" (an assert of `check`) or "crash" (any other error)."""
    if result.status == "timeout":
        return "timeout"
    last = (result.stderr.strip().splitlines() or [""])[-1]
    return "wrong_answer" if last.startswith("AssertionError") else "crash"


def _execute(reply: str, meta: dict, timeout: float):
    """Run a reply as the `humaneval` eval task scores it (one sandbox subprocess)."""
    return execution_passes(reply, meta["prompt"], meta["test"], meta["entry_point"], timeout=timeout)


def _verify(example: Example, max_tries: int) -> dict:
    """One problem -> its cache record: the verified mutant, or why there is none."""
    meta = example.meta
    code = meta["prompt"] + meta["canonical_solution"]
    rec = {"task_id": example.id, "outcome": "no_failing_mutant", "tried": 0, "equivalent": 0, "timeouts": 0,
           "executions": 1}
    if code not in example.reference:
        raise ValueError(f"{example.id}: the reference reply does not hold prompt + canonical solution.")
    if not _execute(example.reference, meta, CANONICAL_TIMEOUT).ok:
        rec["outcome"] = "canonical_fails"
        return rec
    crash = None
    for m in mutants(code, meta["entry_point"], example.id, start=len(meta["prompt"])):
        if rec["tried"] >= max_tries:
            break
        rec["tried"] += 1
        rec["executions"] += 1
        res = _execute(example.reference.replace(code, m.source, 1), meta, MUTANT_TIMEOUT)
        kind = "equivalent" if res.ok else _failure(res)
        if kind == "equivalent":
            rec["equivalent"] += 1
        elif kind == "timeout":
            rec["timeouts"] += 1
        elif kind == "wrong_answer":
            return {**rec, **_pair_fields(m, kind)}
        elif crash is None:
            crash = m
    if crash is not None:
        return {**rec, **_pair_fields(crash, "crash")}
    return rec


def _pair_fields(m: Mutant, failure: str) -> dict:
    return {"outcome": "pair", "operator": m.operator, "mutant": m.source, "change": m.change, "failure": failure}


def _pairs_and_stats(examples: Sequence[Example], records: list[dict]) -> tuple[list[PreferencePair], CodePrefStats]:
    stats, pairs = CodePrefStats(problems=len(examples)), []
    for e, rec in zip(examples, records):
        assert rec["task_id"] == e.id
        stats.executions += rec["executions"]
        stats.equivalent_mutants += rec["equivalent"]
        stats.timeouts += rec["timeouts"]
        if rec["outcome"] == "canonical_fails":
            stats.skipped_canonical_fails += 1
            continue
        stats.canonical_passes += 1
        if rec["outcome"] != "pair":
            stats.skipped_no_failing_mutant += 1
            continue
        code = e.meta["prompt"] + e.meta["canonical_solution"]
        rejected = e.reference.replace(code, rec["mutant"], 1)  # the reference's own wrapping (```python ...```)
        split = e.meta["split"]
        pairs.append(PreferencePair(f"humaneval-pref/{e.id}/{rec['operator']}", tuple(e.prompt), e.reference,
                                    rejected, split))
        stats.pairs += 1
        stats.operators[rec["operator"]] += 1
        stats.failures[rec["failure"]] += 1
        stats.splits[split] += 1
    return pairs, stats


def build_pairs(examples: Sequence[Example], *, max_tries: int = MAX_TRIES,
                workers: int = WORKERS) -> tuple[list[PreferencePair], CodePrefStats, list[dict]]:
    """Verified pairs for HumanEval-style examples (`meta`: prompt, canonical_solution, test,
    entry_point, split), uncached: (pairs, stats, one record per example).

    >>> pairs, stats, _ = build_pairs(humaneval_examples()[:4])   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    # Threads are enough: each check is a sandbox subprocess, so the GIL is not the bottleneck.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(lambda e: _verify(e, max_tries), examples))
    pairs, stats = _pairs_and_stats(examples, records)
    stats.seconds = time.perf_counter() - t0
    return pairs, stats, records


# --------------------------------------------------------------------------------------------
# Cache


def cache_path(examples: Sequence[Example], cache_dir: str | os.PathLike | None = None, *,
               version: str = MUTATOR_VERSION, max_tries: int = MAX_TRIES) -> Path:
    """Where the verified records of `examples` are cached: the name holds the mutator version
    and a digest of the problems and build settings (why: a changed problem, mutator or
    acceptance rule must never reuse records verified under other ones)."""
    h = hashlib.sha256(json.dumps([version, max_tries, CANONICAL_TIMEOUT, MUTANT_TIMEOUT, OPERATORS] + [
        [e.id, e.meta["prompt"], e.meta["canonical_solution"], e.meta["test"], e.meta["entry_point"]]
        for e in examples]).encode("utf-8")).hexdigest()[:16]
    return cache_root(cache_dir) / "prefs" / f"humaneval-{version}-{h}.jsonl"


def _read_cache(path: Path, examples: Sequence[Example]) -> list[dict] | None:
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None  # missing or unreadable: build again
    if [r.get("task_id") if isinstance(r, dict) else None for r in records] != [e.id for e in examples]:
        return None
    fields = ("outcome", "tried", "equivalent", "timeouts", "executions")
    for r in records:  # a damaged or hand-edited file is built again, never half-trusted
        if any(k not in r for k in fields) or r["outcome"] not in ("pair", "canonical_fails", "no_failing_mutant") \
                or r["outcome"] == "pair" and not (r.get("operator") in OPERATORS and isinstance(r.get("mutant"), str)
                                                   and r.get("failure") in ("wrong_answer", "crash")):
            return None
    return records


def _write_cache(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        make_normal(tmp)  # mkstemp makes it 0600; the cache is shared like the fetched data
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)  # atomic: readers see no file or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_pairs(examples: Sequence[Example], cache_dir: str | os.PathLike | None = None, *,
                 version: str = MUTATOR_VERSION, max_tries: int = MAX_TRIES, workers: int = WORKERS,
                 progress: Callable[[str], None] | None = print) -> tuple[list[PreferencePair], CodePrefStats]:
    """`build_pairs`, read from / written to the cache (`cache_path`). Prompts and chosen replies
    are always rebuilt from `examples`; the cache holds only what execution verified.

    >>> pairs, stats = cached_pairs(humaneval_examples())         # doctest: +SKIP
    """
    path = cache_path(examples, cache_dir, version=version, max_tries=max_tries)
    t0 = time.perf_counter()
    records = _read_cache(path, examples)
    if records is not None:
        pairs, stats = _pairs_and_stats(examples, records)
        stats.cached, stats.seconds = True, time.perf_counter() - t0
        return pairs, stats
    pairs, stats, records = build_pairs(examples, max_tries=max_tries, workers=workers)
    _write_cache(path, records)
    if progress:
        progress(f"[jaxlearn] HumanEval preference pairs: {stats.summary()}; cached in {path}")
    return pairs, stats


def humaneval_pairs_and_stats(cache_dir: str | os.PathLike | None = None, *,
                              progress: Callable[[str], None] | None = print
                              ) -> tuple[list[PreferencePair], CodePrefStats]:
    """`humaneval_pairs` and the build's counts (`CodePrefStats.summary()`)."""
    return cached_pairs(humaneval_examples(cache_dir), cache_dir, progress=progress)


def humaneval_pairs(cache_dir: str | os.PathLike | None = None) -> list[PreferencePair]:
    """One pair per HumanEval problem whose canonical solution passes and some mutant fails:
    prompt = the HumanEval task's instruction, chosen = the canonical function, rejected = it
    with one verified bug; ids `humaneval-pref/<task id>/<operator>`; HumanEval's splits.

    >>> p = humaneval_pairs()[0]                                  # doctest: +SKIP
    >>> p.id, p.split                                             # doctest: +SKIP
    ('humaneval-pref/HumanEval/0/arith_swap', 'test')
    """
    return humaneval_pairs_and_stats(cache_dir)[0]
