"""Restart, gracefully, workers that stay paused for too long.

A worker pauses when its process memory passes the ``pause`` threshold
(``distributed.worker.memory.pause``, 80% by default): it stops running tasks
until spilling brings it back under. When the memory is not its data but leaked or
unmanaged memory, spilling can't help and the worker stays paused for good,
holding its data and its share of the computation hostage. The announcement of the
AMM planned for such workers to transition into retirement after a timeout;
distributed never shipped it.

With ``amm.paused-restart.enabled: true``, a worker paused for longer than
``amm.paused-restart.after`` is restarted without losing data:

1. its unique data is moved to running workers by the retirement machinery
   (:class:`amm.retirement.Retirements`, the worker in ``closing_gracefully``
   status, ``amm.retire.timeout`` applying), with ``on-timeout`` forced to
   ``abort``: this restart is the manager's own initiative, so it never loses data;
2. only if that succeeded, its nanny restarts the worker process
   (``Scheduler.restart_workers``); a fresh process starts with only the memory it
   needs, and joins the cluster again.

If the data can't be moved (no other worker is running, the worker holds an actor,
or the timeout), the worker goes back to being paused, keeps its data, and is tried
again after another ``after``.
A worker without a nanny can't be restarted: it is only logged, once per pause.

This is a periodic check rather than a policy: a policy runs synchronously inside a
cycle and only suggests replications and drops, while this has to wait for a
retirement and then talk to a nanny. The check itself is cheap (one pass over the
workers' statuses) and the retirement runs on the manager like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed.core import Status
from distributed.metrics import monotonic, time

from amm.config import option, parse_bool, parse_duration
from amm.logs import logger

if TYPE_CHECKING:
    from amm.retirement import Retirements


def paused_restart_settings() -> tuple[bool, float]:
    """``(enabled, after)`` from the ``amm.paused-restart`` config section, validated"""
    return (
        parse_bool(*option("paused-restart", "enabled")),
        parse_duration(*option("paused-restart", "after")),
    )


class PausedWorkerRestarter:
    """Watches worker statuses; restarts the workers paused for ``after`` seconds.

    :meth:`check` is meant to run periodically (every :attr:`check_interval`
    seconds); the time a worker has been paused is measured from the first check
    that saw it paused, so it is accurate to within one interval.
    """

    retirements: Retirements
    after: float
    check_interval: float

    def __init__(self, retirements: Retirements, after: float):
        self.retirements = retirements
        self.scheduler = retirements.scheduler
        self.after = after
        # Often enough that a worker is not left paused much longer than asked,
        # rarely enough that it costs nothing on a large cluster
        self.check_interval = min(max(after / 4, 0.05), 5.0)
        #: Paused workers, by address, and when they were first seen paused
        self.paused_since: dict[str, float] = {}
        #: Workers being moved away from or restarted
        self.restarting: set[str] = set()
        #: Workers without a nanny already logged in their current pause
        self._logged_no_nanny: set[str] = set()

    def check(self) -> None:
        now = monotonic()
        paused = [
            ws for ws in self.scheduler.workers.values() if ws.status == Status.paused
        ]
        addresses = {ws.address for ws in paused}
        for addr in [a for a in self.paused_since if a not in addresses]:
            # Resumed, retiring, or gone: the clock starts again at the next pause
            del self.paused_since[addr]
            self._logged_no_nanny.discard(addr)

        for ws in paused:
            since = self.paused_since.setdefault(ws.address, now)
            if now - since < self.after or ws.address in self.restarting:
                continue
            if not ws.nanny:
                if ws.address not in self._logged_no_nanny:
                    self._logged_no_nanny.add(ws.address)
                    logger.warning(
                        "Worker %s has been paused for %.0fs, but it has no nanny "
                        "and can't be restarted",
                        ws.address,
                        now - since,
                    )
                continue
            self.restarting.add(ws.address)
            self.scheduler._ongoing_background_tasks.call_soon(
                self.restart, ws.address, now - since
            )

    async def restart(self, address: str, paused_for: float) -> None:
        """Move the worker's unique data away, then have its nanny restart it"""
        s = self.scheduler
        stimulus_id = f"amm-paused-restart-{time()}"
        try:
            ws = s.workers.get(address)
            if ws is None or ws.status != Status.paused:
                return  # resumed or gone since the check
            logger.warning(
                "Worker %s has been paused for %.0fs; moving its data to other "
                "workers and restarting it",
                address,
                paused_for,
            )
            retired = await self.retirements.retire(
                [address],
                close_workers=False,
                remove=False,
                stimulus_id=stimulus_id,
                on_timeout="abort",
                if_status=Status.paused,
            )
            if address not in retired:
                # An aborted retirement puts the worker back to paused through a
                # round trip to it: until then it shows as closing_gracefully
                ws = s.workers.get(address)
                if ws is None or ws.status not in (
                    Status.paused,
                    Status.closing_gracefully,
                ):
                    logger.info(
                        "Paused worker %s resumed or left before its data was moved; "
                        "not restarted",
                        address,
                    )
                    return
                logger.warning(
                    "Paused worker %s was not restarted: its data could not be moved "
                    "to other workers. Trying again in %ss",
                    address,
                    self.after,
                )
                # The worker goes back to paused: restart its clock
                self.paused_since[address] = monotonic()
                return
            if self.retirements.in_progress(address) or address not in s.workers:
                # Someone else retired it meanwhile (a user, adaptive scale-down),
                # to remove it: a restart would bring it back
                logger.info("Paused worker %s is being retired; not restarted", address)
                return
            # From now on, a retirement of it leaves it out rather than report it
            # retired while its nanny starts it again
            self.retirements.restarting.add(address)
            try:
                out = await s.restart_workers(
                    [address],
                    wait_for_workers=False,
                    on_error="return",
                    stimulus_id=stimulus_id,
                )
            finally:
                self.retirements.restarting.discard(address)
            logger.info("Restarted paused worker %s: %s", address, out.get(address))
        except Exception:
            logger.exception("Failed to restart paused worker %s", address)
        finally:
            self.restarting.discard(address)
