"""Chat templates: ChatML, SmolLM2's template stored in its GGUF, and a template stored in a
Hugging Face tokenizer_config.json. Each renders exactly as transformers' apply_chat_template,
round-trips (render, tokenize, detokenize, compare) with every boundary token exactly once, and
masks exactly the assistant replies plus their end-of-turn token."""

from __future__ import annotations

import json

import pytest
import transformers

from jaxlearn.data.bpe_tokenizer import BPETokenizer
from jaxlearn.data.chat import CHATML, ChatTemplate, ChatTemplateError, encode_chat, encode_prompt, stop_ids

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And in French, with “quotes” and a newline?\nPlease."},
    {"role": "assistant", "content": "Quatre.\n\nC'est « quatre »."},
]
WITH_SYSTEM = [{"role": "system", "content": "You answer briefly."}] + CONVERSATION

# A template of the kind stored in tokenizer_config.json: BOS written by the template itself,
# EOS closing each assistant turn, a generation prompt without a trailing space.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def plain_dir(smollm2_tokenizer, tmp_path_factory):
    """A Hugging Face tokenizer directory whose tokenizer_config.json stores PLAIN_TEMPLATE."""
    out = smollm2_tokenizer.save_hf(tmp_path_factory.mktemp("tok") / "plain")
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf["chat_template"] = PLAIN_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return out


def _cases(smollm2_tokenizer, hf_smollm2_tokenizer, plain_dir):
    """(name, our tokenizer, template source, transformers tokenizer with that template)."""
    hf_chatml = transformers.AutoTokenizer.from_pretrained(plain_dir)
    hf_chatml.chat_template = CHATML
    return [
        ("chatml", smollm2_tokenizer, CHATML, hf_chatml),
        ("smollm2-gguf", smollm2_tokenizer, None, hf_smollm2_tokenizer),
        ("tokenizer_config", BPETokenizer.from_hf(plain_dir), None, transformers.AutoTokenizer.from_pretrained(plain_dir)),
    ]


@pytest.fixture(scope="module")
def cases(smollm2_tokenizer, hf_smollm2_tokenizer, plain_dir):
    return _cases(smollm2_tokenizer, hf_smollm2_tokenizer, plain_dir)


def _hf_ids(hf_tok, messages, **kw):
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("i", range(3), ids=["chatml", "smollm2-gguf", "tokenizer_config"])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["no-system", "system"])
def test_render_and_ids_equal_transformers(cases, i, messages):
    name, tok, source, hf_tok = cases[i]
    tpl = ChatTemplate.for_tokenizer(tok, source)
    for gen in (False, True):
        msgs = messages if not gen else messages[:-1]
        text = tpl.render(msgs, add_generation_prompt=gen)
        assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), name
    assert encode_chat(tok, messages, source).ids == _hf_ids(hf_tok, messages)
    assert encode_prompt(tok, messages[:-1], source) == _hf_ids(hf_tok, messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("i", range(3), ids=["chatml", "smollm2-gguf", "tokenizer_config"])
def test_round_trip_and_boundary_tokens_once(cases, i):
    name, tok, source, _ = cases[i]
    enc = encode_chat(tok, WITH_SYSTEM, source)
    assert tok.decode(enc.ids, skip_special=False) == enc.text
    assert "".join(t for t, _ in enc.segments) == enc.text
    # Tokenizing segment by segment gives the same ids as tokenizing the whole text at once.
    assert enc.ids == tok.encode(enc.text, allow_special=True)
    counts = {t: enc.ids.count(tid) for t, tid in tok.special_tokens.items() if tid in enc.ids}
    if name == "tokenizer_config":  # one BOS from the template, one EOS per assistant turn
        assert counts == {"<|im_start|>": 1, "<|im_end|>": 2}
    else:  # one <|im_start|> and one <|im_end|> per message
        assert counts == {"<|im_start|>": 5, "<|im_end|>": 5}
    prompt = encode_prompt(tok, WITH_SYSTEM[:-1], source)
    assert tok.decode(prompt, skip_special=False) == ChatTemplate.for_tokenizer(tok, source).render(
        WITH_SYSTEM[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("i", range(3), ids=["chatml", "smollm2-gguf", "tokenizer_config"])
def test_mask_covers_exactly_the_assistant_replies(cases, i):
    name, tok, source, _ = cases[i]
    enc = encode_chat(tok, WITH_SYSTEM, source)
    assert len(enc.mask) == len(enc.ids)
    spans, cur = [], []
    for tid, m in zip(enc.ids, enc.mask):
        if m:
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    replies = [tok.decode(s, skip_special=False) for s in spans]
    lead = " " if name == "tokenizer_config" else ""  # "Assistant:" prompt, then " reply"
    assert replies == [lead + m["content"] + "<|im_end|>" for m in WITH_SYSTEM if m["role"] == "assistant"]
    # The training prompt of each reply is exactly the generation prompt of its prefix.
    first = enc.mask.index(1)
    assert enc.ids[:first] == encode_prompt(tok, WITH_SYSTEM[:2], source)


def test_stop_ids(smollm2_tokenizer):
    assert stop_ids(smollm2_tokenizer) == (0, 2)  # <|endoftext|>, <|im_end|>


def test_templates_that_rewrite_history_are_refused(smollm2_tokenizer):
    rewrites = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot mark assistant message 1"):
        encode_chat(smollm2_tokenizer, CONVERSATION[:2], rewrites)


def test_template_errors_and_sandbox(smollm2_tokenizer):
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ChatTemplate(PLAIN_TEMPLATE).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):  # the sandbox blocks internals
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="'role' and 'content'"):
        ChatTemplate(CHATML).render([{"content": "no role"}])
    assert ChatTemplate("{{ messages[0]['content'] | tojson }}").render([{"role": "u", "content": "é\"x"}]) == '"é\\"x"'
