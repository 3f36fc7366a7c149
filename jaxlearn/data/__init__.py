"""The data layer: real corpora, a SentencePiece tokenizer, document sources and grain pipelines.

Modules (import the one you need; this package imports nothing on its own, so that
`import jaxlearn.data` stays cheap and free of side effects):

- `corpora`: fetch Shakespeare and the Brown corpus into a local cache, split them by document.
- `tokenizer`: `Tokenizer` (SentencePiece) and `train_tokenizer`.
- `sources`: random-access document sources over text, JSONL, Parquet, ArrayRecord and TFDS,
  plus `make_source(data_cfg, split)`.
- `tfds_text`: `TextFilesBuilder`, a TFDS builder that turns local text files into a dataset.
- `pipeline`: grain pipelines that tokenize, pack and batch documents for pretraining and eval.
- `errors`: `DataError`, raised for every problem with the user's data.
"""
