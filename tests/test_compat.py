"""Policies and callers written for distributed's manager work unchanged"""

from __future__ import annotations

import asyncio
import logging

import pytest

from distributed import Nanny, wait
from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy as DistributedPolicy,
)
from distributed.active_memory_manager import RetireWorker as DistributedRetireWorker
from distributed.active_memory_manager import ReduceReplicas as DistributedReduceReplicas
from distributed.active_memory_manager import Suggestion as DistributedSuggestion
from distributed.core import Status
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster, inc

import amm
from amm import ActiveMemoryManager, ActiveMemoryManagerPolicy, AMMClient, Suggestion
from conftest import amm_config
from helpers import DemoPolicy, demo


def test_public_names():
    assert Suggestion is DistributedSuggestion
    assert issubclass(ActiveMemoryManagerPolicy, DistributedPolicy)
    assert issubclass(amm.ReduceReplicas, ActiveMemoryManagerPolicy)
    assert amm.policies.ReduceReplicas is amm.ReduceReplicas


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config())
async def test_debug_log_lines_are_distributed_s(c, s, *workers):
    """The lines logged at DEBUG are distributed's, worker by worker: its own tests
    (test_ReduceReplicas) and users' log filters match them
    """
    futures = await c.scatter({"x": 123}, broadcast=True)  # noqa: F841
    with captured_logger("distributed.active_memory_manager", logging.DEBUG) as log:
        s.extensions["amm"].run_once()
    lines = log.getvalue().splitlines()
    expect = [
        "Running policy: ReduceReplicas()",
        "(drop, <TaskState 'x' memory>, None): dropping from <WorkerState ",
        "(drop, <TaskState 'x' memory>, None): dropping from <WorkerState ",
        "(drop, <TaskState 'x' memory>, None): dropping from <WorkerState ",
        "ReduceReplicas: Dropping 3 superfluous replicas of 1 tasks",
        "Enacting suggestions for 1 tasks:",
        "- <WorkerState ",
        "- <WorkerState ",
        "- <WorkerState ",
        "Active Memory Manager run in ",
    ]
    assert len(lines) == len(expect), lines
    for line, start in zip(lines, expect):
        assert line.startswith(start), lines
    assert all(line.endswith(" to drop 1 replicas") for line in lines[6:9]), lines


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(policies=[demo("drop", n=5)]))
async def test_distributed_policy_by_class_path(c, s, *workers):
    """A policy subclassing distributed's base, yielding plain tuples, configured by
    class path; the last replica survives even though it asks for 5 drops.
    """
    (policy,) = s.extensions["amm"].policies
    assert isinstance(policy, DemoPolicy)
    x = await c.scatter({"x": 123}, broadcast=True)  # noqa: F841
    await c.amm.run_once()
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)
    # the chosen worker is sent back into the generator; None when rejected
    assert [ws is not None for ws in policy.choices] == [True] * 3 + [False] * 2
    assert len(set(policy.choices[:3])) == 3
    await asyncio.sleep(0.1)
    assert len(s.tasks["x"].who_has) == 1


@gen_cluster(
    client=True,
    config=amm_config(
        policies=[
            {"class": "distributed.active_memory_manager.ReduceReplicas"},
            {"class": "distributed.active_memory_manager.ReduceReplicas"},
        ]
    ),
)
async def test_distributed_reduce_replicas_by_class_path(c, s, a, b):
    from distributed.active_memory_manager import ReduceReplicas

    assert [type(p) for p in s.extensions["amm"].policies] == [ReduceReplicas] * 2
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    await c.amm.run_once()
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)


