"""Random-access document sources: `len(source)` documents, `source[i]` is one document (a str).

They follow grain's `RandomAccessDataSource` protocol, so `grain.MapDataset.source(src)` reads
them directly. Each holds only paths and small index arrays (no open files), so it pickles
into grain worker processes, and reading is thread-safe (every read opens its file).

| source              | one document is                  | notes                                 |
|---------------------|----------------------------------|---------------------------------------|
| `TextFileSource`    | a whole file (or a line)         | UTF-8                                 |
| `JsonlSource`       | the `text_field` of one line     | a byte-offset index over the lines    |
| `ParquetSource`     | the `text_field` of one row      | row groups are read on demand         |
| `ArrayRecordSource` | one record (UTF-8 bytes)         | grain's ArrayRecordDataSource         |
| `TfdsSource`        | the `text_field` of one example  | a TFDS dataset prepared as ArrayRecord|

Bad data raises `DataError` naming the file and line/record and the fix. Errors in one
document (bad UTF-8, a JSONL line that is not JSON) surface when that document is read; a
source that has no documents, or only empty ones, is refused by `make_source`. Example::

    src = JsonlSource(["data/train.jsonl"], text_field="text")
    len(src), src[0][:20]
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlearn.data.errors import DataError

# Bytes read at a time while indexing line offsets (bounded memory for any file size).
_SCAN_BLOCK = 1 << 24


def expand_paths(patterns: Sequence[str | os.PathLike], *, what: str = "data") -> list[Path]:
    """Files named by `patterns` (paths or globs, `~` allowed), sorted within each pattern.

    Every pattern must match at least one file; a directory or a missing path is an error.

    >>> expand_paths(["data/*.txt"])              # doctest: +SKIP
    [PosixPath('data/a.txt'), PosixPath('data/b.txt')]
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise DataError(f"no {what} files given. Set data.paths to a list of files or globs, "
                        f"e.g. data.paths=[data/*.txt].")
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"the glob {pattern!r} matches no {what} files "
                                f"(working directory {os.getcwd()}). Fix the pattern in data.paths.")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern} is a directory, not a {what} file. Use a glob such as "
                            f"{os.path.join(pattern, '*')!r} in data.paths.")
        elif not os.path.isfile(pattern):
            raise DataError(f"{what} file {pattern} does not exist (working directory {os.getcwd()}). "
                            f"Fix the path in data.paths.")
        else:
            files.append(Path(pattern))
    return files


class TextFileSource:
    """Plain UTF-8 text files: one document per file, or one per non-empty line.

    >>> src = TextFileSource(["plays/*.txt"])                       # doctest: +SKIP
    >>> src[0][:11]                                                 # doctest: +SKIP
    'Romeo and J'
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, per_line: bool = False):
        self.files = [str(p) for p in expand_paths(paths, what="text")]
        self.per_line = per_line
        if per_line:
            self._lines = _LineIndex(self.files)
        elif all(os.path.getsize(f) == 0 for f in self.files):
            raise DataError(f"all {len(self.files)} text files are empty (first: {self.files[0]}). "
                            f"Point data.paths at files that hold text.")

    def __len__(self) -> int:
        return len(self._lines) if self.per_line else len(self.files)

    def __getitem__(self, index: int) -> str:
        if self.per_line:
            return self._lines.text(index)
        path = self.files[index]
        with open(path, "rb") as f:
            return _decode(f.read(), path)

    def __repr__(self) -> str:
        unit = "lines" if self.per_line else "files"
        return f"TextFileSource({len(self)} {unit}, first={self.files[0]!r})"


class JsonlSource:
    """JSON Lines files; each non-blank line is an object whose `text_field` is a document.

    >>> JsonlSource(["a.jsonl"], text_field="text")[0]              # doctest: +SKIP
    'first document'
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, text_field: str = "text"):
        self.files = [str(p) for p in expand_paths(paths, what="JSONL")]
        self.text_field = text_field
        self._lines = _LineIndex(self.files)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> str:
        raw, path, offset = self._lines.read(index)
        where = f"{path}:{self._lines.line_number(index)}"
        text = _decode(raw, path, base_offset=offset, where=where)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: the line is not valid JSON ({e.msg} at column {e.colno}). "
                            f"Every line of a JSONL file must be one JSON object; fix or delete it.") from None
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: the line has no field {self.text_field!r} (it has {keys}). "
                            f"Set data.text_field to the field that holds the text, or fix the line.")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {self.text_field!r} is a {type(text).__name__}, not a string.")
        return text

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} lines, field={self.text_field!r}, first={self.files[0]!r})"


