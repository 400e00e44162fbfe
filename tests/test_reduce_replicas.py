"""ReduceReplicas on real clusters"""

from __future__ import annotations

import asyncio

import pytest

from distributed import Event
from distributed.utils_test import async_poll_for, gen_cluster

from amm import ActiveMemoryManagerPolicy, AMMClient, ReduceReplicas
from amm.testing import Recorder, add_task, add_worker, new_scheduler
from conftest import amm_config


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config())
async def test_drops_superfluous_replicas(c, s, *workers):
    x = await c.scatter({"x": 123}, broadcast=True)  # noqa: F841
    y = await c.scatter({"y": 456}, workers=[workers[0].address])  # noqa: F841
    assert len(s.tasks["x"].who_has) == 4
    await c.amm.run_once()
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 1, timeout=5)
    assert len(s.tasks["y"].who_has) == 1
    stats = await AMMClient(c).statistics()
    assert stats["drops_requested"] == 3
    assert stats["by_policy"] == {"ReduceReplicas()": 3}
    assert stats["by_class"] == {"ReduceReplicas": 3}


#: (waiters processing on w1, on w2, not assigned yet; replicas kept under the
#: "each" rule (distributed's), under the "shared" rule)
WAITERS = [
    (0, 0, 0, 1, 1),
    (1, 0, 0, 1, 1),
    (0, 0, 1, 1, 1),
    (2, 0, 0, 1, 1),
    (1, 1, 0, 2, 2),
    (1, 1, 1, 3, 3),
    (1, 1, 2, 4, 3),
    (17, 1, 1, 3, 3),
    # 20+ waiters: not inspected, each may need its own replica
    (18, 1, 1, 4, 4),
]


async def kept_for_waiters(
    c, s, w1, w2, w4, nwaiters_w1, nwaiters_w2, nwaiters_nonproc, nwaiters_far=0
):
    """Replicas of a key on all 4 workers, dependents waiting on it, one cycle:
    the number of replicas left. The dependents not assigned wait for y, which is
    processing, or (the "far" ones) for y2, which waits for y.
    """
    ev = Event()
    x = (await c.scatter({"x": 123}, broadcast=True))["x"]
    y = c.submit(lambda ev: ev.wait(), ev, key="y", workers=[w4.address])
    y2 = c.submit(lambda y: y, y, key="y2", workers=[w4.address])
    waiters = [
        c.submit(lambda x, ev: ev.wait(), x, ev, key=("zw1", i), workers=[w1.address])
        for i in range(nwaiters_w1)
    ] + [
        c.submit(lambda x, ev: ev.wait(), x, ev, key=("zw2", i), workers=[w2.address])
        for i in range(nwaiters_w2)
    ] + [
        c.submit(lambda x, y: None, x, y, key=("znp", i)) for i in range(nwaiters_nonproc)
    ] + [
        c.submit(lambda x, y2: None, x, y2, key=("zfar", i)) for i in range(nwaiters_far)
    ]
    await async_poll_for(lambda: len(s.tasks) == len(waiters) + 3, timeout=5)
    assert s.tasks["y"].state == "processing"
    assert s.tasks["y2"].state == "waiting"
    await c.amm.run_once()
    await asyncio.sleep(0.2)  # let every drop land
    await ev.set()
    return len(s.tasks["x"].who_has)


@pytest.mark.parametrize("nw1,nw2,nnonproc,each,shared", WAITERS)
@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config())
async def test_keeps_replicas_for_waiters(
    c, s, w1, w2, w3, w4, nw1, nw2, nnonproc, each, shared
):
    """A key keeps one replica per distinct place its waiting dependents will run;
    by default dependents not yet assigned that wait only for processing tasks
    each count as a place, as in distributed.
    """
    assert await kept_for_waiters(c, s, w1, w2, w4, nw1, nw2, nnonproc) == each


@pytest.mark.parametrize("nw1,nw2,nnonproc,each,shared", WAITERS)
@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 4,
    config=amm_config(**{"reduce-replicas.unassigned-waiters": "shared"}),
)
async def test_unassigned_waiters_shared(
    c, s, w1, w2, w3, w4, nw1, nw2, nnonproc, each, shared
):
    """With ``unassigned-waiters: shared``, the dependents not yet assigned count
    as one place between them
    """
    assert await kept_for_waiters(c, s, w1, w2, w4, nw1, nw2, nnonproc) == shared


