"""A TFDS builder that turns local UTF-8 text files into a dataset with a `text` feature.

TFDS works without TensorFlow as a format and reader when the dataset is written as
ArrayRecord: prepare once, then read with `tfds.data_source` (or `data.source: tfds` with
`data.tfds_name: text_files` and `data.paths: [<data_dir>]`). The builder is not added to
TFDS's global registry (importing this module changes nothing); a prepared dataset is found
by name in its data_dir all the same. Example::

    builder = TextFilesBuilder(paths=["books/*.txt"], eval_fraction=0.1,
                               data_dir="/data/tfds", file_format="array_record")
    builder.download_and_prepare()
    builder.as_data_source()["train"][0]["text"]       # bytes of one file
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tensorflow_datasets as tfds
from etils import epath  # installed with tensorflow_datasets

from jaxlearn.data.errors import DataError
from jaxlearn.data.sources import expand_paths, held_out_mask


class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One example per text file: `{"text": <the file's contents>}`.

    Splits: `train`, plus `validation` when `eval_fraction` > 0 (files held out by the same
    stable hash as `jaxlearn.data.sources.held_out_mask`). Pass `file_format="array_record"`:
    TFDS's default (TFRecord) needs TensorFlow.

    >>> b = TextFilesBuilder(paths=["a.txt", "b.txt"], data_dir="/tmp/tfds",
    ...                      file_format="array_record")          # doctest: +SKIP
    >>> b.download_and_prepare(); len(b.as_data_source()["train"])  # doctest: +SKIP
    2
    """

    name = "text_files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per local text file."}
    # TFDS derives `code_path` (where it looks for a checksums file) through the
    # `importlib_resources` backport for any builder defined inside a package, and tfds 4.9.10
    # only installs that backport on Python < 3.9. A plain path avoids the import; this builder
    # downloads nothing, so no checksums file is ever read.
    code_path = epath.Path(__file__)

    def __init__(self, *, paths: Sequence[str | os.PathLike] = (), eval_fraction: float = 0.0, **kwargs):
        # Paths are only needed to prepare; reading a prepared dataset needs none.
        self._paths = list(paths)
        self._eval_fraction = eval_fraction
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not via self.dataset_info_from_configs): the builder may live outside
        # a package directory, where TFDS cannot find metadata files next to it.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local UTF-8 text files, one example per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files are local
        files = expand_paths(self._paths, what="text")
        held_out = held_out_mask(len(files), self._eval_fraction)
        splits = {"train": self._generate_examples([f for f, h in zip(files, held_out) if not h])}
        if held_out.any():
            splits["validation"] = self._generate_examples([f for f, h in zip(files, held_out) if h])
        return splits

    def _generate_examples(self, files):
        for path in files:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                raise DataError(f"{path}:{line}: not UTF-8 text (byte offset {e.start}). Re-encode "
                                f"the file as UTF-8.") from None
            yield str(path), {"text": text}
