"""The data feed of a run: this host's rows of every global batch, for every data format.

`make_feed` is the one place a `DataConfig` becomes batches: it picks the builder of the
config's format (`jaxlearn.data.formats.data_format`: text, chat) and returns a `Feed` with the
training stream, the held-out batches and, for chat, a report of what the encoding dropped.

Sharding: the global batch is drawn from `shards` data shards (`data.shards`, default one per
host). Shard `s` of `n` reads the documents (text) or examples (chat) `s::n` and yields
`batch_size / n` rows of each global batch; host `p` of `h` owns shards `p*k ... (p+1)*k - 1`
(k = n / h) and feeds only their rows, which `jax.make_array_from_process_local_data`
assembles into global arrays. Because the shards, not the hosts, define the data order, a run
with 2 hosts and `data.shards=2` sees the same batches as one host with `data.shards=2`, and
their data checkpoints (one file per shard, jaxlearn/train/checkpoint.py) restore in either
layout. Example::

    tok = resolve_tokenizer(cfg.data, "runs/demo")
    feed = make_feed(cfg.data, tok, max_eval_batches=cfg.train.eval_batches)
    local = next(feed.train)          # [batch_size / hosts, seq_len] arrays
    feed.train.shard_states()         # {shard: iterator state}, stored with each checkpoint
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxlearn.config import ConfigError
from jaxlearn.data import pipeline, preference, sft
from jaxlearn.data.batching import eval_share
from jaxlearn.data.errors import DataError
from jaxlearn.data.formats import data_format, is_chat  # noqa: F401 (is_chat: the one chat-or-text test)
from jaxlearn.data.run_tokenizer import resolve_tokenizer  # noqa: F401 (the one tokenizer choice)
from jaxlearn.data.sources import make_source


def owned_shards(shards: int, process_index: int, process_count: int) -> range:
    """The data shards host `process_index` feeds: `owned_shards(4, 1, 2) == range(2, 4)`.

    `shards=0` means one shard per host.

    >>> owned_shards(0, 1, 2)
    range(1, 2)
    """
    shards = shards or process_count
    if shards % process_count:
        raise ConfigError(f"data.shards={shards} does not divide over {process_count} hosts; "
                          f"use a multiple of {process_count} (or 0: one shard per host).")
    k = shards // process_count
    return range(process_index * k, (process_index + 1) * k)


class HostFeed:
    """This host's rows of every global batch: the concatenated batches of the shards it owns.

    `make_iterator(shard_index, shard_count)` builds one shard's iterator. Checkpointable per
    shard (`shard_states` / `set_shard_states`), see jaxlearn/train/checkpoint.py.

    >>> feed = HostFeed(lambda s, n: iter([{"x": np.full(1, s)}]), shards=2)
    >>> next(feed)["x"].tolist()
    [0, 1]
    """

    def __init__(self, make_iterator: Callable[[int, int], Any], shards: int,
                 process_index: int = 0, process_count: int = 1):
        self.shards = shards or process_count
        self.owned = owned_shards(self.shards, process_index, process_count)
        self.iterators = {s: make_iterator(s, self.shards) for s in self.owned}

    @classmethod
    def for_config(cls, data_cfg: Any, tokenizer: Any) -> "HostFeed":
        """This process's training feed of a DataConfig (`make_feed(...).train`, without the eval batches).

        >>> feed = HostFeed.for_config(cfg.data, tok)        # doctest: +SKIP
        """
        return make_train_feed(data_cfg, tokenizer)

    @classmethod
    def wrap(cls, iterator: Any) -> "HostFeed":
        """A plain per-host iterator (host p reads shard p of one per host) seen as a feed."""
        if isinstance(iterator, HostFeed):
            return iterator
        return cls(lambda s, n: iterator, 0, jax.process_index(), jax.process_count())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self.iterators[s]) for s in self.owned]
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def shard_states(self) -> dict[int, Any]:
        return {s: it.get_state() for s, it in self.iterators.items()}

    def set_shard_states(self, states: dict[int, Any]) -> None:
        for s, it in self.iterators.items():
            it.set_state(states[s])


@dataclasses.dataclass
class Feed:
    """What a run reads: training batches, held-out batches and a report on the data.

    `train`: this host's rows of every global batch (a `HostFeed`, checkpointable per shard).
    `eval_batches`: this host's rows of each held-out global batch, the same every call.
    `report`: None, or (chat) the encoding counts `{"train": {...}, "validation": {...}}`
    written to `data_report.json`, plus `"summary"`, the lines to print.
    """

    train: HostFeed
    eval_batches: list[dict[str, np.ndarray]]
    report: dict | None = None


@dataclasses.dataclass(frozen=True)
class Hosts:
    """Where this process sits: its index, the process count and the data shards it owns."""

    process_index: int
    process_count: int
    shards: int  # data shards in all (data.shards, or one per host)
    owned: range

    @classmethod
    def of(cls, data_cfg: Any, process_index: int | None = None, process_count: int | None = None) -> "Hosts":
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if not 0 <= pi < pc:
            raise ConfigError(f"process_index {pi} is not in [0, {pc}); pass the index of this host.")
        shards = data_cfg.shards or pc
        return cls(pi, pc, shards, owned_shards(shards, pi, pc))

    def train_feed(self, make_iterator: Callable[[int, int], Any]) -> HostFeed:
        return HostFeed(make_iterator, self.shards, self.process_index, self.process_count)


# Each format gives (1) the training stream of the shards this host owns and (2) this host's rows
# of the held-out batches, each with its encoding counts (a dataclass with `summary()`, or None).


def _text_train(data_cfg: Any, tokenizer: Any, hosts: Hosts) -> tuple[HostFeed, None]:
    """Pretraining documents, packed; document shard `s` of `n` reads documents `s::n`."""
    return hosts.train_feed(lambda s, n: pipeline.text_train_iterator(data_cfg, tokenizer, shard_index=s,
                                                                      shard_count=n)), None


def _text_held_out(data_cfg: Any, tokenizer: Any, hosts: Hosts, max_batches: int | None) -> tuple[list, None]:
    rows = pipeline.eval_rows(make_source(data_cfg, "eval"), tokenizer, seq_len=data_cfg.seq_len,
                              batch_size=data_cfg.batch_size, max_batches=max_batches)
    return eval_share(rows, batch_size=data_cfg.batch_size, shards=hosts.owned, shard_count=hosts.shards), None


def _chat_train(data_cfg: Any, tokenizer: Any, hosts: Hosts) -> tuple[HostFeed, sft.SFTStats]:
    """Conversations (SFT), loss-masked and first-fit packed; example shard `s` of `n` reads examples `s::n`."""
    # Encoded once per host and shared by the shards it owns: encoding is the slow part.
    rows, stats = sft.encode_split(data_cfg, tokenizer, "train")
    return hosts.train_feed(lambda s, n: sft.train_rows_iterator(data_cfg, rows, shard_index=s, shard_count=n)), stats


def _chat_held_out(data_cfg: Any, tokenizer: Any, hosts: Hosts,
                   max_batches: int | None) -> tuple[list, sft.SFTStats]:
    rows, stats = sft.encode_split(data_cfg, tokenizer, "validation")
    packed = sft.sft_eval_rows(rows, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                               max_batches=max_batches)
    return eval_share(packed, batch_size=data_cfg.batch_size, shards=hosts.owned, shard_count=hosts.shards), stats


def _pref_train(data_cfg: Any, tokenizer: Any, hosts: Hosts) -> tuple[HostFeed, preference.PrefStats]:
    """Preference pairs, one per row ([B, 2, T]); pair shard `s` of `n` reads pairs `s::n`."""
    rows, stats = preference.encode_split(data_cfg, tokenizer, "train")
    return hosts.train_feed(lambda s, n: preference.train_iterator(data_cfg, rows, shard_index=s,
                                                                   shard_count=n)), stats


def _pref_held_out(data_cfg: Any, tokenizer: Any, hosts: Hosts,
                   max_batches: int | None) -> tuple[list, preference.PrefStats]:
    rows, stats = preference.encode_split(data_cfg, tokenizer, "validation")
    return preference.eval_batches(data_cfg, rows, max_batches=max_batches, shards=hosts.owned,
                                   shard_count=hosts.shards), stats


def _prompt_train(data_cfg: Any, tokenizer: Any, hosts: Hosts) -> tuple[HostFeed, Any]:
    """Prompts for RL, one per row, left-padded; prompt shard `s` of `n` reads prompts `s::n`."""
    from jaxlearn.data import prompts

    rows, stats = prompts.encode_split(data_cfg, tokenizer, "train")
    return hosts.train_feed(lambda s, n: prompts.train_iterator(data_cfg, rows, shard_index=s, shard_count=n)), stats


def _prompt_held_out(data_cfg: Any, tokenizer: Any, hosts: Hosts, max_batches: int | None) -> tuple[list, Any]:
    from jaxlearn.data import prompts

    rows, stats = prompts.encode_split(data_cfg, tokenizer, "validation")
    return prompts.eval_batches(data_cfg, rows, max_batches=max_batches, shards=hosts.owned,
                                shard_count=hosts.shards), stats


@dataclasses.dataclass(frozen=True)
class FormatBuilder:
    """How one data format becomes a feed (see the functions above for the signatures)."""

    train: Callable[[Any, Any, Hosts], tuple[HostFeed, Any]]
    held_out: Callable[[Any, Any, Hosts, int | None], tuple[list, Any]]
    label: str = ""  # names the data in the printed report, e.g. "SFT data, train: ..."


# data format -> builder: the one dispatch on the format. A new format (`preference`:
# chosen/rejected pairs) is one entry here, plus its encoder and batch kind. Read-only on purpose.
FORMATS: Mapping[str, FormatBuilder] = types.MappingProxyType({
    "text": FormatBuilder(_text_train, _text_held_out),
    "chat": FormatBuilder(_chat_train, _chat_held_out, label="SFT"),
    "preference": FormatBuilder(_pref_train, _pref_held_out, label="Preference"),
    # unpaired KTO records: the pairs' layout and batching, two independent examples per row
    "unpaired": FormatBuilder(_pref_train, _pref_held_out, label="Unpaired (KTO)"),
    "prompts": FormatBuilder(_prompt_train, _prompt_held_out, label="Prompt"),
})


def make_feed(data_cfg: Any, tokenizer: Any, *, max_eval_batches: int | None = None,
              process_index: int | None = None, process_count: int | None = None) -> Feed:
    """This host's training feed and held-out batches for a DataConfig, whatever its format.

    `max_eval_batches` caps the held-out global batches (a run passes `cfg.train.eval_batches`;
    None: the whole split). `process_index` / `process_count` default to JAX's; pass them to
    build another host's view (tests, tools).

    >>> feed = make_feed(cfg.data, tok, max_eval_batches=8)              # doctest: +SKIP
    >>> next(feed.train)["inputs"].shape, len(feed.eval_batches)          # doctest: +SKIP
    ((8, 256), 8)
    """
    if max_eval_batches is not None and max_eval_batches <= 0:
        raise DataError(f"max_eval_batches (train.eval_batches) must be a positive number of batches, got "
                        f"{max_eval_batches}; use 1 or more (or leave it unset for the whole held-out split).")
    builder = _builder(data_cfg)
    hosts = Hosts.of(data_cfg, process_index, process_count)
    train, train_counts = builder.train(data_cfg, tokenizer, hosts)
    evals, eval_counts = builder.held_out(data_cfg, tokenizer, hosts, max_eval_batches)
    return Feed(train, evals, _report(builder.label, train_counts, eval_counts))


def make_train_feed(data_cfg: Any, tokenizer: Any, *, process_index: int | None = None,
                    process_count: int | None = None) -> HostFeed:
    """Only the training stream of `make_feed` (no held-out batches are built).

    >>> next(make_train_feed(cfg.data, tok))["inputs"].shape     # doctest: +SKIP
    (8, 256)
    """
    hosts = Hosts.of(data_cfg, process_index, process_count)
    return _builder(data_cfg).train(data_cfg, tokenizer, hosts)[0]


def host_eval_batches(data_cfg: Any, tokenizer: Any, max_batches: int | None, *, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """Only the held-out batches of `make_feed`: this host's rows, shard by shard as it trains.

    >>> len(host_eval_batches(cfg.data, tok, 8))        # doctest: +SKIP
    8
    """
    hosts = Hosts.of(data_cfg, process_index, process_count)
    return _builder(data_cfg).held_out(data_cfg, tokenizer, hosts, max_batches)[0]


def _report(label: str, train_counts: Any, eval_counts: Any) -> dict | None:
    """The encoding counts as `data_report.json` holds them, plus the `summary` lines to print."""
    if train_counts is None:
        return None
    report = {"train": dataclasses.asdict(train_counts), "validation": dataclasses.asdict(eval_counts)}
    report["summary"] = (f"{label} data, train: {train_counts.summary()}\n"
                         f"{label} data, validation: {eval_counts.summary()}")
    return report


def _builder(data_cfg: Any) -> FormatBuilder:
    fmt = data_format(data_cfg)
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} has no feed; use one of {', '.join(FORMATS)}.")
    return FORMATS[fmt]
