"""The invariants the manager enforces whatever the policies suggest, on real
schedulers and workers.
"""

from __future__ import annotations

import asyncio

import pytest

from distributed import Event, Lock, wait
from distributed.core import Status
from distributed.utils_test import gen_cluster, lock_inc, slowinc, wait_for_state

from amm import ActiveMemoryManagerPolicy, Suggestion
from conftest import amm_config
from helpers import demo


async def pause(s, w) -> None:
    w.status = Status.paused
    while s.workers[w.address].status != Status.paused:
        await asyncio.sleep(0.01)


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=amm_config(policies=[demo("drop")]))
async def test_never_drops_last_replica_even_across_cycles(c, s, *workers):
    """Many cycles before the workers act on the first one's drops"""
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    for _ in range(10):
        await c.amm.run_once()
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert len(s.tasks["x"].who_has) == 1
    assert await c.gather(x) == {"x": 1}


@gen_cluster(client=True, config=amm_config(policies=[demo("drop")]))
async def test_never_drops_where_dependent_is_processing(c, s, a, b):
    x = (await c.scatter({"x": 1}, broadcast=True))["x"]
    y1 = c.submit(slowinc, x, delay=0.4, key="y1", workers=[a.address])
    y2 = c.submit(slowinc, x, delay=0.8, key="y2", workers=[b.address])
    for key in ("y1", "y2"):
        while key not in s.tasks or s.tasks[key].state != "processing":
            await asyncio.sleep(0.01)
    await c.amm.run_once()
    await asyncio.sleep(0.1)
    assert {ws.address for ws in s.tasks["x"].who_has} == {a.address, b.address}
    assert await y1 == 2
    # y1 is done: a no longer needs x
    await c.amm.run_once()
    while {ws.address for ws in s.tasks["x"].who_has} != {b.address}:
        await asyncio.sleep(0.01)
    assert await y2 == 2


@gen_cluster(client=True, config=amm_config(policies=[demo("drop")]))
async def test_paused_worker_with_dependent_keeps_extra_replica(c, s, a, b):
    """a is paused and runs a dependent, b is running: dropping b's replica would
    leave the key only on a worker that can't serve new work, and RetireWorker-like
    policies would copy it back. Keep both.
    """
    lock = Lock()
    async with lock:
        x = (await c.scatter({"x": 1}, broadcast=True))["x"]
        y = c.submit(lock_inc, x, lock=lock, key="y", workers=[a.address])
        await wait_for_state("y", "executing", a)
        await pause(s, a)
        await c.amm.run_once()
    assert await y == 2
    assert len(s.tasks["x"].who_has) == 2


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=amm_config(policies=[demo("replicate")]))
async def test_never_replicates_to_paused_or_retiring_workers(c, s, w0, w1, w2):
    await pause(s, w1)
    s.handle_worker_status_change(Status.closing_gracefully, s.workers[w2.address], "test")
    x = await c.scatter({"x": 1}, workers=[w0.address])  # noqa: F841
    await c.amm.run_once()
    await asyncio.sleep(0.2)
    assert "x" not in w1.data
    assert "x" not in w2.data
    assert s.tasks["x"].who_has == {s.workers[w0.address]}


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(policies=[demo("replicate", n=10)]))
async def test_replicate_never_twice_to_same_worker(c, s, *workers):
    x = await c.scatter({"x": 1}, workers=[workers[0].address])  # noqa: F841
    for _ in range(3):
        await c.amm.run_once()
    while len(s.tasks["x"].who_has) < 4:
        await asyncio.sleep(0.01)
    assert s.extensions["amm"].stats.total.replicas_requested >= 3


class Counter:
    n = 0

    def increment(self):
        self.n += 1
        return self.n


@gen_cluster(client=True, config=amm_config(policies=[demo("drop"), demo("replicate", key="y")]))
async def test_never_touches_actors(c, s, a, b):
    x = c.submit(Counter, key="x", actor=True, workers=[a.address])
    y = c.submit(Counter, key="y", actor=True, workers=[a.address])
    z = c.submit(lambda cnt: cnt.increment().result(), x, key="z", workers=[b.address])
    await wait([x, y, z])
    assert len(s.tasks["x"].who_has) == 2  # the actor and a proxy
    await c.amm.run_once()
    await asyncio.sleep(0.2)
    assert len(s.tasks["x"].who_has) == 2
    assert len(s.tasks["y"].who_has) == 1
    assert s.extensions["amm"].stats.total.drops_requested == 0
    assert s.extensions["amm"].stats.total.replicas_requested == 0