@gen_cluster(client=True, config=amm_config(policies=[demo("drop", candidates=[])]))
async def test_empty_candidates_means_none(c, s, a, b):
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    await c.amm.run_once()
    await asyncio.sleep(0.1)
    assert len(s.tasks["x"].who_has) == 2


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(policies=[demo("replicate", n=2, candidates=[2, 3])]))
async def test_replicate_with_candidates(c, s, *workers):
    wss = list(s.workers.values())
    x = await c.scatter({"x": 1}, workers=[wss[0].address])  # noqa: F841
    await c.amm.run_once()
    while len(s.tasks["x"].who_has) < 3:
        await asyncio.sleep(0.01)
    assert s.tasks["x"].who_has == {wss[0], wss[2], wss[3]}
    assert all(w.data["x"] == 1 for w in workers if w.address in (wss[2].address, wss[3].address))


@gen_cluster(client=True, config=amm_config(policies=[], measure="managed"))
async def test_pending_and_workers_memory_visible_to_policies(c, s, a, b):
    seen = {}

    class Inspect(DistributedPolicy):
        def run(self):
            ts = self.manager.scheduler.tasks["x"]
            ws = yield Suggestion("drop", ts)
            seen["pending"] = {k: (set(r), set(d)) for k, (r, d) in self.manager.pending.items()}
            seen["memory"] = dict(self.manager.workers_memory)
            seen["choice"] = ws

    x = await c.scatter({"x": "x" * 1000}, broadcast=True)  # noqa: F841
    manager = s.extensions["amm"]
    manager.add_policy(Inspect())
    assert not hasattr(manager, "pending")
    assert not hasattr(manager, "workers_memory")
    manager.run_once()
    ts = s.tasks["x"]
    assert seen["pending"] == {ts: (set(), {seen["choice"]})}
    # the dropper's expected memory no longer counts the dropped replica
    other = next(ws for ws in s.workers.values() if ws is not seen["choice"])
    assert seen["memory"][seen["choice"]] < seen["memory"][other]


@gen_cluster(client=True, config=amm_config(policies=[]))
async def test_policy_removes_itself(c, s, a, b):
    class Once(DistributedPolicy):
        runs = 0

        def run(self):
            type(self).runs += 1
            self.manager.policies.remove(self)
            yield from ()

    manager = s.extensions["amm"]
    manager.add_policy(Once())
    manager.run_once()
    manager.run_once()
    assert Once.runs == 1
    assert not manager.policies


@gen_cluster(client=True, config=amm_config())
async def test_add_policy_rejects_non_policies(c, s, a, b):
    with pytest.raises(TypeError, match="Expected ActiveMemoryManagerPolicy"):
        s.extensions["amm"].add_policy("not a policy")


@gen_cluster(client=True, config=amm_config())
async def test_running_is_a_property(c, s, a, b):
    manager = s.extensions["amm"]
    assert manager.running is False
    manager.start()
    manager.start()  # no-op
    assert manager.running is True
    manager.stop()
    manager.stop()  # no-op
    assert manager.running is False


@gen_cluster(client=True, config=amm_config())
async def test_client_proxy(c, s, a, b):
    assert await c.amm.running() is False
    await c.amm.start()
    assert await c.amm.running() is True
    await c.amm.stop()
    assert await c.amm.running() is False
    await c.amm.run_once()
    assert s.extensions["amm"].stats.cycles == 1


def test_client_proxy_sync(loop):
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=1,
        processes=False,
        dashboard_address=":0",
        scheduler_kwargs={"preload": ["amm"]},
        loop=loop,
    ) as cluster, Client(cluster, loop=loop) as c:
        assert c.amm.running()
        c.amm.stop()
        assert not c.amm.running()
        c.amm.run_once()
        assert amm.AMMClient(c).statistics()["cycles"] == 1


