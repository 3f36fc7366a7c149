"""Document sources over local files (text, JSONL, Parquet, ArrayRecord, TFDS) and their errors."""

import json
import pickle

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlearn.config import DataConfig
from jaxlearn.data import sources
from jaxlearn.data.errors import DataError

DOCS = ["First document.\nIt has two lines.", "Second: naïve café ☃", "third", "", "fifth and last"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_arrayrecord(path, docs):
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for d in docs:
        writer.write(d.encode("utf-8") if isinstance(d, str) else d)
    writer.close()
    return path


# --------------------------------------------------------------------------------------------
# Each source type reads back what was written


def test_text_files_one_document_per_file(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(d, encoding="utf-8")
    src = sources.TextFileSource([tmp_path / "doc*.txt"])
    assert len(src) == 5 and [src[i] for i in range(5)] == DOCS
    assert list(grain.MapDataset.source(src)) == DOCS  # grain reads it as a data source


def test_text_files_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n\nline two\r\n\r\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("line three", encoding="utf-8")
    src = sources.TextFileSource([tmp_path / "a.txt", tmp_path / "b.txt"], per_line=True)
    assert [src[i] for i in range(len(src))] == ["line one", "line two", "line three"]


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    with open(path, "a") as f:
        f.write("\n\n")  # trailing blank lines are not documents
    src = sources.JsonlSource([path])
    assert [src[i] for i in range(len(src))] == DOCS
    assert sources.JsonlSource([path], text_field="text")[1] == DOCS[1]


def test_parquet(tmp_path):
    for part in range(2):  # two files, several row groups each
        table = pa.table({"body": DOCS, "n": list(range(5))})
        pq.write_table(table, tmp_path / f"p{part}.parquet", row_group_size=2)
    src = sources.ParquetSource([tmp_path / "*.parquet"], text_field="body")
    assert len(src) == 10 and [src[i] for i in range(10)] == DOCS + DOCS
    assert src[9] == DOCS[4] and src[2] == DOCS[2]  # random access across files and groups
    clone = pickle.loads(pickle.dumps(src))
    assert clone[7] == DOCS[2]


def test_arrayrecord(tmp_path):
    write_arrayrecord(tmp_path / "a.array_record", DOCS[:3])
    write_arrayrecord(tmp_path / "b.array_record", DOCS[3:])
    src = sources.ArrayRecordSource([tmp_path / "*.array_record"])
    assert len(src) == 5 and [src[i] for i in range(5)] == DOCS
    assert pickle.loads(pickle.dumps(src))[4] == DOCS[4]


def test_tfds_text_files_builder(tmp_path):
    from jaxlearn.data.tfds_text import TextFilesBuilder

    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} ☃", encoding="utf-8")
    data_dir = tmp_path / "tfds"
    builder = TextFilesBuilder(paths=[str(tmp_path / "*.txt")], eval_fraction=0.2, data_dir=str(data_dir),
                               file_format="array_record")
    builder.download_and_prepare()
    raw = builder.as_data_source()
    assert set(raw) == {"train", "validation"} and len(raw["train"]) + len(raw["validation"]) == 20
    assert isinstance(raw["train"][0]["text"], bytes)

    # Read back by name from the data_dir alone (the builder is not in TFDS's registry).
    cfg = DataConfig(source="tfds", tfds_name="text_files", paths=(str(data_dir),))
    train, held = sources.make_source(cfg, "train"), sources.make_source(cfg, "eval")
    texts = {train[i] for i in range(len(train))} | {held[i] for i in range(len(held))}
    assert texts == {f"document {i} ☃" for i in range(20)}
    assert len(held) == len(raw["validation"])  # the natural split is used
    assert pickle.loads(pickle.dumps(train))[0] == train[0]


def test_make_source_splits_file_sources(tmp_path):
    paths = []
    for i in range(200):
        paths.append(tmp_path / f"d{i:03d}.txt")
        paths[-1].write_text(f"doc {i}")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), eval_fraction=0.1)
    train, held = sources.make_source(cfg, "train"), sources.make_source(cfg, "eval")
    got_train = [train[i] for i in range(len(train))]
    got_eval = [held[i] for i in range(len(held))]
    assert 8 <= len(got_eval) <= 35 and not set(got_train) & set(got_eval)
    assert sorted(got_train + got_eval) == sorted(f"doc {i}" for i in range(200))
    again = sources.make_source(cfg, "eval")
    assert [again[i] for i in range(len(again))] == got_eval  # stable


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrayrecord"])
def test_make_source_dispatch(tmp_path, kind):
    docs = [f"document number {i}" for i in range(30)]
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", [{"content": d} for d in docs])
    elif kind == "parquet":
        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"content": docs}), path)
    else:
        path = write_arrayrecord(tmp_path / "a.array_record", docs)
    cfg = DataConfig(source=kind, paths=(str(path),), text_field="content", eval_fraction=0.2)
    parts = [sources.make_source(cfg, s) for s in ("train", "eval")]
    held = sources.held_out_mask(len(docs), 0.2)
    assert 0 < held.sum() < len(docs)
    # each split holds exactly its documents, in file order: the held-out ones by their stable hash
    assert [parts[1][i] for i in range(len(parts[1]))] == [d for d, h in zip(docs, held) if h]
    assert [parts[0][i] for i in range(len(parts[0]))] == [d for d, h in zip(docs, held) if not h]


