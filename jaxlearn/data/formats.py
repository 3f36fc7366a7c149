"""Which kind of records a `DataConfig` holds: the one place the data format is decided.

`text`: documents for pretraining (`jaxlearn.data.pipeline`); `chat`: conversations for
supervised fine-tuning (`jaxlearn.data.sft`); `preference`: (prompt, chosen, rejected) pairs
(`jaxlearn.data.preference`); `unpaired`: (prompt, completion, label) records for KTO, packed two
to a row in the pairs' layout (`jaxlearn.data.preference.unpaired_pairs`). `jaxlearn.data.feed.make_feed` dispatches on
`data_format`; nothing else inspects `data.format` or the source name for this. Example::

    data_format(DataConfig(source="wordnet"))   # 'chat'
"""

from __future__ import annotations

from typing import Any

# Sources whose documents are conversations whatever `data.format` says.
CHAT_SOURCES = ("wordnet", "wordnet_antonyms", "wordnet_definitions", "humaneval", "safety_sft")
# Sources whose records are preference pairs (jaxlearn.data.preference).
PREFERENCE_SOURCES = ("wordnet_antonym_prefs", "wordnet_definition_prefs", "humaneval_prefs", "safety_pairs")
# Sources whose records are prompts with answers, for RL (jaxlearn.data.prompts).
PROMPT_SOURCES = ("wordnet_antonym_prompts",)


def data_format(data_cfg: Any) -> str:
    """The format of a DataConfig's records: `data.format`, except that a chat-only source is chat.

    >>> from jaxlearn.config import DataConfig
    >>> data_format(DataConfig(source="humaneval")), data_format(DataConfig(source="jsonl", format="chat"))
    ('chat', 'chat')
    >>> data_format(DataConfig(source="brown"))
    'text'
    """
    fmt = getattr(data_cfg, "format", "text")
    if fmt == "text" and data_cfg.source in CHAT_SOURCES:
        return "chat"
    if fmt == "text" and data_cfg.source in PREFERENCE_SOURCES:
        return "preference"
    if fmt == "text" and data_cfg.source in PROMPT_SOURCES:
        return "prompts"
    return fmt


def is_chat(data_cfg: Any) -> bool:
    """Whether a DataConfig's documents are conversations (SFT) rather than plain text.

    >>> from jaxlearn.config import DataConfig
    >>> is_chat(DataConfig(source="wordnet")), is_chat(DataConfig(source="brown"))
    (True, False)
    """
    return data_format(data_cfg) == "chat"