#: (waiters processing on w1, on w2, not assigned and waiting for a processing
#: task, not assigned and waiting for a task that has not started; replicas kept
#: under "imminent", under "each")
FAR_WAITERS = [
    (1, 1, 2, 0, 4, 4),
    (0, 0, 0, 3, 1, 3),
    (1, 1, 0, 2, 3, 4),
    (0, 0, 1, 1, 2, 2),
    (0, 0, 2, 5, 3, 4),
    (1, 0, 0, 1, 2, 2),
    # 20+ waiters: not inspected, each may need its own replica
    (1, 0, 0, 19, 4, 4),
]


@pytest.mark.parametrize("nw1,nw2,nnonproc,nfar,imminent,each", FAR_WAITERS)
@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config())
async def test_unassigned_waiters_imminent(
    c, s, w1, w2, w3, w4, nw1, nw2, nnonproc, nfar, imminent, each
):
    """By default (``unassigned-waiters: imminent``), a dependent not assigned yet
    counts as a place of its own if it only waits for processing tasks; those
    waiting for a task that has not started count as one place between them
    """
    kept = await kept_for_waiters(c, s, w1, w2, w4, nw1, nw2, nnonproc, nfar)
    assert kept == imminent


@pytest.mark.parametrize("nw1,nw2,nnonproc,nfar,imminent,each", FAR_WAITERS)
@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 4,
    config=amm_config(**{"reduce-replicas.unassigned-waiters": "each"}),
)
async def test_far_waiters_each(
    c, s, w1, w2, w3, w4, nw1, nw2, nnonproc, nfar, imminent, each
):
    """Under "each" (distributed's rule), the far dependents each count as a place
    like the others
    """
    assert await kept_for_waiters(c, s, w1, w2, w4, nw1, nw2, nnonproc, nfar) == each


class KeepTwo(ActiveMemoryManagerPolicy):
    def desired_replicas(self, ts):
        return 2

    def run(self):
        return iter(())


def test_honours_desired_replicas():
    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(5)]
    add_task(s, "x", 10, wss)
    from amm import ActiveMemoryManager

    m = ActiveMemoryManager(s, [KeepTwo(), ReduceReplicas()], register=False, start=False)
    m.run_once()
    assert sum(len(keys) for _, _, keys in recorder.pop()) == 3
    assert len(s.tasks["x"].who_has) == 2
    m.run_once()
    assert recorder.pop() == []


def test_counts_pending_suggestions_of_other_policies():
    """Two instances in one cycle do not drop the same surplus twice"""
    s = new_scheduler()
    Recorder(s)  # in place of the workers' streams
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(4)]
    add_task(s, "x", 10, wss)
    from amm import ActiveMemoryManager

    m = ActiveMemoryManager(s, [ReduceReplicas(), ReduceReplicas()], register=False, start=False)
    m.run_once()
    assert m.stats.total.drops_requested == 3
    assert m.stats.total.drop_rejected == 0
    assert len(s.tasks["x"].who_has) == 1


@gen_cluster(client=True, config=amm_config())
async def test_client_api(c, s, a, b):
    client = AMMClient(c)
    assert await client.policies() == [
        {"class": "amm.policies.reduce_replicas.ReduceReplicas", "repr": "ReduceReplicas()"}
    ]
    assert await client.remove_policy("ReduceReplicas") == 1
    assert await client.policies() == []
    assert await client.add_policy("amm.ReduceReplicas") == "ReduceReplicas()"
    with pytest.raises(ValueError, match=r"policy\[0\].class='nope.Nope': cannot be imported"):
        await client.add_policy("nope.Nope")
    with pytest.raises(ValueError, match="Unknown AMM method 'explode'"):
        await c.scheduler.amm_handler(method="explode")
    assert not await client.running()
    await client.run_once()
    stats = await client.statistics()
    assert stats["cycles"] == 1
    assert stats["running"] is False
    assert stats["measure"] == "optimistic"

    # replication through the same entry point
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    await client.replicate(x["x"], 2)
    assert [(e["key"], e["n"]) for e in await client.tracked()] == [("x", 2)]
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 2, timeout=5)
    await client.unreplicate(x["x"])
    assert await client.tracked() == []
