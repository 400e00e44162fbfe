"""Eager reduction: replicas a finished task fetched go without waiting for the
next periodic cycle
"""

from __future__ import annotations

import asyncio

import pytest

from distributed import Event
from distributed.utils_test import async_poll_for, gen_cluster, inc

from amm import ActiveMemoryManagerPolicy, AMMConfigError, ReduceReplicas
from amm.policy import CHECKPOINT
from amm import config as amm_config_module
from conftest import amm_config

import dask


class KeepAll(ReduceReplicas):
    """A user's ReduceReplicas that keeps every replica: an eager pass, which runs
    the stock rules, must not drop any either
    """

    def run(self):
        return
        yield


# a periodic interval far longer than the test: anything dropped was dropped eagerly
SLOW = dict(start=True, interval="1h", **{"reduce-replicas.eager-delay": "10ms"})


@gen_cluster(client=True, config=amm_config(**SLOW))
async def test_dependency_replica_dropped_when_task_finishes(c, s, a, b):
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await x
    y = c.submit(inc, x, key="y", workers=[b.address])
    await y
    # x was copied to b to compute y; nothing needs that copy any more
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 1, timeout=5)
    assert s.extensions["amm"].stats.cycles >= 1
    assert await c.gather([x, y]) == [2, 3]


@gen_cluster(client=True, nthreads=[("", 1), ("", 2)], config=amm_config(**SLOW))
async def test_replica_kept_while_a_dependent_runs(c, s, a, b):
    ev = Event()
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await x
    z = c.submit(lambda x, ev: ev.wait(), x, ev, key="z", workers=[b.address])
    y = c.submit(inc, x, key="y", workers=[b.address])
    await y
    # one copy goes, and it is not the one z, still running on b, reads
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 1, timeout=5)
    assert s.tasks["x"].who_has == {s.workers[b.address]}
    await ev.set()
    assert await z is True


@pytest.mark.parametrize(
    "rule,far,kept",
    [
        ("each", False, 2),
        ("shared", False, 1),
        ("imminent", False, 2),
        ("imminent", True, 1),
        ("each", True, 2),
    ],
)
def test_eager_pass_follows_the_periodic_policy_rule(rule, far, kept):
    """Two dependents of x wait, unassigned, for y, which is processing (or, far,
    for y2, which waits for y): the eager pass run when another dependent of x
    finishes keeps a replica for each of them, or one for both, as the configured
    ReduceReplicas would
    """
    policies = [{"class": "amm.ReduceReplicas", "unassigned_waiters": rule}]

    @gen_cluster(
        client=True, nthreads=[("", 1)] * 4, config=amm_config(**SLOW, policies=policies)
    )
    async def test(c, s, *workers):
        ev = Event()
        x = (await c.scatter({"x": 1}, broadcast=True))["x"]
        y = c.submit(lambda ev: ev.wait(), ev, key="y", workers=[workers[3].address])
        if far:
            y = c.submit(lambda y: y, y, key="y2", workers=[workers[3].address])
        waiting = [c.submit(lambda x, y: None, x, y, key=("w", i)) for i in range(2)]
        await async_poll_for(lambda: len(s.tasks) == 4 + far, timeout=5)
        assert await c.submit(inc, x, key="z") == 2
        await async_poll_for(lambda: len(s.tasks["x"].who_has) == kept, timeout=5)
        await asyncio.sleep(0.1)  # and no further
        assert len(s.tasks["x"].who_has) == kept
        await ev.set()
        await c.gather(waiting)

    test()


@pytest.mark.parametrize(
    "settings",
    [
        dict(start=False, **{"reduce-replicas.eager-delay": "10ms"}),
        dict(SLOW, **{"reduce-replicas.eager": False}),
        dict(SLOW, policies=[]),
        dict(SLOW, policies=[{"class": "test_eager.KeepAll"}]),
    ],
    ids=["manager-stopped", "eager-off", "no-reduce-replicas", "rules-of-its-own"],
)
def test_nothing_dropped_eagerly_unless_enabled(settings):
    @gen_cluster(client=True, config=amm_config(**settings))
    async def run(c, s, a, b):
        x = c.submit(inc, 1, key="x", workers=[a.address])
        await x
        y = c.submit(inc, x, key="y", workers=[b.address])
        await y
        await asyncio.sleep(0.3)
        assert len(s.tasks["x"].who_has) == 2

    run()


