"""ReplicateN: keep N replicas of chosen keys, for as long as they live.

distributed's ``Client.replicate()`` and ``scatter(broadcast=True)`` copy data once:
a copy lost with its worker is never made again, a worker that joins later gets
nothing, and ReduceReplicas deletes the copies at its next cycle (dask/distributed
#8796). This policy turns replication into a target the manager maintains:

- every cycle it asks for the replicas a tracked key is missing, and the manager
  picks the least loaded recipients; a copy lost with a dying or retiring worker is
  therefore made again on the next cycles, and ``n="all"`` reaches workers that
  join later;
- through :meth:`ReplicateN.desired_replicas` it tells the manager how many
  replicas no policy may drop below, so ReduceReplicas only drops copies above
  the target;
- the replications in flight to one recipient are bounded (config
  ``amm.replicate.max-per-worker``), so replicating a large dataset onto many
  workers converges over a few cycles instead of flooding them in one burst;
- a key leaves the policy when it is released or forgotten, or set back to n=1.

Keys are added through :mod:`amm.replication` (the client API, and
``Client.replicate`` / ``scatter(broadcast=True)`` which it serves) or by name in
the config ``amm.replicate.keys``, applied whenever such a key is in memory.
"""

from __future__ import annotations

import numbers
from collections.abc import Generator, Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from dask.typing import Key
from dask.utils import parse_bytes
from distributed.core import Status
from distributed.metrics import monotonic
from distributed.scheduler import TaskState, WorkerState

from amm.config import AMMConfigError, option, parse_duration
from amm.logs import logger, task_logger
from amm.policy import (
    CHECKPOINT,
    ActiveMemoryManagerPolicy,
    SuggestionGenerator,
)

#: ``n`` meaning every running worker, including those that join later
ALL: Literal["all"] = "all"

#: A number of replicas: an int >= 1, or ALL
Replicas = Union[int, Literal["all"]]

#: States in which a key leaves the policy: nobody wants it any more, or it failed
GONE = frozenset({"released", "forgotten", "erred"})

#: Keys visited by the bookkeeping between two CHECKPOINTs
CHECKPOINT_EVERY = 256

#: Every tracked key is re-read at least once in this many cycles, even when
#: nothing says it needs work (see ``ReplicateN._keys_to_visit``)...
AUDIT_CYCLES = 32
#: ...and at least this many keys are re-read per cycle, so that a few thousand
#: tracked keys are all re-read at every cycle
AUDIT_MIN_KEYS = 1024


def parse_n(where: str, n: Any, exc: type[ValueError] = AMMConfigError) -> Replicas:
    """Validate a number of replicas. ``where`` names the value in the error, of
    type ``exc``: AMMConfigError for the config, a plain ValueError for a call.
    """
    # bool is an int subclass: True would silently mean 1
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1:
        return int(n)
    if isinstance(n, str) and n == ALL:
        return ALL
    raise exc(f"{where}={n!r}: the number of replicas must be an integer >= 1 or 'all'")


def parse_keys(where: str, value: Any) -> dict[Key, Replicas]:
    """Validate ``amm.replicate.keys``: ``{key name: n}``"""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AMMConfigError(f"{where}={value!r}: must be a mapping {{key name: n}}")
    return {key: parse_n(f"{where}[{key!r}]", n) for key, n in value.items()}


def parse_max_per_worker(where: str, value: Any) -> tuple[float, float]:
    """Validate ``amm.replicate.max-per-worker``: ``{keys: int, bytes: size}``,
    either may be null (no bound). Returns ``(max keys, max bytes)``.
    """
    if value is None:
        value = {}
    if not isinstance(value, Mapping) or set(value) - {"keys", "bytes"}:
        raise AMMConfigError(
            f"{where}={value!r}: must be a mapping with keys 'keys' and/or 'bytes'"
        )
    keys = value.get("keys")
    if keys is None:
        max_keys = float("inf")
    elif isinstance(keys, numbers.Integral) and not isinstance(keys, bool) and keys > 0:
        max_keys = int(keys)
    else:
        raise AMMConfigError(
            f"{where}.keys={keys!r}: must be an integer greater than zero, or null"
        )
    nbytes = value.get("bytes")
    if nbytes is None:
        max_bytes = float("inf")
    else:
        try:
            max_bytes = parse_bytes(nbytes) if isinstance(nbytes, str) else nbytes
        except (TypeError, ValueError) as e:
            raise AMMConfigError(f"{where}.bytes={nbytes!r}: not a size: {e}") from None
        if (
            not isinstance(max_bytes, numbers.Real)
            or isinstance(max_bytes, bool)
            or not max_bytes > 0
        ):
            raise AMMConfigError(
                f"{where}.bytes={nbytes!r}: must be a size greater than zero "
                "(e.g. 256 MiB), or null"
            )
    return max_keys, max_bytes


