"""Shared fixtures of the data tests: the real Shakespeare corpus and tokenizer, a toy tokenizer.

The corpora are fetched through `jaxlearn.data.corpora.fetch_corpus` into the user's cache
(`$JAXLEARN_CACHE` or `~/.cache/jaxlearn`), so only the first run downloads anything.
"""

from __future__ import annotations

import pytest


class IntTokenizer:
    """A toy tokenizer: the text "17 18 19" encodes to [17, 18, 19]. BOS 1, EOS 2, pad 0.

    Tests build documents whose tokens come from distinct ranges (document d uses
    1000*d + 10 ...), so a token tells which document it came from.
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 1 << 20

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) > 2)


def toy_documents(n: int, *, min_len: int = 1, max_len: int = 90, seed: int = 0) -> list[str]:
    """`n` documents; document d holds tokens 1000*(d+1) + 10, + 11, ... (lengths vary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    return [" ".join(str(1000 * (d + 1) + 10 + i) for i in range(length)) for d, length in enumerate(lengths)]


def doc_of(token: int) -> int:
    """Which toy document a token belongs to (-1 for BOS/EOS/pad)."""
    return int(token) // 1000 - 1 if token >= 1000 else -1


# Test modules reach these helpers through fixtures, not `from conftest import ...`: with
# several conftest.py files in the tree, the module named `conftest` is not reliably this one.


@pytest.fixture
def int_tokenizer() -> IntTokenizer:
    return IntTokenizer()


@pytest.fixture
def make_toy_documents():
    return toy_documents


@pytest.fixture
def toy_doc_of():
    return doc_of


@pytest.fixture(scope="session")
def shakespeare_train() -> list[str]:
    from jaxlearn.data.corpora import corpus_documents

    return corpus_documents("shakespeare", "train")


@pytest.fixture(scope="session")
def shakespeare_eval() -> list[str]:
    from jaxlearn.data.corpora import corpus_documents

    return corpus_documents("shakespeare", "eval")


@pytest.fixture(scope="session")
def shakespeare_tokenizer_path(tmp_path_factory, shakespeare_train):
    from jaxlearn.data.tokenizer import train_tokenizer

    return train_tokenizer(shakespeare_train, tmp_path_factory.mktemp("tok") / "shakespeare", vocab_size=2048)


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare_tokenizer_path):
    from jaxlearn.data.tokenizer import Tokenizer

    return Tokenizer.load(shakespeare_tokenizer_path)
