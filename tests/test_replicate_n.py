"""ReplicateN and the replication API, on real clusters and synthetic states"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import pytest

import dask.config
from distributed import Event, Worker
from distributed.core import Status
from distributed.metrics import monotonic
from distributed.utils_test import BlockedGatherDep, async_poll_for, gen_cluster, inc

from amm import (
    ActiveMemoryManager,
    ActiveMemoryManagerPolicy,
    AMMConfigError,
    ReduceReplicas,
    ReplicateN,
)
from amm.policies.replicate_n import AUDIT_MIN_KEYS
from amm.policy import CHECKPOINT
from amm.replication import (
    Replication,
    ReplicateDelete,
    ReplicationClient,
    install_replication,
    keys_of,
)
from amm.testing import (
    Recorder,
    add_task,
    add_worker,
    apply_cycle,
    new_scheduler,
    set_status,
)
from conftest import amm_config
from helpers import demo

#: A running manager with a short interval: what users get, only faster
RUNNING = {"start": True, "interval": "50ms"}


def config(serve: bool = True, **settings):
    """amm_config, with Client.replicate and scatter(broadcast=True) served by
    ReplicateN (or not) whatever the other tests' defaults are
    """
    out = amm_config(**settings)
    out.pop("amm.replicate.serve-client-replicate", None)
    out["amm.replicate.serve-client-replicate"] = serve  # last: wins over a mapping
    return out


def replication(s) -> Replication:
    """The replication of scheduler ``s``, installed here if amm.plugin.install
    does not do it (yet)
    """
    handler = s.handlers.get("amm_replicated")
    if handler is None:
        return install_replication(s, s.extensions["amm"])
    return handler.__self__


def holders(s, key) -> set[str]:
    ts = s.tasks.get(key)
    return {ws.address for ws in ts.who_has or ()} if ts else set()


async def cycles(s, n: int) -> None:
    """Wait until the running manager did ``n`` more cycles"""
    m = s.extensions["amm"]
    target = m.stats.cycles + n
    await async_poll_for(lambda: m.stats.cycles >= target, timeout=10)


# -- reaching and keeping n ------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config(**RUNNING))
async def test_reaches_n_and_keeps_it(c, s, *workers, n):
    """ReduceReplicas runs every cycle and does not drop the tracked replicas"""
    replication(s)
    x = c.submit(inc, 1, key="x")
    await x
    rep = ReplicationClient(c)
    assert await rep.replicate(x, n) is None  # returns at once
    await async_poll_for(lambda: len(holders(s, "x")) == n, timeout=5)
    await cycles(s, 5)
    assert len(holders(s, "x")) == n
    assert await rep.tracked() == [
        {"key": "x", "n": n, "workers": None, "replicas": n, "state": "memory", "source": "api"}
    ]


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config(**RUNNING))
async def test_client_replicate_is_kept(c, s, *workers):
    """dask/distributed#8796: Client.replicate's copies used to be dropped by
    ReduceReplicas at the next cycle
    """
    replication(s)
    x = c.submit(inc, 1, key="x")
    await x
    await c.replicate([x], n=3)
    assert len(holders(s, "x")) == 3  # returned once the copies exist
    await cycles(s, 5)
    assert len(holders(s, "x")) == 3
    # n=None means every worker, as in distributed
    await c.replicate([x])
    assert len(holders(s, "x")) == 4
    await cycles(s, 3)
    assert len(holders(s, "x")) == 4
    # n=1 goes back to ReduceReplicas' rule
    await c.replicate([x], n=1)
    await async_poll_for(lambda: len(holders(s, "x")) == 1, timeout=5)
    assert await ReplicationClient(c).tracked() == []
    # distributed's event, one per call
    events = [ev for _, ev in s.get_events("all") if ev.get("action") == "replicate"]
    assert [(ev["n"], ev["key-count"]) for ev in events] == [(3, 1), ("all", 1), (1, 1)]


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config())
async def test_client_replicate_with_a_lower_n_drops_the_extra_copies(c, s, *workers):
    """As distributed (delete=True, Client.replicate's default): replicate returns
    with the replicas above n dropped, not at some later ReduceReplicas cycle
    (here the AMM is stopped, so none comes)
    """
    replication(s)
    assert not s.extensions["amm"].running
    x = c.submit(inc, 1, key="x")
    await x
    await c.replicate([x], n=4)
    assert len(holders(s, "x")) == 4
    stats = s.extensions["amm"].stats.total
    before = stats.by_class["ReplicateN"]
    await c.replicate([x], n=2)
    assert len(holders(s, "x")) == 2
    # the drops count as ReplicateN's, which serves Client.replicate
    assert stats.by_class["ReplicateN"] == before + 2
    (entry,) = await ReplicationClient(c).tracked()
    assert entry["n"] == 2
    # n=1 untracks the key, and drops down to one copy too
    await c.replicate([x], n=3)
    await c.replicate([x], n=1)
    assert len(holders(s, "x")) == 1
    assert await ReplicationClient(c).tracked() == []
    assert await x == 2
    # delete=False (the scheduler's method; Client.replicate has no such argument)
    await c.replicate([x], n=3)
    await s.replicate(keys=["x"], n=2, delete=False)
    assert len(holders(s, "x")) == 3


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_client_replicate_delete_over_several_time_slices(c, s, a, b, d):
    """The drops may take several slices, and a cycle may be suspended when they
    start: replicate returns once they are all sent
    """
    replication(s)
    m = s.extensions["amm"]
    xs = c.map(inc, range(200), key=[f"x-{i}" for i in range(200)])
    await c.replicate(xs, n=3)
    m.time_slice = 0  # every check point is past the deadline

    class Slow(ActiveMemoryManagerPolicy):
        resumable = True

        def run(self):
            for _ in range(5):
                yield CHECKPOINT

    m.run_policies_once([Slow()])
    assert m.cycle_in_progress  # suspended: the drops wait for it to end
    await c.replicate(xs, n=2)
    assert all(len(holders(s, f"x-{i}")) == 2 for i in range(200))
    assert m.stats.cycles_sliced >= 2


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_client_replicate_with_nothing_to_drop_does_not_wait_for_a_cycle(
    c, s, a, b, d
):
    """A call that drops nothing runs no cycle of drops, so it does not wait for a
    cycle in progress to end if the copies exist already
    """
    replication(s)
    m = s.extensions["amm"]
    x = await c.scatter({"x": 1}, workers=[a.address])
    await c.replicate(list(x.values()), n=2)
    m.time_slice = 0
    until = monotonic() + 3

    class Long(ActiveMemoryManagerPolicy):
        """A cycle that lasts 3 s, one short slice after another"""

        resumable = True

        def run(self):
            while monotonic() < until:
                yield CHECKPOINT

    m.run_policies_once([Long()])
    await asyncio.sleep(0.05)
    assert m.cycle_in_progress
    await c.replicate(list(x.values()), n=2)
    assert len(holders(s, "x")) == 2
    assert m.cycle_in_progress


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_client_replicate_delete_goes_on_if_the_manager_is_stopped(c, s, a, b, d):
    """stop() ends a cycle suspended between two slices: the drops start again
    where they stopped, rather than leave the keys not reached above n for good
    """
    replication(s)
    m = s.extensions["amm"]
    keys = [f"x-{i}" for i in range(300)]
    xs = c.map(inc, range(300), key=keys)
    await c.replicate(xs, n=3)
    m.time_slice = 0
    task = asyncio.create_task(s.replicate(keys=keys, n=2))
    await async_poll_for(
        lambda: m.cycle_in_progress
        and any(isinstance(p, ReplicateDelete) for p in m._cycle.policies),
        timeout=5,
        period=0,
    )
    m.stop()  # client.amm.stop(), say
    await task
    assert [k for k in keys if len(holders(s, k)) != 2] == []


@pytest.mark.parametrize("n", [2, 1])
@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_client_replicate_lower_n_waits_for_copies_of_a_higher_one(c, s, a, b, d, n):
    """A copy on its way for an earlier, higher n (the non-blocking API) would land
    above the new n once replicate returned: it is waited for, then dropped. n=1
    untracks the key: it is waited for before that.
    """
    rep = replication(s)
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await x
    async with BlockedGatherDep(s.address, nthreads=1) as w:
        await ReplicationClient(c).replicate(x, 4)
        await w.in_gather_dep.wait()
        await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
        assert rep.current().in_flight("x") == 1
        lower = asyncio.create_task(c.replicate([x], n=n))
        await asyncio.sleep(0.2)
        assert not lower.done()
        w.block_gather_dep.set()
        await lower
        assert len(holders(s, "x")) == n
        await asyncio.sleep(0.3)
        assert len(holders(s, "x")) == n


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    config=config(measure="managed", **{"replicate.retry-after": "8s"}),
)
async def test_client_replicate_raising_n_after_dropping_an_arrived_copy(c, s, a, b, d):
    """A copy that arrived and was dropped by a lower n no longer counts as in
    flight: raising n again asks for a copy at once rather than after
    retry-after
    """
    replication(s)
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await x
    async with BlockedGatherDep(s.address, nthreads=1) as w:
        # w the most loaded, so that the copy it receives is the one dropped
        clutter = await c.scatter("x" * 100_000, workers=[w.address])  # noqa: F841
        await ReplicationClient(c).replicate(x, 4)
        await w.in_gather_dep.wait()
        await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
        lower = asyncio.create_task(c.replicate([x], n=2))
        await asyncio.sleep(0.2)
        w.block_gather_dep.set()
        await lower
        assert len(holders(s, "x")) == 2
        assert w.address not in holders(s, "x")
        await asyncio.wait_for(c.replicate([x], n=3), timeout=5)
        assert len(holders(s, "x")) == 3


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config())
async def test_client_replicate_lower_n_while_replicate_n_is_suspended_at_the_key(
    c, s, a, b, d, e
):
    """A cycle suspended in the middle of ReplicateN's copies of a key for a higher
    n: the copy it already sent is waited for, and it asks for no more once the
    target is set anew
    """
    rep = replication(s)
    m = s.extensions["amm"]
    keys = [f"x-{i}" for i in range(40)]
    xs = c.map(inc, range(40), key=keys, workers=[a.address])
    await c.replicate(xs, n=2)
    m.time_slice = 0  # suspended at the first check point (63 suggestions)
    await rep.replicate_keys(keys, 4)  # the non-blocking API: 2 more copies each
    assert m.cycle_in_progress
    (key,) = [ts.key for ts, (repl, _) in m.pending.items() if len(repl) == 1]
    await s.replicate(keys=[key], n=2)
    assert len(holders(s, key)) == 2
    await async_poll_for(lambda: not m.cycle_in_progress, timeout=5)
    await asyncio.sleep(0.5)
    assert len(holders(s, key)) == 2


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config())
async def test_client_replicate_delete_with_a_key_listed_twice(c, s, a, b, d, e):
    """Visited twice in one slice, the key would be dropped twice over (the first
    visit's drops are not sent yet), below n among the workers
    """
    replication(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    await c.replicate(list(x.values()), n=4)
    await s.replicate(keys=["x", "x"], n=1, workers=[b.address, d.address, e.address])
    assert len(holders(s, "x") & {b.address, d.address, e.address}) == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config())
async def test_client_replicate_delete_counts_the_given_workers_only(c, s, a, b, d, e):
    """With workers=, as in distributed, the replicas above n among those workers
    are dropped, and the others are left alone
    """
    replication(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    await c.replicate(list(x.values()), n=4)
    await c.replicate(list(x.values()), n=1, workers=[b.address, d.address])
    assert len(holders(s, "x") & {b.address, d.address}) == 1
    assert {a.address, e.address} <= holders(s, "x")


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config(measure="managed"))
async def test_client_replicate_delete_keeps_the_copy_a_running_task_reads(c, s, a, b, d):
    """The drops go through the manager: a dependent processing on a holder keeps
    that holder's copy, though it is the most loaded, which the manager would
    otherwise drop first (distributed's delete picks holders at random)
    """
    replication(s)
    ev = Event()
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    clutter = await c.scatter("x" * 10_000, workers=[a.address])  # noqa: F841
    await c.replicate([x], n=3)
    wss = [s.workers[w.address] for w in (a, b, d)]
    assert wss[0].nbytes > max(ws.nbytes for ws in wss[1:])
    z = c.submit(lambda x, ev: ev.wait(), x, ev, key="z", workers=[a.address])
    await async_poll_for(
        lambda: "z" in s.tasks and s.tasks["z"].state == "processing", timeout=5
    )
    await c.replicate([x], n=1)
    assert holders(s, "x") == {a.address}
    await ev.set()
    await z


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config(**RUNNING))
async def test_scatter_broadcast_is_kept_and_reaches_new_workers(c, s, *workers):
    replication(s)
    y = await c.scatter({"y": 123}, broadcast=True)  # noqa: F841
    assert len(holders(s, "y")) == 3
    await cycles(s, 5)
    assert len(holders(s, "y")) == 3
    (entry,) = await ReplicationClient(c).tracked()
    assert entry["n"] == "all"
    async with Worker(s.address, nthreads=1) as w:
        await async_poll_for(lambda: w.address in holders(s, "y"), timeout=5)
        assert "y" in w.data
        assert len(holders(s, "y")) == 4


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config(**RUNNING))
async def test_scatter_broadcast_direct(c, s, *workers):
    """scatter(direct=True, broadcast=True) goes through Client._replicate"""
    replication(s)
    y = await c.scatter({"y": 1}, broadcast=True, direct=True)  # noqa: F841
    assert len(holders(s, "y")) == 4
    await cycles(s, 5)
    assert len(holders(s, "y")) == 4


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config(**RUNNING))
async def test_workers_restriction(c, s, a, b, d, e):
    """n counts, and replicas go to, the given workers only, as in distributed"""
    replication(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    await c.replicate(list(x.values()), n=2, workers=[b.address, d.address])
    assert holders(s, "x") >= {b.address, d.address}
    assert e.address not in holders(s, "x")
    await cycles(s, 5)
    # a's copy is outside the workers: wanted by nobody, it goes; not the others
    assert holders(s, "x") == {b.address, d.address}


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config(policies=[]))
async def test_copies_outside_the_workers_dropped_without_reduce_replicas(c, s, a, b, d):
    """ReplicateN drops them itself: the count it protects includes them, so no
    other policy could, and a replica kept for a running dependent stays
    """
    replication(s)
    m = s.extensions["amm"]
    assert not m.policies
    ev = Event()
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    z = c.submit(lambda x, ev: ev.wait(), x, ev, key="z", workers=[a.address])
    await async_poll_for(
        lambda: "z" in s.tasks and s.tasks["z"].state == "processing", timeout=5
    )
    await c.replicate([x], n=2, workers=[b.address, d.address])
    assert holders(s, "x") == {a.address, b.address, d.address}
    for _ in range(3):
        await c.amm.run_once()
    assert holders(s, "x") == {a.address, b.address, d.address}  # z reads a's copy
    await ev.set()
    await z
    await c.amm.run_once()
    await async_poll_for(lambda: holders(s, "x") == {b.address, d.address}, timeout=5)
    assert await c.gather(x) == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=config())
async def test_client_replicate_one_copy_on_given_workers(c, s, a, b):
    """n=1 with workers is distributed's "send to one of specific workers": a
    one-off copy there, tracked by nothing
    """
    replication(s)
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    await c.replicate([x], n=1, workers=[b.address])
    assert b.address in holders(s, "x")
    assert await ReplicationClient(c).tracked() == []


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_replication_client_workers_as_one_address(c, s, a, b, d):
    """workers= may be one address, as the scheduler side accepts, not split into
    its characters
    """
    replication(s)
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    await ReplicationClient(c).replicate(x, "all", workers=b.address)
    (entry,) = await ReplicationClient(c).tracked()
    assert entry["workers"] == [b.address]


# -- worker loss -----------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=config(**RUNNING))
async def test_copy_lost_with_a_worker_is_recreated(c, s, *workers):
    replication(s)
    x = c.submit(inc, 1, key="x")
    await x
    await c.replicate([x], n=3)
    victim = next(w for w in workers if "x" in w.data)
    await victim.close()
    await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
    assert victim.address not in holders(s, "x")
    await cycles(s, 3)
    assert len(holders(s, "x")) == 3


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config(**RUNNING))
async def test_copy_on_a_retired_worker_is_recreated(c, s, *workers):
    replication(s)
    x = c.submit(inc, 1, key="x")
    await x
    await ReplicationClient(c).replicate(x, 2)
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)
    victim = next(w for w in workers if "x" in w.data)
    await c.retire_workers([victim.address])
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)
    assert victim.address not in holders(s, "x")
    assert await x == 2


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    Worker=BlockedGatherDep,
    # a replacement can't come from a retry: only from the pause
    config=config(**{"replicate.retry-after": "1h"}),
)
async def test_a_recipient_that_pauses_is_replaced(c, s, a, b, d):
    """A paused (or retiring) worker does not fetch: a replica asked of it is asked
    of a running worker at once, and client.replicate() does not wait for it
    """
    replication(s)
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    waiting = asyncio.create_task(c.replicate([x], n=2))
    # the recipient has the request, and pauses before fetching
    await async_poll_for(
        lambda: b.in_gather_dep.is_set() or d.in_gather_dep.is_set(), timeout=5
    )
    paused, other = (b, d) if b.in_gather_dep.is_set() else (d, b)
    paused.status = Status.paused
    await async_poll_for(lambda: s.workers[paused.address].status == Status.paused, 5)
    # client.replicate() triggers the cycle that asks the other worker
    await async_poll_for(lambda: other.in_gather_dep.is_set(), timeout=5)
    other.block_gather_dep.set()
    await waiting
    assert holders(s, "x") == {a.address, other.address}
    # the paused worker resumes and completes its fetch: ReduceReplicas drops the
    # replica too many
    paused.status = Status.running
    paused.block_gather_dep.set()
    await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
    await c.amm.run_once()
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)


@pytest.mark.parametrize("status", [Status.paused, Status.closing_gracefully])
def test_a_recipient_that_pauses_or_retires_is_no_longer_in_flight(status):
    s, recorder, m, policy, wss = synthetic(3, 1, 100)
    policy.set(["k0"], 2)
    m.run_once()
    ((_, addr, _),) = recorder.pop()
    set_status(s, s.workers[addr], status)
    assert policy.in_flight("k0") == 0
    m.run_once()
    ((_, addr2, keys),) = recorder.pop()
    assert keys == ["k0"]
    assert addr2 not in {wss[0].address, addr}


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_no_churn_while_a_dependent_runs_on_a_paused_holder(c, s, a, b, p):
    """The manager can't drop the replica a dependent processing on a paused worker
    needs. That replica doesn't count towards n, so it must not count towards what
    no policy may drop below either: else ReduceReplicas would drop a running
    replica, and ReplicateN make it again at the next cycle, over and over.
    """
    replication(s)
    x = (await c.scatter({"x": 1}, workers=[a.address]))["x"]
    ev = Event()
    y = c.submit(lambda x, ev: ev.wait(), x, ev, key="y", workers=[p.address])
    # y runs on p (so p holds x), and keeps running once p pauses
    await async_poll_for(lambda: any(t.key == "y" for t in p.state.executing), 5)
    p.status = Status.paused
    await async_poll_for(lambda: s.workers[p.address].status == Status.paused, 5)
    await c.replicate([x], n=2)
    assert holders(s, "x") == {a.address, b.address, p.address}
    for _ in range(4):
        await c.amm.run_once()
        assert holders(s, "x") == {a.address, b.address, p.address}
    # once the dependent is done, the paused worker's replica is the one dropped
    await ev.set()
    await y
    await c.amm.run_once()
    await async_poll_for(lambda: holders(s, "x") == {a.address, b.address}, 5)


# -- leaving the policy ------------------------------------------------------------


@gen_cluster(client=True, config=config(**RUNNING))
async def test_released_keys_leave(c, s, a, b):
    replication(s)
    rep = ReplicationClient(c)
    x = c.submit(inc, 1, key="x")
    await rep.replicate(x, 2)
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)
    x.release()
    await async_poll_for(lambda: "x" not in s.tasks, timeout=5)
    await cycles(s, 1)
    assert replication(s).current()._tracked == {}
    assert await rep.tracked() == []
    # a new task under the same key is another task: not tracked
    x = c.submit(inc, 1, key="x")
    await x
    await cycles(s, 2)
    assert len(holders(s, "x")) == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config(**RUNNING))
async def test_unreplicate(c, s, *workers):
    replication(s)
    rep = ReplicationClient(c)
    x = c.submit(inc, 1, key="x")
    await rep.replicate(x, "all")
    await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
    await rep.unreplicate(x)
    assert await rep.tracked() == []
    await async_poll_for(lambda: len(holders(s, "x")) == 1, timeout=5)


@gen_cluster(client=True, config=config())
async def test_unreplicate_a_released_key(c, s, a, b):
    """Whether a cycle already forgot a released key or not, unreplicating it is
    fine: there is nothing left to undo
    """
    replication(s)
    rep = ReplicationClient(c)
    x = c.submit(inc, 1, key="x")
    await x
    await rep.replicate(x, 2)
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)
    x.release()
    await async_poll_for(lambda: "x" not in s.tasks, timeout=5)
    await c.amm.run_once()
    assert replication(s).current()._tracked == {}  # the cycle forgot it
    await rep.unreplicate("x")
    await c.scheduler.replicate(keys=["x"], n=1)
    await rep.unreplicate("never-known")
    # replicating it is still an error
    with pytest.raises(ValueError, match=r"key 'x': unknown to the scheduler"):
        await rep.replicate("x", 2)


@gen_cluster(client=True, config=config(**RUNNING))
async def test_key_not_in_memory_yet(c, s, a, b):
    replication(s)
    ev = Event()
    x = c.submit(lambda ev: ev.wait() or 1, ev, key="x")
    await async_poll_for(lambda: "x" in s.tasks, timeout=5)
    await ReplicationClient(c).replicate(x, 2)
    (entry,) = await ReplicationClient(c).tracked()
    assert entry["state"] != "memory"
    assert entry["replicas"] == 0
    await ev.set()
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)


# -- protection against other policies ---------------------------------------------


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 4,
    config=config(policies=[demo("drop", n=10), {"class": "amm.ReduceReplicas"}]),
)
async def test_no_policy_drops_below_n(c, s, *workers):
    replication(s)
    x = (await c.scatter({"x": 1}, broadcast=True))["x"]
    assert len(holders(s, "x")) == 4
    await c.replicate([x], n=3)
    # scatter(broadcast=True) tracks "all"; now it is 3: the extra one can go
    for _ in range(5):
        await c.amm.run_once()
    await async_poll_for(lambda: len(holders(s, "x")) == 3, timeout=5)
    await asyncio.sleep(0.1)
    assert len(holders(s, "x")) == 3
    await ReplicationClient(c).unreplicate(x)
    await c.amm.run_once()
    await async_poll_for(lambda: len(holders(s, "x")) == 1, timeout=5)


# -- the config ----------------------------------------------------------------------


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    config=config(**RUNNING, replicate={"keys": {"x": 2, "y": "all"}}),
)
async def test_configured_keys(c, s, *workers):
    replication(s)
    rep = ReplicationClient(c)
    assert {e["key"]: (e["n"], e["state"]) for e in await rep.tracked()} == {
        "x": (2, None),
        "y": ("all", None),
    }
    x = c.submit(inc, 1, key="x")
    y = await c.scatter({"y": 1}, workers=[workers[0].address])  # noqa: F841
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)
    await async_poll_for(lambda: len(holders(s, "y")) == 3, timeout=5)
    await cycles(s, 3)
    assert len(holders(s, "x")) == 2
    assert {e["key"]: e["source"] for e in await rep.tracked()} == {
        "x": "config",
        "y": "config",
    }
    # released and recomputed: the config applies again
    x.release()
    await async_poll_for(lambda: "x" not in s.tasks, timeout=5)
    x = c.submit(inc, 1, key="x")
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)


def test_bad_config():
    with pytest.raises(AMMConfigError, match=r"keys\['x'\]=0: the number of replicas"):
        ReplicateN(keys={"x": 0})
    with dask.config.set({"amm.replicate.keys": {"x": True}}):
        with pytest.raises(AMMConfigError, match=r"amm.replicate.keys\['x'\]=True"):
            ReplicateN()
    with dask.config.set({"amm.replicate.max-per-worker": {"keys": 0}}):
        with pytest.raises(AMMConfigError, match=r"amm.replicate.max-per-worker.keys=0"):
            ReplicateN()
    with pytest.raises(AMMConfigError, match=r"max_per_worker.bytes='lots'"):
        ReplicateN(max_per_worker={"bytes": "lots"})
    with pytest.raises(AMMConfigError, match=r"retry_after=0"):
        ReplicateN(retry_after=0)
    with dask.config.set({"amm.replicate.serve-client-replicate": "maybe"}):
        s = new_scheduler()
        m = ActiveMemoryManager(s, [], register=False, start=False)
        handlers = dict(s.handlers)
        with pytest.raises(AMMConfigError, match="serve-client-replicate='maybe'"):
            install_replication(s, m)
        assert s.handlers == handlers


@gen_cluster(
    client=True,
    config=config(serve=False, **RUNNING),
)
async def test_serving_client_replicate_can_be_turned_off(c, s, a, b):
    """distributed's one-off copies, which ReduceReplicas then drops"""
    replication(s)
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    assert len(holders(s, "x")) == 2
    await async_poll_for(lambda: len(holders(s, "x")) == 1, timeout=5)
    assert await ReplicationClient(c).tracked() == []


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, True, False, 2.5, "two", "ALL", None])
@gen_cluster(client=True, config=config(**RUNNING))
async def test_bad_n(c, s, a, b, n):
    replication(s)
    rep = ReplicationClient(c)
    x = c.submit(inc, 1, key="x")
    await x
    with pytest.raises(ValueError, match=rf"n={n!r}: the number of replicas must be"):
        await rep.replicate(x, n)
    if n is not None:  # None means "every worker" to Client.replicate
        with pytest.raises(ValueError, match=rf"n={n!r}"):
            await c.replicate([x], n=n)
    assert await rep.tracked() == []
    assert replication(s).current() is None  # not even the policy was added
    await cycles(s, 2)
    assert len(holders(s, "x")) == 1


@gen_cluster(client=True, config=config(**RUNNING))
async def test_unknown_keys_and_workers(c, s, a, b):
    replication(s)
    rep = ReplicationClient(c)
    x = c.submit(inc, 1, key="x")
    await x
    with pytest.raises(ValueError, match=r"key 'nope': unknown to the scheduler"):
        await rep.replicate(["x", "nope"], 2)
    with pytest.raises(ValueError, match=r"key \('nope', 1\): unknown"):
        await c.scheduler.replicate(keys=["x", ("nope", 1)], n=2)
    with pytest.raises(ValueError, match=r"'tcp://127.0.0.1:1' is not a worker"):
        await rep.replicate(x, 2, workers=["tcp://127.0.0.1:1"])
    # an address that is the start of a worker's: not that worker (a host name
    # without a port, though, means every worker on the host)
    prefix = a.address[:-1]
    with pytest.raises(ValueError, match=f"{prefix!r} is not a worker"):
        await rep.replicate(x, 2, workers=[prefix])
    with pytest.raises(ValueError, match="workers is empty: no worker to replicate to"):
        await rep.replicate(x, 2, workers=[])
    with pytest.raises(ValueError, match="workers: '' is not a worker"):
        await rep.replicate(x, 2, workers="")
    with pytest.raises(ValueError, match=r"branching_factor=0"):
        await c.replicate([x], n=2, branching_factor=0)
    assert await rep.tracked() == []
    assert replication(s).current() is None  # not even the policy was added
    await cycles(s, 2)
    assert len(holders(s, "x")) == 1
    # a released key: by name, as the future is gone
    x.release()
    await async_poll_for(lambda: "x" not in s.tasks, timeout=5)
    with pytest.raises(ValueError, match=r"key 'x': unknown"):
        await rep.replicate("x", 2)


def test_keys_of():
    assert keys_of("x") == ["x"]
    assert keys_of(("x", 1)) == [("x", 1)]
    assert keys_of(["x", ("y", 1)]) == ["x", ("y", 1)]
    with pytest.raises(TypeError, match="Expected futures"):
        keys_of(object())


# -- the per-cycle bound (synthetic states) ------------------------------------------


def synthetic(nworkers: int, nkeys: int, nbytes: int, **kwargs):
    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(nworkers)]
    for i in range(nkeys):
        add_task(s, f"k{i}", nbytes, [wss[0]])
    policy = ReplicateN(**kwargs)
    m = ActiveMemoryManager(s, [ReduceReplicas(), policy], register=False, start=False)
    return s, recorder, m, policy, wss