class ParquetSource:
    """Parquet files; the string column `text_field` holds one document per row.

    Rows are read a row group at a time (a few recent groups are kept), so reading in file
    order is cheap; heavily shuffled reading of big files is better served by ArrayRecord.

    >>> ParquetSource(["a.parquet"], text_field="text")[0]          # doctest: +SKIP
    'first document'
    """

    _CACHED_GROUPS = 4

    def __init__(self, paths: Sequence[str | os.PathLike], *, text_field: str = "text"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.files = [str(p) for p in expand_paths(paths, what="Parquet")]
        self.text_field = text_field
        starts = [0]
        self._groups: list[tuple[int, int]] = []  # (file index, row group) in row order
        for i, path in enumerate(self.files):
            try:
                meta = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path} is not a readable Parquet file ({e}).") from None
            schema = meta.schema_arrow
            if text_field not in schema.names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {schema.names}). Set "
                                f"data.text_field to the column that holds the text.")
            kind = schema.field(text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"{path}: column {text_field!r} has type {kind}, not string.")
            for g in range(meta.num_row_groups):
                rows = meta.metadata.row_group(g).num_rows
                if rows:
                    self._groups.append((i, g))
                    starts.append(starts[-1] + rows)
        self._starts = starts
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: OrderedDict[int, list] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> str:
        index = _check_index(index, len(self))
        g = bisect.bisect_right(self._starts, index) - 1
        column = self._group(g)
        text = column[index - self._starts[g]]
        if text is None:
            f, rg = self._groups[g]
            raise DataError(f"{self.files[f]}: row {index - self._starts[g]} of row group {rg} has a null "
                            f"{self.text_field!r}. Drop or fill null rows.")
        return text

    def _group(self, g: int) -> list:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        import pyarrow.parquet as pq

        f, rg = self._groups[g]
        column = pq.ParquetFile(self.files[f]).read_row_group(rg, columns=[self.text_field])
        values = column.column(0).to_pylist()
        with self._lock:
            self._cache[g] = values
            while len(self._cache) > self._CACHED_GROUPS:
                self._cache.popitem(last=False)
        return values

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __repr__(self) -> str:
        return f"ParquetSource({len(self)} rows, column={self.text_field!r}, first={self.files[0]!r})"


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 text, one document per record.

    >>> ArrayRecordSource(["docs.array_record"])[0]                 # doctest: +SKIP
    'first document'
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        from array_record.python import array_record_module

        self.files = [str(p) for p in expand_paths(paths, what="ArrayRecord")]
        counts = []
        for path in self.files:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # the C++ reader raises RuntimeError/ValueError on bad files
                raise DataError(f"{path} is not a readable ArrayRecord file ({e}).") from None
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._reader = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> str:
        index = _check_index(index, len(self))
        if self._reader is None:
            import grain

            with self._lock:
                if self._reader is None:
                    self._reader = grain.sources.ArrayRecordDataSource(self.files)
        raw = self._reader[index]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            f = int(np.searchsorted(self._starts, index, side="right")) - 1
            raise DataError(f"{self.files[f]}: record {index - int(self._starts[f])} is not UTF-8 text "
                            f"(byte {e.start}: {raw[e.start:e.start + 4]!r}). Records must be UTF-8 "
                            f"encoded documents.") from None

    def __getstate__(self) -> dict:
        return {"files": self.files, "_starts": self._starts}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reader = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} records, first={self.files[0]!r})"


