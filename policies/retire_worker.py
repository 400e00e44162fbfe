"""RetireWorker: move the unique data off a worker that is about to leave.

The policy is distributed's, rewritten so that a retirement costs the scheduler
little per cycle and cannot hang:

- a key held only by the retiring worker is replicated to a worker chosen by the
  manager (``candidates=None``: the least loaded running worker, ~O(log W) rather
  than a scan of the cluster per key), and that recipient is remembered: later
  cycles ask again, as distributed does (so that a recipient that lost the request
  gets it back), but from the same worker while it runs. distributed lets the
  manager choose afresh each cycle, which once the first recipient has grown sends
  a second copy of the same key to another worker;
- a key that already has replicas elsewhere is dropped from the retiring worker,
  to free its memory (and, if it spilled, its disk) as early as possible;
- :class:`amm.retirement.Retirements` gives up after ``timeout`` seconds (config
  ``amm.retire.timeout``) and then either aborts or closes the worker anyway
  (``amm.retire.on-timeout``).

It subclasses distributed's ``RetireWorker`` so that ``isinstance`` checks,
``done()``, ``no_recipients`` and ``Scheduler._track_retire_worker`` keep working,
and its outcome is reported as distributed's: ``done()`` is True once every key on
the worker has a replica elsewhere (here: on a worker that is staying, neither
retiring nor unreachable), and ``no_recipients`` is raised (with the same warnings)
when the worker holds actors or no worker can receive its data.
"""

from __future__ import annotations

from typing import Any

from distributed.active_memory_manager import RetireWorker as _DistributedRetireWorker
from distributed.core import Status
from distributed.metrics import monotonic
from distributed.scheduler import TaskState, WorkerState

from amm.config import AMMConfigError, option, parse_duration
from amm.logs import logger
from amm.policy import STAYING, ActiveMemoryManagerPolicy, SuggestionGenerator

#: Values accepted by ``amm.retire.on-timeout``
ON_TIMEOUT = ("abort", "close")


def parse_on_timeout(key: str, value: Any) -> str:
    if value not in ON_TIMEOUT:
        raise AMMConfigError(
            f"{key}={value!r}: must be one of " + ", ".join(ON_TIMEOUT)
        )
    return value