def relay(inner, after):
    """Drive ``inner``'s run() as the manager would, calling ``after(suggestion,
    choice)`` once each choice is known
    """
    gen = inner.run()
    choice = None
    while True:
        try:
            suggestion = gen.send(choice)
        except StopIteration:
            return
        choice = yield suggestion
        after(suggestion, choice)


def per_recipient(sent) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, addr, keys in sent:
        assert op == "acquire-replicas"
        out[addr] = out.get(addr, 0) + len(keys)
    return out


def test_bound_on_keys_per_recipient():
    s, recorder, m, policy, wss = synthetic(
        4, 40, 100, max_per_worker={"keys": 5, "bytes": None}
    )
    policy.set([f"k{i}" for i in range(40)], 4)
    rounds = 0
    while any(len(ts.who_has) < 4 for ts in s.tasks.values()):
        m.run_once()
        sent = recorder.pop()
        assert per_recipient(sent) == {ws.address: 5 for ws in wss[1:]}
        # nothing new while these are in flight
        m.run_once()
        assert recorder.pop() == []
        apply_cycle(s, sent)
        rounds += 1
    assert rounds == 8  # 40 keys, 5 at a time
    m.run_once()
    assert recorder.pop() == []  # kept, and ReduceReplicas drops nothing


def test_bound_on_bytes_per_recipient():
    s, recorder, m, policy, wss = synthetic(
        3, 20, 100, max_per_worker={"keys": None, "bytes": 250}
    )
    policy.set([f"k{i}" for i in range(20)], "all")
    m.run_once()
    # the key that crosses the bound goes: 3 keys = 300 bytes
    assert per_recipient(recorder.pop()) == {wss[1].address: 3, wss[2].address: 3}


