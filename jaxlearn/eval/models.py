"""The model under evaluation, and the model-based scorers: generation, log-likelihood, perplexity.

`load_eval_model` opens a pretrained model (preset, .gguf, HF directory) or a run directory,
optionally puts a saved adapter on it, or strips the adapters off (`no_adapters`: the base
model exactly, for measuring forgetting against the same weights). Example::

    em = load_eval_model("smollm2-135m-instruct", adapter="runs/sft/adapters/v1")
    generate_replies(em, [[{"role": "user", "content": "Give an antonym of 'hot'."}]])   # ['cold']
    nll, n = reference_nll(em, [messages])[0]              # summed over the answer's tokens
    corpus_perplexity(em, "brown", max_batches=2)["perplexity"]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.data.batching import TOKEN_FEATURES
from jaxlearn.data.chat import END_OF_TURN, encode_prompt, stop_ids
from jaxlearn.data.sft import chat_tokenizer, encode_example
from jaxlearn.models.generate import SamplingConfig, generate
from jaxlearn.objectives.forward import masked_sum, token_logprobs
from jaxlearn.peft.merge import without_adapters


@dataclasses.dataclass
class EvalModel:
    """A model, its parameters and tokenizer, and how they were obtained (for the report)."""

    name: str
    model: Any  # Transformer
    params: Any
    tokenizer: Any
    description: dict  # model spec, adapter, adapters disabled, weights note

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len


def load_eval_model(spec: str, *, adapter: str | None = None, no_adapters: bool = False) -> EvalModel:
    """A run directory (latest checkpoint) or a pretrained model, plus an optional adapter.

    With `adapter`, the base is built with the adapter's training recipe's model block (so the
    parameter layout and the base fingerprint match) and the adapter is loaded beside it.
    `no_adapters` evaluates the base alone. Trained non-adapter weights (`peft.trainable`
    extras such as a norm) are part of a run's parameters and are not removed by it.

    >>> em = load_eval_model("smollm2-135m-instruct")               # doctest: +SKIP
    >>> em.description["weights"]                                   # doctest: +SKIP
    '4-bit-quantized weights (GGUF Q4_1), dequantized'
    """
    from jaxlearn.config import ModelConfig, config_from_dict
    from jaxlearn.models.presets import PRESETS, load_pretrained
    from jaxlearn.models.transformer import Transformer

    adapter = str(Path(adapter).absolute()) if adapter else None  # orbax wants absolute paths
    desc: dict = {"model": str(spec), "adapter": adapter, "adapters_disabled": no_adapters}
    if (Path(spec) / "config.yaml").is_file():
        from jaxlearn.run import open_run

        run = open_run(spec)
        model, params, tok = run.model, run.params, run.tokenizer
        desc["step"] = run.step
        init = run.cfg.model.init_from
        desc["weights"] = PRESETS[init].weights if init in PRESETS else "float32"
    else:
        base_cfg = ModelConfig()
        if adapter:
            from jaxlearn.peft.files import read_metadata, resolve

            recipe = read_metadata(resolve(adapter)).get("recipe") or {}
            base_cfg = config_from_dict({"model": recipe.get("model", {})}).model
        pre = load_pretrained(spec, base_cfg)
        model, params, tok = Transformer(pre.cfg), pre.params, pre.tokenizer
        desc["weights"] = PRESETS[str(spec)].weights if str(spec) in PRESETS else "as stored"
    if adapter:
        from jaxlearn.peft.files import load_adapter

        params, meta = load_adapter(adapter, without_adapters(params))
        desc["adapter_method"] = meta["method"]
    if no_adapters:
        params = without_adapters(params)
    return EvalModel(str(spec), model, params, tok, desc)


def _cut_at_end_of_turn(text: str) -> str:
    cut = min((text.find(s) for s in END_OF_TURN if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def generate_replies(em: EvalModel, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 16,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to chat prompts, batched through the KV-cache decoder.

    Prompts are sorted by length and every batch is padded to `batch_size` rows (repeating a
    prompt), so few shapes are compiled. Replies stop at the end-of-turn token (or, for
    tokenizers without one, are cut at the end-of-turn text).

    >>> generate_replies(em, [[{"role": "user", "content": "What is the capital of France?"}]])  # doctest: +SKIP
    ['The capital of France is Paris.']
    """
    tok = em.tokenizer
    ids = [encode_prompt(chat_tokenizer(tok), list(c)) for c in conversations]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_tokens=stop_ids(tok) if hasattr(tok, "special_tokens") else (tok.eos_id,),
                              pad_id=tok.pad_id)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies: list[str | None] = [None] * len(ids)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        batch = [ids[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))
        out = generate(em.model, em.params, batch, sampling)
        for i, toks in zip(idx, out.tokens):
            replies[i] = _cut_at_end_of_turn(tok.decode(toks)).strip()
    return replies


