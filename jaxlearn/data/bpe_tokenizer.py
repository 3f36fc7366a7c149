"""Byte-level BPE tokenizers of pretrained models (SmolLM2, Llama 3, Qwen2, GPT-2 style).

Built with the `tokenizers` library, either from a GGUF file's metadata (vocabulary
`tokenizer.ggml.tokens`, merges `tokenizer.ggml.merges`, token types, special ids, chat
template) or from a Hugging Face `tokenizer.json` (plus `tokenizer_config.json`). It has the
same interface as `jaxlearn.data.tokenizer.Tokenizer` (encode, decode, bos_id, eos_id, pad_id,
vocab_size), so pipelines and generation use either. Example::

    tok = BPETokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.encode("Hello world")                   # [19556, 905]
    tok.decode(tok.encode("Hello world"))       # 'Hello world'

Special tokens are explicit, never implicit:
- `encode(text)` adds no BOS/EOS (the data pipeline or the chat template adds them, once) and
  treats text literally: a document that contains the string "<|im_end|>" does not produce
  the control token. `encode(text, allow_special=True)` parses special tokens in the text
  (what chat templates need, and what Hugging Face tokenizers do by default).
- `decode(ids)` drops special tokens; `decode(ids, skip_special=False)` keeps them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from jaxlearn.data.errors import DataError
from jaxlearn.data.model_files import PRESETS, resolve
from jaxlearn.data.tokenizer import Tokenizer

# GGUF `tokenizer.ggml.pre` values whose pre-tokenization this module reproduces. llama.cpp
# splits every digit on its own for the StarCoder family (SmolLM2 is `smollm`), then applies
# the GPT-2 regex; `gpt2`/`default` apply the GPT-2 regex alone.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_ONLY = ("gpt2", "default")

# GGUF token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_ONLY:
        return byte_level
    raise DataError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                    f"{', '.join(_DIGITS_THEN_GPT2 + _GPT2_ONLY)}. Load the model's Hugging Face "
                    f"tokenizer.json instead (BPETokenizer.from_hf).")


class BPETokenizer:
    """A byte-level BPE tokenizer with explicit special tokens (see the module docstring)."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos: int | None, eos: int | None, pad: int | None = None,
                 unk: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | None = None, source: str = "<in memory>"):
        self._tok = tok
        # A second copy that reads special-token strings in text as plain text.
        self._literal = tokenizers.Tokenizer.from_str(tok.to_str())
        self._literal.encode_special_tokens = True
        self._bos, self._eos = bos, eos
        self._pad = pad if pad is not None else (eos if eos is not None else 0)
        self._unk = unk
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.source = source
        self.path = Path(source) if source != "<in memory>" else None
        self._special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_gguf(cls, path: Any) -> BPETokenizer:
        """Build the tokenizer stored in a GGUF file (a path or a `jaxlearn.models.gguf.GGUFFile`).

        >>> tok = BPETokenizer.from_gguf(fetch_smollm2())             # doctest: +SKIP
        >>> tok.bos_id, tok.eos_id, tok.vocab_size                    # doctest: +SKIP
        (1, 2, 49152)
        """
        from jaxlearn.models.gguf import GGUFFile

        f = path if isinstance(path, GGUFFile) else GGUFFile(path)
        kind = f.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise DataError(f"{f.path}: tokenizer model {kind!r} is not byte-level BPE ('gpt2'); "
                            f"jaxlearn builds byte-level BPE tokenizers from GGUF metadata only.")
        tokens = f.require("tokenizer.ggml.tokens")
        merges = f.require("tokenizer.ggml.merges")
        types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise DataError(f"{f.path}: the vocabulary repeats tokens ({len(tokens) - len(vocab)} duplicates).")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(f.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # Control tokens become special added tokens (matched whole, dropped by decode);
        # user-defined ones become plain added tokens. Both keep their vocabulary ids.
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        def tid(key):
            v = f.get(key)
            return None if v is None else int(v)

        return cls(tok, bos=tid("tokenizer.ggml.bos_token_id"), eos=tid("tokenizer.ggml.eos_token_id"),
                   pad=tid("tokenizer.ggml.padding_token_id"), unk=tid("tokenizer.ggml.unknown_token_id"),
                   add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
                   add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=f.get("tokenizer.chat_template"), source=str(f.path))

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a Hugging Face `tokenizer.json` (a file, or a directory that holds it and
        usually `tokenizer_config.json` with the special tokens and the chat template).

        >>> tok = BPETokenizer.from_hf("out/smollm2-hf")               # doctest: +SKIP
        """
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a Hugging Face tokenizer is a tokenizer.json file.")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad JSON
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({e}).") from None
        conf_path = file.parent / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
        smap_path = file.parent / "special_tokens_map.json"
        smap = json.loads(smap_path.read_text(encoding="utf-8")) if smap_path.is_file() else {}

        def tid(name):
            value = conf.get(name, smap.get(name))
            if isinstance(value, dict):
                value = value.get("content")
            return None if value is None else tok.token_to_id(value)

        bos = tid("bos_token")
        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if template is None and (file.parent / "chat_template.jinja").is_file():
            template = (file.parent / "chat_template.jinja").read_text(encoding="utf-8")
        add_bos = conf.get("add_bos_token")
        if add_bos is None:  # the tokenizer.json post-processor decides (Llama 3 adds BOS there)
            add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return cls(tok, bos=bos, eos=tid("eos_token"), pad=tid("pad_token"), unk=tid("unk_token"),
                   add_bos=bool(add_bos), add_eos=bool(conf.get("add_eos_token", False)),
                   chat_template=template, source=str(file))

    # ---------------------------------------------------------------- the Tokenizer interface

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS or EOS.

        >>> tok.encode("<|im_end|>"), tok.encode("<|im_end|>", allow_special=True)   # doctest: +SKIP
        ([44, 108, 306, 79, 3220, 108, 46], [2])
        """
        t = self._tok if allow_special else self._literal
        return t.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (in parallel threads)."""
        t = self._tok if allow_special else self._literal
        return [e.ids for e in t.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special=False`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (byte-level spelling, e.g. `'Ġthe'`)."""
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos if self._bos is not None else self._pad

    @property
    def eos_id(self) -> int:
        return self._eos if self._eos is not None else self._pad

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special (control) tokens by text, e.g. `{'<|im_start|>': 1, '<|im_end|>': 2, ...}`."""
        return dict(self._special)

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a (special) token as it appears in rendered templates."""
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"BPETokenizer({self.source}, vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- saving

    def hf_token_ids(self) -> dict[str, int | None]:
        """Special ids for a Hugging Face config.json."""
        return {"bos_token_id": self._bos, "eos_token_id": self._eos, "pad_token_id": self._pad}

    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template)."""
        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token_text(self._bos),
            "eos_token": self.token_text(self._eos),
            "pad_token": self.token_text(self._pad),
            "unk_token": self.token_text(self._unk),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        return out

    # The Rust tokenizer does not pickle; grain worker processes get its JSON instead.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "bos": self._bos, "eos": self._eos, "pad": self._pad, "unk": self._unk,
                "add_bos": self.add_bos, "add_eos": self.add_eos, "chat_template": self.chat_template,
                "source": self.source}

    def __setstate__(self, s: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(s["json"]), bos=s["bos"], eos=s["eos"], pad=s["pad"],
                      unk=s["unk"], add_bos=s["add_bos"], add_eos=s["add_eos"], chat_template=s["chat_template"],
                      source=s["source"])


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """Any tokenizer jaxlearn knows, by what `spec` names: a SentencePiece `.model` file, a
    `.gguf` file, a Hugging Face `tokenizer.json` or model directory, or a model preset name.

    >>> load_tokenizer("smollm2-135m-instruct").vocab_size          # doctest: +SKIP
    49152
    """
    path = Path(spec).expanduser()
    if path.suffix == ".model" and path.is_file():
        return Tokenizer.load(path)
    if path.suffix == ".gguf" and path.is_file():
        return BPETokenizer.from_gguf(path)
    if path.name == "tokenizer.json" or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return BPETokenizer.from_hf(path)
    if str(spec) in PRESETS:  # the checkpoint's own tokenizer, fetched with it into the cache
        return load_tokenizer(resolve(str(spec)))
    raise DataError(f"cannot load a tokenizer from {spec!r}: expected a SentencePiece .model file, a .gguf file, "
                    f"a tokenizer.json (or a directory holding one), or a preset "
                    f"({', '.join(PRESETS)}).")
