"""Multi-process start-up: the same code path for a TPU pod, a GPU cluster and two
processes over loopback on one CPU machine (how the tests exercise it).

Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> None:
    """Join a multi-process JAX run.

    ``auto=True``: let JAX detect the cluster (TPU pods, SLURM, ...).
    Otherwise give ``coordinator`` ("host:port"), ``num_processes`` and
    ``process_id``. On CPU the collectives go through gloo.
    """
    if not auto and coordinator is None:
        return
    # only the CPU backend reads this; accelerators keep their own collectives
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                                   process_id=int(process_id))


def is_main() -> bool:
    return jax.process_index() == 0
