"""Every way of installing the manager replaces the built-in one"""

from __future__ import annotations

import asyncio
import re

import pytest

import dask
from distributed import Client, Event, LocalCluster, Scheduler
from distributed.active_memory_manager import ActiveMemoryManagerExtension
from distributed.utils_test import (
    BlockedGatherDep,
    async_poll_for,
    gen_cluster,
    gen_test,
    wait_for_state,
)

import amm
from amm import ActiveMemoryManager, ActiveMemoryManagerPlugin, AMMConfigError
from conftest import amm_config


def assert_installed(s: Scheduler) -> ActiveMemoryManager:
    manager = s.extensions["amm"]
    assert isinstance(manager, ActiveMemoryManager)
    assert s.handlers["amm_handler"] == manager.amm_handler
    # the built-in manager no longer runs periodically
    assert [name for name in s.periodic_callbacks if name.startswith("amm-")] == (
        [manager._callback_name] if manager.running else []
    )
    return manager


@gen_cluster(client=True, config=amm_config(start=True, interval="50ms"))
async def test_preload_config(c, s, a, b):
    manager = assert_installed(s)
    assert manager.running
    assert manager.interval == 0.05
    assert await c.amm.running()
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    # the periodic cycle drops the extra replica
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)


@gen_test()
async def test_preload_scheduler_kwarg():
    """What `dask scheduler --preload amm` and LocalCluster(scheduler_kwargs=...) do"""
    async with Scheduler(host="127.0.0.1", dashboard=False, preload=["amm"]) as s:
        manager = assert_installed(s)
        assert manager.running  # amm.start defaults to true
        assert [type(p) for p in manager.policies] == [amm.ReduceReplicas]


def test_localcluster_scheduler_kwargs():
    with LocalCluster(
        n_workers=2,
        processes=False,
        dashboard_address=":0",
        scheduler_kwargs={"preload": ["amm"]},
    ) as cluster, Client(cluster) as client:
        assert client.run_on_scheduler(
            lambda dask_scheduler: type(dask_scheduler.extensions["amm"]).__name__
        ) == "ActiveMemoryManager"
        assert client.amm.running()
        client.amm.stop()
        assert not client.amm.running()


@gen_cluster(client=True)
async def test_register_plugin_on_running_cluster(c, s, a, b):
    builtin = s.extensions["amm"]
    assert isinstance(builtin, ActiveMemoryManagerExtension)
    assert builtin.running

    await c.register_plugin(ActiveMemoryManagerPlugin(interval="100ms"))
    manager = assert_installed(s)
    assert not builtin.running
    assert manager.running
    assert manager.interval == 0.1
    assert await c.amm.running()

    # registering again keeps the first manager
    await c.register_plugin(ActiveMemoryManagerPlugin())
    assert s.extensions["amm"] is manager


@gen_cluster(client=True, config={"distributed.scheduler.active-memory-manager.start": False})
async def test_register_plugin_start_false(c, s, a, b):
    await c.register_plugin(ActiveMemoryManagerPlugin(start=False))
    manager = assert_installed(s)
    assert not manager.running
    await c.amm.start()
    assert manager.running


@pytest.mark.parametrize(
    "key,value",
    [
        ("amm.measure", "nonsense"),
        # validated by the plugin itself, before install() builds the manager
        ("amm.reduce-replicas.eager-delay", "-1s"),
        # validated once the manager is built, by the retirement and replication
        # installs: the new manager must not have taken over client.amm.* yet
        ("amm.retire.timeout", "-1s"),
        ("amm.replicate.retry-after", "nonsense"),
    ],
)
@gen_cluster(client=True)
async def test_invalid_config_leaves_builtin_running(c, s, a, b, key, value):
    builtin = s.extensions["amm"]
    with dask.config.set({key: value}):
        with pytest.raises(AMMConfigError, match=re.escape(f"{key}={value!r}")):
            await c.register_plugin(ActiveMemoryManagerPlugin())
    assert s.extensions["amm"] is builtin
    assert builtin.running
    assert await c.amm.running()
    await c.amm.stop()  # reaches the built-in manager
    assert not builtin.running


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"start": "maybe"}, "start='maybe': must be true or false"),
        ({"interval": "soon"}, "interval='soon': not a time interval"),
        ({"measure": "bogus"}, "measure='bogus': measure must be one of"),
    ],
)
def test_plugin_arguments_are_validated_on_the_client(kwargs, message):
    with pytest.raises(AMMConfigError, match=re.escape(message)):
        ActiveMemoryManagerPlugin(**kwargs)


@gen_cluster(client=True)
async def test_plugin_start_false_as_a_string(c, s, a, b):
    """"false" (from a CLI or an environment variable) is false, not a truthy str"""
    await c.register_plugin(ActiveMemoryManagerPlugin(start="false"))
    assert isinstance(s.extensions["amm"], amm.ActiveMemoryManager)
    assert not await c.amm.running()


def test_plugin_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="polices"):
        ActiveMemoryManagerPlugin(polices=[])


@gen_cluster(client=True)
async def test_retirement_in_progress_is_carried_over(c, s, a, b):
    """A RetireWorker policy of the manager being replaced moves to the new one,
    or the retire_workers() call waiting on it would wait forever.
    """
    from distributed.active_memory_manager import ReduceReplicas, RetireWorker

    builtin = s.extensions["amm"]
    policy = RetireWorker(a.address)
    builtin.add_policy(policy)

    new = amm.install(s)
    assert policy in new.policies
    assert policy.manager is new
    assert policy not in builtin.policies
    # the built-in's own configured policies stay behind
    left = [p for p in builtin.policies if type(p) is ReduceReplicas]
    assert left
    assert not any(p in new.policies for p in left)


@gen_cluster(
    client=True,
    nthreads=[("", 1)],
    config={
        "distributed.scheduler.active-memory-manager.interval": "100ms",
        "amm.interval": "100ms",
    },
)
async def test_retirement_in_progress_finishes_under_a_manager_not_started(c, s, a):
    """Installed with start=False, the new manager runs no cycle: the retirement
    carried over runs on a manager of its own, which stops once it is done
    (distributed's retire_workers waits with no time limit: it would hang)
    """
    async with BlockedGatherDep(s.address) as b:
        y = c.submit(lambda: "y", workers=[a.address], key="y")
        await y
        ev = Event()
        x = c.submit(lambda ev: ev.wait() and "x", ev, workers=[a.address], key="x")
        await wait_for_state("x", "executing", a)
        retiring = asyncio.create_task(c.retire_workers([a.address]))
        await b.in_gather_dep.wait()  # on the built-in manager, y on its way to b
        await c.register_plugin(ActiveMemoryManagerPlugin(start=False))
        assert not await c.amm.running()
        # x lands on a: unique data only a later cycle can move
        await ev.set()
        await wait_for_state("x", "memory", s)
        b.block_gather_dep.set()
        assert list(await asyncio.wait_for(retiring, 10)) == [a.address]
        assert await c.gather([x, y]) == ["x", "y"]
    await async_poll_for(
        lambda: not [k for k in s.periodic_callbacks if k.startswith("amm-")], 5
    )
    assert not await c.amm.running()


def test_dask_scheduler_cli_preload(tmp_path):
    """`dask scheduler --preload amm`, a separate process"""
    import subprocess
    import sys
    import time

    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(scheduler_file), "--preload", "amm",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout=30) as client:
            name = client.run_on_scheduler(
                lambda dask_scheduler: type(dask_scheduler.extensions["amm"]).__module__
            )
            assert name == "amm.manager"
            assert client.amm.running()
    finally:
        proc.terminate()
        proc.wait(30)