class TfdsSource:
    """One split of a TFDS dataset prepared with `file_format="array_record"` (no TensorFlow).

    `data_dir` is where it was prepared (e.g. by `TextFilesBuilder.download_and_prepare`).

    >>> TfdsSource("text_files", "train", data_dir="/data/tfds")[0]  # doctest: +SKIP
    'first document'
    """

    def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 text_field: str = "text"):
        if not name:
            raise DataError("data.tfds_name is empty; set it to the name of a prepared TFDS dataset "
                            "(e.g. text_files for jaxlearn.data.tfds_text.TextFilesBuilder).")
        self.name, self.split, self.text_field = name, split, text_field
        self.data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
        self._source = self._open()
        if len(self._source) and text_field not in self._source[0]:
            raise DataError(f"TFDS dataset {name!r}: examples have no feature {text_field!r} "
                            f"(they have {sorted(self._source[0])}). Set data.text_field.")

    def _open(self) -> Any:
        import tensorflow_datasets as tfds

        where = f"in {self.data_dir}" if self.data_dir else "in the default TFDS data_dir"
        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...)
            first_line = str(e).strip().split("\n")[0]  # the rest lists every TFDS dataset
            raise DataError(
                f"cannot open TFDS dataset {self.name!r} split {self.split!r} {where} ({first_line}). Prepare it "
                f"first with file_format='array_record' (for local text files: jaxlearn.data.tfds_text."
                f"TextFilesBuilder(paths=..., data_dir=...).download_and_prepare()), and set data.paths "
                f"to [data_dir]."
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        value = self._source[index][self.text_field]
        if isinstance(value, bytes):  # tfds Text features come back as bytes
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"TFDS dataset {self.name!r} split {self.split!r} example {index}: "
                                f"{self.text_field!r} is not UTF-8 (byte {e.start}).") from None
        return str(value)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._source = self._open()

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def tfds_split_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The split names of a prepared TFDS dataset (read from its dataset_info.json).

    >>> tfds_split_names("text_files", "/data/tfds")                # doctest: +SKIP
    ['train', 'validation']
    """
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
    try:
        return list(tfds.builder(name, data_dir=data_dir).info.splits.keys())
    except Exception as e:
        first_line = str(e).strip().split("\n")[0]
        raise DataError(f"cannot find TFDS dataset {name!r} in {data_dir or 'the default data_dir'} "
                        f"({first_line}). Prepare it with file_format='array_record' and set data.paths to "
                        f"[data_dir].") from None


class SubsetSource:
    """The documents of `source` at `indices` (a split of a source without a natural one).

    >>> SubsetSource(src, [0, 2])[1] == src[2]                      # doctest: +SKIP
    True
    """

    def __init__(self, source: Any, indices: Sequence[int], *, name: str = "subset"):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> str:
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self.name}, {len(self)} of {self.source!r})"


def held_out_mask(num_documents: int, eval_fraction: float) -> np.ndarray:
    """Which documents form the eval split: a stable hash of each index below `eval_fraction`.

    The hash (splitmix64) depends only on the index, so the split is the same on every host
    and every run. When the fraction selects no document but there are at least two, the one
    with the smallest hash is held out, so a small dataset still gets an eval split. (Named
    records are split by `corpora.stable_fraction` of their key instead; the two hashes stay
    apart because moving either onto the other would move documents between existing splits.)

    >>> held_out_mask(10, 0.3).tolist()
    [False, False, False, True, False, False, False, False, False, False]
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}.")
    h = _splitmix64(np.arange(num_documents, dtype=np.uint64))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    mask = u < eval_fraction
    if eval_fraction > 0 and num_documents >= 2 and not mask.any():
        mask[int(np.argmin(u))] = True
    return mask