def test_unbounded_is_one_cycle():
    s, recorder, m, policy, wss = synthetic(
        5, 50, 100, max_per_worker={"keys": None, "bytes": None}
    )
    policy.set([f"k{i}" for i in range(50)], 3)
    m.run_once()
    sent = recorder.pop()
    assert sum(per_recipient(sent).values()) == 100
    apply_cycle(s, sent)
    assert all(len(ts.who_has) == 3 for ts in s.tasks.values())
    # least loaded first: the 4 recipients got 25 each
    assert sorted(per_recipient(sent).values()) == [25] * 4


def test_lost_transfer_is_asked_again():
    s, recorder, m, policy, wss = synthetic(3, 1, 100, retry_after=0.05)
    policy.set(["k0"], 2)
    m.run_once()
    assert sum(per_recipient(recorder.pop()).values()) == 1
    m.run_once()
    assert recorder.pop() == []
    import time

    time.sleep(0.06)
    m.run_once()
    assert sum(per_recipient(recorder.pop()).values()) == 1


def test_desired_replicas():
    s, recorder, m, policy, wss = synthetic(4, 2, 100)
    policy.set(["k0"], 3)
    policy.set(["k1"], "all", frozenset({wss[0].address, wss[1].address}))
    k0, k1 = s.tasks["k0"], s.tasks["k1"]
    assert m.desired_replicas(k0) == 3
    assert m.desired_replicas(k1) == 2
    # a running replica outside the workers is protected, so that the count can't
    # be met by dropping one inside them
    s.add_replica(k1, wss[2])
    assert m.desired_replicas(k1) == 3
    policy.set(["k0"], 1)
    assert m.desired_replicas(k0) == 1
    assert policy.tracked() == [
        {
            "key": "k1",
            "n": "all",
            "workers": sorted([wss[0].address, wss[1].address]),
            "replicas": 1,
            "state": "memory",
            "source": "api",
        }
    ]


