"""An Active Memory Manager for Dask, installed as a scheduler plugin.

Enable it with the dask config ``distributed.scheduler.preload: [amm]`` (or
``dask scheduler --preload amm``), or on a running cluster with
``client.register_plugin(amm.ActiveMemoryManagerPlugin())``.
"""

from __future__ import annotations

from distributed.active_memory_manager import Suggestion

from amm import config  # noqa: F401  (loads the amm config defaults)
from amm.client import AMMClient
from amm.config import AMMConfigError
from amm.manager import ActiveMemoryManager
from amm.plugin import ActiveMemoryManagerPlugin, install
from amm.policy import ActiveMemoryManagerPolicy
from amm.policies import Rebalance, ReduceReplicas, ReplicateN, RetireWorker

__all__ = [
    "AMMClient",
    "AMMConfigError",
    "ActiveMemoryManager",
    "ActiveMemoryManagerPlugin",
    "ActiveMemoryManagerPolicy",
    "Rebalance",
    "ReduceReplicas",
    "ReplicateN",
    "RetireWorker",
    "Suggestion",
    "dask_setup",
    "install",
]

__version__ = "0.1.0"


def dask_setup(scheduler) -> None:  # type: ignore[no-untyped-def]
    """Preload hook: ``distributed.scheduler.preload: [amm]``.

    Adds the plugin; the scheduler starts it (installing the manager) once its own
    extensions exist. A preload that runs on a worker or nanny does nothing.
    """
    from distributed.scheduler import Scheduler

    if isinstance(scheduler, Scheduler):
        scheduler.add_plugin(ActiveMemoryManagerPlugin(), idempotent=True)
