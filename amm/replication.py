"""Replication that the manager keeps: scheduler handlers and the client API.

The :class:`~amm.policies.ReplicateN` policy holds the targets; this module is how
they are set:

- :class:`ReplicationClient`, on the client: ``replicate(futures, n)``,
  ``unreplicate(futures)`` and ``tracked()``. Non-blocking: it returns as soon as
  the scheduler knows the target; the copies are made by the following cycles.
- ``Client.replicate()`` and ``Client.scatter(..., broadcast=True)``, unchanged on
  the client. While this manager is installed the scheduler serves them through
  ReplicateN (``broadcast=True`` meaning ``n="all"``), so the copies are kept, made
  again when lost, and no longer dropped by ReduceReplicas a cycle later
  (dask/distributed#8796). As in distributed, they return once the copies exist.
- The config ``amm.replicate.keys: {key name: n}``, read by the policy.

:func:`install_replication` wires the scheduler side when the manager is
installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dask.base import is_dask_collection
from dask.typing import Key
from distributed import Client, Future, futures_of
from distributed.core import Status
from distributed.metrics import monotonic
from distributed.scheduler import Scheduler, TaskState

from amm import config
from amm.logs import logger
from amm.manager import ActiveMemoryManager
from amm.policy import ActiveMemoryManagerPolicy, SuggestionGenerator
from amm.policies.replicate_n import (
    ALL,
    ReplicateN,
    parse_n,
    validate,
)

__all__ = ["Replication", "ReplicationClient", "install_replication"]

#: Seconds between two checks of a caller waiting for its copies. Also the shortest
#: time between two cycles that waiting callers trigger, whatever their number.
POLL = 0.05

#: The first check comes this soon, and the wait grows by half each time up to
#: POLL: a small key is copied in a few milliseconds, and a caller that scatters
#: with broadcast=True in a loop (as it may under distributed, whose replicate
#: awaits the transfers themselves) waited a whole POLL for each key
FIRST_POLL = 0.001

#: Seconds the scheduler waits for the tasks of a client's futures to arrive, see
#: :meth:`Replication.replicate_keys`
GRACE = 2.0


class _ReplicateNow(ActiveMemoryManagerPolicy):
    """The manager's ReplicateN, run on demand without its rolling audit.

    ``on_cut`` is called if the run is stopped before it is through (the
    manager was stopped between two time slices): the keys it had not reached
    yet are still due, and with the AMM stopped no periodic cycle comes for them.
    """

    resumable = True

    def __init__(self, policy: ReplicateN, on_cut: Callable[[], None]):
        self.policy = policy
        self.on_cut = on_cut
        #: in the statistics, what it accepts is the policy's
        self.counted_as = policy

    def __repr__(self) -> str:
        return f"{self.policy!r} (on demand)"

    def run(self) -> SuggestionGenerator:
        # Driven by hand rather than with ``yield from``: the manager stops a
        # policy removed while its cycle is suspended (Cycle.run), and here the
        # policy it sees is this wrapper, so the wrapper checks for it
        suggestions = self.policy.run(audit=False)
        choice = None
        try:
            while True:
                try:
                    suggestion = suggestions.send(choice)
                except StopIteration:
                    return
                try:
                    choice = yield suggestion
                except GeneratorExit:
                    if not self.manager.cycle_in_progress:
                        # ended from outside (stop()), not because it failed:
                        # run again, a failing ReplicateN would fail every time
                        self.on_cut()
                    raise
                if self.policy not in self.manager.policies:
                    # tell it the worker chosen last (the manager sent it), then stop
                    try:
                        suggestions.send(choice)
                    except StopIteration:
                        pass
                    return
        finally:
            suggestions.close()


class ReplicateDelete(ActiveMemoryManagerPolicy):
    """``Client.replicate(..., delete=True)`` (its default): drop the replicas of
    ``tasks`` above ``n`` among the workers at ``addresses`` (any if None), as
    distributed's ``Scheduler.replicate`` does once the copies exist. Through the
    manager, so that no drop breaks its rules: not the copy a running dependent
    reads, not below the count another policy keeps (ReplicateN's new target is
    ``n`` itself), and the most loaded holders first, where distributed picks at
    random.

    A run cut short (the manager stopped between two time slices) is started
    again by :meth:`Replication._drop_above`, from the key it had reached.
    """

    resumable = True

    def __init__(
        self,
        tasks: list[TaskState],
        n: int,
        addresses: frozenset[str] | None,
        counted_as: ReplicateN | None,
    ):
        self.tasks = tasks
        self.n = n
        self.addresses = addresses
        if counted_as is not None:
            #: in the statistics, what it accepts is ReplicateN's, which serves
            #: Client.replicate (as the drops of its own _drop_outside are)
            self.counted_as = counted_as
        #: the position in ``tasks`` of the key being worked on
        self.position = 0
        #: suggestions the manager answered, over all runs
        self.answered = 0

    def __repr__(self) -> str:
        return "Client.replicate(delete=True)"

    @property
    def finished(self) -> bool:
        return self.position >= len(self.tasks)

    @property
    def progress(self) -> int:
        """Grows with every step of a run: a run that ends (stopped, not
        finished) without making any failed
        """
        return self.position + self.answered

    def run(self) -> SuggestionGenerator:
        addresses = self.addresses
        while not self.finished:
            # holders read afresh: a key a cut run was working on resumes with the
            # copies its sent drops left
            ts = self.tasks[self.position]
            holders = {
                ws
                for ws in ts.who_has or ()
                if addresses is None or ws.address in addresses
            }
            for _ in range(len(holders) - self.n):
                ws = yield ("drop", ts, holders)
                self.answered += 1
                if ws is None:
                    break
                holders.discard(ws)  # a candidate set may lose workers, not gain
            self.position += 1


def install_replication(scheduler: Scheduler, manager: ActiveMemoryManager) -> Replication:
    """Register the scheduler handlers of replication: ``amm_replicate`` and
    ``amm_replicated`` (see :class:`ReplicationClient`) and, unless
    ``amm.replicate.serve-client-replicate`` is false, ``replicate`` and ``scatter``
    (``Client.replicate``, ``Client.scatter``) along with the instance attributes
    ``scheduler.replicate`` and ``scheduler.scatter``.

    The :class:`ReplicateN` policy joins the manager's policies when it first has
    something to do: now if ``amm.replicate.keys`` names keys, else at the first
    replication request; so a cluster that never replicates runs no extra policy.
    A ReplicateN listed in ``amm.policies`` is used instead of a new one.

    Everything is built, and the config validated (raising ``AMMConfigError``),
    before the scheduler is changed. Installing twice keeps the first installation.
    """
    current = getattr(scheduler.handlers.get("amm_replicated"), "__self__", None)
    if isinstance(current, Replication) and current.manager is manager:
        return current
    key, serve = config.option("replicate", "serve-client-replicate")
    if serve == "auto":
        serve = not config.distributed_section_customized()
    else:
        serve = config.parse_bool(key, serve)
    replication = Replication(scheduler, manager)  # validates amm.replicate.*
    if replication.current() is None and replication.spare.configured:
        replication.policy()

    scheduler.handlers["amm_replicate"] = replication.replicate_keys
    scheduler.handlers["amm_replicated"] = replication.tracked
    if serve:
        scheduler.handlers["replicate"] = replication.replicate
        scheduler.handlers["scatter"] = replication.scatter
        # Scheduler methods that call self.replicate / self.scatter go through us too
        scheduler.replicate = replication.replicate  # type: ignore[method-assign]
        scheduler.scatter = replication.scatter  # type: ignore[method-assign]
    logger.debug(
        "Replication installed%s",
        "; serving Client.replicate and scatter(broadcast=True)" if serve else "",
    )
    return replication


class Replication:
    """The scheduler side: the RPC handlers, and the replacements of
    ``Scheduler.replicate`` and ``Scheduler.scatter``.
    """

    scheduler: Scheduler
    manager: ActiveMemoryManager

    def __init__(self, scheduler: Scheduler, manager: ActiveMemoryManager):
        self.scheduler = scheduler
        self.manager = manager
        # distributed's own scatter, bound to this scheduler; we only add to it
        scatter = scheduler.handlers["scatter"]
        owner = getattr(scatter, "__self__", None)
        if isinstance(owner, Replication):  # installed before, for another manager
            scatter = owner._scatter
        self._scatter = scatter
        #: The policy to add at the first request; built now to validate the config
        self.spare = ReplicateN()
        #: A kick waits for the cycle in progress to end, see :meth:`kick`
        self._kick_deferred = False

    def current(self) -> ReplicateN | None:
        """The manager's ReplicateN policy, if it has one"""
        return next((p for p in self.manager.policies if isinstance(p, ReplicateN)), None)

    def policy(self) -> ReplicateN:
        """The manager's ReplicateN policy, added if there is none yet. A user who
        removed it stops replication; the next request starts afresh, with the
        configured keys only.
        """
        policy = self.current()
        if policy is None:
            policy, self.spare = self.spare, ReplicateN()
            self.manager.add_policy(policy)
            logger.info("Added policy %r", policy)
        return policy

    # -- handlers of ReplicationClient -------------------------------------------

    async def replicate_keys(
        self,
        keys: Iterable[Key],
        n: Any,
        workers: Iterable[str] | None = None,
        grace: float = 0,
    ) -> None:
        """Handler ``amm_replicate``: keep ``n`` replicas of ``keys`` (n=1: stop).
        Returns at once; a cycle starts right away to make the first copies.

        ``grace``: seconds to wait for unknown keys to appear before failing. A
        client sends its futures' tasks on another connection than this request, so
        a future submitted just before may not have reached the scheduler yet.
        """
        keys = list(keys)
        addresses = self._resolve_workers(workers)
        if addresses is not None and not addresses and n != 1:
            # tracked, the keys would wait for a worker that can never exist
            raise ValueError("workers is empty: no worker to replicate to")
        tasks = self.scheduler.tasks
        deadline = monotonic() + grace
        while monotonic() < deadline and not all(k in tasks for k in keys):
            await asyncio.sleep(0.01)
        if self._set(keys, n, addresses) != 1:
            self.kick(force=True)

    def tracked(self) -> list[dict[str, Any]]:
        """Handler ``amm_replicated``: see :meth:`ReplicateN.tracked`"""
        policy = self.current()
        return policy.tracked() if policy is not None else []

    # -- Client.replicate and Client.scatter(broadcast=True) -----------------------

    async def replicate(
        self,
        keys: Iterable[Key],
        n: int | str | None = None,
        workers: Iterable[str] | None = None,
        branching_factor: int = 2,
        delete: bool = True,
        stimulus_id: str | None = None,
    ) -> dict[str, Any] | None:
        """Replaces ``Scheduler.replicate``, with the same arguments and return
        value: keep ``n`` replicas of ``keys`` (every worker if None) among
        ``workers`` (any if None), and return once they exist.

        Unlike distributed's, the copies are then kept. ``branching_factor`` is
        accepted and unused: the manager bounds the transfers per recipient instead
        (``amm.replicate.max-per-worker``). ``delete`` drops the replicas above
        ``n`` among ``workers`` before returning, as distributed does, but through
        the manager (see :class:`ReplicateDelete`).
        """
        if (
            not isinstance(branching_factor, int)
            or isinstance(branching_factor, bool)
            or branching_factor <= 0
        ):
            raise ValueError(
                f"branching_factor={branching_factor!r}: must be an integer > 0"
            )
        n = parse_n("n", ALL if n is None else n, ValueError)
        keys = list(keys)
        addresses = self._resolve_workers(workers)
        # distributed raises when there is nowhere to replicate to
        running = self.scheduler.running
        if not any(
            addresses is None or ws.address in addresses for ws in running
        ):
            raise ValueError(
                "No running worker to replicate to"
                + (f" among {sorted(addresses)}" if addresses is not None else "")
            )
        # As distributed: do nothing if some keys have no data (yet)
        tasks = self.scheduler.tasks
        missing = [k for k in keys if k in tasks and not tasks[k].who_has]
        if missing:
            return {"status": "partial-fail", "keys": missing}
        if delete:
            await self._until_landed(keys)

        if self._set(keys, n, addresses) == 1:
            if addresses is not None:
                # distributed's "send to one of specific workers": untracked, that
                # is a one-off copy, which distributed's own method makes (and logs)
                out = await Scheduler.replicate(
                    self.scheduler,
                    keys=keys,
                    n=1,
                    workers=sorted(addresses),
                    branching_factor=branching_factor,
                    delete=False,
                    stimulus_id=stimulus_id,
                )
                if out is None and delete:
                    await self._drop_above(keys, 1, addresses)
                return out  # type: ignore[no-any-return]
        else:
            await self.wait(keys)
        if delete and n != ALL:
            await self._drop_above(keys, n, addresses)
        # distributed's event, which dashboards and tests read
        self.scheduler.log_event(
            "all",
            {
                "action": "replicate",
                "workers": sorted(addresses) if addresses is not None else None,
                "key-count": len(keys),
                "branching-factor": branching_factor,
                "n": n,
            },
        )
        return None

    async def scatter(
        self,
        data: dict,
        workers: Iterable[str] | None = None,
        client: str | None = None,
        broadcast: bool | int = False,
        timeout: float = 2,
    ) -> list[Key]:
        """Replaces ``Scheduler.scatter``: distributed's scatter, then for
        ``broadcast`` the replication of :meth:`replicate`: ``broadcast=True`` keeps
        a replica on every worker in ``workers`` (any worker if None, including
        those that join later), ``broadcast=<int>`` keeps that many.
        """
        keys = await self._scatter(
            data=data, workers=workers, client=client, broadcast=False, timeout=timeout
        )
        if broadcast:
            n = None if broadcast is True else broadcast
            await self.replicate(keys=keys, n=n, workers=workers)
        return keys

    # -- waiting -------------------------------------------------------------------

    def kick(self, force: bool = False) -> None:
        """Run ReplicateN now, unless it ran less than :data:`POLL` seconds ago (or
        ``force``). A cycle in progress is not disturbed: ReplicateN runs once it
        ends, and again at once if the manager is stopped in the middle of it.

        Only ReplicateN, and only over the keys that need work (see
        :class:`_ReplicateNow`): a caller that scatters with ``broadcast=True`` in
        a loop makes a cycle per call, and one of every policy costs what all the
        replicated keys cost ReduceReplicas and the audit, so the loop was
        quadratic. Nor does a user who stopped the AMM get other policies run.
        """
        policy = self.current()
        if policy is None:
            return  # nothing tracked
        if not force and monotonic() - policy.last_run < POLL:
            return
        try:
            started = self.manager.run_policies_once(
                [_ReplicateNow(policy, on_cut=self._defer_kick)]
            )
        except RuntimeError:
            return  # called from within a cycle: it runs ReplicateN, or the next one
        if not started:
            # A cycle is suspended between two time slices, and may not run
            # ReplicateN (an eager pass): run it once that one ends, not at the
            # next periodic cycle, which may never come (the AMM is stopped)
            self._defer_kick()

    def _defer_kick(self) -> None:
        if not self._kick_deferred:
            self._kick_deferred = True
            self.manager.call_when_idle(self._deferred_kick)

    def _deferred_kick(self) -> None:
        self._kick_deferred = False
        if self.scheduler.status not in (Status.closing, Status.closed):
            self.kick(force=True)

    async def wait(self, keys: list[Key]) -> None:
        """Return once each of ``keys`` has its replicas (or is no longer tracked:
        released, set back to 1).

        Cycles are triggered as needed rather than waiting for the next periodic one
        (the manager may even be stopped): right away, then each time none of the
        keys still missing a replica has a transfer in flight, i.e. when the
        previous round of transfers is over or the per-recipient bound held some
        keys back.
        """
        policy = self.policy()
        manager = self.manager
        remaining = keys
        self.kick(force=True)
        poll = FIRST_POLL
        while True:
            remaining = [k for k in remaining if not policy.reached(k)]
            if not remaining:
                return
            if (
                self.scheduler.status in (Status.closing, Status.closed)
                or self.scheduler.extensions.get("amm") is not manager
                or policy not in manager.policies
            ):
                # nobody is left to make the copies; don't hang the caller
                logger.warning(
                    "Stopped waiting for the replicas of %d keys: the manager or "
                    "its ReplicateN policy is gone",
                    len(remaining),
                )
                return
            if not any(policy.in_flight(k) for k in remaining):
                self.kick()
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, POLL)

    async def _until_landed(self, keys: list[Key]) -> None:
        """Wait for the copies of ``keys`` on their way for their current target:
        a lower ``n`` set now would otherwise see them land above it once the
        drops are done. distributed's replicate calls wait for each other's
        transfers the same way, through the replica lock.

        On their way: ReplicateN's transfers in flight (they expire after its
        ``retry-after``), and the copies a cycle in progress accepted, which
        ReplicateN records only as it resumes.
        """
        current = self.current()
        manager = self.manager
        tasks = self.scheduler.tasks

        def on_their_way() -> bool:
            if current is not None and any(current.in_flight(k) for k in keys):
                return True
            if not manager.cycle_in_progress:
                return False
            pending = manager.pending
            for k in keys:
                ts = tasks.get(k)
                entry = pending.get(ts) if ts is not None else None
                if entry is not None and entry[0]:
                    return True
            return False

        poll = FIRST_POLL
        while on_their_way():
            if self.scheduler.status in (Status.closing, Status.closed):
                return
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, POLL)

    async def _drop_above(
        self, keys: list[Key], n: int, addresses: frozenset[str] | None
    ) -> None:
        """Drop the replicas of ``keys`` above ``n`` among ``addresses``, and return
        once the drops are sent (the scheduler forgets the replicas at once).

        The drops run when no other cycle is in progress, queued with the
        callbacks waiting for one to end, and are started again where they
        stopped if the manager is stopped in the middle.
        """
        current = self.current()
        if current is not None:
            for k in keys:
                current.forget_arrived(k)  # those dropped now must not look in flight
        tasks = self.scheduler.tasks
        above = [
            ts
            for k in dict.fromkeys(keys)  # a key listed twice is visited once
            if (ts := tasks.get(k)) is not None and len(ts.who_has or ()) > n
        ]
        if not above:
            return  # the common case: don't wait for a cycle in progress
        policy = ReplicateDelete(above, n, addresses, current)
        manager = self.manager
        ended = asyncio.get_running_loop().create_future()
        started_at: int | None = None  # the progress when the last run started

        def start() -> None:
            nonlocal started_at
            if ended.done():
                return
            if policy.finished or started_at == policy.progress:
                # done; or the last run made no progress, which only a failure of
                # the policy (logged by the manager) explains
                ended.set_result(None)
                return
            progress = policy.progress
            if manager.run_policies_once([policy]):
                started_at = progress
            # again once this cycle, or the one in the way, ends
            manager.call_when_idle(start)

        start()
        while not ended.done():
            if self.scheduler.status in (Status.closing, Status.closed):
                return  # callbacks waiting for the manager are dropped then
            await asyncio.wait([ended], timeout=POLL)

    # -- internals -----------------------------------------------------------------

    def _set(self, keys: list[Key], n: Any, addresses: frozenset[str] | None) -> Any:
        """Validate, then hand the request to the policy (adding it if needed).
        On error nothing changes, not even the list of policies. Returns n parsed.
        """
        current = self.current()
        n, keys, _ = validate(self.scheduler.tasks, keys, n)
        if n == 1 and current is None:
            return n  # nothing tracked: nothing to undo
        (current or self.policy()).set(keys, n, addresses)
        return n

    def _resolve_workers(self, workers: Iterable[str] | None) -> frozenset[str] | None:
        """Worker addresses from addresses, names or host names (as distributed's
        ``workers=``); an unknown one raises ValueError naming it.
        """
        if workers is None:
            return None
        if isinstance(workers, str):
            workers = [workers]
        scheduler = self.scheduler
        out: set[str] = set()
        for w in workers:
            if w == "":
                # as a host name it would be part of every address
                raise ValueError("workers: '' is not a worker of this cluster")
            if w in scheduler.aliases:  # a name, or an address
                out.add(scheduler.aliases[w])
                continue
            try:
                addr = scheduler.coerce_address(w, resolve=False)
            except (TypeError, ValueError):
                addr = None
            if addr in scheduler.workers:
                out.add(addr)
                continue
            # a host name: every worker on it, as Scheduler.workers_list does. Not
            # an address (with a ":"), as there: a departed worker's address may be
            # the start of another's (tcp://h:4000 of tcp://h:40001)
            hosts = [
                a
                for a in scheduler.workers
                if isinstance(w, str) and ":" not in w and w in a
            ]
            if not hosts:
                raise ValueError(f"workers: {w!r} is not a worker of this cluster")
            out.update(hosts)
        return frozenset(out)


