"""A run's tokenizer: the one place that decides which tokenizer a `DataConfig` uses.

`data.tokenizer` names one (a SentencePiece `.model`, a `.gguf`, a `tokenizer.json` or Hugging
Face directory, or a model preset such as `smollm2-135m-instruct`); when it is empty the run
directory's `tokenizer.model` is used, trained on the train split the first time a run needs
it. Training (`jaxlearn train`) may train one; reading a finished run (`open_run`) never does.
Example::

    tok = resolve_tokenizer(cfg.data, "runs/demo")                   # trains runs/demo/tokenizer.model once
    tok = resolve_tokenizer(cfg.data, "runs/demo", may_train=False)  # a missing one is an error
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxlearn.data.bpe_tokenizer import load_tokenizer
from jaxlearn.data.errors import DataError
from jaxlearn.data.formats import data_format
from jaxlearn.data.sources import make_source
from jaxlearn.data.tokenizer import Tokenizer, train_tokenizer

# Characters of the train split read to train a tokenizer (more adds time, not quality).
TOKENIZER_CHARS = 50_000_000


def resolve_tokenizer(data_cfg: Any, run_dir: str | os.PathLike, *, may_train: bool = True) -> Any:
    """The run's tokenizer: `data_cfg.tokenizer` if set, else `<run_dir>/tokenizer.model`.

    With `may_train`, a missing `tokenizer.model` is trained on the train split (with
    `data_cfg.tokenizer_vocab_size`); training is deterministic, so hosts sharing no file system
    train identical models. Without it (reading a finished run), a missing one is a
    FileNotFoundError that says to pass `data.tokenizer`.

    >>> tok = resolve_tokenizer(DataConfig(source="shakespeare"), "runs/demo")   # doctest: +SKIP
    >>> tok.vocab_size                                                           # doctest: +SKIP
    8192
    """
    if data_cfg.tokenizer:  # a .model/.gguf/tokenizer.json path, HF directory or preset name
        return load_tokenizer(data_cfg.tokenizer)
    path = Path(run_dir).expanduser() / "tokenizer.model"
    if not may_train:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found for run {run_dir}; pass data.tokenizer=PATH.")
        return Tokenizer.load(path)
    if not path.exists() and data_format(data_cfg) != "text":
        raise DataError(f"data.source={data_cfg.source} holds {data_format(data_cfg)} records for fine-tuning, so there "
                        f"is no text to "
                        f"train a tokenizer on; set data.tokenizer to the model's tokenizer (a preset such as "
                        f"smollm2-135m-instruct, or a pretraining run's tokenizer.model).")
    if not path.exists():
        source = make_source(data_cfg, "train")
        train_tokenizer(text_sample(source, TOKENIZER_CHARS), path.with_suffix(""),
                        vocab_size=data_cfg.tokenizer_vocab_size)
    tok = Tokenizer.load(path)
    if tok.vocab_size != data_cfg.tokenizer_vocab_size:
        raise DataError(f"{path} has vocab_size {tok.vocab_size} but data.tokenizer_vocab_size is "
                        f"{data_cfg.tokenizer_vocab_size}. Delete {path} to train a new one, or set "
                        f"data.tokenizer_vocab_size={tok.vocab_size}.")
    return tok


def text_sample(source: Any, max_chars: int):
    """Documents in a fixed pseudo-random order until `max_chars` characters are read.

    >>> list(text_sample(["ab", "cd", "ef"], 3))
    ['ef', 'ab']
    """
    order = np.random.default_rng(0).permutation(len(source))
    total = 0
    for i in order:
        text = source[int(i)]
        yield text
        total += len(text)
        if total >= max_chars:
            return