@gen_cluster(client=True, config=amm_config())
async def test_adhoc_manager_with_explicit_policies(c, s, a, b):
    """The constructor takes explicit policies, as retire_workers does with the
    built-in one; such a manager does not touch the scheduler's handlers.
    """
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    policy = DemoPolicy("drop", "x")
    adhoc = ActiveMemoryManager(s, {policy}, register=False, start=False)
    assert s.extensions["amm"] is not adhoc
    assert s.handlers["amm_handler"] == s.extensions["amm"].amm_handler
    adhoc.run_once()
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("start", [False, True])
@gen_cluster(client=True, config=amm_config(policies=[]))
async def test_retire_workers_through_this_manager(c, s, a, b, start):
    if start:
        await c.amm.start()
    manager = s.extensions["amm"]
    seen_policies = []
    orig_add_policy = manager.add_policy

    def add_policy(policy):
        seen_policies.append(policy)
        orig_add_policy(policy)

    manager.add_policy = add_policy
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    out = await c.retire_workers([a.address])
    assert set(out) == {a.address}
    # the worker's info as distributed returns it: taken once it is removed
    assert out[a.address]["status"] == "closed"
    assert a.address not in s.workers
    assert "x" in b.data
    if start:
        # retire_workers used this manager rather than an ad hoc built-in one, and
        # this project's RetireWorker, which is one of distributed's
        assert [type(p) for p in seen_policies] == [amm.RetireWorker]
        assert isinstance(seen_policies[0], DistributedRetireWorker)
    # RetireWorker removes itself at the first cycle after the worker is gone
    manager.run_once()
    assert not manager.policies


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=amm_config(start=True, interval="50ms"))
async def test_retire_several_workers_with_reduce_replicas(c, s, *workers):
    futs = c.map(inc, range(40))
    await wait(futs)
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    await c.retire_workers([w.address for w in workers[:3]])
    assert set(s.workers) == {workers[3].address}
    assert await c.gather(futs) == list(range(1, 41))
    assert s.workers[workers[3].address].status == Status.running


@gen_cluster(
    client=True,
    Worker=Nanny,
    nthreads=[("", 1)] * 2,
    config=amm_config(
        start=True, interval="50ms", **{"replicate.serve-client-replicate": True}
    ),
)
async def test_client_restart_keeps_the_manager_working(c, s, a, b):
    """client.restart() forgets every key and restarts every worker process: the
    manager stays installed and running, forgets what it tracked, and acts on what
    comes after
    """
    manager = s.extensions["amm"]
    x = await c.scatter({"x": 1}, broadcast=True)
    await async_poll_for(lambda: len(s.tasks["x"].who_has) == 2, timeout=5)

    await c.restart()
    assert s.extensions["amm"] is manager
    assert manager.running
    assert await AMMClient(c).tracked() == []
    del x

    wa, wb = s.workers
    y = c.submit(inc, 1, key="y", workers=[wa])
    z = c.submit(inc, y, key="z", workers=[wb])
    assert await z == 3
    await async_poll_for(lambda: len(s.tasks["y"].who_has) == 1, timeout=5)
    w = await c.scatter({"w": 2}, broadcast=True)
    await async_poll_for(lambda: len(s.tasks["w"].who_has) == 2, timeout=5)
    await asyncio.sleep(0.3)  # kept, not dropped by ReduceReplicas
    assert len(s.tasks["w"].who_has) == 2
    assert [t["key"] for t in await AMMClient(c).tracked()] == ["w"]
    assert await c.gather(w) == {"w": 2}


@gen_cluster(client=True, config=amm_config())
async def test_policies_as_distributed_has_them(c, s, a, b):
    """Code written against distributed's manager finds the default policy by its
    class, and uses the named methods of a set on ``policies``
    """
    manager = s.extensions["amm"]
    (default,) = manager.policies
    assert isinstance(default, DistributedReduceReplicas)
    other = amm.ReplicateN()
    copy = manager.policies.copy()
    copy.update([other])
    assert list(copy) == [default, other]
    assert list(manager.policies) == [default]
    assert manager.policies.issubset(copy)
    assert copy.issuperset(manager.policies)
    assert list(copy.difference(manager.policies)) == [other]
    assert list(manager.policies.union([other])) == [default, other]
    assert list(copy.intersection({other})) == [other]
    copy.difference_update([default])
    assert list(copy) == [other]
