"""Workers ordered by expected memory, so that choosing where a replica goes (or
which one goes away) costs ~O(log W) instead of a scan of the whole cluster.

The order is built from a fresh memory snapshot at the start of every cycle and
follows the cycle's accepted suggestions: :meth:`WorkerMemoryOrder.update` records
a worker's new expected memory at once, and the sorted structure catches up the
next time a search walks it. Suggestions that only ever scan a few candidates (the
drops of ReduceReplicas, for instance) therefore never pay for re-sorting.

Ties are broken by the worker's position in ``Scheduler.workers`` (sorted by
address): among equally loaded workers the first one receives and the last one
drops. Both search strategies below implement exactly this order, so which one
runs never changes the result, only its cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from math import isqrt

from sortedcontainers import SortedList

from distributed.scheduler import WorkerState


class WorkerMemoryOrder:
    """Workers sorted by ``(expected memory, rank)``.

    ``memory`` is shared with the manager (it is the ``workers_memory`` that
    policies read), so it must only be changed through :meth:`update`.

    Searches take the eligibility rule as sets rather than a callable, which keeps
    the per-worker test to a few hash lookups: a worker is eligible if it is in
    ``candidates`` (None: any worker), in ``require`` (None: no requirement) and in
    none of ``exclude``.
    """

    __slots__ = ("memory", "_rank", "_sorted", "_walkable", "_stale", "_scan_limit")

    memory: dict[WorkerState, int]
    _rank: dict[WorkerState, int]
    _sorted: SortedList
    #: the workers in _sorted
    _walkable: set[WorkerState]
    #: workers whose entry in _sorted still carries this old memory value
    _stale: dict[WorkerState, int]
    _scan_limit: int

    def __init__(
        self,
        memory: dict[WorkerState, int],
        walkable: Set[WorkerState] | None = None,
    ):
        """``walkable``: the workers searches may walk to (default: all). The
        others are only ever found by scanning a candidate set. The manager walks
        running workers only: paused and retiring ones never receive, so their
        memory stays put while everyone else's grows, and a walk from the low end
        would have to step over all of them on every search.
        """
        self.memory = memory
        self._rank = {ws: i for i, ws in enumerate(memory)}
        self._walkable = (
            set(memory) if walkable is None else {ws for ws in memory if ws in walkable}
        )
        # rank is unique, so tuples never fall through to comparing WorkerStates
        self._sorted = SortedList(
            (nbytes, self._rank[ws], ws)
            for ws, nbytes in memory.items()
            if ws in self._walkable
        )
        self._stale = {}
        # Scanning C candidates costs C; walking the order from one end costs
        # about W / C steps before meeting one, when candidates are spread over
        # the order. The two meet at C = sqrt(W).
        self._scan_limit = max(4, isqrt(len(memory)))

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, ws: object) -> bool:
        return ws in self._rank

    def key(self, ws: WorkerState) -> tuple[int, int]:
        return self.memory[ws], self._rank[ws]

    def update(self, ws: WorkerState, nbytes: int) -> None:
        """Set the expected memory of ``ws``"""
        if ws not in self._stale and ws in self._walkable:
            self._stale[ws] = self.memory[ws]
        self.memory[ws] = nbytes

    def _catch_up(self) -> None:
        if self._stale:
            memory, rank, sorted_ = self.memory, self._rank, self._sorted
            for ws, old in self._stale.items():
                sorted_.remove((old, rank[ws], ws))
                sorted_.add((memory[ws], rank[ws], ws))
            self._stale.clear()

    def ascending(self) -> Iterator[WorkerState]:
        self._catch_up()
        for _, _, ws in self._sorted:
            yield ws

    def descending(self) -> Iterator[WorkerState]:
        self._catch_up()
        for _, _, ws in reversed(self._sorted):
            yield ws

    def lowest(
        self,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None = None,
        exclude: tuple[Set[WorkerState], ...] = (),
    ) -> WorkerState | None:
        """The least loaded eligible worker, or None"""
        if candidates is not None and len(candidates) <= self._scan_limit:
            return self._scan(candidates, require, exclude, False)
        return self._walk(self.ascending(), candidates, require, exclude)

    def highest(
        self,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None = None,
        exclude: tuple[Set[WorkerState], ...] = (),
    ) -> WorkerState | None:
        """The most loaded eligible worker, or None"""
        if candidates is not None and len(candidates) <= self._scan_limit:
            return self._scan(candidates, require, exclude, True)
        return self._walk(self.descending(), candidates, require, exclude)

    def scan_highest(
        self,
        candidates: Set[WorkerState],
        require: Set[WorkerState] | None = None,
        exclude: tuple[Set[WorkerState], ...] = (),
    ) -> WorkerState | None:
        """The most loaded eligible worker among ``candidates``, found by scanning
        them, whatever their number: for workers that may not be walkable
        """
        return self._scan(candidates, require, exclude, True)

    @staticmethod
    def _walk(
        order: Iterator[WorkerState],
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None,
        exclude: tuple[Set[WorkerState], ...],
    ) -> WorkerState | None:
        for ws in order:
            if candidates is not None and ws not in candidates:
                continue
            if require is not None and ws not in require:
                continue
            for e in exclude:
                if ws in e:
                    break
            else:
                return ws
        return None

    def _scan(
        self,
        candidates: Set[WorkerState],
        require: Set[WorkerState] | None,
        exclude: tuple[Set[WorkerState], ...],
        highest: bool,
    ) -> WorkerState | None:
        memory, rank = self.memory, self._rank
        best = None
        best_key = (0, 0)
        for ws in candidates:
            nbytes = memory.get(ws)
            if nbytes is None:
                continue  # joined after this cycle's snapshot
            if require is not None and ws not in require:
                continue
            for e in exclude:
                if ws in e:
                    break
            else:
                key = (nbytes, rank[ws])
                if best is None or (key > best_key if highest else key < best_key):
                    best, best_key = ws, key
        return best