def test_all_candidates_are_the_missing_workers():
    """For "all" the policy names the workers that lack the key, so the manager
    does not walk past the holders, nor past the workers already chosen, at each
    suggestion
    """
    s, recorder, _, policy, wss = synthetic(6, 1, 100)
    ts = s.tasks["k0"]
    for ws in wss[1:4]:
        s.add_replica(ts, ws)

    class Spy(ActiveMemoryManagerPolicy):
        seen: list = []

        def run(self):
            def record(suggestion, choice):
                self.seen.append((suggestion[0], set(suggestion[2]), choice))

            yield from relay(policy, record)

    m = ActiveMemoryManager(s, [Spy()], register=False, start=False)
    policy.manager = m
    policy.set(["k0"], "all")
    m.run_once()
    # the second suggestion names only the worker still lacking the key: the first
    # one has its copy coming
    assert Spy.seen == [
        ("replicate", {wss[4], wss[5]}, wss[4]),
        ("replicate", {wss[5]}, wss[5]),
    ]
    assert per_recipient(recorder.pop()) == {wss[4].address: 1, wss[5].address: 1}


def test_a_key_untracked_while_the_policy_is_suspended_is_not_left_in_flight():
    """An unreplicate may arrive while a cycle is suspended at a suggestion of the
    policy: the transfer the manager then accepts is not waited for
    """
    s, recorder, _, policy, _ = synthetic(3, 1, 100)

    class UnreplicateMeanwhile(ActiveMemoryManagerPolicy):
        def run(self):
            yield from relay(policy, lambda sug, choice: policy.set(["k0"], 1))

    m = ActiveMemoryManager(s, [UnreplicateMeanwhile()], register=False, start=False)
    policy.manager = m
    policy.set(["k0"], 2)
    m.run_once()
    assert sum(per_recipient(recorder.pop()).values()) == 1
    assert policy.tracked() == []
    assert policy._with_inflight == set()


