"""What the stress test's workers run: task functions, an actor, and a worker whose
fetches can be made slow.

They live in a module of their own, imported as ``stress.workload`` (``tests/`` is
on ``sys.path`` through pyproject's ``pythonpath``), rather than in the test
module, so that a nanny's worker process can import them to unpickle a task:
pytest imports the test module under a name (``tests.stress.test_stress``) that a
spawned process may not be able to import, and ``sys.path`` is passed on to it.
"""

from __future__ import annotations

import asyncio
import time

from distributed import Worker
from distributed.core import Status

#: Results are cut to this size, so that chains of concatenations stay small
MAX_BYTES = 3_000_000


def make_bytes(n: int, seed: int) -> bytes:
    return bytes([seed % 251]) * n


def concat(a: bytes, b: bytes) -> bytes:
    return (a + b)[:MAX_BYTES]


def head(a: bytes, n: int) -> bytes:
    return a[:n]


def slow_len(a: bytes, delay: float) -> int:
    """A task that runs for a while: its dependencies stay pinned to its worker"""
    time.sleep(delay)
    return len(a)


def set_status(status: str, dask_worker: Worker) -> str:
    """Pause or resume a worker in another process (``Client.run``), as the tests
    do in-process by setting ``Worker.status``
    """
    dask_worker.status = Status[status]
    return dask_worker.address


class Counter:
    """An actor: a worker holding one can't be retired"""

    n = 0

    def increment(self) -> int:
        self.n += 1
        return self.n


class SlowGatherDep(Worker):
    """A worker whose fetches from other workers start ``gather_delay`` seconds late
    (settable at any time): a slow recipient makes retirements and replications
    take long, or time out.
    """

    gather_delay = 0.0

    async def gather_dep(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.gather_delay:
            await asyncio.sleep(self.gather_delay)
        return await super().gather_dep(*args, **kwargs)
