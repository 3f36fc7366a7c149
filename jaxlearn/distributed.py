"""Multi-host runs: starting `jax.distributed`.

Every process of a multi-host job runs the same program. `initialize` joins them into one JAX
job (automatically on Cloud TPU pods and SLURM/MPI clusters, or with an explicit coordinator);
after that `jax.devices()` lists every chip of the job and the mesh spans all of them. Which
rows of each global batch a host feeds is the data layer's business (`jaxlearn.data.feed`).
Example::

    initialize(coordinator="10.0.0.2:1234", num_processes=2, process_id=0)   # on each host
    feed = make_feed(cfg.data, tokenizer)               # this host's rows of every global batch
"""

from __future__ import annotations

import jax

from jaxlearn.config import ConfigError
# Moved to the data layer; re-exported until every caller imports them from jaxlearn.data.feed.
from jaxlearn.data.feed import HostFeed, host_eval_batches, owned_shards  # noqa: F401


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