# -- which keys a cycle visits (synthetic states) -------------------------------------

#: more than a cycle re-reads when nothing changed (replicate_n.AUDIT_MIN_KEYS)
MANY = 3000


def converged(nworkers: int, n: int):
    """MANY keys at their target of ``n`` replicas, after one unbounded cycle"""
    s, recorder, m, policy, wss = synthetic(
        nworkers, MANY, 100, max_per_worker={"keys": None, "bytes": None}
    )
    policy.set([f"k{i}" for i in range(MANY)], n)
    m.run_once()
    apply_cycle(s, recorder.pop())
    assert all(len(ts.who_has) == n for ts in s.tasks.values())
    m.run_once()
    assert recorder.pop() == []
    return s, recorder, m, policy, wss


def test_a_replica_lost_without_a_worker_leaving_is_found_by_the_audit():
    """Nothing signals such a loss: the rolling audit finds it, re-reading a
    stretch of the keys per cycle rather than all of them
    """
    s, recorder, m, policy, wss = converged(3, 2)
    lost = ["k5", f"k{MANY // 2}", f"k{MANY - 1}"]
    for key in lost:
        ts = s.tasks[key]
        s.remove_replica(ts, next(ws for ws in ts.who_has if ws is not wss[0]))
    recreated: list[set[str]] = []
    for _ in range(math.ceil(MANY / AUDIT_MIN_KEYS)):
        m.run_once()
        sent = recorder.pop()
        recreated.append({key for _, _, keys in sent for key in keys})
        apply_cycle(s, sent)
    assert all(len(s.tasks[key].who_has) == 2 for key in lost)
    # the keys are a stretch apart: each cycle found one
    assert [len(keys) for keys in recreated] == [1, 1, 1]
    assert set().union(*recreated) == set(lost)


