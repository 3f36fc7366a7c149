"""Rewards for RL from feedback: functions (prompt_text, response_text, record) -> float.

`record` is the prompt's data record as a mapping (`jaxlearn.data.prompts.PromptRecord.as_record`):
`answers` (the accept-set), and whatever else a reward reads. Rewards are computed on the host
from decoded text, between sampling and the step (`Objective.prepare`), never inside the
compiled step. Built-in terms, by name:

| name | value |
|---|---|
| `accept` | 1.0 if the normalised reply equals any normalised accepted answer (WordNet antonyms: every antonym counts) |
| `exact` | 1.0 if the normalised reply equals the FIRST accepted answer (the reference) |
| `contains` | 1.0 if an accepted answer appears in the reply as whole words (a right answer inside a sentence) |
| `format` | 1.0 if the reply is one line of at most `max_words` words (a bare short answer), else 0.0 |
| `length` | -min(1, extra / target_chars) for a reply `extra` characters longer than `target_chars` (0 up to it) |

`make_reward` composes them with weights (a recipe's `objective.rewards`). Example::

    fn = make_reward((("accept", 1.0), ("format", 0.2)))
    fn("Give an antonym of 'able'.", "unable", {"answers": ["unable"]})      # 1.2
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxlearn.eval.scorers import contains_answer, exact_match, normalize_answer

RewardFn = Callable[[str, str, Mapping[str, Any]], float]


def accept_reward(prompt: str, response: str, record: Mapping[str, Any]) -> float:
    """1.0 if the reply matches any accepted answer after normalisation (case, punctuation, articles).

    >>> accept_reward("", "Unable.", {"answers": ["incapable", "unable"]})
    1.0
    """
    return float(exact_match(response, record.get("answers", ())))


def exact_reward(prompt: str, response: str, record: Mapping[str, Any]) -> float:
    """1.0 if the reply matches the first accepted answer (the reference) after normalisation.

    >>> exact_reward("", "unable", {"answers": ["incapable", "unable"]})
    0.0
    """
    answers = record.get("answers", ())
    return float(bool(answers) and normalize_answer(response) == normalize_answer(answers[0]))


def contains_reward(prompt: str, response: str, record: Mapping[str, Any]) -> float:
    """1.0 if an accepted answer appears in the reply as whole words, after normalisation: partial
    credit for a right answer wrapped in a sentence, which `accept` scores 0 (why: a small model
    starts out answering in sentences, so `accept` alone almost never fires and gives GRPO no
    signal, and a `format` term alone teaches the format of a bare answer, not the answer).

    >>> contains_reward("", 'Antonym: "unable"', {"answers": ["unable"]}), contains_reward("", "disabled", {"answers": ["able"]})
    (1.0, 0.0)
    """
    return float(contains_answer(response, record.get("answers", ())))


def format_reward(prompt: str, response: str, record: Mapping[str, Any], max_words: int = 3) -> float:
    """1.0 for a bare short answer: one non-empty line of at most `max_words` words.

    >>> format_reward("", "unable", {}), format_reward("", "The antonym is unable.\\nHope it helps", {})
    (1.0, 0.0)
    """
    text = response.strip()
    return float(bool(text) and "\n" not in text and len(text.split()) <= max_words)


def length_reward(prompt: str, response: str, record: Mapping[str, Any], target_chars: int = 24) -> float:
    """A penalty in [-1, 0] for characters beyond `target_chars` (linear, saturating at twice it).

    >>> length_reward("", "x" * 10, {}, target_chars=20), length_reward("", "x" * 30, {}, target_chars=20)
    (0.0, -0.5)
    """
    extra = max(0, len(response.strip()) - target_chars)
    return 0.0 - min(1.0, extra / max(target_chars, 1))  # 0.0 - x: no -0.0 for a reply within budget


# name -> term. Read-only: a recipe names terms; a new term is one entry here.
REWARDS: Mapping[str, RewardFn] = types.MappingProxyType({
    "accept": accept_reward,
    "exact": exact_reward,
    "contains": contains_reward,
    "format": format_reward,
    "length": length_reward,
})


def make_reward(weights: Sequence[tuple[str, float]] | Mapping[str, float], *, max_words: int = 3,
                target_chars: int = 24) -> RewardFn:
    """sum_i w_i * term_i as one reward function; unknown names fail here (when the objective is
    built), not mid-run.

    >>> make_reward({"accept": 1.0, "length": 0.5}, target_chars=4)("", "unable", {"answers": ["unable"]})
    0.75
    """
    pairs = list(weights.items()) if isinstance(weights, Mapping) else [tuple(p) for p in weights]
    unknown = [n for n, _ in pairs if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward term(s) {unknown}; use {', '.join(REWARDS)}.")
    options = {"format": {"max_words": max_words}, "length": {"target_chars": target_chars}}
    terms = [(float(w), functools.partial(REWARDS[n], **options.get(n, {}))) for n, w in pairs]

    def reward(prompt: str, response: str, record: Mapping[str, Any]) -> float:
        return float(sum(w * fn(prompt, response, record) for w, fn in terms))

    return reward


def score_batch(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str],
                records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """float32 [B] rewards of B (prompt, response, record) triples.

    >>> score_batch(accept_reward, ["", ""], ["hot", "cold"], [{"answers": ["cold"]}] * 2).tolist()
    [0.0, 1.0]
    """
    return np.asarray([fn(p, r, rec) for p, r, rec in zip(prompts, responses, records)], np.float32)
