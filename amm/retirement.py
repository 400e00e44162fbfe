"""Retiring workers on this project's :class:`~amm.policies.RetireWorker`, with a
timeout.

distributed's ``Scheduler.retire_workers`` hard-codes its own ``RetireWorker`` and
waits for it with no time limit (dask/distributed#6252: a recipient that never
completes a transfer makes the call hang forever). :func:`install_retirement`
replaces it on one scheduler, both as the ``retire_workers`` RPC handler (which
serves ``client.retire_workers()``, adaptive scale-down, ``SpecCluster`` scale-down
and ``Worker.close_gracefully``) and as the instance attribute
``scheduler.retire_workers`` (which serves in-process callers such as the HTTP
API). The signature, the return value, the events logged and the locking are the
same as distributed's; only the policy and the time limit differ.

What the time limit does is configured in the ``amm.retire`` section:

- ``timeout`` (60s): how long a retirement may go without progress (without a
  key held only by the worker getting a copy elsewhere, or going away);
- ``on-timeout`` (``abort``): ``abort`` puts the worker back in the status it had
  and leaves its data where it is (it is not in the returned dict, like a worker
  whose data had no recipient); ``close`` retires it anyway, as if its data had
  moved, and logs at WARNING the keys that only it held and that are lost.
"""

from __future__ import annotations

import asyncio
import reprlib
from collections.abc import Callable
from typing import Any, Literal

from tornado.ioloop import PeriodicCallback

from distributed.core import Status
from distributed.metrics import monotonic, time
from distributed.scheduler import Scheduler, WorkerState
from distributed.utils import log_errors

from amm.config import option, parse_duration
from amm.logs import logger, scheduler_logger
from amm.policies.retire_worker import (
    RetireWorker,
    parse_on_timeout,
)

#: Outcome of the retirement of one worker
Outcome = Literal["OK", "no-recipients", "timed-out", "cancelled"]

#: Name of the paused-restart check in ``Scheduler.periodic_callbacks``
PAUSED_RESTART_CALLBACK = "amm-paused-restart"

#: Longest a retirement that gives up waits for the worker to confirm its old
#: status, in seconds: see :meth:`Retirements._until_restored`
RESTORE_WAIT = 5.0