def split_source(source: Any, split: str, eval_fraction: float) -> Any:
    """The `train` or `eval` part of a source that has no natural split (see `held_out_mask`).

    A source of a single document (one big `input.txt`) cannot be split by document; its
    text is split instead: the last `eval_fraction` of its lines is held out (see
    `TextTailSplit`).

    >>> len(split_source(src, "eval", 0.05))                        # doctest: +SKIP
    12
    """
    if len(source) == 1 and eval_fraction > 0:
        return TextTailSplit(source, split, eval_fraction)
    mask = held_out_mask(len(source), eval_fraction)
    indices = np.flatnonzero(mask if split == "eval" else ~mask)
    if split == "eval" and len(indices) == 0:
        raise DataError(f"{source!r} has no held-out documents: data.eval_fraction is 0. Set it above 0 "
                        f"(e.g. data.eval_fraction=0.05) to hold out documents for evaluation.")
    if split == "train" and len(indices) == 0:
        raise DataError(f"{source!r}: every document is held out for eval; lower data.eval_fraction.")
    return SubsetSource(source, indices, name=split)


class TextTailSplit:
    """One split of a single-document source: `train` is its text up to the cut, `eval` after.

    The cut is the first line break after `(1 - eval_fraction)` of the characters, so both
    parts are whole lines (nanoGPT holds out the tail of `input.txt` the same way).

    >>> TextTailSplit(["l1\\nl2\\nl3\\nl4\\n"], "eval", 0.25)[0]
    'l4\\n'
    """

    def __init__(self, source: Any, split: str, eval_fraction: float):
        self.source, self.split, self.eval_fraction = source, split, eval_fraction

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> str:
        _check_index(index, 1)
        text = self.source[0]
        cut = int(len(text) * (1.0 - self.eval_fraction))
        newline = text.find("\n", max(cut - 1, 0))
        cut = newline + 1 if newline >= 0 else cut
        return text[cut:] if self.split == "eval" else text[:cut]

    def __repr__(self) -> str:
        return f"TextTailSplit({self.split}, last {self.eval_fraction:g} held out, of {self.source!r})"


def check_not_empty(source: Any, what: str) -> None:
    """Refuse a source with no documents, or with only empty ones (reads until one has text).

    >>> check_not_empty(JsonlSource(["empty.jsonl"]), "data.paths")  # doctest: +SKIP
    DataError: data.paths: JsonlSource(0 lines, ...) holds no documents. ...
    """
    if len(source) == 0:
        raise DataError(f"{what}: {source!r} holds no documents. Point data.paths at non-empty data.")
    # Usually the first document has text, so this costs one read; only a source of empty
    # documents is read in full (and then it is refused, rather than looping forever later).
    for i in range(len(source)):
        if source[i].strip():
            return
    raise DataError(f"{what}: all {len(source)} documents of {source!r} are empty or whitespace. "
                    f"Check data.text_field and the files in data.paths.")