def validate(
    tasks: Mapping[Key, TaskState],
    keys: Iterable[Key],
    n: Any,
) -> tuple[Replicas, list[Key], list[TaskState]]:
    """Check a replication request against the scheduler's ``tasks``, raising a
    ValueError that names the first bad key or value. Returns ``n`` parsed, the
    keys without duplicates, and the tasks found.

    Setting n=1 (unreplicating) on a key the scheduler doesn't know is fine: there
    is nothing left to undo. Whether such a key is still tracked depends on whether
    a cycle already saw it gone, which the caller can't know; and a configured key
    is stopped by name before its task exists.
    """
    n = parse_n("n", n, ValueError)
    keys = list(dict.fromkeys(keys))
    found: list[TaskState] = []
    for key in keys:
        ts = tasks.get(key)
        if ts is None:
            if n == 1:
                continue
            raise ValueError(f"Cannot replicate key {key!r}: unknown to the scheduler")
        if n != 1 and ts.state in GONE:
            raise ValueError(
                f"Cannot replicate key {key!r}: it is {ts.state}"
                + (" (failed)" if ts.state == "erred" else " (no client wants it)")
            )
        if n != 1 and ts.actor:
            raise ValueError(f"Cannot replicate key {key!r}: it is an actor")
        found.append(ts)
    return n, keys, found


@dataclass(eq=False)
class Target:
    """What is wanted of one tracked key"""

    #: The task; a new TaskState under the same key (released, then resubmitted) is
    #: another task and is not tracked
    ts: TaskState
    n: Replicas
    #: Addresses the replicas are counted on and sent to; None: any worker
    workers: frozenset[str] | None
    #: "api" (a client call) or "config" (``amm.replicate.keys``)
    source: str
    #: Recipients asked for a replica and not yet holding it, with the time after
    #: which they are asked again
    inflight: dict[WorkerState, float] = field(default_factory=dict)


