"""Which worker receives and which one drops"""

from __future__ import annotations

import asyncio

import pytest

from distributed import wait
from distributed.core import Status
from distributed.utils_test import gen_cluster

from amm import ActiveMemoryManager, ActiveMemoryManagerPolicy, Suggestion
from amm.policy import CHECKPOINT
from amm.testing import add_task, add_worker, set_status
from conftest import amm_config
from helpers import demo


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(policies=[demo("replicate", n=1)], measure="managed"))
async def test_replicate_to_least_loaded(c, s, *workers):
    ws1, ws2, ws3, ws4 = s.workers.values()
    x = await c.scatter({"x": 1}, workers=[ws1.address])  # noqa: F841
    clogs = await c.scatter([2, 3], workers=[ws2.address, ws4.address])  # noqa: F841
    await c.amm.run_once()
    while s.tasks["x"].who_has != {ws1, ws3}:
        await asyncio.sleep(0.01)


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(policies=[demo("drop", n=1)], measure="managed"))
async def test_drop_from_most_loaded(c, s, *workers):
    ws1, ws2, ws3, ws4 = s.workers.values()
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    clog = c.submit(lambda: "x" * 100, workers=[ws3.address])
    await wait(clog)
    await c.amm.run_once()
    while s.tasks["x"].who_has != {ws1, ws2, ws4}:
        await asyncio.sleep(0.01)


@gen_cluster(client=True, nthreads=[("", 1)] * 6, config=amm_config(policies=[demo("drop", n=1)], measure="managed"))
async def test_drop_prefers_paused_and_retiring(c, s, *workers):
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    # the most loaded worker is running; a paused one must still drop first
    clog = await c.scatter("x" * 10_000, workers=[workers[0].address])  # noqa: F841
    workers[3].status = Status.paused
    while s.workers[workers[3].address].status != Status.paused:
        await asyncio.sleep(0.01)
    await c.amm.run_once()
    while len(s.tasks["x"].who_has) != 5:
        await asyncio.sleep(0.01)
    assert s.workers[workers[3].address] not in s.tasks["x"].who_has


def test_expected_memory_updates_within_a_cycle(synthetic):
    """Later suggestions see the memory earlier ones will cause: two equal keys
    replicated in one cycle go to two different empty workers.
    """
    s, recorder = synthetic
    w0, w1, w2 = (add_worker(s, f"tcp://w{i}:1") for i in range(3))
    keys = [add_task(s, key, 100, [w0]) for key in ("k1", "k2")]
    chosen = []

    class Spread(ActiveMemoryManagerPolicy):
        def run(self):
            for ts in keys:
                chosen.append((yield Suggestion("replicate", ts)))
            self.memory = dict(self.manager.workers_memory)

    policy = Spread()
    ActiveMemoryManager(s, [policy], register=False, start=False, measure="managed").run_once()
    assert chosen == [w1, w2]
    assert policy.memory == {w0: 200, w1: 100, w2: 100}
    assert recorder.pop() == [
        ("acquire-replicas", w1.address, ["k1"]),
        ("acquire-replicas", w2.address, ["k2"]),
    ]


def test_ties_follow_worker_order(synthetic):
    """Equal expected memory: the first worker in Scheduler.workers receives, the
    last one drops.
    """
    s, recorder = synthetic
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(5)]
    x = add_task(s, "x", 10, [wss[2]])
    y = add_task(s, "y", 10, wss)
    # give every worker the same memory
    for ws in wss:
        if ws is not wss[2]:
            add_task(s, f"pad-{ws.address}", 10, [ws])
    chosen = []

    class P(ActiveMemoryManagerPolicy):
        def __init__(self, op, ts):
            self.op, self.ts = op, ts

        def run(self):
            chosen.append((yield Suggestion(self.op, self.ts)))

    for policy in (P("replicate", x), P("drop", y)):
        ActiveMemoryManager(
            s, [policy], register=False, start=False, measure="managed"
        ).run_once()
    assert chosen == [wss[0], wss[4]]


