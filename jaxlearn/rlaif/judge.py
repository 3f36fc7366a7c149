"""An AI judge: a language model compares two responses, read off its next-token A/B log-probs.

The judge is any `EvalModel` (a preset such as `smollm2-135m-instruct`, a run directory, a
Hugging Face directory). It never generates. For each comparison the rubric is rendered as one
chat user message holding the question, "Response A: ...", "Response B: ..." and an instruction
to answer with the single letter A or B; the prompt is encoded with the chat template's
generation prompt (`encode_prompt`), and the judge's log-probabilities of the tokens "A" and "B"
at the assistant turn's first position are read from one forward pass.

Letters: the token of a letter is the FIRST token of the tokenizer's encoding of the letter on
its own, which is how an assistant reply "A" is tokenized for SFT (`encode_chat` encodes each
segment on its own). With byte-level BPE (SmolLM2) and character tokenizers it is the whole
letter; a SentencePiece vocabulary may give "▁A". If a vocabulary splits a letter into several
tokens, only the first is scored (the first token decides which letter is being written);
`Judge` refuses a vocabulary whose A and B start with the same token.

Position bias: small judges prefer a position ("A") regardless of content. Every pair is judged
in both orders, (x as A, y as B) and (y as A, x as B). With P(.) normalised over the two letters,

    p_ab = P(A | x shown as A)          P(x better) in the first order
    p_ba = P(B | x shown as B)          P(x better) in the swapped order
    p    = (p_ab + p_ba) / 2            the debiased P(x better)

and the pair is position-consistent when both orders pick the same response (the judge said
"A" in one order and "B" in the other). A judge that always says A gets p = 0.5 exactly (up to
rounding) and is inconsistent on every pair. Example::

    judge = Judge(load_eval_model("smollm2-135m-instruct"), rubric=RUBRICS["antonym"])
    [v] = judge_pairs(judge, [("Give an antonym of 'hot'.", "cold", "warm")])
    v.p, v.consistent                              # e.g. 0.71, True
    agreement(judge, preference_pairs(DataConfig(source="wordnet_antonym_prefs"), "test"))[0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.data.chat import encode_prompt
from jaxlearn.data.sft import chat_tokenizer
from jaxlearn.objectives.forward import hidden_states, model_params

# The rubric is one user message; {prompt}, {a}, {b} are replaced by the question and the two
# responses as shown. Short on purpose: a 135M judge reads short instructions best, and the
# whole prompt must fit the judge's context.
GENERAL_RUBRIC = (
    "Compare two responses to the same question. The better response is helpful, correct and concise.\n\n"
    "Question: {prompt}\n\n"
    "Response A: {a}\n\n"
    "Response B: {b}\n\n"
    "Which response is better? Answer with the single letter A or B."
)
ANTONYM_RUBRIC = (
    "Two responses answer the same request for an antonym (a word with the opposite meaning).\n\n"
    "Question: {prompt}\n\n"
    "Response A: {a}\n\n"
    "Response B: {b}\n\n"
    "Which response gives a correct antonym of the word in the question? Answer with the single letter A or B."
)
RUBRICS = {"general": GENERAL_RUBRIC, "antonym": ANTONYM_RUBRIC}
PLACEHOLDERS = ("{prompt}", "{a}", "{b}")
LETTERS = ("A", "B")
# |p - 0.5| below this is a tie: p_ab + p_ba of a judge that ignores content is 1 only up to
# float rounding, and such a pair must not count as a (weak) preference either way.
TIE_EPS = 1e-6

Triple = tuple[str, str, str]  # (question, response shown as A, response shown as B)


class Scorer(Protocol):
    """What `judge_pairs` needs: log p("A"), log p("B") [N, 2] for N (question, shown A, shown B)."""

    def score(self, triples: Sequence[Triple]) -> np.ndarray: ...


def check_rubric(rubric: str) -> str:
    """`rubric` if it holds each placeholder {prompt}, {a}, {b} (once or more), else ValueError.

    >>> check_rubric("Q: {prompt} A: {a} B: {b} A or B?")[:2]
    'Q:'
    >>> check_rubric("Which is better?")
    Traceback (most recent call last):
    ...
    ValueError: a judge rubric needs the placeholders {prompt}, {a}, {b}; missing: {prompt}, {a}, {b}.
    """
    missing = [p for p in PLACEHOLDERS if p not in rubric]
    if missing:
        raise ValueError(f"a judge rubric needs the placeholders {', '.join(PLACEHOLDERS)}; missing: "
                         f"{', '.join(missing)}.")
    return rubric


def render_rubric(rubric: str, prompt: str, a: str, b: str) -> str:
    """The rubric with its placeholders filled in one pass (braces inside a response stay as
    they are, and other braces in the rubric, e.g. JSON examples, are left alone).

    >>> render_rubric("Q: {prompt}|A: {a}|B: {b}", "2+2?", "4 {b}", "5")
    'Q: 2+2?|A: 4 {b}|B: 5'
    """
    values = {"prompt": prompt, "a": a, "b": b}
    return re.sub(r"\{(prompt|a|b)\}", lambda m: values[m.group(1)], rubric)


def question_text(messages: Sequence[dict] | str) -> str:
    """What the judge is told was asked: the user message of a one-turn prompt (system messages
    are the policy's business, not the judge's), else a "Role: content" transcript.

    >>> question_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    'Hi?'
    >>> question_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
    ...                {"role": "user", "content": "Bye?"}])
    'User: Hi\\nAssistant: Hello\\nUser: Bye?'
    """
    if isinstance(messages, str):
        return messages
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


@functools.partial(jax.jit, static_argnames=("model",))
def _letter_logprobs(model, params, batch, last, letters):
    """log_softmax of the next-token logits at each row's position `last`, at the `letters` ids.

    The trunk runs over the padded rows, the LM head over one position per row only: a
    [rows, vocab] block instead of [rows, length, vocab] logits (49k-wide for SmolLM2).
    """
    h = hidden_states(model, params, batch)  # [B, T, D]
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, D]
    lg = model.apply({"params": model_params(params)}, h_last, method="logits")[:, 0]  # [B, V]
    return jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)[:, letters]


@dataclasses.dataclass
class Judge:
    """A model with a rubric, scoring A/B comparisons by next-token log-probabilities.

    `em` is an `EvalModel` (`jaxlearn.eval.models.load_eval_model`). `system` is an optional
    system message before the rubric (the chat template's default otherwise). Rows are sorted by
    length, right-padded to a multiple of `bucket` and batched `batch_size` at a time (the last
    batch filled with empty rows), so few shapes are compiled.

    >>> judge = Judge(load_eval_model("smollm2-135m-instruct"))                  # doctest: +SKIP
    >>> judge.score([("Give an antonym of 'hot'.", "cold", "warm")])              # doctest: +SKIP
    array([[-0.9, -1.6]], dtype=float32)
    """

    em: Any
    rubric: str = GENERAL_RUBRIC
    system: str | None = None
    batch_size: int = 16
    bucket: int = 32

    def __post_init__(self):
        check_rubric(self.rubric)
        ids = [chat_tokenizer(self.em.tokenizer).encode(letter) for letter in LETTERS]
        if not all(ids) or ids[0][0] == ids[1][0]:
            raise ValueError(f"the judge's tokenizer cannot tell the letters apart: 'A' -> {ids[0]}, 'B' -> {ids[1]}.")
        self.letter_ids = (ids[0][0], ids[1][0])

    def messages(self, question: str, a: str, b: str) -> list[dict]:
        """The chat messages of one comparison (the rubric as the user turn).

        >>> Judge(em, rubric="{prompt}|{a}|{b}").messages("Q", "x", "y")          # doctest: +SKIP
        [{'role': 'user', 'content': 'Q|x|y'}]
        """
        msgs = [{"role": "user", "content": render_rubric(self.rubric, question, a, b)}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + msgs

    def prompt_ids(self, question: str, a: str, b: str) -> list[int]:
        """Token ids of one comparison, ending with the assistant header (the letter comes next)."""
        return encode_prompt(chat_tokenizer(self.em.tokenizer), self.messages(question, a, b))

    def fits(self, question: str, x: str, y: str) -> bool:
        """Whether the comparison fits the judge's context in both orders."""
        limit = self.em.max_seq_len
        return len(self.prompt_ids(question, x, y)) <= limit and len(self.prompt_ids(question, y, x)) <= limit

    def score(self, triples: Sequence[Triple]) -> np.ndarray:
        """log p("A"), log p("B") under the full vocabulary [N, 2] for (question, shown A, shown B).

        >>> judge.score([("2+2?", "4", "5")]).shape                                 # doctest: +SKIP
        (1, 2)
        """
        rows = [self.prompt_ids(*t) for t in triples]
        too_long = [i for i, r in enumerate(rows) if len(r) > self.em.max_seq_len]
        if too_long:
            i = too_long[0]
            raise ValueError(f"{len(too_long)} judge prompt(s) exceed the judge's context of {self.em.max_seq_len} "
                             f"tokens (the first: {len(rows[i])} tokens, question {triples[i][0][:60]!r}); use "
                             "shorter responses or a shorter rubric (Judge.fits checks a pair).")
        out = np.zeros((len(rows), 2), np.float32)
        letters = jnp.asarray(self.letter_ids, jnp.int32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            length = -(-max(len(rows[i]) for i in idx) // self.bucket) * self.bucket
            tokens = np.zeros((self.batch_size, length), np.int32)
            seg = np.zeros((self.batch_size, length), np.int32)
            last = np.zeros(self.batch_size, np.int32)
            for r, i in enumerate(idx):
                n = len(rows[i])
                tokens[r, :n], seg[r, :n], last[r] = rows[i], 1, n - 1
            pos = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
            batch = {"inputs": jnp.asarray(tokens), "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg)}
            lp = np.asarray(_letter_logprobs(self.em.model, self.em.params, batch, jnp.asarray(last), letters))
            out[idx] = lp[:len(idx)]
        return out


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judge on one pair (x, y), both orders. Probabilities are P(x better), normalised over
    the two letters; `said_a` is which letter won in each order (a tie counts as "A")."""

    p_ab: float  # x shown as A
    p_ba: float  # x shown as B
    p: float  # debiased: (p_ab + p_ba) / 2
    consistent: bool  # both orders picked the same response
    said_a: tuple[bool, bool]  # the judge's letter was A, in the first and in the swapped order
    letter_mass: float  # mean P("A") + P("B") under the full vocabulary: how on-format the judge is

    @property
    def prefers_x(self) -> bool | None:
        """True/False when the debiased verdict prefers x/y, None for a tie."""
        return None if abs(self.p - 0.5) < TIE_EPS else self.p > 0.5

    def as_dict(self) -> dict:
        return {"p_ab": self.p_ab, "p_ba": self.p_ba, "p": self.p, "consistent": self.consistent,
                "said_a": list(self.said_a), "letter_mass": self.letter_mass}


def _p_first(lp_first: float, lp_second: float) -> float:
    """P(first letter) normalised over the two letters, stable for -inf log-probs."""
    if lp_first == lp_second:  # also both -inf
        return 0.5
    return 1.0 / (1.0 + math.exp(min(lp_second - lp_first, 700.0)))


def judge_pairs(judge: Scorer, pairs: Sequence[tuple[Sequence[dict] | str, str, str]]) -> list[Verdict]:
    """Judge (question, x, y) pairs in both orders; one `Verdict` per pair (P(x better)).

    `question` is a string or prompt messages (`question_text`). Both orders go through one
    `judge.score` call, so they share batches.

    >>> [v] = judge_pairs(judge, [("Give an antonym of 'hot'.", "cold", "warm")])  # doctest: +SKIP
    >>> v.p_ab, v.p_ba, v.p, v.consistent                                          # doctest: +SKIP
    (0.83, 0.41, 0.62, False)
    """
    triples = []
    for question, x, y in pairs:
        q = question_text(question)
        triples += [(q, x, y), (q, y, x)]
    lp = np.asarray(judge.score(triples), np.float64).reshape(len(pairs), 2, 2)
    out = []
    for (la1, lb1), (la2, lb2) in lp:
        p_ab = _p_first(la1, lb1)  # x is A in the first order
        p_ba = _p_first(lb2, la2)  # x is B in the swapped order
        said_a = (bool(la1 >= lb1), bool(la2 >= lb2))
        mass = (math.exp(la1) + math.exp(lb1) + math.exp(la2) + math.exp(lb2)) / 2
        # Consistent = the same response won twice = different letters in the two orders.
        out.append(Verdict(p_ab, p_ba, (p_ab + p_ba) / 2, said_a[0] != said_a[1], said_a, mass))
    return out


def agreement(judge: Scorer, pairs: Sequence[Any]) -> tuple[dict, list[dict]]:
    """The judge against checkable labels: `pairs` are `PreferencePair`s (prompt, chosen = right,
    rejected = wrong). Returns (metrics, one row per pair).

    Each pair is judged with x = chosen: in the first order the right response is "A", in the
    swapped order it is "B". Metrics (shares in [0, 1]):

    - accuracy: the debiased verdict picks the right response (a tie counts one half)
    - accuracy_both_orders: right in both orders (position-consistent and right)
    - accuracy_right_as_a / accuracy_right_as_b: right in the first / the swapped order alone
    - position_consistency: both orders pick the same response; position_bias_rate = 1 - it
    - a_share_order1 / a_share_order2: share of "A" answers in each order (a content-blind judge
      has the same share in both; 1.0 and 1.0 is "always A")
    - accuracy_if_consistent: accuracy over the position-consistent pairs only (the labels
      `--drop-inconsistent` keeps; their share is `position_consistency`); None if there are none
    - mean_p_chosen: mean debiased P(chosen better); letter_mass: mean P("A") + P("B")

    >>> metrics, rows = agreement(judge, pairs)                                     # doctest: +SKIP
    >>> metrics["accuracy"], metrics["position_bias_rate"]                           # doctest: +SKIP
    (0.62, 0.41)
    """
    if not pairs:
        raise ValueError("agreement needs at least one pair.")
    verdicts = judge_pairs(judge, [(p.prompt, p.chosen, p.rejected) for p in pairs])
    n = len(verdicts)

    def share(flags) -> float:
        return float(sum(flags)) / n

    right = [0.5 if v.prefers_x is None else float(v.prefers_x) for v in verdicts]
    consistent = [v for v in verdicts if v.consistent]
    metrics = {
        "n": n,
        "accuracy": sum(right) / n,
        "accuracy_both_orders": share(v.said_a[0] and not v.said_a[1] for v in verdicts),
        "accuracy_right_as_a": share(v.said_a[0] for v in verdicts),
        "accuracy_right_as_b": share(not v.said_a[1] for v in verdicts),
        "position_consistency": share(v.consistent for v in verdicts),
        "position_bias_rate": share(not v.consistent for v in verdicts),
        "a_share_order1": share(v.said_a[0] for v in verdicts),
        "a_share_order2": share(v.said_a[1] for v in verdicts),
        # Consistent pairs are never ties (their two orders disagree in letter, so p != 0.5).
        "accuracy_if_consistent": (sum(v.p > 0.5 for v in consistent) / len(consistent)) if consistent else None,
        "mean_p_chosen": sum(v.p for v in verdicts) / n,
        "letter_mass": sum(v.letter_mass for v in verdicts) / n,
    }
    rows = [{"id": p.id, "prompt": question_text(p.prompt), "chosen": p.chosen, "rejected": p.rejected,
             **v.as_dict(), "right": r} for p, v, r in zip(pairs, verdicts, right)]
    return metrics, rows
