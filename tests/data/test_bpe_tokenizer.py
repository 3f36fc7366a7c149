"""The SmolLM2 byte-level BPE tokenizer built from GGUF metadata equals two references: the
tokenizer transformers builds from the same GGUF (on ~4 MB of Shakespeare and Brown and on edge
cases), and a small pure-Python BPE written here from llama.cpp's `smollm` pre-tokenizer rules
(digits split one by one, then the GPT-2 regex). Special tokens are explicit: never added by
`encode`, parsed from text only when asked, dropped by `decode` unless asked."""

from __future__ import annotations

import pickle

import pytest
import regex

from jaxlearn.data.bpe_tokenizer import BPETokenizer, load_tokenizer
from jaxlearn.data.corpora import corpus_documents

EDGE_CASES = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs",
    "\n",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\r\n",
    "word    word\n    indented\n\t\tmixed \t \n",
    "héllo wörld, naïve café — “curly quotes” ‘single’ … ellipsis",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "Ελληνικά, русский текст, עברית, العربية",
    "math: ∑ x² ≤ ∞, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝒷𝑜𝓁𝒹",
    "numbers 0 1 12 123 1234 12345 3.14159 1,000,000 2024-11-26 0xFF 1e-5",
    "don't can't I'll we've they're she'd it's O'Neil 'quoted'",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "text<|im_end|>glued<|im_start|>",
    "<|im_end",  # half a special token is plain text
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "\x00\x01 control chars \x7f",
]


@pytest.fixture(scope="module")
def texts():
    """About 4 MB of real text: Shakespeare's plays and Brown texts, whole documents."""
    out = []
    for name in ("shakespeare", "brown"):
        size = 0
        for doc in corpus_documents(name, "eval") + corpus_documents(name, "train"):
            out.append(doc)
            size += len(doc)
            if size > 2_000_000:
                break
    return out


def test_matches_transformers_on_real_text(smollm2_tokenizer, hf_smollm2_tokenizer, texts):
    ours = smollm2_tokenizer.encode_batch(texts)
    ref = hf_smollm2_tokenizer(texts, add_special_tokens=False).input_ids
    same = sum(a == b for a, b in zip(ours, ref))
    n_tokens = sum(map(len, ours))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"SmolLM2 tokenizer vs transformers (same GGUF): {same}/{len(texts)} documents identical, "
          f"{n_tokens} tokens, {mb:.1f} MB")
    assert same == len(texts) and mb > 3.5
    assert all(smollm2_tokenizer.decode(ids) == t for ids, t in zip(ours, texts))


def test_matches_transformers_on_edge_cases(smollm2_tokenizer, hf_smollm2_tokenizer):
    tok, ref = smollm2_tokenizer, hf_smollm2_tokenizer
    for text in EDGE_CASES:
        # Special tokens in text: parsed like transformers by default when allowed ...
        assert tok.encode(text, allow_special=True) == ref(text, add_special_tokens=False).input_ids, text
        # ... and spelled out as plain text otherwise (transformers' split_special_tokens).
        assert tok.encode(text) == ref(text, add_special_tokens=False, split_special_tokens=True).input_ids, text
        assert tok.decode(tok.encode(text), skip_special=False) == text
        assert tok.decode(tok.encode(text, allow_special=True), skip_special=False) == text


def test_special_tokens_are_explicit(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 2, 2, 0, 49152)
    assert not tok.add_bos and not tok.add_eos
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    hi = tok.token_to_id("Hi")
    assert tok.encode("Hi") == [hi]  # no BOS, no EOS
    assert tok.encode("<|im_end|>", allow_special=True) == [2]
    assert 2 not in tok.encode("<|im_end|>")  # a document quoting the marker cannot end a turn
    assert tok.decode([1, hi, 2]) == "Hi" and tok.decode([1, hi, 2], skip_special=False) == "<|im_start|>Hi<|im_end|>"


def test_saved_tokenizer_json_loads_in_transformers_and_back(smollm2_tokenizer, tmp_path, texts):
    import transformers

    out = smollm2_tokenizer.save_hf(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    again = BPETokenizer.from_hf(out)
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (1, 2, 2, smollm2_tokenizer.chat_template)
    sample = EDGE_CASES + texts[:2]
    for text in sample:
        want = smollm2_tokenizer.encode(text, allow_special=True)
        assert hf(text, add_special_tokens=False).input_ids == want == again.encode(text, allow_special=True)
    assert load_tokenizer(out).encode("Hello") == smollm2_tokenizer.encode("Hello")


def test_pickles_for_grain_workers(smollm2_tokenizer):
    tok = pickle.loads(pickle.dumps(smollm2_tokenizer))
    assert tok.encode(EDGE_CASES[7]) == smollm2_tokenizer.encode(EDGE_CASES[7]) and tok.bos_id == 1


# --------------------------------------------------------------------------------------------
# A second reference, independent of the `tokenizers` library.

_GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_DIGIT = regex.compile(r"\p{N}")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 maps to itself, the rest to 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    """llama.cpp's `smollm` recipe, step by step: isolate every digit, split the rest with the
    GPT-2 regex, spell bytes in GPT-2's alphabet, merge the lowest-ranked pair until none applies."""

    def __init__(self, tokens: list[str], merges: list[str]):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.alphabet = _byte_alphabet()
        self.cache: dict[str, list[int]] = {}

    def pieces(self, text: str) -> list[str]:
        out, pos = [], 0
        for m in _DIGIT.finditer(text):
            out += _GPT2_SPLIT.findall(text[pos:m.start()]) + [m.group()]
            pos = m.end()
        return out + _GPT2_SPLIT.findall(text[pos:])

    def word(self, piece: str) -> list[int]:
        if piece not in self.cache:
            parts = [self.alphabet[b] for b in piece.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self.cache[piece] = [self.vocab[p] for p in parts]
        return self.cache[piece]

    def encode(self, text: str) -> list[int]:
        return [i for piece in self.pieces(text) for i in self.word(piece)]


def test_matches_a_pure_python_reference(smollm2_tokenizer, smollm2_file, texts):
    ref = ReferenceBPE(smollm2_file.get("tokenizer.ggml.tokens"), smollm2_file.get("tokenizer.ggml.merges"))
    sample = [t for t in EDGE_CASES if "<|" not in t] + [t[:100_000] for t in texts[:3] + texts[-3:]]
    for text in sample:
        assert smollm2_tokenizer.encode(text) == ref.encode(text), text[:60]
