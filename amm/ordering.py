"""Workers ordered by expected memory, so that choosing where a replica goes (or
which one goes away) costs ~O(log W) instead of a scan of the whole cluster.

The order is rebuilt from a fresh memory snapshot at the start of every cycle and
updated in place each time the cycle accepts a suggestion, so that later
suggestions in the same cycle see the memory the earlier ones will cause.

Ties are broken by the worker's position in ``Scheduler.workers`` (sorted by
address): among equally loaded workers the first one receives and the last one
drops. Both search strategies below implement exactly this order, so which one
runs never changes the result, only its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Set
from math import isqrt

from sortedcontainers import SortedList

from distributed.scheduler import WorkerState

Accept = Callable[[WorkerState], bool]


class WorkerMemoryOrder:
    """Workers sorted by ``(expected memory, rank)``.

    ``memory`` is shared with the manager (it is the ``workers_memory`` that
    policies read), so it must only be changed through :meth:`update`.
    """

    __slots__ = ("memory", "_rank", "_sorted")

    memory: dict[WorkerState, int]
    _rank: dict[WorkerState, int]
    _sorted: SortedList

    def __init__(self, memory: dict[WorkerState, int]):
        self.memory = memory
        self._rank = {ws: i for i, ws in enumerate(memory)}
        # rank is unique, so tuples never fall through to comparing WorkerStates
        self._sorted = SortedList(
            (nbytes, self._rank[ws], ws) for ws, nbytes in memory.items()
        )

    def __len__(self) -> int:
        return len(self._sorted)

    def key(self, ws: WorkerState) -> tuple[int, int]:
        return self.memory[ws], self._rank[ws]

    def update(self, ws: WorkerState, nbytes: int) -> None:
        """Set the expected memory of ``ws`` and move it to its new place"""
        rank = self._rank[ws]
        self._sorted.remove((self.memory[ws], rank, ws))
        self.memory[ws] = nbytes
        self._sorted.add((nbytes, rank, ws))

    def ascending(self) -> Iterator[WorkerState]:
        for _, _, ws in self._sorted:
            yield ws

    def descending(self) -> Iterator[WorkerState]:
        for _, _, ws in reversed(self._sorted):
            yield ws

    def lowest(
        self, candidates: Set[WorkerState] | None, accept: Accept
    ) -> WorkerState | None:
        """The least loaded worker in ``candidates`` (all workers if None) that
        passes ``accept``, or None.
        """
        if candidates is not None and self._should_scan(candidates):
            eligible = [ws for ws in candidates if ws in self._rank and accept(ws)]
            return min(eligible, key=self.key, default=None)
        for ws in self.ascending():
            if (candidates is None or ws in candidates) and accept(ws):
                return ws
        return None

    def highest(
        self, candidates: Set[WorkerState] | None, accept: Accept
    ) -> WorkerState | None:
        """The most loaded worker in ``candidates`` (all workers if None) that passes
        ``accept``, or None.
        """
        if candidates is not None and self._should_scan(candidates):
            eligible = [ws for ws in candidates if ws in self._rank and accept(ws)]
            return max(eligible, key=self.key, default=None)
        for ws in self.descending():
            if (candidates is None or ws in candidates) and accept(ws):
                return ws
        return None

    def _should_scan(self, candidates: Set[WorkerState]) -> bool:
        """Pick the cheaper strategy for a candidate set of size C among W workers.

        Scanning the candidates costs C. Walking the order from one end costs about
        W / C steps before meeting a candidate, when candidates are spread across
        the order. The two meet at C = sqrt(W).
        """
        return len(candidates) <= max(4, isqrt(len(self._sorted)))