class ReplicationClient:
    """Keep data replicated, from a client:

    .. code-block:: python

        from amm.replication import ReplicationClient

        rep = ReplicationClient(client)
        rep.replicate(futures, 3)        # keep 3 replicas of each
        rep.replicate(lookup, "all")     # one on every worker, including new ones
        rep.replicate(x, 2, workers=[a, b])
        rep.tracked()                    # [{"key": ..., "n": 3, "replicas": 2, ...}]
        rep.unreplicate(futures)         # back to 1; ReduceReplicas drops the rest

    ``futures`` is a future, a persisted dask collection, a key (a str or a tuple),
    or a list or set of those. Keys need not be in memory yet: they are replicated
    once they are. A key the scheduler doesn't know, or ``n`` other than an integer
    >= 1 or ``"all"``, raises ValueError and changes nothing; :meth:`unreplicate`
    accepts unknown keys (released ones, say): there is nothing to undo.

    Non-blocking: :meth:`replicate` returns once the scheduler knows the target;
    ReplicateN runs right away and the periodic cycles (every ``amm.interval``)
    make the rest of the copies, a bounded number per worker at a time. With the
    AMM stopped there are no periodic cycles, and only the first round is made. To
    block until the copies exist, use ``client.replicate(futures, n)``, which this
    manager serves the same way, running ReplicateN until they do.

    Like ``client.amm``, every method is synchronous on a synchronous client and
    returns an awaitable on an asynchronous one.
    """

    def __init__(self, client: Client):
        self._client = client

    def replicate(
        self,
        futures: Any,
        n: int | str,
        *,
        workers: Iterable[str] | str | None = None,
    ) -> Any:
        """Keep ``n`` replicas of each key (``"all"``: one on every running worker),
        on ``workers`` only if given (addresses, names or host names, or one of them).
        """
        if isinstance(futures, Iterator):
            futures = list(futures)  # read twice below
        return self._client.sync(
            self._client.scheduler.amm_replicate,
            keys=keys_of(futures),
            n=n,
            workers=(
                None
                if workers is None
                else [workers] if isinstance(workers, str) else list(workers)
            ),
            grace=GRACE if _has_futures(futures) else 0,
        )

    def unreplicate(self, futures: Any) -> Any:
        """Stop keeping replicas of these keys: they go back to n=1. Keys the
        scheduler no longer knows are fine: there is nothing left to undo.
        """
        return self._client.sync(
            self._client.scheduler.amm_replicate, keys=keys_of(futures), n=1
        )

    def tracked(self) -> Any:
        """One dict per tracked key: ``key``, ``n``, ``workers`` (None: any),
        ``replicas`` (how many it has now), ``state`` and ``source``
        (``"api"`` or ``"config"``)
        """
        return self._client.sync(self._tracked)

    async def _tracked(self) -> list[dict[str, Any]]:
        # the wire turns lists into tuples
        out = []
        for entry in await self._client.scheduler.amm_replicated():
            entry = dict(entry)
            if entry["workers"] is not None:
                entry["workers"] = list(entry["workers"])
            out.append(entry)
        return out


def _has_futures(futures: Any) -> bool:
    if isinstance(futures, Future) or is_dask_collection(futures):
        return True
    if isinstance(futures, dict):
        futures = futures.values()
    if isinstance(futures, (list, set, frozenset)):
        return any(_has_futures(f) for f in futures)
    return False


def keys_of(futures: Any) -> list[Key]:
    """The keys of a future, a persisted collection, a key, or a list or set of
    those. A tuple is a key (dask's convention), not a list of keys.
    """
    if isinstance(futures, Future):
        return [futures.key]
    if is_dask_collection(futures):
        found = futures_of(futures)
        if not found:
            raise ValueError(
                f"{type(futures).__name__} has no futures: persist it first"
            )
        return [f.key for f in found]
    if isinstance(futures, (str, bytes, int, float, tuple)):
        return [futures]
    if isinstance(futures, dict):
        futures = futures.values()  # as returned by client.scatter({...})
    try:
        items = iter(futures)
    except TypeError:
        raise TypeError(
            f"Expected futures, keys or a persisted collection; got {futures!r}"
        ) from None
    return [key for item in items for key in keys_of(item)]