def test_eager_config_errors():
    with dask.config.set({"amm.reduce-replicas.eager-delay": "-1s"}):
        with pytest.raises(AMMConfigError, match="amm.reduce-replicas.eager-delay='-1s'"):
            amm_config_module.eager_reduction()
    with dask.config.set({"amm.reduce-replicas.eager": "sometimes"}):
        with pytest.raises(AMMConfigError, match="amm.reduce-replicas.eager='sometimes'"):
            amm_config_module.eager_reduction()


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    config=amm_config(start=True, interval="1h", **{"retire.timeout": "3s"}),
    timeout=30,
)
async def test_retirement_starting_during_a_suspended_eager_pass(c, s, a, b, w3):
    """An eager pass runs its own ReduceReplicas only. A retirement starting while
    it is suspended between two slices runs once it ends, not at the next periodic
    cycle (an hour here, far past the retirement's timeout)
    """
    from amm import ReduceReplicas

    keys = [f"x{i}" for i in range(300)]
    xs = await c.scatter(dict(zip(keys, range(300))), broadcast=True)  # noqa: F841
    u = await c.scatter({"u": 1}, workers=[a.address])
    m = s.extensions["amm"]
    m.time_slice = 0  # one suggestion or so per slice: the pass stays suspended
    m.run_policies_once([ReduceReplicas(keys=[s.tasks[k] for k in keys])])
    assert m.cycle_in_progress
    retiring = asyncio.ensure_future(s.retire_workers(workers=[a.address]))
    while m.cycle_in_progress:
        await asyncio.sleep(0)
    m.time_slice = 0.1
    assert a.address in await retiring
    assert await c.gather(u["u"]) == 1


@gen_cluster(client=True, config=amm_config(**SLOW))
async def test_eager_passes_count_under_one_name(c, s, a, b):
    """Each pass covers another number of keys; the statistics name them all
    alike, or they would grow by an entry per batch size for good
    """
    for n in range(1, 6):
        xs = c.map(inc, range(n), key=[f"x{n}-{i}" for i in range(n)], workers=[a.address])
        ys = c.map(inc, xs, key=[f"y{n}-{i}" for i in range(n)], workers=[b.address])
        await c.gather(ys)
        await async_poll_for(
            lambda: all(len(s.tasks[x.key].who_has) == 1 for x in xs), timeout=5
        )
    by_policy = s.extensions["amm"].statistics()["by_policy"]
    assert len(by_policy) == 1, by_policy
    assert sum(by_policy.values()) == 15


class Counts(ActiveMemoryManagerPolicy):
    def __init__(self):
        self.runs = 0
        self.while_stopped = 0

    def __repr__(self):
        return "Counts()"

    def run(self):
        self.runs += 1
        self.while_stopped += not self.manager.running
        return
        yield


class Slow(ActiveMemoryManagerPolicy):
    """A narrow pass that suspends once between two slices"""

    resumable = True

    def __repr__(self):
        return "Slow()"

    def run(self):
        yield CHECKPOINT


@gen_cluster(client=True, config=amm_config(start=True, interval="1h"))
async def test_no_full_cycle_after_stop(c, s, a, b):
    """A full cycle deferred behind a narrow pass does not run once the manager
    is stopped, even if the pass has already ended when stop() comes
    """
    m = s.extensions["amm"]
    counts = Counts()
    m.add_policy(counts)
    m.time_slice = 0  # the narrow pass suspends at its CHECKPOINT
    assert m.run_policies_once([Slow()])
    assert m.cycle_in_progress
    m.run_once()  # e.g. the periodic tick: deferred until the pass ends
    assert counts.runs == 0
    # On the next turn of the loop the pass ends (queuing the full cycle), and
    # then, in the same turn, the manager is stopped
    asyncio.get_running_loop().call_soon(m.stop)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not m.cycle_in_progress
    assert not m.running
    assert counts.while_stopped == 0, "a full cycle ran after stop()"
    assert counts.runs == 0
