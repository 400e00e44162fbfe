"""ReduceReplicas: drop the replicas of a key that no computation needs."""

from __future__ import annotations

from collections.abc import Iterable

from distributed.active_memory_manager import ReduceReplicas as _DistributedReduceReplicas
from distributed.scheduler import TaskState

from amm.config import option, parse_unassigned_waiters
from amm.logs import logger
from amm.policy import CHECKPOINT, ActiveMemoryManagerPolicy, SuggestionGenerator

#: Above this many waiters, don't look at where they run: assume each may need its
#: own replica. Telling them apart costs a set build per key per cycle.
MAX_WAITERS_INSPECTED = 20

#: Keys visited between two CHECKPOINTs
CHECKPOINT_EVERY = 256

#: The rule of ``amm.reduce-replicas.unassigned-waiters`` in amm.yaml, left out of
#: the repr
DEFAULT_UNASSIGNED_WAITERS = "imminent"

#: With ``unassigned_waiters="imminent"``, a dependent still waiting for more tasks
#: than this counts as a place of its own without looking at them, as in "each"
MAX_DEPENDENCIES_INSPECTED = 8


class ReduceReplicas(ActiveMemoryManagerPolicy, _DistributedReduceReplicas):
    """Drop the replicas of in-memory keys beyond what is needed.

    A subclass of distributed's ReduceReplicas (as RetireWorker is of its
    RetireWorker), so that code finding the default policy with ``isinstance``
    finds this one.

    A key needs as many replicas as the manager's desired count for it (1 unless a
    policy such as ReplicateN asks for more), or as many as the distinct places its
    waiting dependents will run, whichever is larger. How the dependents not yet
    assigned to a worker count is ``unassigned_waiters``:

    - ``"each"`` (distributed's rule): each is a place of its own, in case it runs
      where no replica is; dropping a replica it would then fetch only causes a
      transfer back;
    - ``"imminent"`` (the default): each is a place of its own if it can be
      assigned as soon as the tasks running now finish (it waits for nothing, or
      only for processing tasks), as in "each"; those that wait for a task that
      has not started yet (queued, waiting, no worker) are one place between
      them. A dependent that far from running keeps no replica of its own while
      the tasks before it are still to run: in ``(x @ x.T).sum()`` most
      unassigned dependents of a block wait for a queued block, and the peak went
      from 0.82x to 0.48x of no AMM, for 6% more bytes sent (see the README);
    - ``"shared"``: together they are one place, however close they are to
      running. The scheduler tends to run a task where its data already is, so
      they mostly use the replicas kept for the assigned dependents.

    Whatever the rule, a key with ``MAX_WAITERS_INSPECTED`` waiters or more keeps a
    replica per waiter, as in distributed: telling apart where they run costs too much.

    Which replicas go is the manager's choice: those on paused or retiring workers
    first, then those on the most loaded workers, never the last one, never one a
    processing dependent is using.

    Besides running every cycle, the manager runs it over just the dependencies of
    each task that finishes (see :mod:`amm.eager`), so that a replica fetched for a
    task goes as soon as the task is done rather than up to an interval later.

    Parameters
    ----------
    keys:
        Only consider these tasks (default: every task with more than one replica)
    unassigned_waiters:
        ``"each"``, ``"imminent"`` or ``"shared"``; default
        ``amm.reduce-replicas.unassigned-waiters``
    """

    unassigned_waiters: str

    def __init__(
        self,
        keys: Iterable[TaskState] | None = None,
        *,
        unassigned_waiters: str | None = None,
    ):
        self.keys = None if keys is None else list(keys)
        self.unassigned_waiters = parse_unassigned_waiters(
            *(
                option("reduce-replicas", "unassigned-waiters")
                if unassigned_waiters is None
                else ("unassigned_waiters", unassigned_waiters)
            )
        )

    def __repr__(self) -> str:
        # Not the number of keys: the statistics count accepted suggestions by
        # repr, and would gain an entry for every batch size of the eager passes
        args = [] if self.keys is None else ["keys=..."]
        if self.unassigned_waiters != DEFAULT_UNASSIGNED_WAITERS:
            args.append(f"unassigned_waiters={self.unassigned_waiters!r}")
        return f"ReduceReplicas({', '.join(args)})"

    #: The manager may suspend this policy between two suggestions and resume it on
    #: a later event-loop turn: it iterates over a snapshot and re-reads each key.
    resumable = True

    def run(self) -> SuggestionGenerator:
        manager = self.manager
        pending = manager.pending
        desired_replicas = manager.desired_replicas
        rule = self.unassigned_waiters
        nkeys = 0
        ndrop = 0

        tasks = self.keys
        if tasks is None:
            tasks = list(manager.scheduler.replicated_tasks)
        for i, ts in enumerate(tasks):
            if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                # Keys that need nothing (protected, or kept for waiters) make no
                # suggestion, the manager's only other chance to end a time slice
                yield CHECKPOINT
            if not ts.who_has or len(ts.who_has) < 2:
                continue  # released, or dropped, while this policy was suspended
            waiters = ts.waiters
            nwaiters = len(waiters) if waiters else 0
            if 1 < nwaiters < MAX_WAITERS_INSPECTED:
                # The places the waiters will run: the worker of an assigned one;
                # an unassigned one is a place of its own (the task itself), or
                # shares None with the others of its kind
                places: set[object]
                if rule == "each":
                    places = {w.processing_on or w for w in waiters}
                elif rule == "shared":
                    places = {w.processing_on for w in waiters}
                else:
                    places = {
                        w.processing_on or (w if _imminent(w) else None)
                        for w in waiters
                    }
                nwaiters = len(places)

            keep = max(desired_replicas(ts), nwaiters)
            ndrop_key = len(ts.who_has) - keep  # type: ignore[arg-type]
            entry = pending.get(ts)
            if entry:
                ndrop_key += len(entry[0]) - len(entry[1])

            if ndrop_key > 0:
                nkeys += 1
                ndrop += ndrop_key
                for _ in range(ndrop_key):
                    yield ("drop", ts, None)  # a plain tuple: see amm.policy

        if ndrop:
            logger.debug(
                "ReduceReplicas: Dropping %d superfluous replicas of %d tasks",
                ndrop,
                nkeys,
            )


def _imminent(ts: TaskState) -> bool:
    """Whether an unassigned task can be assigned a worker as soon as the tasks
    running now finish: it waits for no dependency (it is queued, or has no
    worker to run on), or only for processing ones. One waiting for more than
    ``MAX_DEPENDENCIES_INSPECTED`` counts as imminent unseen, erring on the side
    of the replica, as distributed does for all of them.
    """
    waiting_on = ts.waiting_on
    if not waiting_on or len(waiting_on) > MAX_DEPENDENCIES_INSPECTED:
        return True
    return all(dep.state == "processing" for dep in waiting_on)
