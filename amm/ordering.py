"""Workers ordered by expected memory, so that choosing where a replica goes (or
which one goes away) costs far less than a scan of the whole cluster.

One order serves one cycle. It reads a worker's memory from the scheduler the
first time the cycle needs it, not every worker's up front: a snapshot of every
worker would cost a cycle that only drops a few replicas (the eager pass) 0.3 ms
at W=1000 (1.3 ms through ``WorkerState.memory``, see :mod:`amm.measures`), for
workers it never looks at. The sorted structure is only built, from every
worker's memory, when a search first walks it. From then on the order follows
the cycle's accepted suggestions: :meth:`WorkerMemoryOrder.update` records a
worker's new expected memory at once, and the sorted structure catches up the
next time a search walks it. Suggestions that only ever scan a few candidates (the
drops of ReduceReplicas, for instance) therefore never pay for sorting.

The sorted structure is a plain list kept sorted with :mod:`bisect`: moving a worker
costs two binary searches and a ``memmove`` of the list, which up to a few thousand
workers is several times cheaper than a balanced structure (``SortedList``: 3.4 us
per move at W=1000 against 1.4 us here; they cross near W=5000), and iterating it
runs at C speed.

Ties are broken by address, which is the order of ``Scheduler.workers``: among
equally loaded workers the first one receives and the last one drops. The three
search strategies below implement exactly this order, so which one runs never
changes the result, only its cost:

- a *scan* of the candidates, when there are few of them (at most sqrt(W));
- a *walk* of the whole order from one end, skipping ineligible workers, when the
  candidates are many and spread over the order;
- a walk of a *sub-order* of one candidate set, when a walk of the whole order
  had to step over many workers that are not candidates. This is what keeps
  repeated searches over a set that shrinks during the cycle cheap: the recipients
  ReplicateN still has room on (the full ones gather at the low end, since they
  are the ones that received), or the workers still lacking a key being
  replicated to all. Workers that left the set are deleted from the sub-order as
  the walk meets them, so each is stepped over once rather than at every search.
  Sub-orders last one time slice: between two, the event loop runs and a set may
  grow (a key's who_has).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Mapping, Set
from math import isqrt

from distributed.scheduler import WorkerState

#: (expected memory, address, worker); addresses are unique, so comparisons of
#: entries never fall through to comparing WorkerStates
Entry = tuple[int, str, WorkerState]

#: Sub-orders kept at once: few candidate sets need one at a time (the set a policy
#: is working through now), so only the newest are kept
MAX_VIEWS = 4


class _Sorted:
    """Entries sorted by (memory, address), for the whole order or for the members of
    one candidate set (a sub-order)
    """

    __slots__ = ("candidates", "entries", "members", "stale")

    def __init__(self, candidates: Set[WorkerState] | None, entries: list[Entry]):
        #: the candidate set of a sub-order; None for the whole order
        self.candidates = candidates
        self.entries = entries
        self.members = {ws for _, _, ws in entries}
        #: members whose entry still carries this old memory value
        self.stale: dict[WorkerState, int] = {}

    def catch_up(self, memory: dict[WorkerState, int]) -> None:
        entries = self.entries
        for ws, old in self.stale.items():
            address = ws.address
            # (old, address) sorts right before (old, address, ws): no other entry
            # has this address
            del entries[bisect_left(entries, (old, address))]
            insort(entries, (memory[ws], address, ws))
        self.stale.clear()

    def discard(self, entry: Entry) -> None:
        ws = entry[2]
        del self.entries[bisect_left(self.entries, entry[:2])]
        self.members.discard(ws)
        self.stale.pop(ws, None)


class WorkerMemoryOrder:
    """Workers sorted by ``(expected memory, address)``.

    ``memory`` holds the workers read so far; :meth:`complete` reads the others.
    It is shared with the manager (completed, it is the ``workers_memory`` that
    policies read), so it must only be changed through :meth:`update`.

    Searches take the eligibility rule as sets rather than a callable, which keeps
    the per-worker test to a few hash lookups: a worker is eligible if it is in
    ``candidates`` (None: any worker), in ``require`` (None: no requirement) and in
    none of ``exclude``.
    """

    __slots__ = (
        "memory",
        "_workers",
        "_frozen",
        "_read",
        "_complete",
        "_walkable",
        "_sorted",
        "_scan_limit",
        "_views",
    )

    memory: dict[WorkerState, int]
    #: the workers of this order, by address, in address order
    _workers: Mapping[str, WorkerState]
    _frozen: bool
    _read: Callable[[WorkerState], int]
    _complete: bool
    _walkable: Set[WorkerState] | None
    #: the walkable workers, sorted; built by the first walk
    _sorted: _Sorted | None
    _scan_limit: int
    #: sub-orders of the candidate sets that needed one, by id(candidates)
    _views: dict[int, _Sorted]

    def __init__(
        self,
        workers: Mapping[str, WorkerState],
        read: Callable[[WorkerState], int],
        walkable: Set[WorkerState] | None = None,
    ):
        """``workers``: address -> worker, in address order (``Scheduler.workers``),
        the workers of this order. The mapping is used as it is until
        :meth:`freeze` copies it: copying ``Scheduler.workers`` (a SortedDict)
        costs 0.15 ms at W=1000, more than a whole cycle with little to do.

        ``read``: the memory of a worker, called at most once per worker, the first
        time the order needs it.

        ``walkable``: the workers searches may walk to (default: all), as they are
        when the first walk happens. The others are only ever found by scanning a
        candidate set. The manager walks running workers only: paused and retiring
        ones never receive, so their memory stays put while everyone else's grows,
        and a walk from the low end would have to step over all of them on every
        search.
        """
        self.memory = {}
        self._workers = workers
        self._frozen = False
        self._read = read
        self._complete = False
        self._walkable = walkable
        self._sorted = None
        # Scanning C candidates costs C; walking the order from one end costs
        # about W / C steps before meeting one, when candidates are spread over
        # the order. The two meet at C = sqrt(W).
        self._scan_limit = max(4, isqrt(len(self._workers)))
        self._views = {}

    def freeze(self) -> None:
        """Fix the workers of this order as they are now: a worker that joins or
        leaves the mapping given to the constructor from now on does not change
        them
        """
        if not self._frozen:
            self._workers = dict(self._workers)
            self._frozen = True

    def forget_views(self) -> None:
        """Drop the sub-orders of candidate sets. A sub-order holds as long as its
        set only shrinks, which is so within one time slice; between two, the
        event loop runs and sets may grow (a key's who_has, as replicas arrive).
        """
        self._views.clear()

    @property
    def workers(self) -> Mapping[str, WorkerState]:
        """The workers of this order, by address"""
        return self._workers

    def get(self, ws: WorkerState) -> int | None:
        """The expected memory of ``ws``, or None if it is not one of the workers
        of this order
        """
        nbytes = self.memory.get(ws)
        if nbytes is None:
            if self._workers.get(ws.address) is not ws:
                return None
            nbytes = self.memory[ws] = self._read(ws)
        return nbytes

    def complete(self) -> dict[WorkerState, int]:
        """Read the memory of every worker not read yet, and return ``memory``,
        now holding every worker in address order (the order of distributed's
        ``workers_memory``). It stays the same dict object.
        """
        if not self._complete:
            memory, read = self.memory, self._read
            filled = {
                ws: nbytes if (nbytes := memory.get(ws)) is not None else read(ws)
                for ws in self._workers.values()
            }
            memory.clear()
            memory.update(filled)
            self._complete = True
        return self.memory

    def update(self, ws: WorkerState, delta: int) -> int:
        """Add ``delta`` bytes to the expected memory of ``ws``, one of the workers
        of this order, but never take it below zero (a drop of a key larger than
        the worker's measured memory); return the change actually made
        """
        memory = self.memory
        old = memory.get(ws)
        if old is None:
            old = self.get(ws)
            if old is None:
                raise KeyError(ws)
        if old + delta < 0:
            delta = -old
        memory[ws] = old + delta
        sorted_ = self._sorted
        if sorted_ is not None and ws in sorted_.members:
            # the first update since the last catch-up records where the entry is
            sorted_.stale.setdefault(ws, old)
            for view in self._views.values():
                if ws in view.members:
                    view.stale.setdefault(ws, old)
        return delta

    def _whole(self) -> _Sorted:
        """The walkable workers, sorted and caught up"""
        sorted_ = self._sorted
        if sorted_ is None:
            walkable = self._walkable
            sorted_ = self._sorted = _Sorted(
                None,
                sorted(
                    (nbytes, ws.address, ws)
                    for ws, nbytes in self.complete().items()
                    if walkable is None or ws in walkable
                ),
            )
        elif sorted_.stale:
            sorted_.catch_up(self.memory)
        return sorted_

    def ascending(self) -> Iterator[WorkerState]:
        """The walkable workers, least loaded first"""
        for _, _, ws in self._whole().entries:
            yield ws

    def lowest(
        self,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None = None,
        exclude: tuple[Set[WorkerState], ...] = (),
    ) -> WorkerState | None:
        """The least loaded eligible worker, or None"""
        if candidates is not None and len(candidates) <= self._scan_limit:
            return self._scan(candidates, require, exclude, False)  # the common case
        return self._search(candidates, require, exclude, False)

    def highest(
        self,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None = None,
        exclude: tuple[Set[WorkerState], ...] = (),
    ) -> WorkerState | None:
        """The most loaded eligible worker, or None"""
        if candidates is not None and len(candidates) <= self._scan_limit:
            return self._scan(candidates, require, exclude, True)  # the common case
        return self._search(candidates, require, exclude, True)

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

    def _search(
        self,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None,
        exclude: tuple[Set[WorkerState], ...],
        highest: bool,
    ) -> WorkerState | None:
        if candidates is None:
            return self._walk(self._whole(), None, require, exclude, highest)
        if len(candidates) <= self._scan_limit:
            return self._scan(candidates, require, exclude, highest)
        view = self._views.get(id(candidates))
        if view is not None and view.candidates is candidates:
            if view.stale:
                view.catch_up(self.memory)
            return self._walk(view, candidates, require, exclude, highest)
        return self._walk(self._whole(), candidates, require, exclude, highest)

    def _walk(
        self,
        sorted_: _Sorted,
        candidates: Set[WorkerState] | None,
        require: Set[WorkerState] | None,
        exclude: tuple[Set[WorkerState], ...],
        highest: bool,
    ) -> WorkerState | None:
        """The first eligible worker from one end of ``sorted_``.

        Stepping over many workers that are not candidates means the candidates
        are bunched at the far end: the set gets a sub-order of its own. In a
        sub-order, a worker that is no longer a candidate left the set for good (a
        set may only shrink during a time slice; the sub-orders are dropped at the
        end of each, see :meth:`forget_views`), so it is deleted and never stepped
        over again.
        """
        skipped: list[Entry] | None = None  # most walks skip nothing
        choice = None
        for entry in reversed(sorted_.entries) if highest else sorted_.entries:
            ws = entry[2]
            if candidates is not None and ws not in candidates:
                if skipped is None:
                    skipped = [entry]
                else:
                    skipped.append(entry)
                continue
            if require is not None and ws not in require:
                continue
            for e in exclude:
                if ws in e:
                    break
            else:
                choice = ws
                break
        if skipped:
            if sorted_.candidates is not None:
                for entry in skipped:
                    sorted_.discard(entry)
            elif len(skipped) > self._scan_limit:
                self._add_view(candidates)  # type: ignore[arg-type]
        return choice

    def _add_view(self, candidates: Set[WorkerState]) -> None:
        if len(self._views) >= MAX_VIEWS:
            del self._views[next(iter(self._views))]
        # the whole order was just walked: it is caught up, its entries in order
        entries = [e for e in self._whole().entries if e[2] in candidates]
        self._views[id(candidates)] = _Sorted(candidates, entries)

    def _scan(
        self,
        candidates: Set[WorkerState],
        require: Set[WorkerState] | None,
        exclude: tuple[Set[WorkerState], ...],
        highest: bool,
    ) -> WorkerState | None:
        memory = self.memory
        best = None
        best_nbytes = 0
        for ws in candidates:
            if require is not None and ws not in require:
                continue
            for e in exclude:
                if ws in e:
                    break
            else:
                nbytes = memory.get(ws)
                if nbytes is None:
                    nbytes = self.get(ws)  # read it now
                    if nbytes is None:
                        continue  # joined after this cycle began
                # (nbytes, address) order, comparing addresses only on a tie
                if (
                    best is None
                    or (nbytes > best_nbytes if highest else nbytes < best_nbytes)
                    or (
                        nbytes == best_nbytes
                        and (
                            ws.address > best.address
                            if highest
                            else ws.address < best.address
                        )
                    )
                ):
                    best, best_nbytes = ws, nbytes
        return best
