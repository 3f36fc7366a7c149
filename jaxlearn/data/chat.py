"""Chat templates: conversations rendered to text and token ids, for training and generation.

A template is a Jinja string, as stored in checkpoints (GGUF `tokenizer.chat_template`, Hugging
Face `tokenizer_config.json`), rendered in a sandboxed Jinja environment configured the way
`transformers` renders them (trim_blocks, lstrip_blocks, `raise_exception`, a `tojson` that
keeps non-ASCII text). `CHATML` is the plain ChatML template (SmolLM2's stored template is
ChatML plus a default system prompt). Example::

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    enc = encode_chat(tok, messages)              # training: ids + assistant mask
    enc.ids, enc.mask                             # mask is 1 on "Hello!<|im_end|>" only
    prompt = encode_prompt(tok, messages[:1])     # generation: ends with "<|im_start|>assistant\\n"

The assistant mask covers each assistant message's content and the end-of-turn token that
closes it (the model must learn to stop), and nothing else: not the role header, not the
separator after the end-of-turn token. Spans come from rendering prefixes of the conversation
(`messages[:i]` with the generation prompt, then `messages[:i+1]`), so any template works whose
rendering of a conversation starts with the rendering of its prefixes; others are rejected.
Every segment is tokenized on its own, so a prompt's tokens at training time are exactly the
tokens `encode_prompt` gives at generation time.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Sequence
from typing import Any

from jaxlearn.data.errors import DataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# End-of-turn tokens that stop generation when the vocabulary has them (besides eos).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")

Message = dict[str, Any]


class ChatTemplateError(DataError):
    """A template failed to render, or cannot mark assistant spans."""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None


class ChatTemplate:
    """A compiled chat template.

    >>> ChatTemplate(CHATML).render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self._template = _compile(source)

    @classmethod
    def for_tokenizer(cls, tok: Any, source: str | None = None) -> ChatTemplate:
        """`source`, else the template stored with the tokenizer, else ChatML."""
        source = source or getattr(tok, "chat_template", None) or CHATML
        text = getattr(tok, "token_text", None)
        return cls(source, text(tok.bos_id) if text else None, text(tok.eos_id) if text else None)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False, **extra: Any) -> str:
        from jinja2.exceptions import TemplateError

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r}.")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None


@dataclasses.dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and a 0/1 mask of the assistant tokens."""

    ids: list[int]
    mask: list[int]
    text: str  # the rendered conversation
    segments: list[tuple[str, bool]]  # (text, is_assistant) in order; their concatenation is `text`


def _assistant_spans(tpl: ChatTemplate, messages: Sequence[Message], specials: Sequence[str], extra: dict):
    """(full text, [(start, end)] character spans of assistant turns, end-of-turn token included)."""
    full = tpl.render(messages, **extra)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tpl.render(messages[:i], add_generation_prompt=True, **extra)
        upto = tpl.render(messages[: i + 1], **extra)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ChatTemplateError(
                f"cannot mark assistant message {i}: rendering messages[:{i}] with the generation prompt is not "
                f"a prefix of rendering messages[:{i + 1}] (the template rewrites earlier turns). Use a template "
                f"whose rendering grows by appending, such as ChatML.")
        start, end = len(prompt), len(upto)
        # Keep the turn's last special token (its end-of-turn marker), drop the separator after it.
        body = full[start:end]
        last = max(((body.rfind(s) + len(s)) for s in specials if s and s in body), default=-1)
        if last > 0:
            end = start + last
        spans.append((start, end))
    return full, spans


def encode_chat(tok: Any, messages: Sequence[Message], template: str | None = None, **extra: Any) -> ChatEncoding:
    """Render a conversation for training: token ids plus a mask of the assistant tokens.

    `template` defaults to the tokenizer's stored template (else ChatML). Special-token strings
    in the rendered text (role markers, end-of-turn) become their control tokens; nothing else
    is added (no implicit BOS/EOS), so each boundary token appears exactly as often as the
    template writes it.

    >>> msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> enc = encode_chat(tok, msgs)                                                    # doctest: +SKIP
    >>> tok.decode([i for i, m in zip(enc.ids, enc.mask) if m], skip_special=False)    # doctest: +SKIP
    '4<|im_end|>'
    """
    tpl = ChatTemplate.for_tokenizer(tok, template)
    specials = list(getattr(tok, "special_tokens", {}) or ())
    full, spans = _assistant_spans(tpl, messages, specials, extra)
    segments, pos = [], 0
    for start, end in spans:
        if start > pos:
            segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    if pos < len(full):
        segments.append((full[pos:], False))
    ids, mask = [], []
    for text, is_assistant in segments:
        seg = tok.encode(text, allow_special=True)
        ids.extend(seg)
        mask.extend([int(is_assistant)] * len(seg))
    return ChatEncoding(ids, mask, full, segments)


def encode_prompt(tok: Any, messages: Sequence[Message], template: str | None = None, **extra: Any) -> list[int]:
    """Token ids of a conversation followed by the generation prompt (the assistant's header).

    >>> tok.decode(encode_prompt(tok, [{"role": "user", "content": "Hi"}]), skip_special=False)  # doctest: +SKIP
    '<|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    tpl = ChatTemplate.for_tokenizer(tok, template)
    return tok.encode(tpl.render(messages, add_generation_prompt=True, **extra), allow_special=True)


def stop_ids(tok: Any) -> tuple[int, ...]:
    """Token ids that end an assistant turn: eos and any end-of-turn token in the vocabulary."""
    ids = {tok.eos_id}
    specials = getattr(tok, "special_tokens", {}) or {}
    ids.update(specials[s] for s in END_OF_TURN if s in specials)
    return tuple(sorted(i for i in ids if i is not None))
