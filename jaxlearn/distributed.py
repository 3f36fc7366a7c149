"""Multi-host runs: starting `jax.distributed`, and each host's share of the global batch.

Every process of a multi-host job runs the same program. `initialize` joins them into one JAX
job (automatically on Cloud TPU pods and SLURM/MPI clusters, or with an explicit coordinator);
after that `jax.devices()` lists every chip of the job and the mesh spans all of them.

Data: the global batch is drawn from `shards` document shards (`data.shards`, default one per
host); host `p` of `n` owns shards `p*k ... (p+1)*k - 1` (k = shards / n) and feeds only their
rows, which `jax.make_array_from_process_local_data` assembles into global arrays. Because the
shards, not the hosts, define the data order, a run with 2 hosts and `data.shards=2` sees the
same batches as one host with `data.shards=2`, and their data checkpoints (one file per shard)
restore in either layout. Example::

    initialize(coordinator="10.0.0.2:1234", num_processes=2, process_id=0)   # on each host
    feed = HostFeed.for_config(cfg.data, tokenizer)     # this host's rows of every global batch
    local = next(feed)                                   # [batch_size / hosts, seq_len] arrays
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxlearn.config import ConfigError


def initialize(coordinator: str = "", num_processes: int | None = None, process_id: int | None = None,
               cpu_collectives: str = "gloo") -> None:
    """Join this process to a multi-process JAX job; call before anything touches a device.

    With no arguments JAX detects the cluster (Cloud TPU pod slices, SLURM, Open MPI,
    Kubernetes JobSet). Elsewhere pass the coordinator `host:port` (process 0's address), the
    number of processes and this process's id. CPU devices need a collectives library for
    cross-process all-reduces: gloo, built into jaxlib.

    >>> initialize("127.0.0.1:8476", num_processes=2, process_id=0)       # doctest: +SKIP
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError("an explicit coordinator needs --num-processes and --process-id as well.")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()


def owned_shards(shards: int, process_index: int, process_count: int) -> range:
    """The document shards host `process_index` feeds: `owned_shards(4, 1, 2) == range(2, 4)`."""
    shards = shards or process_count
    if shards % process_count:
        raise ConfigError(f"data.shards={shards} does not divide over {process_count} hosts; "
                          f"use a multiple of {process_count} (or 0: one shard per host).")
    k = shards // process_count
    return range(process_index * k, (process_index + 1) * k)


class HostFeed:
    """This host's rows of every global batch: the concatenated batches of the shards it owns.

    Checkpointable per shard (`shard_states` / `set_shard_states`), see
    jaxlearn/train/checkpoint.py.
    """

    def __init__(self, make_iterator: Callable[[int, int], Any], shards: int,
                 process_index: int = 0, process_count: int = 1):
        self.shards = shards or process_count
        self.owned = owned_shards(self.shards, process_index, process_count)
        self.iterators = {s: make_iterator(s, self.shards) for s in self.owned}

    @classmethod
    def for_config(cls, data_cfg: Any, tokenizer: Any) -> "HostFeed":
        from jaxlearn.data.pipeline import make_train_iterator

        return cls(lambda s, n: make_train_iterator(data_cfg, tokenizer, shard_index=s, shard_count=n),
                   data_cfg.shards, jax.process_index(), jax.process_count())

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


def host_eval_batches(data_cfg: Any, tokenizer: Any, max_batches: int | None) -> list[dict]:
    """This host's rows of the held-out batches, shard by shard as `HostFeed` feeds training."""
    from jaxlearn.data.pipeline import make_eval_batches

    shards = data_cfg.shards or jax.process_count()
    per_shard = [make_eval_batches(data_cfg, tokenizer, max_batches, shard_index=s, shard_count=shards)
                 for s in owned_shards(shards, jax.process_index(), jax.process_count())]
    return [{k: np.concatenate([bs[i][k] for bs in per_shard]) for k in per_shard[0][i]}
            for i in range(len(per_shard[0]))]
