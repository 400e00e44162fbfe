"""Eager reduction: drop the replicas a finished task no longer needs right away,
instead of waiting up to an interval for the next cycle.

A task's dependencies are copied to the worker that runs it. Once it finishes,
those copies are often needed by nothing, yet under the periodic cycle alone they
stay in memory for up to ``amm.interval``. In a computation that keeps finishing
tasks (a matrix product, say) that is a steady surplus of dead replicas, and it is
what sets the peak.

So the plugin watches transitions to memory and collects the dependencies of the
finished task that have more than one replica; a moment later (``delay``, so that
a burst of completions makes one pass, not hundreds) the manager runs
ReduceReplicas over just those keys, through the usual cycle and invariants. A
replica still wanted (a waiting dependent, a desired count) is kept exactly as the
periodic cycle would keep it.

It only acts while the manager runs periodically and has a ReduceReplicas policy:
a user who stopped the AMM or configured it without ReduceReplicas gets nothing
dropped behind their back. Nor does one whose ReduceReplicas is a subclass with a
``run()`` of its own: the pass runs the stock rules, which are not that policy's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from distributed.active_memory_manager import ReduceReplicas as _DistReduceReplicas
from distributed.scheduler import TaskState

from amm.logs import logger

if TYPE_CHECKING:
    from amm.manager import ActiveMemoryManager


class EagerReduction:
    """Collects keys whose replicas may have become superfluous and reduces them
    shortly after
    """

    def __init__(self, manager: ActiveMemoryManager, delay: float):
        self.manager = manager
        self.delay = delay
        self.keys: set[TaskState] = set()
        self._timer: asyncio.TimerHandle | None = None

    def task_finished(self, ts: TaskState) -> None:
        for dts in ts.dependencies:
            who_has = dts.who_has
            if who_has and len(who_has) > 1:
                self.keys.add(dts)
        if self.keys and self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.delay, self.flush)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.keys.clear()

    def flush(self) -> None:
        from amm.policies import ReduceReplicas

        self._timer = None
        manager = self.manager
        periodic = next((p for p in manager.policies if _stock_rules(p)), None)
        if not manager.running or periodic is None:
            self.keys.clear()
            return
        if manager.cycle_in_progress:
            self._schedule()  # try again once the regular cycle is through
            return
        keys, self.keys = self.keys, set()
        # the same rule as the periodic policy: distributed's is "each"
        unassigned_waiters = getattr(periodic, "unassigned_waiters", "each")
        try:
            manager.run_policies_once(
                [ReduceReplicas(keys=keys, unassigned_waiters=unassigned_waiters)]
            )
        except Exception:
            logger.exception("Eager replica reduction failed")


def _stock_rules(policy: object) -> bool:
    """Whether ``policy`` decides as this project's or distributed's ReduceReplicas
    (this project's is one of distributed's), which an eager pass reproduces
    """
    from amm.policies import ReduceReplicas

    return isinstance(policy, _DistReduceReplicas) and type(policy).run in (
        ReduceReplicas.run,
        _DistReduceReplicas.run,
    )