@functools.partial(jax.jit, static_argnames=("model",))
def _row_nll(model, params, batch):
    """Per-row summed next-token NLL over `loss_mask`, and the count of scored tokens."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return -masked_sum(token_logprobs(model, params, batch), mask), jnp.sum(mask, axis=-1)


def batch_nll(em: EvalModel, batches: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and token count per row, over already-built 5-key batches.

    >>> nll, n = batch_nll(em, eval_batches)              # doctest: +SKIP
    """
    sums, counts = [], []
    for b in batches:
        s, c = _row_nll(em.model, em.params, {k: jnp.asarray(v) for k, v in b.items()})
        sums.append(np.asarray(s))
        counts.append(np.asarray(c))
    return np.concatenate(sums), np.concatenate(counts)


def reference_nll(em: EvalModel, conversations: Sequence[Sequence[dict]], *, batch_size: int = 16,
                  bucket: int = 32) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of tokens) of each conversation's assistant turns given the rest.

    The tokens scored are exactly those SFT trains on (`encode_example`): each assistant
    message and its end-of-turn token. Rows are padded to a multiple of `bucket`.

    >>> reference_nll(em, [[{"role": "user", "content": "Define 'cat'."},
    ...                     {"role": "assistant", "content": "a small feline"}]])        # doctest: +SKIP
    [(14.2, 5)]
    """
    rows = []
    for c in conversations:
        row, status = encode_example(em.tokenizer, list(c), em.max_seq_len, truncation="drop")
        if row is None:
            raise ValueError(f"cannot score a conversation ({status}): {list(c)[:1]}...")
        rows.append(row)
    return rows_nll(em, rows, batch_size=batch_size, bucket=bucket)


def rows_nll(em: EvalModel, rows: Sequence[dict], *, batch_size: int = 16, bucket: int = 32) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens under the loss) of each encoded row (`inputs`, `targets`,
    `loss_mask`). Rows of similar length share a batch; lengths round up to a multiple of
    `bucket` (few shapes compile) but never past the model's context.

    >>> rows_nll(em, [encode_example(em.tokenizer, conv, 128)[0]])       # doctest: +SKIP
    [(14.2, 5)]
    """
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["inputs"]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        longest = max(len(rows[i]["inputs"]) for i in idx)
        length = max(longest, min(-(-longest // bucket) * bucket, em.max_seq_len))
        batch = {k: np.zeros((batch_size, length), dtype) for k, dtype in TOKEN_FEATURES.items()}
        for r, i in enumerate(idx):
            n = len(rows[i]["inputs"])
            for k in ("inputs", "targets", "loss_mask"):
                batch[k][r, :n] = rows[i][k]
            batch["segment_ids"][r, :n] = 1
            batch["positions"][r, :n] = np.arange(n)
        sums, counts = batch_nll(em, [batch])
        for r, i in enumerate(idx):
            out[i] = (float(sums[r]), int(counts[r]))
    return out


def corpus_perplexity(em: EvalModel, corpus: str, *, seq_len: int = 256, batch_size: int = 8,
                      max_batches: int = 4) -> dict:
    """Held-out perplexity on a text corpus's eval split (`shakespeare`, `brown`), first
    `max_batches` packed batches (documents in a fixed order, BOS/EOS added as in pretraining).

    >>> corpus_perplexity(em, "brown", max_batches=2)      # doctest: +SKIP
    {'loss': 3.41, 'perplexity': 30.3, 'tokens': 4096}
    """
    from jaxlearn.config import DataConfig
    from jaxlearn.data.pipeline import eval_batches
    from jaxlearn.data.sources import make_source

    batches = eval_batches(make_source(DataConfig(source=corpus), "eval"), em.tokenizer, seq_len=seq_len,
                           batch_size=batch_size, max_batches=max_batches)
    sums, counts = batch_nll(em, batches)
    loss = float(sums.sum() / max(counts.sum(), 1.0))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(counts.sum())}