@gen_cluster(client=True, config=amm_config(policies=[demo("drop"), demo("replicate")]))
async def test_only_keys_in_memory(c, s, a, b):
    ev = Event()
    x = c.submit(lambda ev: ev.wait(), ev, key="x")
    while "x" not in s.tasks or s.tasks["x"].state != "processing":
        await asyncio.sleep(0.01)
    await c.amm.run_once()
    stats = s.extensions["amm"].stats.total
    assert stats.drops_requested == stats.replicas_requested == 0
    await ev.set()
    await x
    assert len(s.tasks["x"].who_has) == 1


class KeepThree(ActiveMemoryManagerPolicy):
    """Protects x at 3 replicas through the desired-replicas hook"""

    def desired_replicas(self, ts):
        return 3 if ts.key == "x" else 1

    def run(self):
        return
        yield


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 5,
    config=amm_config(
        policies=[
            {"class": "test_invariants.KeepThree"},
            {"class": "amm.ReduceReplicas"},
            demo("drop", n=10),
        ]
    ),
)
async def test_desired_replicas_protect_keys_from_every_policy(c, s, *workers):
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    y = await c.scatter({"y": 2}, broadcast=True)  # noqa: F841
    for _ in range(3):
        await c.amm.run_once()
        await asyncio.sleep(0.05)
    while len(s.tasks["y"].who_has) > 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(s.tasks["x"].who_has) == 3
    assert s.extensions["amm"].desired_replicas(s.tasks["x"]) == 3
    assert s.extensions["amm"].desired_replicas(s.tasks["y"]) == 1


@gen_cluster(client=True, config=amm_config(policies=[]))
async def test_drop_needs_a_holder_among_candidates(c, s, a, b):
    ws_a, ws_b = s.workers[a.address], s.workers[b.address]
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    y = await c.scatter({"y": 1}, broadcast=True)  # noqa: F841
    chosen = []

    class P(ActiveMemoryManagerPolicy):
        def run(self):
            chosen.append((yield Suggestion("drop", s.tasks["x"], {ws_b})))
            chosen.append((yield Suggestion("replicate", s.tasks["y"], {ws_a, ws_b})))
            chosen.append((yield Suggestion("drop", s.tasks["y"], {ws_b})))
            chosen.append((yield Suggestion("drop", s.tasks["y"], {ws_b})))

    s.extensions["amm"].add_policy(P())
    await c.amm.run_once()
    assert chosen == [None, None, ws_b, None]


@pytest.mark.parametrize("leaving", [Status.closing_gracefully, Status.closing])
def test_never_drops_the_last_replica_off_leaving_workers(leaving):
    """x is on a and on b, which is leaving: retiring, or closing (Worker.close(),
    which the scheduler sees until the worker unregisters). Dropping a's replica
    would leave x only on b, to be lost with it; and with b retiring, a retirement
    that ran before the drop was sent would count b's replica as held on a, and
    close b with the last one.
    """

    @gen_cluster(client=True, nthreads=[("", 1)] * 3, config=amm_config(policies=[]))
    async def test(c, s, a, b, w):
        await _never_drops_the_last_replica_off_leaving_workers(c, s, a, b, w, leaving)

    test()


async def _never_drops_the_last_replica_off_leaving_workers(c, s, a, b, w, leaving):
    ws_a, ws_b, ws_w = (s.workers[x.address] for x in (a, b, w))
    x = await c.scatter({"x": 1}, workers=[a.address, b.address], broadcast=True)
    y = await c.scatter({"y": 1}, broadcast=True)  # noqa: F841
    s.handle_worker_status_change(leaving, ws_b, "test")
    chosen = []

    class P(ActiveMemoryManagerPolicy):
        def run(self):
            chosen.append((yield Suggestion("drop", s.tasks["x"], {ws_a})))
            chosen.append((yield Suggestion("drop", s.tasks["x"], None)))
            # w still holds y: a's replica may go, then w's may not
            chosen.append((yield Suggestion("drop", s.tasks["y"], {ws_a})))
            chosen.append((yield Suggestion("drop", s.tasks["y"], {ws_w})))

    s.extensions["amm"].add_policy(P())
    await c.amm.run_once()
    assert chosen == [None, ws_b, ws_a, None]
    assert await c.gather(x) == {"x": 1}