def test_held_out_mask_is_stable():
    mask = sources.held_out_mask(10_000, 0.05)
    assert 400 < mask.sum() < 600
    assert np.array_equal(mask, sources.held_out_mask(10_000, 0.05))
    assert np.array_equal(mask[:100], sources.held_out_mask(100, 0.05) | mask[:100])  # prefix-stable
    assert sources.held_out_mask(3, 0.01).sum() == 1  # a tiny dataset still gets one eval document
    assert sources.held_out_mask(10, 0.0).sum() == 0


# --------------------------------------------------------------------------------------------
# Bad input: each error names the file (and line) and the fix


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"text file .*nope\.txt does not exist.*data\.paths"):
        sources.TextFileSource([tmp_path / "nope.txt"])


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"glob .*\*\.jsonl' matches no JSONL files"):
        sources.JsonlSource([str(tmp_path / "*.jsonl")])


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory.*glob"):
        sources.TextFileSource([tmp_path])


def test_no_paths():
    with pytest.raises(DataError, match="no text files given. Set data.paths"):
        sources.make_source(DataConfig(source="text"), "train")


def test_non_utf8_text(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    src = sources.TextFileSource([path])
    with pytest.raises(DataError, match=r"latin1\.txt:2: not UTF-8 text \(byte offset 21.*iconv"):
        src[0]
    lines = sources.TextFileSource([path], per_line=True)
    assert lines[0] == "line one"
    with pytest.raises(DataError, match=r"latin1\.txt:2: not UTF-8 text \(byte offset 21"):
        lines[1]


def test_jsonl_line_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n')
    src = sources.JsonlSource([path])
    assert src[1] == "fine"
    with pytest.raises(DataError, match=r"bad\.jsonl:4: the line is not valid JSON"):
        src[2]


def test_jsonl_line_without_the_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: the line has no field 'text' \(it has \['body'\]\).*data\.text_field"):
        sources.JsonlSource([path])[1]
    write_jsonl(tmp_path / "b.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' is a int"):
        sources.JsonlSource([tmp_path / "b.jsonl"])[0]


def test_jsonl_bad_first_line_fails_early(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}] * 3)
    cfg = DataConfig(source="jsonl", paths=(str(path),))
    with pytest.raises(DataError, match=r"a\.jsonl:1: the line has no field 'text'"):
        sources.make_source(cfg, "train")  # refused before training starts


def test_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: \['body'\]\)"):
        sources.ParquetSource([tmp_path / "a.parquet"])


def test_not_a_parquet_or_arrayrecord_file(tmp_path):
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(DataError, match=r"x\.parquet is not a readable Parquet file"):
        sources.ParquetSource([tmp_path / "x.parquet"])
    (tmp_path / "x.array_record").write_text("hello")
    with pytest.raises(DataError, match=r"x\.array_record is not a readable ArrayRecord file"):
        sources.ArrayRecordSource([tmp_path / "x.array_record"])


def test_arrayrecord_record_not_utf8(tmp_path):
    write_arrayrecord(tmp_path / "a.array_record", ["fine"])
    write_arrayrecord(tmp_path / "b.array_record", ["ok", b"\xff\xfe bad"])
    src = sources.ArrayRecordSource([tmp_path / "*.array_record"])
    with pytest.raises(DataError, match=r"b\.array_record: record 1 is not UTF-8 text \(byte 0"):
        src[2]


def test_empty_datasets(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"all 1 text files are empty \(first: .*empty\.txt\)"):
        sources.TextFileSource([tmp_path / "empty.txt"])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "blank.jsonl"),))
    with pytest.raises(DataError, match="holds no documents"):
        sources.make_source(cfg, "train")
    write_jsonl(tmp_path / "spaces.jsonl", [{"text": ""}, {"text": "  \n"}])
    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "spaces.jsonl"),))
    with pytest.raises(DataError, match="all 2 documents .* are empty or whitespace"):
        sources.make_source(cfg, "train")


def test_single_document_is_split_by_its_tail(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    (tmp_path / "input.txt").write_text("".join(lines))
    cfg = DataConfig(source="text", paths=(str(tmp_path / "input.txt"),), eval_fraction=0.1)
    train, held = sources.make_source(cfg, "train"), sources.make_source(cfg, "eval")
    assert len(train) == len(held) == 1
    assert train[0] + held[0] == "".join(lines)  # whole lines on both sides, nothing lost
    assert held[0].startswith("line ") and 0.07 < len(held[0]) / len(train[0] + held[0]) < 0.11


def test_no_eval_split(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), eval_fraction=0.0)
    assert len(sources.make_source(cfg, "train")) == 3
    with pytest.raises(DataError, match="no held-out documents: data.eval_fraction is 0"):
        sources.make_source(cfg, "eval")


def test_tfds_dataset_not_prepared(tmp_path):
    cfg = DataConfig(source="tfds", tfds_name="text_files", paths=(str(tmp_path),))
    with pytest.raises(DataError, match=r"TFDS dataset 'text_files'.*TextFilesBuilder"):
        sources.make_source(cfg, "train")