def test_copies_that_arrived_and_are_forgotten_early_still_let_the_outside_copy_go():
    """forget_arrived (Client.replicate settling transfers before its drops) does
    what the policy's own settling does: a key restricted to workers is due once
    its copies there arrived, so the next run drops every copy outside them, not
    only those of the keys the rolling audit re-reads
    """
    s, recorder, m, policy, wss = synthetic(
        3, MANY, 100, max_per_worker={"keys": None, "bytes": None}
    )
    keys = [f"k{i}" for i in range(MANY)]
    policy.set(keys, 2, frozenset({wss[1].address, wss[2].address}))
    m.run_once()
    apply_cycle(s, recorder.pop())
    assert all(len(s.tasks[k].who_has) == 3 for k in keys)
    for k in keys:
        policy.forget_arrived(k)
    m.run_once()
    apply_cycle(s, recorder.pop())
    assert [k for k in keys if wss[0] in s.tasks[k].who_has] == []


def test_a_change_in_the_running_workers_makes_every_key_due():
    s, recorder, m, policy, wss = converged(4, 3)
    paused = wss[3]
    on_paused = {ts.key for ts in paused.has_what}
    assert len(on_paused) > AUDIT_MIN_KEYS  # not all in one audit stretch
    s.handle_worker_status_change("paused", paused.address, stimulus_id="test")
    m.run_once()
    sent = recorder.pop()
    # a copy on a paused worker no longer counts: every one is made again at once
    assert {key for _, _, keys in sent for key in keys} == on_paused
    assert all(addr != paused.address for _, addr, _ in sent)


