"""The alignment pipeline: stages chained weight to weight, with a forgetting matrix after each
(`jaxlearn pipeline`, `jaxlearn/pipeline/runner.py`)."""