def make_source(data_cfg: Any, split: str) -> Any:
    """The document source of one split ("train" or "eval") for a `DataConfig`.

    Shakespeare and Brown are fetched into the cache on first use and split by document
    (held-out plays / texts). File sources hold out `eval_fraction` of their documents by a
    stable hash of the document index (a single document: the tail of its text). TFDS uses the dataset's own `validation` (or `eval`,
    `test`) split when it has one, else holds out `eval_fraction` of `train`.

    >>> src = make_source(DataConfig(source="jsonl", paths=("a.jsonl",)), "train")  # doctest: +SKIP
    >>> src[0]                                                                        # doctest: +SKIP
    'first document'
    """
    if split not in ("train", "eval"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'eval'.")
    kind = data_cfg.source
    if kind in ("shakespeare", "brown"):
        from jaxlearn.data.corpora import corpus_files

        source = TextFileSource(corpus_files(kind, split))
    elif kind == "tfds":
        source = _tfds_source(data_cfg, split)
    else:
        if kind == "text":
            whole = TextFileSource(data_cfg.paths)
        elif kind == "jsonl":
            whole = JsonlSource(data_cfg.paths, text_field=data_cfg.text_field)
        elif kind == "parquet":
            whole = ParquetSource(data_cfg.paths, text_field=data_cfg.text_field)
        elif kind == "arrayrecord":
            whole = ArrayRecordSource(data_cfg.paths)
        else:
            raise DataError(f"unknown data.source {kind!r}; use shakespeare, brown, text, jsonl, "
                            f"parquet, arrayrecord or tfds.")
        check_not_empty(whole, "data.paths")
        source = split_source(whole, split, data_cfg.eval_fraction)
    check_not_empty(source, f"data.source={kind} split {split}")
    return source


def _tfds_source(data_cfg: Any, split: str) -> Any:
    if len(data_cfg.paths) > 1:
        raise DataError(f"data.source=tfds takes one data_dir in data.paths, got {list(data_cfg.paths)}.")
    data_dir = data_cfg.paths[0] if data_cfg.paths else None
    name, field = data_cfg.tfds_name, data_cfg.text_field
    if split == "train":
        train = TfdsSource(name, "train", data_dir=data_dir, text_field=field)
        names = tfds_split_names(name, data_dir)
        if any(s in names for s in ("validation", "eval", "test")):
            return train
        return split_source(train, "train", data_cfg.eval_fraction)
    names = tfds_split_names(name, data_dir)
    for natural in ("validation", "eval", "test"):
        if natural in names:
            return TfdsSource(name, natural, data_dir=data_dir, text_field=field)
    train = TfdsSource(name, "train", data_dir=data_dir, text_field=field)
    return split_source(train, "eval", data_cfg.eval_fraction)


# --------------------------------------------------------------------------------------------
# Helpers


class _LineIndex:
    """Byte offsets of the non-blank lines of some files, for random access to line i."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        file_ids, starts, ends = [], [], []
        for i, path in enumerate(self.files):
            s, e = _line_offsets(path)
            file_ids.append(np.full(len(s), i, dtype=np.int32))
            starts.append(s)
            ends.append(e)
        self.file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, index: int) -> tuple[bytes, str, int]:
        index = _check_index(index, len(self))
        path = self.files[self.file_ids[index]]
        start, end = int(self.starts[index]), int(self.ends[index])
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start), path, start

    def text(self, index: int) -> str:
        raw, path, start = self.read(index)
        return _decode(raw, path, base_offset=start, where=f"{path}:{self.line_number(index)}")

    def line_number(self, index: int) -> int:
        """1-based line number in its file (counted on demand: only error messages need it)."""
        path = self.files[self.file_ids[index]]
        with open(path, "rb") as f:
            return f.read(int(self.starts[index])).count(b"\n") + 1


def _line_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each line with content, newline and `\\r` excluded."""
    newlines = []
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + size)
            size += len(block)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if len(starts):  # drop a trailing `\r` of Windows line ends, and lines that were only `\r`
        data = np.memmap(path, dtype=np.uint8, mode="r")
        ends = ends - (data[ends - 1] == 13)
        del data
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
    return starts, ends


def _decode(raw: bytes, path: str, *, base_offset: int = 0, where: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = base_offset + e.start
        if where is None:  # whole file: count the line of the bad byte
            line = raw[:e.start].count(b"\n") + 1
            where = f"{path}:{line}"
        raise DataError(f"{where}: not UTF-8 text (byte offset {offset} in {path}: "
                        f"{raw[e.start:e.start + 4]!r}). Re-encode the file as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8`.") from None


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if not 0 <= index < n:
        raise IndexError(f"document index {index} out of range for {n} documents")
    return index


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing function (wrapping uint64 arithmetic on arrays)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