def test_keys_whose_transfer_timed_out_are_due_again():
    s, recorder, m, policy, wss = synthetic(
        3, MANY, 100, max_per_worker={"keys": None, "bytes": None}, retry_after=1
    )
    policy.set([f"k{i}" for i in range(MANY)], 2)
    m.run_once()
    assert sum(per_recipient(recorder.pop()).values()) == MANY  # never arrive
    m.run_once()
    assert recorder.pop() == []  # in flight: nothing is due
    import time

    time.sleep(1.05)
    m.run_once()
    # all asked again at once, not a stretch of the audit per cycle
    assert sum(per_recipient(recorder.pop()).values()) == MANY


# -- the benchmark -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_benchmark_quick(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "replicate.py")
    out = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "replicate.json").read_text())
    assert {r["manager"] for r in results["runs"]} == {"amm", "distributed"}
    for run in results["runs"]:
        assert run["seconds_to_n"] > 0
        assert 0 <= run["fraction_at_n_after_cycles"] <= 1
        assert 0 <= run["fraction_at_n_after_kill"] <= 1
        assert run["broadcasts"] == 20 and run["broadcast_seconds"] > 0
    ours = next(r for r in results["runs"] if r["manager"] == "amm")
    assert ours["fraction_at_n_after_cycles"] == 1
    md = (tmp_path / "replicate.md").read_text()
    assert md.startswith("|") or "| manager |" in md
    assert not math.isnan(ours["seconds_to_n"])


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_replication_on_demand_runs_replicate_n_alone(c, s, a, b, d):
    """client.replicate / scatter(broadcast=True) run ReplicateN right away, even
    with the AMM stopped; not ReduceReplicas: a user who stopped the AMM gets
    nothing dropped, and a loop of broadcasts does not pay, at every call, for
    every replicated key
    """
    m = s.extensions["amm"]
    assert not m.running
    extra = await c.scatter({"extra": 1}, workers=[a.address])
    await c.replicate(list(extra.values()), n=1, workers=[b.address])  # untracked copy
    assert holders(s, "extra") == {a.address, b.address}
    for i in range(3):
        await c.scatter({f"y{i}": i}, broadcast=True)
        assert len(holders(s, f"y{i}")) == 3
    assert holders(s, "extra") == {a.address, b.address}
    stats = m.statistics()
    assert stats["by_policy"] == {"ReplicateN()": 6}  # one name, whatever is tracked
    assert stats["by_class"] == {"ReplicateN": 6}


# -- copies outside the workers of a restricted key ---------------------------------


def _abc_cluster():
    s = new_scheduler()
    rec = Recorder(s)
    a = add_worker(s, "tcp://a:1")
    b = add_worker(s, "tcp://b:1")
    c = add_worker(s, "tcp://c:1")
    return s, rec, a, b, c


def _run_cycles(s, rec, m, n=5):
    for _ in range(n):
        m.run_once()
        apply_cycle(s, rec.pop())


def test_outside_copy_dropped_when_n_exceeds_the_pool():
    """replicate(x, n=3, workers=[a, b]): a and b hold x, which is all the pool can
    hold (reached() says so and Client.replicate returns); c's copy goes
    """
    s, rec, a, b, c = _abc_cluster()
    x = add_task(s, "x", 100, [c])
    rn = ReplicateN()
    m = ActiveMemoryManager(s, [ReduceReplicas(), rn], register=False, start=False)
    rn.set(["x"], 3, frozenset({a.address, b.address}))
    _run_cycles(s, rec, m)
    assert rn.reached("x")
    assert {ws.address for ws in x.who_has} == {a.address, b.address}, x.who_has


def test_outside_copy_dropped_while_a_pool_worker_is_paused():
    """n=2 on [a, b] while b is paused: the pool is {a}; once a holds x, c's copy
    goes, rather than being asked for and refused at every cycle
    """
    s, rec, a, b, c = _abc_cluster()
    set_status(s, b, Status.paused)
    x = add_task(s, "x", 100, [c])
    rn = ReplicateN()
    m = ActiveMemoryManager(s, [ReduceReplicas(), rn], register=False, start=False)
    rn.set(["x"], 2, frozenset({a.address, b.address}))
    _run_cycles(s, rec, m)
    assert a in x.who_has
    # the pool is a alone while b is paused: c's copy goes
    assert {ws.address for ws in x.who_has} == {a.address}, x.who_has
    assert m.stats.total.drop_rejected == 0


# -- on-demand runs while a cycle is suspended --------------------------------------