class Retirements:
    """Serves ``retire_workers`` for one scheduler.

    ``manager`` is the manager installed with it; retirements use whatever manager
    is ``scheduler.extensions["amm"]`` at the time of the call, and only fall back
    to ``manager`` for its interval when they need a temporary one.
    """

    scheduler: Scheduler
    #: The scheduler's own method, kept to restore it
    original: Callable[..., Any]

    def __init__(self, scheduler: Scheduler, manager: Any):
        self.scheduler = scheduler
        self.manager = manager
        self.original = scheduler.retire_workers
        #: Workers being retired, by address: the status to put each back in if
        #: its retirements give up, and how many are in progress. Two may overlap
        #: (a retry, adaptive scale-down and a user): only the last to end may put
        #: the worker back, and in the status it had before the first began, not
        #: in the ``closing_gracefully`` the second found; unless one of them
        #: retired it without removing it (``remove=False``), which leaves it
        #: drained, ``closing_gracefully``, on purpose.
        self._in_progress: dict[str, tuple[Status, int]] = {}
        #: Workers whose last retirement gave up and that are being put back in
        #: this status: a retirement that starts before the scheduler hears back
        #: from the worker inherits it, see :meth:`_until_restored`
        self._restoring: dict[str, Status] = {}
        #: The installed manager each temporary manager in use is known to
        self._owners: dict[Any, Any] = {}
        #: Workers being restarted by their nanny after being drained (see
        #: :mod:`amm.paused_restart`): a retirement leaves them out, as they come
        #: back
        self.restarting: set[str] = set()

    def __repr__(self) -> str:
        return f"<Retirements for {self.scheduler.address}>"

    @log_errors
    async def retire_workers(
        self,
        workers: list[str] | None = None,
        *,
        names: list | None = None,
        close_workers: bool = False,
        remove: bool = True,
        stimulus_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Gracefully retire workers: move the keys held only by them elsewhere,
        then remove them (``remove=True``) and/or close them (``close_workers=True``).

        Same parameters and return value as
        :meth:`distributed.Scheduler.retire_workers`: ``workers`` (addresses) or
        ``names``, or else keyword arguments for
        :meth:`~distributed.Scheduler.workers_to_close`. Returns
        ``{address: worker identity}`` of the workers retired. Workers whose unique
        data could not be moved (no recipient, an actor, or the timeout with
        ``amm.retire.on-timeout: abort``) go back to their previous status, keep
        their data, and are not in the result.
        """
        if names is not None and workers is not None:
            raise TypeError("names and workers are mutually exclusive")
        if (names is not None or workers is not None) and kwargs:
            raise TypeError(
                "Parameters for workers_to_close() are mutually exclusive with "
                f"names and workers: {kwargs}"
            )
        return await self.retire(
            workers,
            names=names,
            close_workers=close_workers,
            remove=remove,
            stimulus_id=stimulus_id,
            workers_to_close=kwargs,
        )

    async def retire(
        self,
        workers: list[str] | None = None,
        *,
        names: list | None = None,
        close_workers: bool = False,
        remove: bool = True,
        stimulus_id: str | None = None,
        workers_to_close: dict[str, Any] | None = None,
        on_timeout: str | None = None,
        if_status: Status | None = None,
    ) -> dict[str, Any]:
        """:meth:`retire_workers`, plus two options for the paused-worker restart:
        ``on_timeout`` overrides the config (the restart must never lose data), and
        ``if_status`` retires only the workers still in that status once the lock
        is held (waiting for it, behind a rebalance() or replicate(), a paused
        worker may have resumed; it must not be drained and restarted then).
        """
        s = self.scheduler
        stimulus_id = stimulus_id or f"retire-workers-{time()}"
        # Mutually exclusive with the scheduler's rebalance() and replicate(), which
        # take the same lock; several retirements may run at once.
        async with s._replica_lock("retire-workers"):
            if names is not None:
                scheduler_logger.info("Retire worker names %s", names)
                # Names passed through a CLI become strings
                names_set = {str(name) for name in names}
                wss = {ws for ws in s.workers.values() if str(ws.name) in names_set}
            elif workers is not None:
                scheduler_logger.info(
                    "Retire worker addresses (stimulus_id='%s') %s",
                    stimulus_id,
                    workers,
                )
                wss = {s.workers[addr] for addr in workers if addr in s.workers}
            else:
                wss = {
                    s.workers[addr]
                    for addr in s.workers_to_close(**(workers_to_close or {}))
                }
            if if_status is not None:
                wss = {ws for ws in wss if ws.status == if_status}
            restarting = sorted(ws.address for ws in wss if ws.address in self.restarting)
            if restarting:
                scheduler_logger.info(
                    "Not retiring %s: being restarted (amm.paused-restart)", restarting
                )
                wss = {ws for ws in wss if ws.address not in self.restarting}
            if not wss:
                return {}

            # Built first: an invalid setting raises before any worker changes
            policies = {
                ws: RetireWorker(ws.address, on_timeout=on_timeout) for ws in wss
            }
            amm, temporary = self._manager()
            try:
                coros = []
                for ws, policy in policies.items():
                    amm.add_policy(policy)
                    # Stop new tasks from landing on the worker: set the status here
                    # at once, to avoid races, and tell the worker.
                    prev_status = ws.status
                    s.handle_worker_status_change(
                        Status.closing_gracefully, ws, stimulus_id
                    )
                    _send_status(s, ws, stimulus_id)
                    coros.append(
                        self._track(
                            ws,
                            policy,
                            prev_status=prev_status,
                            close=close_workers,
                            remove=remove,
                            stimulus_id=stimulus_id,
                        )
                    )
                # Don't wait for the next periodic cycle
                _kick(amm)
                ok: dict[str, Any] = {}
                aborted: dict[str, Any] = {}
                timed_out: list[str] = []
                for addr, outcome, info, late in await asyncio.gather(*coros):
                    if outcome == "OK":
                        ok[addr] = info
                    else:
                        aborted[addr] = info
                    if late:
                        timed_out.append(addr)
            finally:
                if temporary:
                    self._release(amm)

        s.log_event(
            "all",
            {
                "action": "retire-workers",
                "retired": list(ok),
                "could-not-retire": list(aborted),
                # This project's addition: the workers whose retirement ran out of
                # time (aborted, or retired anyway with amm.retire.on-timeout: close)
                "timed-out": timed_out,
                "stimulus_id": stimulus_id,
            },
        )
        s.log_event(list(ok), {"action": "retired", "stimulus_id": stimulus_id})
        s.log_event(
            list(aborted), {"action": "could-not-retire", "stimulus_id": stimulus_id}
        )
        return ok

    def _manager(self) -> tuple[Any, bool]:
        """The manager to run the policies on, and whether it is a temporary one.

        If the installed manager is stopped, a temporary one runs only the
        retirement policies, as distributed does: the user who stopped the AMM did
        not ask for ReduceReplicas and friends to run.
        """
        amm = self.scheduler.extensions.get("amm")
        if amm is not None and amm.running:
            return amm, False
        return self._temporary_manager(), True

    def _temporary_manager(self) -> Any:
        """A started manager with no policy, for retirements only; release it with
        :meth:`_release`. The installed manager knows of it, so that the client API
        (``AMMClient.policies``, ``remove_policy``, ``statistics``) reaches it.
        """
        from amm.manager import ActiveMemoryManager

        # Every 2 s, as distributed's temporary manager, or the configured interval
        # if shorter: that of a stopped manager may be long, as it was not meant to
        # run, and a key landing on the worker after the first cycle waited for it
        amm = self.scheduler.extensions.get("amm")
        interval = min(getattr(amm or self.manager, "interval", None) or 2.0, 2.0)
        temporary = ActiveMemoryManager(
            self.scheduler, policies=[], register=False, start=True, interval=interval
        )
        if isinstance(amm, ActiveMemoryManager):
            amm.temporary_managers.add(temporary)
            self._owners[temporary] = amm
            # what it does counts where users look: the installed manager's
            # statistics and metrics
            temporary.stats = amm.stats
        return temporary

    def _release(self, temporary: Any) -> None:
        temporary.stop()
        owner = self._owners.pop(temporary, None)
        if owner is not None:
            owner.temporary_managers.discard(temporary)

    def _adopt(self, policy: RetireWorker) -> Any:
        """Move a retirement off the manager it ran on, which was stopped, onto a
        temporary one, as if it had started with the AMM stopped. Its policy would
        not run any more: a key landing on the worker from then on (a task ending
        there), or a recipient to replace, would wait for the timeout, which
        under ``Worker.close_gracefully`` and adaptive scale-down closes the
        worker with the key. (distributed's retirement waits forever then.)
        """
        temporary = self._temporary_manager()
        policy.manager.policies.discard(policy)
        temporary.add_policy(policy)
        logger.info(
            "AMM stopped while retiring worker %s; the retirement goes on", policy.address
        )
        _kick(temporary)
        return temporary

    async def _track(
        self,
        ws: WorkerState,
        policy: RetireWorker,
        prev_status: Status,
        close: bool,
        remove: bool,
        stimulus_id: str,
    ) -> tuple[str, Outcome, dict[str, Any], bool]:
        """Wait until the worker's unique data has moved, or the policy gives up, or
        the timeout expires; then finish or abort the retirement.

        Returns the address, the outcome, the worker's identity, and whether the
        timeout expired (with ``on-timeout: close`` the outcome is then "OK").
        """
        address = ws.address
        if address in self._in_progress:
            before, count = self._in_progress[address]
        else:
            # While a retirement that gave up puts the worker back, the scheduler
            # still has it closing_gracefully: what it had before is that one's
            restoring = self._restoring.pop(address, None)
            if restoring is not None and prev_status == Status.closing_gracefully:
                prev_status = restoring
            before, count = prev_status, 0
        self._in_progress[address] = (before, count + 1)
        try:
            result = await self._wait_and_finish(ws, policy, close, remove, stimulus_id)
        finally:
            before, count = self._in_progress.pop(address)
            if count > 1:
                self._in_progress[address] = (before, count - 1)
        if result[1] != "OK" and count == 1:
            # The last one to give up: it has just told the worker to go back to
            # ``before`` (no await since)
            await self._until_restored(ws, before)
        return result

    def in_progress(self, address: str) -> bool:
        """Whether a retirement of the worker at ``address`` is under way"""
        return address in self._in_progress

    def _last_in_progress(self, ws: WorkerState) -> bool:
        return self._in_progress[ws.address][1] == 1

    async def _wait_and_finish(
        self,
        ws: WorkerState,
        policy: RetireWorker,
        close: bool,
        remove: bool,
        stimulus_id: str,
    ) -> tuple[str, Outcome, dict[str, Any], bool]:
        s = self.scheduler
        # The timeout runs from the last progress, not from the start: a large
        # worker whose data keeps moving may take longer than it, while one that
        # stalls (a recipient that never completes a transfer) gives up after it.
        # Progress: fewer keys than ever in this retirement are held by it alone.
        least = len(policy.unique_keys())
        deadline = monotonic() + policy.timeout
        timed_out = False
        adopted = None  # the temporary manager it moved to, if its own stopped
        try:
            while not policy.done():
                now = monotonic()
                nkeys = len(policy.unique_keys())
                if nkeys < least:
                    least = nkeys
                    deadline = now + policy.timeout
                remaining = deadline - now
                if remaining <= 0:
                    timed_out = True
                    break
                if (
                    adopted is None
                    and not policy.manager.running
                    and s.status not in (Status.closing, Status.closed)
                ):
                    adopted = self._adopt(policy)
                # done() and unique_keys() scan the worker's keys (~0.1-0.2us each),
                # so poll less often the more keys there are, keeping the scans
                # under ~2% of the event loop: 0.01s up to 200 keys, 0.1s at 2k,
                # 0.5s from 10k. (distributed waits 0.5s from 200 keys on, which
                # adds up to half a second to every retirement.)
                poll = max(0.01, min(0.5, len(ws.has_what) / 20_000))
                await asyncio.sleep(min(poll, remaining))
        finally:
            if adopted is not None:
                self._release(adopted)

        if timed_out:
            # Stop moving data first, so that nothing changes under what follows
            policy.manager.policies.discard(policy)
        # done() because someone removed the policy (AMMClient.remove_policy), not
        # because the data moved
        cancelled = (
            not timed_out
            and not policy.concluded
            and policy not in policy.manager.policies
            and s.workers.get(ws.address) is ws
        )

        if (
            policy.no_recipients
            or cancelled
            or (timed_out and policy.on_timeout == "abort")
        ):
            if self._last_in_progress(ws):
                # Put the worker back as it was, through the worker: it tells the
                # scheduler once it has changed, so no task lands on it before.
                prev_status = self._in_progress[ws.address][0]
                _send_status(s, ws, stimulus_id, prev_status)
                then = f"goes back to {prev_status.name}"
            else:
                then = "stays retiring: another retirement of it is in progress"
            if timed_out:
                scheduler_logger.warning(
                    "Could not retire worker %r: its unique data (%d keys) made no "
                    "progress towards other workers within %ss (amm.retire.timeout); "
                    "it keeps it and %s (stimulus_id=%r)",
                    ws.address,
                    len(policy.unique_keys()),
                    policy.timeout,
                    then,
                    stimulus_id,
                )
                return ws.address, "timed-out", ws.identity(), True
            if cancelled:
                scheduler_logger.warning(
                    "Retirement of worker %r cancelled: its RetireWorker policy was "
                    "removed from the manager; it keeps its data and %s "
                    "(stimulus_id=%r)",
                    ws.address,
                    then,
                    stimulus_id,
                )
                return ws.address, "cancelled", ws.identity(), False
            scheduler_logger.warning(
                f"Could not retire worker {ws.address!r}: unique data could not be "
                f"moved to any other worker ({stimulus_id=!r})"
            )
            return ws.address, "no-recipients", ws.identity(), False

        if timed_out:
            lost = policy.unique_keys()
            scheduler_logger.warning(
                "Retirement of worker %r made no progress for %ss (amm.retire.timeout); "
                "retiring it anyway (amm.retire.on-timeout: close). %d keys held only "
                "by it are lost: %s (stimulus_id=%r)",
                ws.address,
                policy.timeout,
                len(lost),
                reprlib.repr(lost),
                stimulus_id,
            )
        else:
            scheduler_logger.debug(
                f"All unique keys on worker {ws.address!r} have been replicated "
                "elsewhere"
            )

        if remove:
            await s.remove_worker(
                ws.address, expected=True, close=close, stimulus_id=stimulus_id
            )
            # Nothing left to do for it; don't wait for its next run to notice
            policy.manager.policies.discard(policy)
        else:
            # Drained, and left closing_gracefully on purpose: an overlapping
            # retirement that gives up leaves it so
            _, count = self._in_progress[ws.address]
            self._in_progress[ws.address] = (Status.closing_gracefully, count)
            if close:
                s.close_worker(ws.address)
        scheduler_logger.info(f"Retired worker {ws.address!r} ({stimulus_id=!r})")
        # after the removal, as distributed: the info shows the worker closed
        return ws.address, "OK", ws.identity(), timed_out

    async def _until_restored(self, ws: WorkerState, status: Status) -> None:
        """Wait (``RESTORE_WAIT`` at most) until the scheduler hears from ``ws``
        that it is back in ``status``, after the last of its retirements gave up.

        Until then the scheduler has it ``closing_gracefully``: a retirement that
        started meanwhile (the caller retrying as soon as the last one returned,
        or adaptive scale-down) would take that for the status to put it back
        in, and if it gave up too, leave the worker retiring for good, with
        nothing to close it (distributed does). Meanwhile ``_restoring`` holds
        the status: such a retirement takes it over, and then the worker is its
        to put back, its own message coming after this one's.

        If the worker does not answer in time, the status stays recorded: the
        worker is still retiring as far as the scheduler knows.
        """
        address = ws.address
        if status == Status.closing_gracefully:
            return

        def unconfirmed() -> bool:
            return (
                ws.status == Status.closing_gracefully
                and self.scheduler.workers.get(address) is ws
            )

        self._restoring[address] = status
        deadline = monotonic() + RESTORE_WAIT
        while (
            unconfirmed()
            and address not in self._in_progress
            and monotonic() < deadline
        ):
            await asyncio.sleep(0.005)
        if address not in self._in_progress and not unconfirmed():
            self._restoring.pop(address, None)


def _send_status(
    s: Scheduler, ws: WorkerState, stimulus_id: str, status: Status | None = None
) -> None:
    """Tell the worker its status (by default, the scheduler's view of it). A worker
    whose stream is gone is leaving the cluster anyway.
    """
    comm = s.stream_comms.get(ws.address)
    if comm is None or comm.closed():
        return
    comm.send(
        {
            "op": "worker-status-change",
            "status": (status or ws.status).name,
            "stimulus_id": stimulus_id,
        }
    )


def _kick(amm: Any) -> None:
    """Run a cycle now, in addition to the periodic ones"""
    try:
        amm.run_once()
    except RuntimeError:
        # Only possible with a manager that can't start a cycle while one is in
        # progress: the next cycle picks the new policies up.
        logger.debug("AMM cycle in progress; retirement starts at the next one")
    except Exception:
        # The retirement is under way and tracked: the periodic cycles go on with
        # it, and its timeout puts the worker back if they can't. Raising here
        # would leave the worker retiring with nobody waiting for it.
        logger.exception("AMM cycle failed as a retirement started")


def validate_config() -> None:
    """Raise :class:`~amm.AMMConfigError` on an invalid ``amm.retire`` or
    ``amm.paused-restart`` setting, so that a bad deployment fails at install time
    rather than at the first retirement.
    """
    from amm.paused_restart import paused_restart_settings

    parse_duration(*option("retire", "timeout"))
    parse_on_timeout(*option("retire", "on-timeout"))
    paused_restart_settings()


def install_retirement(scheduler: Scheduler, manager: Any) -> Retirements:
    """Make ``scheduler.retire_workers`` (method and RPC handler) run on this
    project's RetireWorker with a timeout, and start the paused-worker restart if
    ``amm.paused-restart.enabled``. Installing twice keeps the first installation.

    Raises :class:`~amm.AMMConfigError` on invalid settings, before changing
    anything.
    """
    current = getattr(scheduler.retire_workers, "__self__", None)
    if isinstance(current, Retirements):
        return current
    validate_config()

    retirements = Retirements(scheduler, manager)
    scheduler.handlers["retire_workers"] = retirements.retire_workers
    scheduler.retire_workers = retirements.retire_workers  # type: ignore[method-assign]

    from amm.paused_restart import PausedWorkerRestarter, paused_restart_settings

    enabled, after = paused_restart_settings()
    if enabled:
        restarter = PausedWorkerRestarter(retirements, after)
        pc = PeriodicCallback(restarter.check, restarter.check_interval * 1000.0)
        scheduler.periodic_callbacks[PAUSED_RESTART_CALLBACK] = pc
        pc.start()
        logger.info("Paused workers will be restarted after %ss", after)
    return retirements


def uninstall_retirement(scheduler: Scheduler) -> None:
    """Undo :func:`install_retirement`. Retirements in progress finish."""
    current = getattr(scheduler.retire_workers, "__self__", None)
    if not isinstance(current, Retirements):
        return
    scheduler.handlers["retire_workers"] = current.original
    del scheduler.retire_workers  # the class attribute, i.e. the method, shows again
    pc = scheduler.periodic_callbacks.pop(PAUSED_RESTART_CALLBACK, None)
    if pc is not None:
        pc.stop()