def test_cycle_reads_the_memory_of_the_workers_it_considers_only(synthetic):
    """Reading a worker's memory builds a MemoryState: a cycle that drops a few
    replicas (an eager pass, say) reads their holders', not the whole cluster's.
    A policy that asks for workers_memory gets every worker, in scheduler order.
    """
    s, recorder = synthetic
    wss = [add_worker(s, f"tcp://w{i:03d}:1") for i in range(100)]
    for i, ws in enumerate(wss):
        add_task(s, f"pad{i}", 1000 + i, [ws])
    holders = [wss[3], wss[50], wss[97]]
    x = add_task(s, "x", 10, holders)
    expected = [(ws, ws.nbytes - (10 if ws is wss[97] else 0)) for ws in wss]
    seen = {}

    class Drop(ActiveMemoryManagerPolicy):
        def run(self):
            seen["dropped"] = yield Suggestion("drop", x)
            seen["read"] = set(self.manager._cycle.order.memory)
            seen["memory"] = list(self.manager.workers_memory.items())

    ActiveMemoryManager(s, [Drop()], register=False, start=False, measure="managed").run_once()
    assert seen["dropped"] is wss[97]
    assert seen["read"] == set(holders)
    assert seen["memory"] == expected


@pytest.mark.parametrize("ncandidates", [1, 3, 40])
def test_candidates_restrict_choice_both_strategies(synthetic, ncandidates):
    """Small candidate sets are scanned, large ones walked in memory order: both
    give the least loaded eligible candidate.
    """
    s, recorder = synthetic
    wss = [add_worker(s, f"tcp://w{i:03d}:1") for i in range(100)]
    for i, ws in enumerate(wss):
        add_task(s, f"pad{i}", 1000 * ((i * 37) % 100), [ws])
    x = add_task(s, "x", 1, [wss[0]])
    candidates = set(wss[10 : 10 + ncandidates])
    expect = min(candidates, key=lambda ws: (ws.nbytes, wss.index(ws)))
    chosen = []

    class P(ActiveMemoryManagerPolicy):
        def run(self):
            chosen.append((yield Suggestion("replicate", x, candidates)))

    ActiveMemoryManager(s, [P()], register=False, start=False, measure="managed").run_once()
    assert chosen == [expect]


def test_paused_droppers_first_synthetic(synthetic):
    s, recorder = synthetic
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(4)]
    x = add_task(s, "x", 10, wss)
    add_task(s, "big", 10**6, [wss[0]])
    set_status(s, wss[2], Status.paused)
    set_status(s, wss[3], Status.closing_gracefully)
    chosen = []

    class P(ActiveMemoryManagerPolicy):
        def run(self):
            for _ in range(3):
                chosen.append((yield Suggestion("drop", x)))

    ActiveMemoryManager(s, [P()], register=False, start=False, measure="managed").run_once()
    # the two non-running workers first (equal memory: the last in order first),
    # then the most loaded running one; the last replica stays on wss[1]
    assert chosen == [wss[3], wss[2], wss[0]]


class TwoDropsOfX(ActiveMemoryManagerPolicy):
    """Drops a replica of x, lets the cycle suspend, then drops another"""

    resumable = True

    def run(self):
        ts = self.manager.scheduler.tasks["x"]
        self.first = yield ("drop", ts, None)
        yield CHECKPOINT
        self.second = yield ("drop", ts, None)


def test_a_holder_added_between_slices_is_a_dropper_candidate(synthetic):
    """who_has grows between two slices: the worker that just got a replica, the
    most loaded of all, is where the second drop goes. Searched through a sub-order
    built on who_has in the first slice (a sub-order assumes its set only shrinks),
    it was never seen.
    """
    s, recorder = synthetic
    wss = [add_worker(s, f"tcp://w{i:03d}:1") for i in range(100)]
    for i, ws in enumerate(wss[:60]):  # loaded non-holders: the walk skips them
        add_task(s, f"pad{i}", 10_000 + i, [ws])
    add_task(s, "x", 1, wss[60:75])  # more holders than a scan takes
    late = wss[75]
    add_task(s, "big", 1_000_000, [late])
    policy = TwoDropsOfX()
    m = ActiveMemoryManager(s, [policy], register=False, start=False)
    m.time_slice = 0

    async def run():
        m.run_once()
        assert m.cycle_in_progress
        s.add_replica(s.tasks["x"], late)
        while m.cycle_in_progress:
            await asyncio.sleep(0)

    asyncio.run(run())
    assert policy.first in wss[60:75]
    assert policy.second is late