class SlowFor(ActiveMemoryManagerPolicy):
    """A narrow pass (as an eager ReduceReplicas pass) that stays suspended
    between time slices for ``seconds``
    """

    resumable = True

    def __init__(self, seconds):
        self.seconds = seconds

    def __repr__(self):
        return "SlowFor()"

    def run(self):
        end = monotonic() + self.seconds
        while monotonic() < end:
            yield CHECKPOINT


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=config())
async def test_replication_request_waits_for_a_suspended_narrow_pass(c, s, a, b):
    """ReplicationClient.replicate() with the AMM stopped, while a narrow pass is
    suspended: ReplicateN runs once the pass ends. Dropped, the copies were
    never made
    """
    m = s.extensions["amm"]
    assert not m.running
    futs = await c.scatter({"x": 1}, workers=[a.address])
    m.time_slice = 0
    assert m.run_policies_once([SlowFor(0.3)])
    assert m.cycle_in_progress
    await ReplicationClient(c).replicate(futs["x"], 2)
    deadline = monotonic() + 3
    while holders(s, "x") != {a.address, b.address} and monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not m.cycle_in_progress
    assert holders(s, "x") == {a.address, b.address}


@gen_cluster(
    client=True, nthreads=[("", 1)] * 3, config=config(**{"replicate.retry-after": "60s"})
)
async def test_raised_n_while_suspended_at_that_key(c, s, a, b, d):
    """A request that raises n of the key ReplicateN is suspended at (between
    two time slices) keeps it due when the policy resumes with the old target:
    on-demand runs skip the audit, so with the AMM stopped nothing else would
    visit it, and Client.replicate waited for good
    """
    m = s.extensions["amm"]
    assert not m.running
    rep = s.handlers["amm_replicated"].__self__
    keys = [f"k{i:02d}" for i in range(63)]
    futs = await c.scatter(dict.fromkeys(keys, 1), workers=[a.address])  # noqa: F841
    m.time_slice = 0
    rep._set(keys, 2, None)
    rep.kick(force=True)  # suspends after 63 suggestions, at the yield for k62
    assert m.cycle_in_progress
    gen = m._cycle._current.suggestions
    while "key" not in gen.gi_frame.f_locals:  # a wrapping generator, if any
        gen = gen.gi_frame.f_locals["suggestions"]
    assert gen.gi_frame.f_locals["key"] == "k62"
    # what Replication.replicate(["k62"], n=3) does, if it arrives now
    rep._set(["k62"], 3, None)
    await asyncio.wait_for(rep.wait(["k62"]), 5)
    assert len(holders(s, "k62")) == 3


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_removed_replicate_n_stops_in_an_on_demand_run(c, s, a, b, d):
    """A policy removed while its cycle is suspended does not go on (Cycle.run);
    in an on-demand run, the manager sees the wrapper, which checks for it
    """
    m = s.extensions["amm"]
    rep = s.handlers["amm_replicated"].__self__
    keys = [f"k{i:03d}" for i in range(200)]
    futs = await c.scatter(dict.fromkeys(keys, 1), workers=[a.address])  # noqa: F841
    m.time_slice = 0
    rep._set(keys, 2, None)
    rep.kick(force=True)
    assert m.cycle_in_progress
    assert m.remove_policies("ReplicateN") == 1
    while m.cycle_in_progress:
        await asyncio.sleep(0)
    # had the removed policy stopped, only the first 63 suggestions were made
    assert m.stats.total.replicas_requested <= 63, m.stats.total.replicas_requested


class BadRepr(ActiveMemoryManagerPolicy):
    """A narrow pass that accepted a suggestion, then stays suspended at
    CHECKPOINTs; its repr raises (a user policy with a buggy repr)
    """

    resumable = True

    def __init__(self, ts):
        self.ts = ts

    def __repr__(self):
        raise RuntimeError("bad repr")

    def run(self):
        yield ("replicate", self.ts, None)
        while True:
            yield CHECKPOINT


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_stop_that_raises_still_runs_the_deferred_replication(c, s, a, b, d):
    """stop() ends the suspended cycle; if ending it raises, what waited for the
    cycle to end still runs: the deferred on-demand ReplicateN, whose flag would
    otherwise stay set and keep every later kick from being deferred
    """
    m = s.extensions["amm"]
    futs = await c.scatter({"x": 1, "y": 2}, workers=[a.address])
    m.time_slice = 0
    assert m.run_policies_once([BadRepr(s.tasks["y"])])
    await ReplicationClient(c).replicate(futs["x"], 2)
    with pytest.raises(RuntimeError, match="bad repr"):
        m.stop()
    assert not m.cycle_in_progress
    await async_poll_for(lambda: len(holders(s, "x")) == 2, timeout=5)


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=config())
async def test_on_demand_run_cut_by_stop_goes_on(c, s, a, b, d):
    """stop() ends an on-demand ReplicateN run suspended between two slices; the
    keys it had not reached are run again at once, not left for a periodic cycle
    that never comes with the AMM stopped
    """
    m = s.extensions["amm"]
    assert not m.running
    keys = [f"k{i:03d}" for i in range(200)]
    futs = await c.scatter(dict.fromkeys(keys, 1), workers=[a.address])  # noqa: F841
    m.time_slice = 0
    await ReplicationClient(c).replicate(list(futs.values()), 2)  # returns at once
    assert m.cycle_in_progress
    m.stop()
    m.time_slice = 0.1
    await async_poll_for(lambda: all(len(holders(s, k)) == 2 for k in keys), timeout=10)



class YieldsGarbage(ReplicateN):
    """A ReplicateN with a bug: every run yields something that is no suggestion"""

    runs = 0

    def run(self, audit=True):
        YieldsGarbage.runs += 1
        yield "not a suggestion"


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=config())
async def test_on_demand_run_that_fails_is_not_run_again_and_again(c, s, a, b):
    """The manager closes a failing policy's run; that is no cut short run to
    resume, or a broken ReplicateN would be run again at every turn of the loop
    """
    m = s.extensions["amm"]
    m.add_policy(YieldsGarbage())
    YieldsGarbage.runs = 0
    replication(s).kick(force=True)
    for _ in range(20):
        await asyncio.sleep(0)
    assert YieldsGarbage.runs == 1
    assert m.stats.total.policy_errors == 1
