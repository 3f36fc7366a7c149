"""General-capability probes: what a fine-tuned model should still know and do.

Two built-in eval tasks, generated from WordNet (the same files `jaxlearn/data/instruct.py`
reads; nothing is downloaded from a hub):

| task | items | how it is scored | headline |
|---|---|---|---|
| `probes:facts` | factual questions from WordNet relations: capitals (`@i` "national capital" + part holonym -> country), "X is a kind of ___" (hypernym), "X is part of ___" (part holonym), "X is a member of ___" (member holonym) | greedy reply (max 16 new tokens) contains an accepted answer (lemma names, lower-case, underscores as spaces) | `contains` (also `bare_word`: the share of one-word replies, and `contains_<relation>`) |
| `probes:format` | generic instructions with a checkable form: exactly three words, a number only, start with Yes/No, capital letters only, three items separated by commas | deterministic format checks on the greedy reply (max 24 new tokens) | `follows` (also `follows_<check>`) |

No leakage: an item is dropped when its subject or any accepted answer (whole lemmas) is a
word that any WordNet SFT training split trains on (`sft_training_words`: the antonym words and
their antonyms, the defined words). So "What is the capital of Austria?" is not a probe:
`Define 'vienna'.` -> "the capital and largest city of Austria" is an SFT training example.

`--limit N` takes N items spread evenly over the relations (checks), each the ones with the
smallest hashes of their ids, so before/after numbers compare like for like. Example::

    items = build_probe_items("facts")
    items[0].prompt          # "What is the capital of Norway? Answer with one word or name."
    score_fact("The capital of Norway is Oslo.", ("oslo",))   # {'contains': True, 'bare_word': False}
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from jaxlearn.data.corpora import fetch_wordnet, stable_fraction
from jaxlearn.data.errors import DataError
from jaxlearn.data.instruct import read_wordnet_synsets, wordnet_antonyms, wordnet_definitions
from jaxlearn.eval.scorers import contains_answer, normalize_answer

PROBES = ("facts", "format")
FACT_RELATIONS = ("capital", "kind", "part", "member")
FORMAT_CHECKS = ("three_words", "number", "yes_no", "upper", "three_items")
HEADLINE = {"facts": "contains", "format": "follows"}
# Instance hypernyms of a part holonym that make it a country (Ottawa is part of Ontario, a province).
_COUNTRY_KINDS = {"country", "state", "nation", "kingdom", "republic", "sultanate", "principality", "emirate",
                  "monarchy", "island", "commonwealth"}
_WORD = re.compile(r"[a-z]{3,}")
_SMALL = {"of", "the", "and", "de", "la", "el"}
_PUNCT_EDGES = " \t\n.,;:!?\"'`()[]*"


@dataclasses.dataclass(frozen=True)
class ProbeItem:
    """One probe question: `kind` is the relation (facts) or the format check (format)."""

    id: str
    kind: str
    prompt: str
    answers: tuple[str, ...] = ()  # accepted answers (facts), or the word a check needs (format)
    subject: tuple[str, ...] = ()  # the words the question is about (checked for leakage)

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


# --------------------------------------------------------------------------------------------
# Leakage: the words the WordNet SFT splits train on


def sft_training_words(cache_dir: str | os.PathLike | None = None) -> frozenset[str]:
    """Every word the WordNet SFT training splits train on: antonym words and their accepted
    antonyms, and defined words (lower-case, as the builders write them).

    >>> "vienna" in sft_training_words()      # doctest: +SKIP
    True
    """
    words: set[str] = set()
    for e in wordnet_antonyms(cache_dir):
        if e.meta["split"] == "train":
            words.add(e.meta["word"])
            words.update(e.answers)
    for e in wordnet_definitions(cache_dir):
        if e.meta["split"] == "train":
            words.add(e.meta["word"])
    return frozenset(words)


# --------------------------------------------------------------------------------------------
# Building the items


def _title(name: str) -> str:
    """'republic of the congo' -> 'Republic of the Congo' (WordNet's lemmas are lower-cased here)."""
    parts = name.split(" ")
    return " ".join(p if (i and p in _SMALL) else p[:1].upper() + p[1:] for i, p in enumerate(parts))


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _familiar_first_senses(root) -> dict[str, tuple[int, str]]:
    """{noun: (tagged sense count, offset of its most frequent sense)} for single nouns of 3+ letters."""
    out = {}
    with open(root / "index.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, p_cnt = fields[0], int(fields[3])
            tagged, offsets = int(fields[5 + p_cnt]), fields[6 + p_cnt:]
            if _WORD.fullmatch(lemma) and offsets:
                out[lemma] = (tagged, offsets[0])
    return out


def _clean_answers(lemmas: Sequence[str], subject: Sequence[str], banned: Sequence[str] = ()) -> tuple[str, ...]:
    """Accepted answers without those that give the answer away (they repeat the subject, e.g.
    'capital of austria' for the capital of Austria), sorted."""
    subj = [f" {s} " for s in subject]
    keep = []
    for a in lemmas:
        padded = f" {a} "
        if any(s in padded for s in subj) or any(b in padded for b in banned) or not normalize_answer(a):
            continue
        keep.append(a)
    return tuple(sorted(set(keep)))


@dataclasses.dataclass
class _WordNet:
    synsets: dict
    nouns: dict  # familiar first senses
    banned: frozenset  # SFT training words

    def noun(self, offset: str) -> dict | None:
        return self.synsets.get(("noun", offset))

    def targets(self, s: dict, symbol: str) -> list[dict]:
        return [t for sym, off, pos, _ in s["pointers"] if sym == symbol and pos == "n"
                for t in [self.noun(off)] if t is not None]

    def leaks(self, *groups: Sequence[str]) -> bool:
        return any(w in self.banned for g in groups for w in g)


def _load(cache_dir, training_words: frozenset[str] | None = None) -> _WordNet:
    root = fetch_wordnet(cache_dir, progress=None)
    banned = sft_training_words(cache_dir) if training_words is None else training_words
    return _WordNet(read_wordnet_synsets(root), _familiar_first_senses(root), banned)


def _capitals(wn: _WordNet) -> list[ProbeItem]:
    capital_kinds = [off for (pos, off), s in wn.synsets.items() if pos == "noun" and "national capital" in s["words"]]
    out = []
    for (pos, off), s in sorted(wn.synsets.items()):
        if pos != "noun" or not any(sym == "@i" and o in capital_kinds for sym, o, _, _ in s["pointers"]):
            continue
        countries = [c for c in wn.targets(s, "#p")
                     if any(_COUNTRY_KINDS & set(w.split()) for k in wn.targets(c, "@i") for w in k["words"])]
        if len(countries) != 1:  # none, or ambiguous (a city of two states)
            continue
        country = countries[0]["words"]
        answers = _clean_answers(s["words"], country, banned=("capital",))
        if not answers or wn.leaks(country, s["words"]):
            continue
        out.append(ProbeItem(f"capital/{country[0]}", "capital",
                             f"What is the capital of {_title(country[0])}? Answer with one word or name.",
                             answers, tuple(country)))
    return out


def _relation(wn: _WordNet, kind: str, symbol: str, template: str, min_tagged: int) -> list[ProbeItem]:
    """Items "<a> <x> <template> ___" for familiar nouns x (most frequent sense, tagged at least
    `min_tagged` times) whose `symbol` targets include a familiar word."""
    out = []
    for word, (tagged, off) in sorted(wn.nouns.items()):
        s = wn.noun(off)
        if tagged < min_tagged or s is None:
            continue
        targets = wn.targets(s, symbol)
        lemmas = [w for t in targets for w in t["words"]]
        # a familiar answer: a 135 M model cannot be asked for a genus name
        if not any(wn.nouns.get(w, (0,))[0] >= 1 for w in lemmas):
            continue
        answers = _clean_answers(lemmas, s["words"])
        if not answers or wn.leaks(s["words"], lemmas):
            continue
        a = _article(word)
        prompt = f"Fill in the blank with one word or name: {a[0].upper() + a[1:]} {word} {template} ___."
        out.append(ProbeItem(f"{kind}/{word}", kind, prompt, answers, tuple(s["words"])))
    return out


def _facts(wn: _WordNet) -> list[ProbeItem]:
    # Subjects need not be sense-tagged: most tagged nouns are defined in the SFT training split,
    # so only the answers are required to be familiar words.
    return (_capitals(wn) + _relation(wn, "kind", "@", "is a kind of", 0)
            + _relation(wn, "part", "#p", "is part of", 0) + _relation(wn, "member", "#m", "is a member of", 0))


def _format(wn: _WordNet) -> list[ProbeItem]:
    """Generic instructions about familiar nouns no SFT split trains on; each word gets one check
    (by a stable hash of the word), so the prompts are fixed."""
    out = []
    for word, (tagged, off) in sorted(wn.nouns.items()):
        s = wn.noun(off)
        if tagged < 1 or s is None or wn.leaks(s["words"]):
            continue
        a = _article(word)
        check = FORMAT_CHECKS[int(stable_fraction(f"format:{word}") * len(FORMAT_CHECKS))]
        if check == "three_words":
            prompt = f"Describe {a} {word} in exactly three words."
        elif check == "number":
            prompt = f"How many letters are in the word '{word}'? Reply with a number only."
        elif check == "yes_no":
            hyper = [w for t in wn.targets(s, "@") for w in t["words"] if " " not in w]
            if not hyper or wn.leaks(hyper[:1]):
                continue
            prompt = f"Is {a} {word} a kind of {hyper[0]}? Start your reply with 'Yes' or 'No'."
        elif check == "upper":
            prompt = f"Write the word '{word}' in capital letters only, nothing else."
        else:
            prompt = f"Name three things you associate with {a} {word}, separated by commas."
        out.append(ProbeItem(f"format/{word}", check, prompt, (word,), tuple(s["words"])))
    return out


def build_probes(cache_dir: str | os.PathLike | None = None, *,
                 training_words: frozenset[str] | None = None) -> dict[str, list[ProbeItem]]:
    """Every probe's items, {"facts": [...], "format": [...]}, from one read of WordNet.
    `training_words` (default: `sft_training_words()`) are the words no item may hold.

    >>> sorted(build_probes())                                    # doctest: +SKIP
    ['facts', 'format']
    """
    wn = _load(cache_dir, training_words)
    return {"facts": _facts(wn), "format": _format(wn)}


def build_probe_items(probe: str, cache_dir: str | os.PathLike | None = None) -> list[ProbeItem]:
    """All items of one probe (`facts` or `format`), in a fixed order.

    >>> {i.kind for i in build_probe_items("facts")}             # doctest: +SKIP
    {'capital', 'kind', 'part', 'member'}
    """
    if probe not in PROBES:
        raise DataError(f"unknown probe {probe!r}; available: {', '.join('probes:' + p for p in PROBES)}.")
    wn = _load(cache_dir)
    return _facts(wn) if probe == "facts" else _format(wn)


def sample_items(items: Sequence[ProbeItem], limit: int | None) -> list[ProbeItem]:
    """`limit` items spread evenly over the kinds (round robin in sorted kind order), each kind's
    in order of the hash of their ids; all items when `limit` is None/0.

    >>> its = [ProbeItem(f"{k}/{i}", k, "") for k in "ab" for i in range(3)]
    >>> sorted(i.kind for i in sample_items(its, 4))
    ['a', 'a', 'b', 'b']
    """
    by_kind: dict[str, list[ProbeItem]] = {}
    for it in sorted(items, key=lambda i: stable_fraction(i.id)):
        by_kind.setdefault(it.kind, []).append(it)
    if not limit or limit >= len(items):
        return [it for k in sorted(by_kind) for it in by_kind[k]]
    out: list[ProbeItem] = []
    depth = 0
    while len(out) < limit:
        for k in sorted(by_kind):
            if depth < len(by_kind[k]) and len(out) < limit:
                out.append(by_kind[k][depth])
        depth += 1
    return out


# --------------------------------------------------------------------------------------------
# Scoring


def reply_contains(reply: str, answers: Sequence[str]) -> bool:
    """Whether an accepted answer appears in the reply as whole words (`scorers.contains_answer`).

    >>> reply_contains("The capital of Norway is Oslo.", ["oslo"]), reply_contains("Oslofjord", ["oslo"])
    (True, False)
    """
    return contains_answer(reply, answers)


def score_fact(reply: str, answers: Sequence[str]) -> dict:
    """`contains` (an accepted answer is in the reply) and `bare_word` (the reply is one word).

    >>> score_fact("Oslo", ["oslo"])
    {'contains': True, 'bare_word': True}
    """
    return {"contains": reply_contains(reply, answers), "bare_word": len(normalize_answer(reply).split()) == 1}


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*", text)


def check_format(check: str, reply: str, word: str = "") -> bool:
    """Whether `reply` has the form instruction `check` asks for (`FORMAT_CHECKS`).

    >>> check_format("three_words", "Loyal, furry, friendly."), check_format("number", "It has 3 letters.")
    (True, False)
    """
    text = reply.strip()
    if check == "three_words":
        return len(_words(text)) == 3
    if check == "number":
        return re.fullmatch(r"\d+", text.strip(_PUNCT_EDGES)) is not None
    if check == "yes_no":
        return re.match(r"^[\W_]*(yes|no)\b", text, re.I) is not None
    if check == "upper":
        return text.strip(_PUNCT_EDGES) == word.upper()
    if check == "three_items":
        items = [i.strip() for i in text.rstrip(".").split(",")]
        return len(items) == 3 and all(items) and "\n" not in text
    raise DataError(f"unknown format check {check!r}; available: {', '.join(FORMAT_CHECKS)}.")


def score_replies(probe: str, items: Sequence[ProbeItem], replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-item rows) of a probe's replies: the headline over all items, per-kind shares.

    >>> m, _ = score_replies("facts", [ProbeItem("capital/x", "capital", "?", ("oslo",))], ["Oslo."])
    >>> m["contains"], m["bare_word"], m["contains_capital"], m["n"]
    (1.0, 1.0, 1.0, 1)
    """
    rows = []
    for it, r in zip(items, replies, strict=True):
        row: dict[str, Any] = {"id": it.id, "kind": it.kind, "prompt": it.prompt, "reply": r}
        if probe == "facts":
            row.update(answers=list(it.answers), **score_fact(r, it.answers))
        else:
            row["follows"] = check_format(it.kind, r, it.answers[0] if it.answers else "")
        rows.append(row)
    if not rows:
        raise DataError(f"probes:{probe} has no items to score.")
    head = HEADLINE[probe]
    keys = (head, "bare_word") if probe == "facts" else (head,)
    metrics: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r[head] for r in rows if r["kind"] == kind]
        metrics[f"{head}_{kind}"] = sum(sel) / len(sel)
    metrics["n"] = len(rows)
    return metrics, rows


def run_probe(em, probe: str, limit: int | None, opts: dict, items: Sequence[ProbeItem] | None = None
              ) -> tuple[dict, list[dict]]:
    """Generate greedy replies of `em` (an `EvalModel`) to a probe's sampled items and score them.

    >>> metrics, rows = run_probe(em, "facts", 40, {})                 # doctest: +SKIP
    """
    from jaxlearn.eval.models import generate_replies

    chosen = sample_items(items if items is not None else build_probe_items(probe), limit)
    replies = generate_replies(em, [it.messages for it in chosen],
                               max_new_tokens=opts.get("max_new_tokens") or (16 if probe == "facts" else 24),
                               batch_size=opts.get("batch_size", 16))
    return score_replies(probe, chosen, replies)


def probe_runner(probe: str):
    """A task runner `(em, split, limit, opts) -> (metrics, rows)` for `jaxlearn.eval.tasks`. The
    items do not depend on the split: no probe item is in any SFT training split.

    >>> probe_runner("facts")(em, "test", 8, {})[0]["n"]                # doctest: +SKIP
    8
    """
    def run(em, split: str, limit: int | None, opts: dict) -> tuple[dict, list[dict]]:
        return run_probe(em, probe, limit, opts)

    return run