class RetireWorker(ActiveMemoryManagerPolicy, _DistributedRetireWorker):
    """Replicate elsewhere every key held only by the worker at ``address``, and drop
    from it the keys that already have a replica elsewhere, so that it can close
    without losing data.

    There is one instance per worker being retired, added by
    :meth:`amm.retirement.Retirements.retire_workers` (which serves
    ``client.retire_workers()``, ``Scheduler.retire_workers`` and adaptive
    scale-down); it removes itself once nothing is left to move. It is not meant to
    be listed in the ``amm.policies`` config.

    **Failure conditions**, as in distributed:

    - the worker holds an actor, which can't be moved: ``no_recipients`` is set at
      once and the worker is not retired;
    - no worker can receive a unique key (this is the only worker left, or all the
      others are paused or retiring too): ``no_recipients`` is set and the
      retirement is aborted;
    - the data could not be moved within ``timeout`` (a recipient hangs, the
      transfers are too slow): decided by the retirement, see ``on_timeout``.

    Parameters
    ----------
    address:
        Address of the worker to retire
    timeout:
        Seconds after which the retirement gives up; default ``amm.retire.timeout``
    on_timeout:
        ``"abort"`` (the worker goes back to its previous status and keeps its data)
        or ``"close"`` (it is retired anyway and the keys only it held are lost,
        logged at WARNING); default ``amm.retire.on-timeout``
    """

    #: The manager may suspend this policy between two suggestions: it iterates over
    #: a snapshot of the worker's keys and re-reads each key and the worker.
    resumable = True

    timeout: float
    on_timeout: str

    def __init__(
        self,
        address: str,
        *,
        timeout: float | str | None = None,
        on_timeout: str | None = None,
    ):
        super().__init__(address)
        self.timeout = parse_duration(
            *(option("retire", "timeout") if timeout is None else ("timeout", timeout))
        )
        self.on_timeout = parse_on_timeout(
            *(
                option("retire", "on-timeout")
                if on_timeout is None
                else ("on_timeout", on_timeout)
            )
        )
        #: Unique keys asked to be replicated, their recipient, and since when
        self._requested: dict[TaskState, tuple[WorkerState, float]] = {}
        self._announced = False
        #: run() found nothing left to do and removed the policy. Removed by
        #: anyone else (AMMClient.remove_policy, say), it has not: done() is then
        #: True, as in distributed, but the retirement is cancelled, not complete.
        self.concluded = False

    def run(self) -> SuggestionGenerator:
        manager = self.manager
        scheduler = manager.scheduler
        ws = scheduler.workers.get(self.address)
        if ws is None:
            logger.debug("Removing policy %s: Worker no longer in cluster", self)
            self._conclude()
            return

        if ws.actors:
            # Same text as distributed, which users and tests grep for
            logger.warning(
                f"Tried retiring worker {self.address}, but it holds actor(s) "
                f"{set(ws.actors)}, which can't be moved."
                "The worker will not be retired."
            )
            self.no_recipients = True
            self._conclude()
            return

        running = scheduler.running
        pending = manager.pending  # the same dict for the whole cycle
        requested = self._requested
        # One set object for every drop: the manager checks a candidate set once
        # per cycle, by identity
        only_ws = frozenset((ws,))
        now = monotonic()
        patience = self.timeout / 2
        # the running workers but a recipient that is too slow, one set for all
        # the keys asked of it
        others: dict[WorkerState, frozenset[WorkerState]] = {}
        nrepl = 0  # unique keys still to move
        nno_rec = 0  # unique keys nobody can receive

        # Forget the keys that left the worker (moved and dropped, or released)
        for ts in [ts for ts in requested if ws not in (ts.who_has or ())]:
            del requested[ts]

        logger.debug("Retiring %s", ws)
        for ts in list(ws.has_what):  # a snapshot: we may be suspended at a yield
            if ws.status == Status.closed:
                return  # left while suspended; the next cycle removes the policy
            who_has = ts.who_has
            if ts.actor or not who_has or ws not in who_has:
                # An actor proxy (an original would have stopped us above), or a
                # key dropped or released while the policy was suspended
                continue

            if len(who_has) > 1:
                # The key is elsewhere too: free this worker of it. If the manager
                # refuses (another policy drops the same replica, a dependent runs
                # here), try again next cycle; but if every replica is on a worker
                # that is leaving, a copy must be made on a running one.
                requested.pop(ts, None)
                if (yield ("drop", ts, only_ws)):  # a plain tuple: see amm.policy
                    continue
                if (ts.who_has or _EMPTY) & running:
                    continue

            nrepl += 1
            entry = pending.get(ts)
            if entry and entry[0]:
                continue  # another policy already asked for a replica in this cycle

            # Ask again at every cycle, as distributed does: a recipient that lost
            # the request (it gave up on a fetch, or was told to forget the key)
            # gets it back. But ask the same recipient while it is running: a
            # second one would only mean a second transfer of the same data, and
            # the worker ignores a request for a key it is already fetching.
            # Unless the copy has not arrived after half the timeout: the recipient
            # may be hung, and waiting on it would end the retirement (and, under
            # Worker.close_gracefully or adaptive scale-down, which close the worker
            # anyway, lose the key). Another worker is asked then.
            previous, since = requested.get(ts, _NOT_REQUESTED)
            candidates: frozenset[WorkerState] | None = None
            if previous is not None and previous in running:
                if now - since < patience:
                    candidates = frozenset((previous,))
                else:
                    candidates = others.get(previous)
                    if candidates is None:
                        candidates = others[previous] = frozenset(running - {previous})
                    previous = None
            choice = yield ("replicate", ts, candidates)
            if choice is None and candidates is not None:
                choice = yield ("replicate", ts, None)
            if choice is not None:
                if choice is not previous:
                    requested[ts] = (choice, now)
            elif (
                ts.state == "memory"
                and ws in (ts.who_has or _EMPTY)
                and not running
            ):
                # No running worker to send it to. (Otherwise the key was released,
                # or a running worker got it, while suspended; or a worker joined or
                # resumed after this cycle began, which only the next cycle sees.)
                nno_rec += 1

        if nno_rec:
            # All other workers are paused or retiring: abort now rather than wait
            # for the timeout, as distributed does.
            self.no_recipients = True
            logger.warning(
                f"Tried retiring worker {self.address}, but {nno_rec} tasks could not "
                "be moved as there are no suitable workers to receive them. "
                "The worker will not be retired."
            )
            self._conclude()
        elif nrepl:
            if not self._announced:
                logger.info(
                    f"Retiring worker {self.address}; {nrepl} keys are being moved "
                    "away."
                )
                self._announced = True
            else:
                logger.debug(
                    "Retiring worker %s; %d keys left to move", self.address, nrepl
                )
        elif not self._held_elsewhere(ws):
            # Every key seemed to be elsewhere, but some only on workers that are
            # leaving: retiring too (one of the two copies is being dropped, and
            # the other worker's policy will move the last one), or whose stream
            # has just closed (the scheduler is about to remove them). Stay, so
            # that done() stays False; by the next cycle those keys are gone from
            # here, or unique here and moved.
            logger.debug(
                "Retiring worker %s; some of its keys are elsewhere only on "
                "workers that are leaving",
                self.address,
            )
        else:
            logger.info(
                f"Retiring worker {self.address}; no unique keys need to be moved away."
            )
            self._conclude()

    def _conclude(self) -> None:
        self.concluded = True
        self.manager.policies.discard(self)

    def done(self) -> bool:
        """True once it is safe to close the worker: distributed's rule (every key
        on it has a replica elsewhere), except that a replica counts only on a
        worker that is staying. One whose stream has closed is removed by the
        scheduler a moment later, with its replicas; one that is retiring too may
        close at the same time, if this policy and its own have not run yet (a
        cycle in progress defers them). Counting either would let the worker
        close with the only copies of its keys.
        """
        if self not in self.manager.policies:
            # run() removed it: no_recipients, or nothing left to move (checked
            # with the same rule)
            return True
        ws = self.manager.scheduler.workers.get(self.address)
        return ws is None or self._held_elsewhere(ws)

    def _held_elsewhere(self, ws: WorkerState) -> bool:
        """Whether every key on ``ws`` has a replica on another worker that is
        staying (neither retiring nor closing, see :data:`amm.policy.STAYING`) and
        that the scheduler can still reach
        """
        has_what = ws.has_what
        if not all(len(ts.who_has or ()) > 1 for ts in has_what):
            return False
        # Only once the cheap check passes, and only the stream of the first holder
        # that is staying: done() is polled, by every retiring worker, so a
        # scan of all the streams (unreachable_addresses) each time would add up
        streams = self.manager.scheduler.stream_comms
        return all(
            any(
                h is not ws
                and h.status in STAYING
                and not _closed(streams.get(h.address))
                for h in ts.who_has or ()
            )
            for ts in has_what
        )

    def unique_keys(self) -> list[Any]:
        """Keys whose only replica is on the retiring worker (they would be lost if
        it closed now). Actors are listed too: they never move.
        """
        ws = self.manager.scheduler.workers.get(self.address)
        if ws is None:
            return []
        return [ts.key for ts in ws.has_what if len(ts.who_has or ()) < 2]


_EMPTY: frozenset[Any] = frozenset()
_NOT_REQUESTED: tuple[None, float] = (None, 0.0)


def _closed(stream: Any) -> bool:
    """Whether a worker's stream from the scheduler has closed: the scheduler is
    about to remove the worker (see :func:`amm.cycle.unreachable_addresses`)
    """
    return stream is not None and bool(stream.closed())
