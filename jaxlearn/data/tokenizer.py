"""A SentencePiece tokenizer: train one in-process on a corpus, load it, encode and decode.

The models trained here are lossless: normalization is off (`identity`), whitespace is kept as
is (no collapsing, no dummy prefix) and byte fallback turns any character the vocabulary lacks
into its UTF-8 bytes, so `decode(encode(text)) == text` for every string, newlines included
(a play script needs its line breaks; each newline is a token of its own). Special ids are
fixed: pad 0, unk 1, bos 2, eos 3.
Example::

    path = train_tokenizer(["To be, or not to be"] * 100, "/tmp/tok", vocab_size=300)
    tok = Tokenizer.load(path)
    tok.decode(tok.encode("To be")) # 'To be'
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from jaxlearn.data.errors import DataError
from jaxlearn.perms import make_normal

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# SentencePiece trains on "sentences" of bounded length; documents are cut into chunks of at
# most this many characters (4 bytes per character at worst stays under the trainer's limit).
_CHUNK_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS


class Tokenizer:
    """A loaded SentencePiece model. Encoding adds no BOS/EOS; the pipeline adds them.

    >>> tok = Tokenizer.load("runs/demo/tokenizer.model")      # doctest: +SKIP
    >>> tok.encode("ROMEO:")                                   # doctest: +SKIP
    [1523, 290]
    """

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None):
        self._proto = bytes(model_proto)
        self.path = Path(path) if path is not None else None
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self.pad_id < 0 or len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise DataError(
                f"tokenizer {self.path or '(in memory)'} needs distinct pad, bos and eos ids, but has "
                f"pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id}. Train it with "
                f"jaxlearn.data.tokenizer.train_tokenizer, or with --pad_id/--bos_id/--eos_id set."
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `.model` file.

        >>> Tokenizer.load("runs/demo/tokenizer.model").vocab_size    # doctest: +SKIP
        8192
        """
        path = Path(path).expanduser()
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read tokenizer {path} ({e.strerror or e}). Set data.tokenizer to an "
                            f"existing SentencePiece .model file, or leave it empty to train one.") from None
        try:
            return cls(proto, path)
        except RuntimeError as e:  # SentencePiece reports a bad proto as RuntimeError
            raise DataError(f"{path} is not a SentencePiece model ({e}). Point data.tokenizer at a "
                            f".model file written by SentencePiece.") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS.

        >>> tok.encode("")                                          # doctest: +SKIP
        []
        """
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad, bos and eos (control tokens) decode to nothing.

        >>> tok.decode(tok.encode("Is the day so young?"))         # doctest: +SKIP
        'Is the day so young?'
        """
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, e.g. `'▁the'` (`▁` stands for a space)."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path) if self.path else '<in memory>'}, vocab_size={self.vocab_size})"

    # The C++ processor does not pickle; grain worker processes get the model bytes instead.
    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["path"])


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 4,
) -> Path:
    """Train a lossless SentencePiece model on `texts`; write `<out_prefix>.model` and `.vocab`.

    Documents are cut at blank lines, then lines, then every 4096 characters, because the
    trainer wants bounded "sentences" (newlines stay inside the chunks, so the vocabulary
    learns them). When there are more than `input_sentence_size` chunks, a uniform sample of
    that many is kept, drawn with `seed` (SentencePiece's own sampler uses a global seed;
    ours keeps every host training the same model). The same texts and arguments give a
    byte-identical `.model` on every machine. Both files are written under temporary names
    and renamed into place, `.model` last. Returns the `.model` path.

    >>> train_tokenizer(corpus_documents("shakespeare", "train"), "/tmp/shk", 4096)  # doctest: +SKIP
    PosixPath('/tmp/shk.model')
    """
    out_prefix = Path(out_prefix).expanduser()
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    vocab_path = out_prefix.with_name(out_prefix.name + ".vocab")
    sentences = _sample(_chunks(texts), input_sentence_size, seed)
    if not sentences:
        raise DataError(f"cannot train tokenizer {model_path}: the training texts are empty. "
                        f"Check that the train split holds non-empty documents.")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # The proto is written to memory, not to a `model_prefix`: the prefix (a temporary path)
    # would be recorded in the model and make otherwise identical models differ.
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,  # any UTF-8 text encodes, nothing maps to <unk>
            normalization_rule_name="identity",  # lossless: no NFKC folding
            remove_extra_whitespaces=False,  # keep runs of spaces and newlines
            add_dummy_prefix=False,  # no phantom leading space: decode(encode(x)) == x
            allow_whitespace_only_pieces=True,  # indentation becomes a few tokens, not many
            # A newline is always a token of its own: no piece like ":\n" that a prompt ending
            # in "ROMEO:" could never produce, so prompts tokenize the way training text did.
            user_defined_symbols=["\n"],
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # we sampled already (deterministically)
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=num_threads,  # recorded in the model: fixed, not os.cpu_count()
            minloglevel=2,  # keep the trainer's per-iteration log off the console
        )
    except RuntimeError as e:
        raise _explain(e, model_path, vocab_size, model_type) from None
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    _write_atomic(vocab_path, vocab.encode("utf-8"))
    _write_atomic(model_path, proto.getvalue())
    return model_path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        make_normal(tmp)  # mkstemp makes it 0600; the tokenizer is shared like any run file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents into trainer sentences: paragraphs, else lines, else fixed-size pieces."""
    for text in texts:
        for para in text.split("\n\n"):
            if len(para) <= _CHUNK_CHARS:
                if para.strip():
                    yield para
                continue
            for line in para.split("\n"):
                for i in range(0, len(line), _CHUNK_CHARS):
                    piece = line[i:i + _CHUNK_CHARS]
                    if piece.strip():
                        yield piece


def _sample(chunks: Iterator[str], k: int, seed: int) -> list[str]:
    """Reservoir-sample `k` chunks (all of them when there are fewer), in a fixed order."""
    rng = np.random.default_rng(seed)
    kept: list[str] = []
    for n, chunk in enumerate(chunks):
        if n < k:
            kept.append(chunk)
        else:
            j = int(rng.integers(0, n + 1))
            if j < k:
                kept[j] = chunk
    return kept


def _explain(e: RuntimeError, model_path: Path, vocab_size: int, model_type: str) -> DataError:
    msg = str(e)
    if m := re.search(r"Please set it to a value <= (\d+)", msg):
        return DataError(f"cannot train tokenizer {model_path}: vocab_size={vocab_size} is too large for "
                         f"this corpus; the maximum is {m.group(1)}. Set data.tokenizer_vocab_size to at "
                         f"most {m.group(1)} or train on more text.")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return DataError(f"cannot train tokenizer {model_path}: vocab_size={vocab_size} is below the "
                         f"{m.group(2)} entries the corpus needs (its distinct characters plus 256 byte "
                         f"tokens and 4 special tokens). Raise data.tokenizer_vocab_size, or pass a "
                         f"character_coverage below 1.0 (rare characters then fall back to bytes).")
    return DataError(f"SentencePiece could not train {model_type} tokenizer {model_path} with "
                     f"vocab_size={vocab_size}: {msg}")
