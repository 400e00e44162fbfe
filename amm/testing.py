"""Synthetic scheduler states, for property tests and scale benchmarks.

They are made of a real (never started) :class:`~distributed.scheduler.Scheduler`
and real ``WorkerState`` / ``TaskState`` objects, wired the way the scheduler wires
them (``who_has``, ``has_what``, ``nbytes``, ``replicated_tasks``, ``running``), so
the manager and the policies run on them exactly as on a live cluster, minus the
network. :func:`apply_cycle` plays the role of the workers: it applies what a cycle
sent, as if every transfer succeeded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import dask.config
from distributed.core import Status
from distributed.scheduler import Scheduler, TaskState, WorkerState


def new_scheduler(**kwargs: Any) -> Scheduler:
    """An unstarted scheduler with no built-in AMM and no other extension.

    A Scheduler must be created inside an event loop; this works from sync code.
    """

    async def create() -> Scheduler:
        with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
            return Scheduler(
                dashboard_address="127.0.0.1:0",
                extensions={},
                validate=False,
                **kwargs,
            )

    return asyncio.run(create())


def add_worker(
    scheduler: Scheduler,
    address: str,
    *,
    memory_limit: int = 2**32,
    status: Status = Status.running,
    nthreads: int = 1,
) -> WorkerState:
    ws = WorkerState(
        address=address,
        status=status,
        pid=0,
        name=address,
        nthreads=nthreads,
        memory_limit=memory_limit,
        local_directory="",
        nanny=None,
        server_id=address,
        scheduler=scheduler,
    )
    # What a heartbeat would have filled in; see _refresh
    ws.metrics = {"memory": 0, "spilled_bytes": {"memory": 0, "disk": 0}}
    scheduler.workers[address] = ws
    scheduler.aliases[address] = address
    if status == Status.running:
        scheduler.running.add(ws)
    return ws


def set_status(scheduler: Scheduler, ws: WorkerState, status: Status) -> None:
    ws.status = status
    if status == Status.running:
        scheduler.running.add(ws)
    else:
        scheduler.running.discard(ws)


def add_task(
    scheduler: Scheduler,
    key: str,
    nbytes: int,
    who_has: Iterable[WorkerState] = (),
    *,
    state: str = "memory",
) -> TaskState:
    """A task in ``state``; if in memory, with a replica on each of ``who_has``"""
    ts = scheduler.new_task(key, None, "released")
    ts.state = state  # type: ignore[assignment]
    ts.set_nbytes(nbytes)
    for ws in who_has:
        scheduler.add_replica(ts, ws)
        _refresh(ws)
    return ts


def _refresh(ws: WorkerState) -> None:
    """Process memory as the next heartbeat would report it: exactly the managed
    memory (MemoryState caps managed memory at process memory).
    """
    ws.metrics["memory"] = ws.nbytes


def apply_cycle(scheduler: Scheduler, sent: list[tuple[str, str, list[Any]]]) -> None:
    """Apply the messages a cycle sent, as if every worker complied"""
    for op, address, keys in sent:
        ws = scheduler.workers[address]
        for key in keys:
            ts = scheduler.tasks[key]
            if op == "acquire-replicas":
                if ws not in (ts.who_has or ()):
                    scheduler.add_replica(ts, ws)
            # remove-replicas already removed the replica from who_has on sending
        _refresh(ws)


class Recorder:
    """Capture what a manager sends instead of writing to worker streams.

    ``request_acquire_replicas`` / ``request_remove_replicas`` of the scheduler are
    replaced on this one scheduler object; the bookkeeping the real
    ``request_remove_replicas`` does on the scheduler side (forgetting the replica
    at once) is kept.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.sent: list[tuple[str, str, list[Any]]] = []
        scheduler.request_acquire_replicas = self._acquire  # type: ignore[method-assign]
        scheduler.request_remove_replicas = self._remove  # type: ignore[method-assign]

    def _acquire(self, addr: str, keys: list[Any], *, stimulus_id: str) -> None:
        for key in keys:
            assert self.scheduler.tasks[key].who_has
        self.sent.append(("acquire-replicas", addr, list(keys)))

    def _remove(self, addr: str, keys: list[Any], *, stimulus_id: str) -> None:
        ws = self.scheduler.workers[addr]
        for key in keys:
            ts = self.scheduler.tasks[key]
            assert ts.who_has and len(ts.who_has) > 1, (key, ts.who_has)
            self.scheduler.remove_replica(ts, ws)
        self.sent.append(("remove-replicas", addr, list(keys)))

    def pop(self) -> list[tuple[str, str, list[Any]]]:
        out, self.sent = self.sent, []
        return out
