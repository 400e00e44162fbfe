"""The manager: a scheduler extension with the public surface of distributed's
``ActiveMemoryManagerExtension``, so that ``Scheduler.retire_workers``, adaptive
scale-down, ``client.amm`` and policies written for distributed use it unchanged.

What a cycle does is in :mod:`amm.cycle`; this module owns the lifecycle (start,
stop, periodic runs), the policies and the RPC handlers.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterable, Iterator, Set
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from tornado.ioloop import PeriodicCallback

from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy as _DistributedPolicy,
)
from distributed.core import Status
from distributed.scheduler import Scheduler, TaskState, WorkerState

from amm import config
from amm.cycle import Cycle, desired_replicas_of, restricted_to_of
from amm.logs import logger
from amm.policy import ActiveMemoryManagerPolicy, PolicySet
from amm.stats import ManagerStats

#: Fraction of ``time_slice`` a slice aims to end by. Where it ends is an estimate:
#: the policies are checked every few dozen suggestions, and the time to send what
#: was decided is extrapolated from the previous send.
SLICE_AIM = 0.8

#: Methods reachable through ``client.amm`` (distributed's AMMClientProxy)
CLIENT_PROXY_METHODS = frozenset({"start", "stop", "run_once", "running"})


class ActiveMemoryManager:
    """Scheduler extension that keeps the cluster's memory in shape.

    Every ``interval`` seconds, or on demand, it runs every policy; each suggests
    creating or destroying single replicas of in-memory keys; the manager accepts
    what the invariants allow, picks the workers, and tells them. There is no "move":
    a move is a replication in one cycle and a drop of the original in a later one,
    once the copy exists.

    The constructor mirrors distributed's so the manager can be created ad hoc:
    ``policies=None``, ``measure=None``, ``start=None`` and ``interval=None`` come
    from the config (the ``amm`` section, then distributed's AMM section, then the
    defaults: see :mod:`amm.config`); ``register=False`` leaves
    the scheduler's RPC handlers alone, for a throwaway manager.
    """

    #: Back-reference to the scheduler holding this extension
    scheduler: Scheduler
    #: Policies run at every cycle, in insertion order
    policies: PolicySet
    #: Attribute of :class:`distributed.scheduler.MemoryState` used to order workers
    measure: str
    #: Seconds between two cycles once started
    interval: float
    #: Lifetime counters, see :meth:`statistics`
    stats: ManagerStats

    def __init__(
        self,
        scheduler: Scheduler,
        policies: Iterable[_DistributedPolicy] | None = None,
        *,
        measure: str | None = None,
        register: bool = True,
        start: bool | None = None,
        interval: float | str | None = None,
    ):
        self.scheduler = scheduler
        self.policies = PolicySet()
        self.stats = ManagerStats()
        #: The cycle in progress: running, or suspended between two time slices
        self._cycle: Cycle | None = None
        #: A full cycle was asked for while a narrower one (run_policies_once) was
        #: suspended; it runs as soon as that one ends
        self._full_cycle_wanted = False
        #: Called on the next turn of the event loop once the cycle in progress ends
        self._when_idle: list[Callable[[], None]] = []
        #: Temporary managers running retirements while this one is stopped (see
        #: :mod:`amm.retirement`); the client API lists and removes their policies
        #: along with this one's
        self.temporary_managers: set[ActiveMemoryManager] = set()
        #: Longest time one cycle holds the event loop before resuming later
        self.time_slice = config.parse_duration(*config.setting("time-slice"))

        if policies is None:
            policies = config.build_policies(*config.setting("policies"))
        for policy in policies:
            self.add_policy(policy)

        if measure is None:
            self.measure = config.parse_measure(*config.setting("measure"))
        else:
            self.measure = config.parse_measure("measure", measure)

        if interval is None:
            self.interval = config.parse_duration(*config.setting("interval"))
        else:
            self.interval = config.parse_duration("interval", interval)

        if register:
            self.register_handlers()

        if start is None:
            start = config.parse_bool(*config.setting("start"))
        if start:
            self.start()

    def register_handlers(self) -> None:
        """Serve ``client.amm.*`` (distributed's ``amm_handler``) and this project's
        client API from this manager
        """
        self.scheduler.handlers.update(
            {
                "amm_handler": self.amm_handler,
                "amm_statistics": self.statistics,
                "amm_policies": self.describe_policies,
                "amm_add_policy": self.add_policy_from_spec,
                "amm_remove_policy": self.remove_policies,
            }
        )

    def __repr__(self) -> str:
        return (
            f"<ActiveMemoryManager: {len(self.policies)} policies, "
            f"interval={self.interval}s, running={self.running}>"
        )

    # -- lifecycle ---------------------------------------------------------------

    @property
    def _callback_name(self) -> str:
        return f"amm-{id(self)}"

    def start(self) -> None:
        """Run a cycle every ``interval`` seconds until stopped or the scheduler
        closes. Starting a running manager does nothing.
        """
        if self.running:
            return
        pc = PeriodicCallback(self.run_once, self.interval * 1000.0)
        self.scheduler.periodic_callbacks[self._callback_name] = pc
        pc.start()

    def stop(self) -> None:
        """Stop the periodic cycle, and end a cycle suspended between two time
        slices: what it decided so far was sent, the rest is not decided. Stopping
        a stopped manager with no cycle in progress does nothing. Replication a
        client asked for (ReplicateN run on demand) goes on regardless.
        """
        pc = self.scheduler.periodic_callbacks.pop(self._callback_name, None)
        if pc:
            pc.stop()
        self._full_cycle_wanted = False
        cycle = self._cycle
        if cycle is not None and cycle.suspended:
            self._cycle = None
            try:
                cycle.end_current()
                self.stats.record(cycle.stats, cycle.seconds, cycle.slices)
                logger.debug("Active Memory Manager stopped between two time slices")
            finally:
                # the cycle is over whatever happened: what waits for it may go on
                self._idle()

    @property
    def running(self) -> bool:
        """True while cycles run periodically"""
        return self._callback_name in self.scheduler.periodic_callbacks

    # -- policies ----------------------------------------------------------------

    def add_policy(self, policy: _DistributedPolicy) -> None:
        """Add a policy; it runs from the next cycle on. Policies written for
        distributed's manager are accepted as they are.
        """
        if not isinstance(policy, _DistributedPolicy):
            raise TypeError(f"Expected ActiveMemoryManagerPolicy; got {policy!r}")
        self.policies.add(policy)
        policy.manager = self  # type: ignore[assignment]

    def desired_replicas(self, ts: TaskState) -> int:
        """The number of replicas of ``ts`` that no drop may go below: 1, unless a
        policy asks for more through
        :meth:`ActiveMemoryManagerPolicy.desired_replicas`.
        """
        desired = (
            self._cycle.desired_replicas
            if self._cycle is not None
            else desired_replicas_of([p for p in self.policies if _protects_keys(p)])
        )
        return 1 if desired is None else desired(ts)

    def restricted_to(self, ts: TaskState) -> Set[WorkerState] | None:
        """The workers ``ts`` may live on, by every policy's
        :meth:`ActiveMemoryManagerPolicy.restricted_to`: the workers all the
        restricting policies allow, or None if none restricts it. A policy that
        raises, or answers something other than a set, is reported and left out
        for the rest of the cycle, as a failing ``desired_replicas``.
        """
        restricted_to = (
            self._cycle.restricted_to
            if self._cycle is not None
            else restricted_to_of([p for p in self.policies if _restricts(p)])
        )
        return restricted_to(ts)

    # -- the cycle ---------------------------------------------------------------

    @property
    def pending(self) -> dict[TaskState, tuple[set[WorkerState], set[WorkerState]]]:
        """Replications and drops accepted so far in the running cycle, per task.
        Only exists while a cycle runs, as in distributed.
        """
        if self._cycle is None:
            raise AttributeError("pending only exists while a cycle runs")
        return self._cycle.pending

    @property
    def workers_memory(self) -> dict[WorkerState, int]:
        """Expected memory of each worker once the accepted suggestions of the
        running cycle are enacted. Only exists while a cycle runs.
        """
        if self._cycle is None:
            raise AttributeError("workers_memory only exists while a cycle runs")
        return self._cycle.order.complete()

    def run_once(self) -> None:
        """Run every policy once and send what was accepted to the workers. Returns
        as soon as the messages are queued; it does not wait for the transfers.

        A cycle that takes longer than ``time_slice`` sends what it decided so far
        and resumes on the next turn of the event loop, so the scheduler never
        stalls on it; while it is suspended, further calls do nothing.
        """
        self._begin(self.policies)

    def run_policies_once(self, policies: Iterable[_DistributedPolicy]) -> bool:
        """Run one cycle of ``policies`` instead of the manager's own, e.g. a
        narrow ReduceReplicas over a few keys between two regular cycles. Keys
        protected by the manager's policies stay protected. Returns False, doing
        nothing, if a cycle is already in progress.
        """
        policies = list(policies)
        for policy in policies:
            policy.manager = self  # type: ignore[assignment]
        return self._begin(policies)

    def _begin(self, policies: Iterable[_DistributedPolicy]) -> bool:
        cycle = self._cycle
        if cycle is not None:
            if not cycle.suspended:
                raise RuntimeError("AMM cycle started from within a running cycle")
            if (
                policies is self.policies
                and cycle.policies is not self.policies
                and not self._full_cycle_wanted
            ):
                # A narrow cycle (an eager pass) does not run the manager's policies,
                # nor one added meanwhile (a retirement starting): run them all
                # once it ends, rather than up to an interval later.
                self._full_cycle_wanted = True
                self.call_when_idle(self._run_full_cycle)
            logger.debug("Active Memory Manager cycle still in progress; skipped")
            return False
        protectors = [p for p in self.policies if _protects_keys(p)]
        restrictors = [p for p in self.policies if _restricts(p)]
        self._cycle = Cycle(
            self.scheduler, self.measure, protectors, policies, restrictors
        )
        self._run_slices()
        return True

    @property
    def cycle_in_progress(self) -> bool:
        """A cycle has started and not finished (it may be suspended between two
        time slices)
        """
        return self._cycle is not None

    def _run_slices(self) -> None:
        """Run the current cycle one time slice at a time. With a running event
        loop, each further slice is a separate callback; without one (a synthetic
        scheduler in a benchmark) the slices run back to back.
        """
        while True:
            cycle = self._cycle
            assert cycle is not None
            cycle.suspended = False
            start = perf_counter()
            try:
                with gc_paused():
                    if cycle.slices:
                        cycle.refresh()
                    done = cycle.run(start + self.time_slice * SLICE_AIM)
                    cycle.enact(final=done)
            except BaseException:
                self._cycle = None
                self._idle()
                raise
            elapsed = perf_counter() - start
            cycle.slices += 1
            cycle.seconds += elapsed
            self.stats.record_slice(elapsed)
            if done:
                self._cycle = None
                self.stats.record(cycle.stats, cycle.seconds, cycle.slices)
                logger.debug("Active Memory Manager run in %.0fms", cycle.seconds * 1000)
                self._idle()
                return
            cycle.suspend()
            if not self._call_soon(self._resume):
                continue
            return

    def call_when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the next turn of the event loop after the cycle in
        progress ends (finished, failed or stopped), e.g. to start a cycle that
        could not start while it was suspended. With no cycle in progress, on the
        next turn. Dropped if the scheduler closes first.
        """
        self._when_idle.append(callback)
        if self._cycle is None:
            self._idle()

    def _idle(self) -> None:
        callbacks, self._when_idle = self._when_idle, []
        for callback in callbacks:
            if not self._call_soon(callback):
                callback()  # no event loop: a synthetic scheduler

    @staticmethod
    def _call_soon(callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the next turn of the event loop, after what the
        scheduler has waiting. Returns False, doing nothing, without a running
        loop (a synthetic scheduler in a benchmark or test).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(callback)
        return True

    def _run_full_cycle(self) -> None:
        # not wanted any more if the manager was stopped meanwhile
        if not self._full_cycle_wanted:
            return
        self._full_cycle_wanted = False
        if self.scheduler.status in (Status.closing, Status.closed):
            return
        try:
            self.run_once()
        except Exception:
            logger.exception("Active Memory Manager cycle failed")

    def _resume(self) -> None:
        if self._cycle is None:
            return
        if self.scheduler.status in (Status.closing, Status.closed):
            self._cycle = None
            self._when_idle.clear()
            return
        try:
            self._run_slices()
        except Exception:
            logger.exception("Active Memory Manager cycle failed")

    # -- RPC handlers ------------------------------------------------------------

    def amm_handler(self, method: str) -> Any:
        """Serve ``client.amm.start()``, ``.stop()``, ``.run_once()``, ``.running()``"""
        if method not in CLIENT_PROXY_METHODS:
            raise ValueError(
                f"Unknown AMM method {method!r}; expected one of "
                + ", ".join(sorted(CLIENT_PROXY_METHODS))
            )
        out = getattr(self, method)
        return out() if callable(out) else out

    def statistics(self) -> dict[str, Any]:
        """Lifetime counters: cycles run, their durations, replications and drops
        requested and rejected, policy errors, accepted suggestions per policy.
        """
        out = self.stats.to_dict()
        out["running"] = self.running
        out["interval"] = self.interval
        out["measure"] = self.measure
        return out

    def describe_policies(self) -> list[dict[str, Any]]:
        """The policies in the order they run, then those of the temporary
        managers (retirements while this one is stopped)
        """
        return [
            {"class": f"{type(p).__module__}.{type(p).__qualname__}", "repr": repr(p)}
            for _, p in self._all_policies()
        ]

    def _all_policies(self) -> Iterator[tuple[ActiveMemoryManager, Any]]:
        """(manager, policy) of this manager and of its temporary managers"""
        for manager in (self, *self.temporary_managers):
            for policy in manager.policies:
                yield manager, policy

    def add_policy_from_spec(self, spec: dict[str, Any]) -> str:
        """Instantiate and add a policy from ``{"class": dotted.path, **kwargs}``,
        as in the ``policies`` config list. Returns the new policy's repr.
        """
        (policy,) = config.build_policies("policy", [spec])
        self.add_policy(policy)
        logger.info("Added policy %r", policy)
        return repr(policy)

    def remove_policies(self, cls: str) -> int:
        """Remove every policy whose class is ``cls`` (a dotted path or a class
        name). Returns how many were removed.
        """
        removed = [
            (manager, p)
            for manager, p in self._all_policies()
            if cls in (type(p).__qualname__, f"{type(p).__module__}.{type(p).__qualname__}")
        ]
        for manager, policy in removed:
            manager.policies.discard(policy)
        if removed:
            logger.info("Removed policies %r", [p for _, p in removed])
        return len(removed)


def _protects_keys(policy: object) -> bool:
    """Whether the policy overrides the desired-replicas hook"""
    return _overrides(policy, "desired_replicas")


def _restricts(policy: object) -> bool:
    """Whether the policy overrides the restricted-to hook"""
    return _overrides(policy, "restricted_to")


def _overrides(policy: object, hook: str) -> bool:
    """Whether the policy implements one of this project's hooks: the others
    (distributed's policies) are skipped without calling anything
    """
    return isinstance(policy, ActiveMemoryManagerPolicy) and getattr(
        type(policy), hook
    ) is not getattr(ActiveMemoryManagerPolicy, hook)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one time slice.

    A slice allocates a few containers per suggestion (its entry in ``pending``,
    the journal of what to send) that live until the slice sends its messages. With
    the collector on, young collections run every 700 allocations and promote those
    still alive to the oldest generation; once promotions reach a quarter of what
    the oldest holds, Python collects every object of the process. In a scheduler
    that is every TaskState and WorkerState: at 100k keys, dropping 100k replicas
    made 2-3 such full collections, which doubled the cycle. Paused, the slice's
    containers are freed by reference counting when it ends, before any collection
    sees them; the objects it leaves alive are collected as usual afterwards. The
    pause lasts one slice (``amm.time-slice``, 100 ms by default), so garbage in
    reference cycles waits that long at most. A collector the application turned
    off stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
