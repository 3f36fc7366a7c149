"""The data layer: real corpora, a SentencePiece tokenizer, document sources and grain pipelines.

Modules (import the one you need; this package imports nothing on its own, so that
`import jaxlearn.data` stays cheap and free of side effects):

- `corpora`: fetch Shakespeare and the Brown corpus into a local cache, split them by document.
- `tokenizer`: `Tokenizer` (SentencePiece) and `train_tokenizer`.
- `sources`: random-access document sources over text, JSONL, Parquet, ArrayRecord and TFDS,
  plus `make_source(data_cfg, split)`.
- `tfds_text`: `TextFilesBuilder`, a TFDS builder that turns local text files into a dataset.
- `pipeline`: grain pipelines that tokenize, pack and batch documents for pretraining and eval.
- `sft`: conversations -> loss-masked, first-fit-packed batches (supervised fine-tuning).
- `formats`: `data_format` / `is_chat`, the one decision of what kind of records a config holds.
- `batching`: `TOKEN_FEATURES` (the batch features and dtypes), padding, each host's eval rows.
- `feed`: `make_feed`, the one format dispatch: a run's training feed (`HostFeed`, per data
  shard) and held-out batches.
- `run_tokenizer`: `resolve_tokenizer`, the one place a run's tokenizer is chosen.
- `model_files`: the named pretrained checkpoints (presets), fetched into the cache.
- `errors`: `DataError`, raised for every problem with the user's data.
"""