class ReplicateN(ActiveMemoryManagerPolicy):
    """Keep ``n`` replicas of each tracked key, ``n`` an int >= 1 or ``"all"``.

    **Counting.** Only replicas on running workers count: a copy on a paused or
    retiring worker is about to become unavailable, so a replacement is made on a
    running worker right away. Likewise, a requested replica stops counting as in
    flight once its recipient pauses or retires, since such a worker does not
    fetch. A key tracked with ``workers=`` (as
    ``Client.replicate(..., workers=)``) counts and receives replicas on those
    workers only; ``"all"`` then means all of them that are running.

    **Each cycle**, for every tracked key in memory, it asks the manager for as many
    replicas as are missing, minus those already in flight. For ``n`` an int the
    candidates are ``None`` (the manager picks the least loaded running worker in
    ~O(log W)); for ``"all"`` they are the running workers that lack the key, and
    each worker chosen leaves the set, so the cost is linear in what is missing
    rather than a scan of the holders (and of the workers already chosen) for
    each suggestion. The manager keeps a sorted sub-order of such a shrinking set.

    **Only the keys that need work.** A cycle visits the keys that are short of
    their target (new keys, keys the last cycle could not finish, keys whose
    transfer failed or timed out), not every tracked key: replicating 100k keys
    onto a few workers takes hundreds of bounded cycles, and each would otherwise
    re-read all 100k. A change in the running workers (one left, paused, retired
    or joined) makes every key due again, since that is how replicas are lost and
    how ``"all"`` grows. Anything else (a worker that lost a replica without
    leaving, a key released) is caught by a rolling audit that re-reads every key
    at least once in ``AUDIT_CYCLES`` cycles; with up to ``AUDIT_MIN_KEYS`` keys,
    that is every cycle.

    **Bounded bursts.** A recipient stops being offered new keys for the rest of a
    cycle once it has ``max_per_worker["keys"]`` keys or ``max_per_worker["bytes"]``
    bytes in flight (the last key may cross the byte bound, so that a key larger
    than the bound still moves). A requested replica that has not arrived after
    ``retry_after`` seconds is asked for again.

    **Protection.** :meth:`desired_replicas` gives the manager the count below which
    no policy may drop; copies above it are ReduceReplicas' to drop as usual. A key
    tracked with ``workers=`` stays on them: this policy drops its copies elsewhere
    once they hold theirs, and :meth:`restricted_to` keeps balancing policies from
    moving it away.

    Parameters
    ----------
    keys:
        ``{key: n}`` to keep replicated whenever such a key is in memory; default
        ``amm.replicate.keys``
    max_per_worker:
        ``{"keys": int | None, "bytes": size | None}``; default
        ``amm.replicate.max-per-worker``
    retry_after:
        Seconds (or a duration string); default ``amm.replicate.retry-after``
    """

    #: The manager may suspend this policy between two suggestions: it iterates over
    #: a snapshot of the tracked keys and re-reads each key before yielding.
    resumable = True

    configured: dict[Key, Replicas]
    max_keys: float
    max_bytes: float
    retry_after: float
    #: When the policy last ran, so that callers waiting for replicas don't
    #: trigger cycles back to back (see amm.replication)
    last_run: float

    def __init__(
        self,
        keys: Mapping[Key, Any] | None = None,
        *,
        max_per_worker: Mapping[str, Any] | None = None,
        retry_after: float | str | None = None,
    ):
        self.configured = parse_keys(
            *(option("replicate", "keys") if keys is None else ("keys", keys))
        )
        # n=1 is what every key has anyway: nothing to track
        self.configured = {k: n for k, n in self.configured.items() if n != 1}
        self.max_keys, self.max_bytes = parse_max_per_worker(
            *(
                option("replicate", "max-per-worker")
                if max_per_worker is None
                else ("max_per_worker", max_per_worker)
            )
        )
        self.retry_after = parse_duration(
            *(
                option("replicate", "retry-after")
                if retry_after is None
                else ("retry_after", retry_after)
            )
        )
        self._tracked: dict[Key, Target] = {}
        #: Keys of targets with replications in flight
        self._with_inflight: set[Key] = set()
        #: Keys to visit at the next cycle (an insertion-ordered set)
        self._due: dict[Key, None] = {}
        #: The rolling audit: a snapshot of the tracked keys and how far it got
        self._audit: list[Key] = []
        self._audit_at = 0
        #: The running workers when the due keys were last all re-read
        self._running_seen: frozenset[WorkerState] = frozenset()
        #: The task whose copies outside its workers this policy is dropping right
        #: now; see desired_replicas
        self._dropping: TaskState | None = None
        self.last_run = 0.0

    def __repr__(self) -> str:
        # Not the number of keys: the statistics count accepted suggestions by
        # repr, and would gain an entry for every number of keys ever tracked
        return "ReplicateN()"

    # -- the API used by amm.replication -----------------------------------------

    def set(
        self,
        keys: Iterable[Key],
        n: Any,
        workers: frozenset[str] | None = None,
    ) -> list[Key]:
        """Keep ``n`` replicas of each of ``keys`` (n=1: stop tracking them).

        Keys must be known to the scheduler, except for n=1; they need not be in
        memory yet (they are replicated once they land). Everything is validated
        before anything changes: on error nothing is tracked and a ValueError
        names the culprit.
        Returns the keys, in order and without duplicates.
        """
        tasks = self.manager.scheduler.tasks
        n, keys, found = validate(tasks, keys, n)

        if n == 1:
            for key in keys:
                self._untrack(key)
                # an explicit request beats the config for the rest of this run
                self.configured.pop(key, None)
            logger.debug("ReplicateN: no longer replicating %d keys", len(keys))
            return keys

        for ts in found:
            old = self._tracked.get(ts.key)
            inflight = old.inflight if old is not None and old.ts is ts else {}
            self._tracked[ts.key] = Target(ts, n, workers, "api", inflight)
            self._due[ts.key] = None
        # DEBUG: scatter(broadcast=True) in a loop would flood INFO
        logger.debug(
            "ReplicateN: keeping %s replicas of %d keys%s",
            n,
            len(keys),
            f" on {len(workers)} workers" if workers is not None else "",
        )
        return keys

    def tracked(self) -> list[dict[str, Any]]:
        """What is tracked: one dict per key, with the target ``n``, the
        ``workers`` it is restricted to (or None), the ``replicas`` it has on
        them now, its scheduler ``state`` and ``source`` ("api" or "config").
        Configured keys that are not in memory are listed with state None (absent)
        or their state, and 0 replicas.
        """
        self._forget_gone()
        out = []
        for key, target in self._tracked.items():
            _, have, _ = self._count(target)
            out.append(
                {
                    "key": key,
                    "n": target.n,
                    "workers": (
                        sorted(target.workers) if target.workers is not None else None
                    ),
                    "replicas": have,
                    "state": target.ts.state,
                    "source": target.source,
                }
            )
        tasks = self.manager.scheduler.tasks
        for key, n in self.configured.items():
            if key not in self._tracked:
                ts = tasks.get(key)
                out.append(
                    {
                        "key": key,
                        "n": n,
                        "workers": None,
                        "replicas": 0,
                        "state": ts.state if ts is not None else None,
                        "source": "config",
                    }
                )
        return out

    def reached(self, key: Key) -> bool:
        """Whether a caller waiting for ``key``'s replicas may return: the key
        has as many replicas as it wants, or as many as there are running workers
        it may use, or it is no longer tracked (released, set back to 1).
        """
        target = self._tracked.get(key)
        if target is None:
            return True
        if self._gone(key, target):
            return True
        ts = target.ts
        if ts.state != "memory":
            return False  # not computed yet, or being recomputed after a loss
        pool, have, goal = self._count(target)
        return have >= min(goal, len(pool))

    def in_flight(self, key: Key) -> int:
        """Replicas of ``key`` requested and not yet arrived, from running workers
        only (see :meth:`_settle_inflight`)
        """
        target = self._tracked.get(key)
        if target is None or not target.inflight:
            return 0
        now = monotonic()
        who_has = target.ts.who_has or _EMPTY
        return sum(
            1
            for ws, deadline in target.inflight.items()
            if deadline > now and ws.status == Status.running and ws not in who_has
        )

    def forget_arrived(self, key: Key) -> None:
        """Forget the transfers of ``key`` that have arrived, ahead of this policy's
        next run: a copy dropped after it arrived (``Client.replicate`` with a
        lower n) would otherwise look in flight until ``retry-after``, and a
        caller raising n again would wait that long for it.
        """
        target = self._tracked.get(key)
        if target is not None:
            self._forget_arrived(key, target)

    def _forget_arrived(self, key: Key, target: Target) -> None:
        """Forget the transfers of ``target`` whose copy arrived. A key restricted
        to workers is then due: its copies outside them may go now.
        """
        if not target.inflight:
            return
        who_has = target.ts.who_has or _EMPTY
        arrived = [ws for ws in target.inflight if ws in who_has]
        for ws in arrived:
            del target.inflight[ws]
        if arrived and target.workers is not None:
            self._due[key] = None

    # -- the desired-replicas hook -----------------------------------------------

    def desired_replicas(self, ts: TaskState) -> int:
        """The replicas of ``ts`` no policy may drop below.

        For a key restricted to ``workers``, running replicas outside them are
        added to the count, so that no other policy can meet it by dropping a
        replica inside them; this policy drops those outside itself, once the
        workers hold what they should (see :meth:`_drop_outside`). Replicas on
        paused or retiring workers are not: the manager drops those first, which
        frees the workers that most need it; except those it can't drop, see
        :meth:`_pinned`.
        """
        running = self.manager.scheduler.running
        target = self._tracked.get(ts.key)
        goal: int
        if target is None or target.ts is not ts:
            n = self.configured.get(ts.key)
            # a configured key that landed since the last run of this policy
            if n is None or ts.state != "memory":
                return 1
            goal = len(running) if n == ALL else n  # type: ignore[assignment]
        elif target.workers is None:
            n = target.n
            goal = len(running) if n == ALL else n  # type: ignore[assignment]
        else:
            pool, _, goal = self._count(target)
            if ts is self._dropping:
                # what the pool can hold: fewer than n if fewer of its workers run
                goal = max(1, min(goal, len(pool)))
            else:
                goal += sum(
                    1 for ws in ts.who_has or () if ws in running and ws not in pool
                )
        return goal + self._pinned(ts)

    def restricted_to(self, ts: TaskState) -> Set[WorkerState] | None:
        """The running workers a key tracked with ``workers=`` may use; None for
        the others
        """
        target = self._tracked.get(ts.key)
        if target is None or target.ts is not ts or target.workers is None:
            return None
        return self._count(target)[0]

    def _pinned(self, ts: TaskState) -> int:
        """Replicas of ``ts`` on paused or retiring workers where a dependent of
        ``ts`` is processing. They don't count towards the target (see
        :meth:`_count`), and the manager can't drop them while the dependent needs
        them: left out of :meth:`desired_replicas`, the manager would drop a running
        replica instead, which the next cycle makes again, and so on for as long
        as the dependent runs.
        """
        if not ts.waiters:
            return 0
        scheduler = self.manager.scheduler
        running = scheduler.running
        if len(running) == len(scheduler.workers):
            return 0  # every worker is running
        who_has = ts.who_has or _EMPTY
        busy = {dts.processing_on for dts in ts.waiters}
        return sum(
            1 for ws in busy if ws is not None and ws in who_has and ws not in running
        )

    # -- the cycle ---------------------------------------------------------------

    def run(self, audit: bool = True) -> SuggestionGenerator:
        """One cycle. ``audit=False`` leaves the rolling audit for the next one:
        for a cycle run on demand, to make the copies a caller waits for, whose
        cost must not grow with the keys tracked already.
        """
        manager = self.manager
        scheduler = manager.scheduler
        now = self.last_run = monotonic()
        self._apply_config()
        load = yield from self._settle_inflight()
        if not self._tracked:
            return
        visit = self._keys_to_visit(audit)

        # Recipients that can take no more in this cycle, and, once there is any,
        # the running workers that still can. Both only shrink during the run, so
        # the candidate sets built from them stay valid for the manager (which
        # checks a candidate set once per cycle, by identity).
        full = {ws for ws, (k, b) in load.items() if self._is_full(k, b)}
        open_: set[WorkerState] | None = set(scheduler.running) - full if full else None
        pools: dict[frozenset[str], set[WorkerState]] = {}
        pending = manager.pending  # the same dict for the whole cycle
        due = self._due
        nrepl = 0
        nkeys = 0

        for i, key in enumerate(visit):
            if open_ is not None and not open_:
                # the keys not visited stay due
                logger.debug("ReplicateN: every recipient has its fill of transfers")
                break
            if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                yield CHECKPOINT  # most keys may need nothing: no suggestion for long
            # re-read after a possible suspension: the key may be gone
            target = self._tracked.get(key)  # type: ignore[assignment]
            if target is None:
                due.pop(key, None)
                continue
            if self._forget_if_gone(key, target):
                continue
            ts = target.ts
            if ts.state != "memory" or ts.actor:
                continue  # due until it lands
            pool, have, goal = self._count(target, pools)
            # more than the workers it may use is out of reach: don't ask for it
            missing = min(goal, len(pool)) - have - len(target.inflight)
            entry = pending.get(ts)
            if entry:
                missing -= len(entry[0])  # another policy already asked for copies
            if missing <= 0:
                due.pop(key, None)
                if target.workers is not None and have >= max(1, min(goal, len(pool))):
                    # the workers hold what they should: copies elsewhere may go
                    yield from self._drop_outside(target)
                continue

            candidates = self._candidates(target, pool, open_)
            if candidates is not None and not candidates:
                continue
            nkeys += 1
            nbytes = ts.get_nbytes()
            placed = 0
            for _ in range(missing):
                if ts.state != "memory" or self._tracked.get(key) is not target:
                    # released, untracked or set anew while this policy was
                    # suspended: ``missing`` counted for a target that is gone (one
                    # set anew is due, for its next run to count)
                    break
                ws = yield ("replicate", ts, candidates)  # a plain tuple: see amm.policy
                if ws is None:
                    break  # no running worker without the key is left to receive it
                nrepl += 1
                placed += 1
                # re-read after the suspension at the yield: a key untracked
                # meanwhile has nothing to wait for (recording it would leave it in
                # _with_inflight for good); a key set anew for the same task has a
                # new target that shares this one's in-flight transfers
                current = self._tracked.get(key)
                if current is not None and current.ts is ts:
                    current.inflight[ws] = now + self.retry_after
                    self._with_inflight.add(key)
                if candidates is not None and candidates is not open_:
                    # this key's own set: the worker has its copy coming. The
                    # manager would skip it anyway, but at a cost at every search.
                    candidates.discard(ws)
                counts = load.setdefault(ws, [0, 0])
                counts[0] += 1
                counts[1] += nbytes
                if self._is_full(*counts):
                    task_logger.debug("ReplicateN: %s has its fill of transfers", ws)
                    full.add(ws)
                    if open_ is None:
                        open_ = set(scheduler.running) - full
                        if candidates is None:
                            candidates = open_
                    else:
                        open_.discard(ws)
                if candidates is not None and not candidates:
                    break
            if placed == missing and self._tracked.get(key) is target:
                # all asked for: due again only if a transfer fails. (Set anew
                # while this policy was suspended, it stays due for the new target.)
                due.pop(key, None)

        if nrepl:
            logger.debug(
                "ReplicateN: Replicating %d missing replicas of %d tasks", nrepl, nkeys
            )

    def _drop_outside(self, target: Target) -> SuggestionGenerator:
        """Drop the copies of a key tracked with ``workers=`` held by other workers
        (the one it was computed or scattered on, one a balancing policy moved it
        to), once the workers it is restricted to hold it: they are wanted by
        nobody, and :meth:`desired_replicas` counts them so that no other policy
        drops a copy inside instead. The manager still keeps a copy a processing
        dependent is reading.
        """
        ts = target.ts
        outside = {ws for ws in ts.who_has or () if ws.address not in target.workers}
        while outside:
            self._dropping = ts
            try:
                ws = yield ("drop", ts, outside)
            finally:
                self._dropping = None
            if ws is None:
                return
            task_logger.debug(
                "ReplicateN: dropping %r from %s, outside its workers", ts.key, ws
            )
            outside.discard(ws)
            if self._tracked.get(ts.key) is not target:
                return  # untracked, or set anew, while this policy was suspended

    # -- internals ---------------------------------------------------------------

    def _is_full(self, nkeys: int, nbytes: int) -> bool:
        return nkeys >= self.max_keys or nbytes >= self.max_bytes

    def _apply_config(self) -> None:
        """Start tracking the configured keys that are now in memory"""
        tasks = self.manager.scheduler.tasks
        for key, n in self.configured.items():
            if key in self._tracked:
                continue  # tracked already, or overridden by a client call
            ts = tasks.get(key)
            if ts is not None and ts.state == "memory" and not ts.actor:
                self._tracked[key] = Target(ts, n, None, "config")
                self._due[key] = None
                logger.debug("ReplicateN: keeping %s replicas of %r (config)", n, key)

    def _untrack(self, key: Key) -> None:
        self._tracked.pop(key, None)
        self._with_inflight.discard(key)
        self._due.pop(key, None)

    def _gone(self, key: Key, target: Target) -> bool:
        """The tracked task was released, failed, or forgotten (a new task under
        the same key is another task)
        """
        ts = target.ts
        return ts.state in GONE or self.manager.scheduler.tasks.get(key) is not ts

    def _forget_if_gone(self, key: Key, target: Target) -> bool:
        if not self._gone(key, target):
            return False
        self._untrack(key)
        task_logger.debug(
            "ReplicateN: %r is %s; no longer tracked", key, target.ts.state
        )
        return True

    def _forget_gone(self) -> None:
        """Stop tracking the keys that are gone, all at once (a cycle finds them
        as it visits them)
        """
        for key, target in list(self._tracked.items()):
            self._forget_if_gone(key, target)

    def _settle_inflight(self) -> Generator[Any, None, dict[WorkerState, list[int]]]:
        """Forget the transfers that arrived, failed or timed out; a key whose
        transfer did not arrive is due again. Returns the transfers still in
        flight to each recipient: ``{worker: [keys, bytes]}``.

        In-flight transfers number up to ``max_per_worker`` per worker, so this
        yields a CHECKPOINT every ``CHECKPOINT_EVERY`` keys.
        """
        now = monotonic()
        due = self._due
        load: dict[WorkerState, list[int]] = {}
        for i, key in enumerate(list(self._with_inflight)):
            if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                yield CHECKPOINT
            target = self._tracked.get(key)  # type: ignore[assignment]
            if target is None:
                continue  # untracked while the cycle was suspended
            ts = target.ts
            if ts.state != "memory":
                target.inflight.clear()
                due[key] = None
            self._forget_arrived(key, target)
            for ws, deadline in list(target.inflight.items()):
                if ws.status != Status.running or deadline <= now:
                    # Gone, or paused or retiring: such a worker does not fetch, so
                    # waiting until retry_after would hold back a replacement on a
                    # running worker. If it resumes and completes the transfer after
                    # all, the key has a replica above its target, for ReduceReplicas
                    # to drop (it stays if no policy drops replicas).
                    del target.inflight[ws]
                    due[key] = None
                else:
                    counts = load.setdefault(ws, [0, 0])
                    counts[0] += 1
                    counts[1] += ts.get_nbytes()
            if not target.inflight:
                self._with_inflight.discard(key)
        return load

    def _keys_to_visit(self, audit: bool = True) -> list[Key]:
        """The keys this cycle visits: the due ones, plus the next stretch of the
        rolling audit; or every key, if the running workers changed since the last
        cycle. Visiting a key that needs nothing costs a few microseconds; what
        this saves is visiting 100k of them at each of hundreds of cycles.
        """
        running = self.manager.scheduler.running
        if running != self._running_seen:
            # Workers left (with their replicas), paused or retired (their
            # replicas no longer count), or joined ("all" wants them): any key
            # may be short. WorkerStates compare by server id, so a worker that
            # restarted at the same address counts as a change.
            self._running_seen = frozenset(running)
            self._due = dict.fromkeys(self._tracked)
            return list(self._due)
        if not audit:
            return list(self._due)
        if self._audit_at >= len(self._audit):
            self._audit = list(self._tracked)
            self._audit_at = 0
        stretch = max(AUDIT_MIN_KEYS, -(-len(self._audit) // AUDIT_CYCLES))
        due = self._due
        # keys untracked since the snapshot are dropped from due when visited
        due.update(dict.fromkeys(self._audit[self._audit_at : self._audit_at + stretch]))
        self._audit_at += stretch
        return list(due)

    def _count(
        self,
        target: Target,
        pools: dict[frozenset[str], set[WorkerState]] | None = None,
    ) -> tuple[Set[WorkerState], int, int]:
        """``(pool, have, goal)``: the running workers the key may use, how many of
        them hold it, and how many should.
        """
        scheduler = self.manager.scheduler
        running = scheduler.running
        who_has = target.ts.who_has or _EMPTY
        pool: Set[WorkerState]
        if target.workers is None:
            pool = running
            # the common case costs O(1): every worker is running
            have = (
                len(who_has)
                if len(running) == len(scheduler.workers)
                else len(who_has & running)
            )
        else:
            cached = pools.get(target.workers) if pools is not None else None
            if cached is None:
                workers = scheduler.workers
                cached = {
                    ws
                    for addr in target.workers
                    if (ws := workers.get(addr)) is not None and ws in running
                }
                if pools is not None:
                    pools[target.workers] = cached
            pool = cached
            have = len(who_has & pool)
        goal = len(pool) if target.n == ALL else target.n
        return pool, have, goal  # type: ignore[return-value]

    def _candidates(
        self,
        target: Target,
        pool: Set[WorkerState],
        open_: set[WorkerState] | None,
    ) -> set[WorkerState] | None:
        """Where the missing replicas of a key may go; None for anywhere. The
        manager excludes holders and non-running workers by itself; explicit sets
        are only built where None would be wrong (restricted keys, recipients
        already in flight) or slow (``"all"``: the manager would walk past every
        holder at each suggestion).
        """
        if target.workers is None and target.n != ALL and not target.inflight:
            return open_
        who_has = target.ts.who_has or _EMPTY
        inflight = target.inflight
        if open_ is not None and len(open_) < len(pool):
            base = open_
            return {
                ws for ws in base if ws in pool and ws not in who_has and ws not in inflight
            }
        return {
            ws
            for ws in pool
            if ws not in who_has
            and ws not in inflight
            and (open_ is None or ws in open_)
        }


_EMPTY: frozenset[Any] = frozenset()
