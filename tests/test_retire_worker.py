"""Retiring workers on amm.RetireWorker (client.retire_workers, Scheduler.retire_workers,
adaptive scale-down), the retirement timeout, and the restart of stuck paused workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import dask.config
from distributed import Client, Event, LocalCluster, Nanny, wait
from distributed.core import Status
from distributed.utils_test import (
    BlockedGatherDep,
    BlockedGetData,
    async_poll_for,
    captured_logger,
    gen_cluster,
    gen_test,
    inc,
    wait_for_state,
)
from distributed.worker_state_machine import AcquireReplicasEvent

from amm import (
    ActiveMemoryManager,
    ActiveMemoryManagerPolicy,
    AMMClient,
    AMMConfigError,
    RetireWorker,
)
from amm.policy import CHECKPOINT
from amm.retirement import (
    PAUSED_RESTART_CALLBACK,
    Retirements,
    install_retirement,
    uninstall_retirement,
    validate_config,
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

AMM_LOGGER = "distributed.active_memory_manager"
#: where distributed's retire_workers reports what it retired or gave up on
SCHEDULER_LOGGER = "distributed.scheduler"

#: The installed manager stopped: retirements run on a temporary one, like
#: distributed's, with the installed manager's interval
STOPPED = amm_config(interval="50ms", policies=[])
#: The installed manager running; "managed" makes the recipient choice predictable
#: in a single-process cluster, where every worker reports the same process memory
RUNNING = amm_config(start=True, interval="50ms", policies=[], measure="managed")


def _slow(x: int) -> int:
    time.sleep(0.5)
    return x


@gen_cluster(
    client=True,
    Worker=BlockedGetData,
    config={**amm_config(interval="1h", policies=[]), "amm.retire.timeout": "10s"},
)
async def test_stopped_manager_with_long_interval_retires_in_time(c, s, a, b):
    """The manager is stopped, with a long interval. y lands on a, unique there,
    after the retirement's first cycle: the temporary manager moves it at its next
    cycle, 2 s later as in distributed, not an interval later (the retirement
    gave up first).
    """
    b.block_get_data.set()  # only a's transfers are held back
    x = await c.scatter({"x": 1}, workers=[a.address])
    y = c.submit(_slow, 2, key="y", workers=[a.address], allow_other_workers=True)
    while not s.tasks.get("y") or s.tasks["y"].state != "processing":
        await asyncio.sleep(0.01)
    retire = asyncio.create_task(c.retire_workers([a.address]))
    await a.in_get_data.wait()  # b is fetching x from a
    while s.tasks["y"].state != "memory":
        await asyncio.sleep(0.01)
    a.block_get_data.set()
    assert list(await retire) == [a.address]
    assert await c.gather([x["x"], y]) == [1, 2]


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=RUNNING)
async def test_outcome_logged_where_distributed_logs_it(c, s, a, b):
    """Log filters and tests written for distributed's retire_workers read the
    scheduler's logger; the policy's own lines stay on the AMM's, as in distributed.
    """
    wire(s)
    await c.scatter({"x": 1}, workers=[a.address])
    with captured_logger(SCHEDULER_LOGGER, logging.INFO) as sched_log:
        with captured_logger(AMM_LOGGER, logging.INFO) as amm_log:
            assert list(await c.retire_workers([a.address])) == [a.address]
    assert "Retire worker addresses" in sched_log.getvalue()
    assert f"Retired worker '{a.address}'" in sched_log.getvalue()
    assert "Retire worker" not in amm_log.getvalue()
    assert f"Retiring worker {a.address}; 1 keys are being moved" in amm_log.getvalue()


def wire(s) -> Retirements:
    """The plugin wires the retirement at install time; make sure it is, so that
    these tests don't depend on the order in which things are integrated.
    """
    return install_retirement(s, s.extensions["amm"])


def retire_events(s) -> list[dict]:
    return [ev for _, ev in s.get_events("all") if ev.get("action") == "retire-workers"]


async def pause(s, w) -> None:
    w.status = Status.paused
    while s.workers[w.address].status != Status.paused:
        await asyncio.sleep(0.01)


def retire_policies(s) -> list[RetireWorker]:
    return [p for p in s.extensions["amm"].policies if isinstance(p, RetireWorker)]


# -- wiring and config ---------------------------------------------------------------


@gen_cluster(client=True, nthreads=[], config=STOPPED)
async def test_install_replaces_retire_workers(c, s):
    retirements = wire(s)
    assert s.handlers["retire_workers"] == retirements.retire_workers
    assert s.retire_workers == retirements.retire_workers
    assert install_retirement(s, s.extensions["amm"]) is retirements  # idempotent
    assert PAUSED_RESTART_CALLBACK not in s.periodic_callbacks  # off by default
    uninstall_retirement(s)
    assert s.retire_workers.__func__ is type(s).retire_workers
    assert s.handlers["retire_workers"] == s.retire_workers
    wire(s)


@pytest.mark.parametrize(
    "key,value",
    [
        ("amm.retire.timeout", "soon"),
        ("amm.retire.timeout", 0),
        ("amm.retire.on-timeout", "explode"),
        ("amm.paused-restart.enabled", "maybe"),
        ("amm.paused-restart.after", "-1s"),
    ],
)
def test_invalid_config_fails_install(key, value):
    s = new_scheduler()
    handler = s.handlers["retire_workers"]
    with dask.config.set({key: value}):
        with pytest.raises(AMMConfigError, match=f"{key}={value!r}"):
            install_retirement(s, None)
        with pytest.raises(AMMConfigError):
            validate_config()
    assert s.handlers["retire_workers"] == handler
    assert not isinstance(getattr(s.retire_workers, "__self__", None), Retirements)


def test_policy_kwargs_override_config():
    policy = RetireWorker("tcp://w", timeout="2s", on_timeout="close")
    assert (policy.timeout, policy.on_timeout) == (2.0, "close")
    with dask.config.set({"amm.retire.timeout": "5 minutes"}):
        assert RetireWorker("tcp://w").timeout == 300
    with pytest.raises(AMMConfigError, match="on_timeout='never'"):
        RetireWorker("tcp://w", on_timeout="never")


# -- the policy on a synthetic cluster -----------------------------------------------


def test_unique_keys_stay_with_their_recipient():
    """Every cycle asks again for the keys not moved yet (a recipient that lost the
    request gets it back, as in distributed), but from the same recipient while it
    runs: never a second transfer of the same data elsewhere.
    """
    s = new_scheduler()
    rec = Recorder(s)
    a = add_worker(s, "tcp://a:1")
    b = add_worker(s, "tcp://b:1")
    c = add_worker(s, "tcp://c:1")
    for i in range(100):
        add_task(s, f"x{i}", 1000, [a])
    add_task(s, "y", 1000, [a, b])
    set_status(s, a, Status.closing_gracefully)
    policy = RetireWorker(a.address)
    manager = ActiveMemoryManager(s, [policy], register=False, start=False)

    manager.run_once()
    sent = rec.pop()
    acquired = {addr: keys for op, addr, keys in sent if op == "acquire-replicas"}
    assert sorted(k for keys in acquired.values() for k in keys) == sorted(
        f"x{i}" for i in range(100)
    )
    assert ("remove-replicas", a.address, ["y"]) in sent  # already elsewhere
    assert not policy.done()

    manager.run_once()
    again = {addr: keys for op, addr, keys in rec.pop() if op == "acquire-replicas"}
    assert again == acquired  # same keys, same recipients

    # b dies before its transfers complete: its keys go to c
    set_status(s, b, Status.closed)
    manager.run_once()
    sent = rec.pop()
    assert [(op, addr) for op, addr, _ in sent] == [("acquire-replicas", c.address)]
    assert sorted(sent[0][2]) == sorted(acquired[b.address] + acquired[c.address])

    apply_cycle(s, sent + [("acquire-replicas", c.address, acquired[c.address])])
    assert policy.done()
    manager.run_once()
    sent = rec.pop()
    assert [(op, addr) for op, addr, _ in sent] == [("remove-replicas", a.address)]
    assert len(sent[0][2]) == 100
    assert policy not in manager.policies


# -- retire_workers on real clusters -------------------------------------------------


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=STOPPED)
async def test_retire_moves_unique_keys(c, s, a, b, w3):
    wire(s)
    data = {f"x{i}": i for i in range(20)}
    futures = await c.scatter(data, workers=[a.address])
    out = await c.retire_workers([a.address])
    assert list(out) == [a.address]
    assert a.address not in s.workers
    # every key moved once (scattered data can't have been recomputed)
    assert sorted(list(b.data) + list(w3.data)) == sorted(data)
    assert await c.gather(futures) == data
    (event,) = retire_events(s)
    assert event["retired"] == [a.address]
    assert event["could-not-retire"] == []
    assert event["timed-out"] == []  # our retire_workers ran, not distributed's


@gen_cluster(client=True, config=RUNNING)
async def test_retire_drops_replicated_keys(c, s, a, b):
    """Keys already on another worker are dropped from the retiring one, not copied"""
    wire(s)
    x = await c.scatter({"x": 1}, broadcast=True)
    y = await c.scatter({"y": 2}, workers=[a.address])
    out = await c.retire_workers([a.address], close_workers=False, remove=False)
    assert list(out) == [a.address]
    assert s.workers[a.address].status == Status.closing_gracefully
    while a.data or retire_policies(s):
        await asyncio.sleep(0.01)
    assert set(b.data) == {"x", "y"}
    acquired = {
        key
        for ev in b.state.stimulus_log
        if isinstance(ev, AcquireReplicasEvent)
        for key in ev.who_has
    }
    assert acquired == {"y"}
    assert await c.gather([x["x"], y["y"]]) == [1, 2]


@gen_cluster(client=True, config=RUNNING)
async def test_retire_not_held_up_by_a_task_running_there(c, s, a, b):
    """A task still running on the retiring worker does not hold up the
    retirement: the worker closes once its data has moved, and the task runs again
    elsewhere. (Had the retirement waited for it, its result would be a new unique
    key to move, and so on for as long as tasks run there: dask/distributed#6223.)
    """
    wire(s)
    ev = Event()
    xs = await c.scatter(list(range(20)), workers=[a.address])
    extra = c.submit(
        lambda ev: ev.wait(30) and "done",
        ev,
        key="extra",
        workers=[a.address],
        allow_other_workers=True,
    )
    await wait_for_state("extra", "executing", a)
    out = await asyncio.wait_for(c.retire_workers([a.address]), timeout=20)
    assert list(out) == [a.address]
    assert a.address not in s.workers
    assert not retire_policies(s)
    await ev.set()
    assert await extra == "done"
    assert "extra" in b.data
    assert await c.gather(xs) == list(range(20))


@gen_cluster(client=True, nthreads=[("", 1)] * 5, config=STOPPED)
async def test_retire_several_at_once(c, s, *workers):
    wire(s)
    data = {f"x{i}": i for i in range(50)}
    futures = await c.scatter(data)
    shared = await c.scatter(  # only on workers being retired
        {"shared": -1}, workers=[workers[0].address, workers[1].address], broadcast=True
    )
    assert len(s.tasks["shared"].who_has) == 2
    out = await c.retire_workers([w.address for w in workers[:-1]])
    assert set(out) == {w.address for w in workers[:-1]}
    assert set(s.workers) == {workers[-1].address}
    assert set(workers[-1].data) == set(data) | {"shared"}
    assert await c.gather(futures) == data
    assert await c.gather(shared) == {"shared": -1}


@gen_cluster(client=True, nthreads=[("", 1)] * 4, config=STOPPED)
async def test_retire_all_workers_no_recipients(c, s, w1, w2, w3, w4):
    """As distributed: a worker without data retires; one with unique data can't;
    of two holding the same key, one retires.
    """
    wire(s)
    x = await c.scatter({"x": "x"}, workers=[w2.address])  # noqa: F841
    y = await c.scatter(  # noqa: F841
        {"y": "y"}, workers=[w3.address, w4.address], broadcast=True
    )
    with captured_logger(AMM_LOGGER, logging.WARNING) as log:
        out = await c.retire_workers([w1.address, w2.address, w3.address, w4.address])
    assert set(out) in ({w1.address, w3.address}, {w1.address, w4.address})
    assert set(s.workers) in ({w2.address, w3.address}, {w2.address, w4.address})
    assert "no suitable workers to receive them" in log.getvalue()
    (event,) = retire_events(s)
    assert w2.address in event["could-not-retire"]
    assert event["timed-out"] == []
    # back to running after a scheduler -> worker -> scheduler round trip
    while any(ws.status != Status.running for ws in s.workers.values()):
        await asyncio.sleep(0.01)
    assert await c.submit(lambda: 2, key="z") == 2


@gen_cluster(client=True, config=STOPPED)
async def test_retire_all_recipients_paused(c, s, a, b):
    """Gives up at once rather than at the timeout (60s, longer than the test's)"""
    wire(s)
    await pause(s, b)
    x = await c.scatter({"x": 1}, workers=[a.address])
    assert await c.retire_workers([a.address]) == {}
    assert set(s.workers) == {a.address, b.address}
    while s.workers[a.address].status != Status.running:
        await asyncio.sleep(0.01)
    assert await c.gather(x) == {"x": 1}


@gen_cluster(client=True, config=RUNNING)
async def test_retire_survives_dying_recipient(c, s, w1, w2):
    """The chosen recipient hangs: the key is asked for again at every cycle, from
    that same recipient; once it leaves, from the next one.
    """
    wire(s)
    x = c.submit(lambda: 123, key="x", workers=[w1.address])
    await wait(x)
    clutter = await c.scatter(456, workers=[w2.address])  # w3 will be the lowest
    manager = s.extensions["amm"]
    async with BlockedGatherDep(s.address) as w3:
        await c.wait_for_workers(3)
        retiring = asyncio.create_task(c.retire_workers([w1.address]))
        await w3.in_gather_dep.wait()
        assert len(retire_policies(s)) == 1  # this project's policy, not distributed's
        cycles = manager.stats.cycles
        while manager.stats.cycles < cycles + 5:
            await asyncio.sleep(0.01)
        while (
            sum(isinstance(ev, AcquireReplicasEvent) for ev in w3.state.stimulus_log)
            < 3
        ):
            await asyncio.sleep(0.01)
        assert not retiring.done()
    await retiring
    assert w1.address not in s.workers
    assert w3.address not in s.workers
    assert dict(w2.data) == {"x": 123, clutter.key: 456}
    assert not retire_policies(s)


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=RUNNING)
async def test_retire_does_not_count_replicas_on_an_unreachable_worker(c, s, a, b, w3):
    """b's stream has closed and the scheduler has not removed b yet, so b still
    counts as a holder of the keys a also holds. Had the retirement counted those
    replicas (distributed's done() does), a would close at once and the keys would
    vanish with b a moment later. It waits for b to go, then moves them to w3.
    """
    wire(s)
    data = {f"x{i}": i for i in range(10)}
    futures = await c.scatter(data, workers=[a.address, b.address], broadcast=True)
    assert all(len(s.tasks[k].who_has) == 2 for k in data)
    s.stream_comms[b.address].abort()
    out = await s.retire_workers(workers=[a.address])
    assert list(out) == [a.address]
    assert set(s.workers) == {w3.address}
    assert dict(w3.data) == data
    assert await c.gather(futures) == data


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=RUNNING)
async def test_retire_worker_done_ignores_replicas_on_an_unreachable_worker(
    c, s, a, b, w3
):
    """The same race, checked where it is decided: while b is unreachable and not
    yet removed, the policy neither removes itself nor reports done().
    """
    data = {f"x{i}": i for i in range(10)}
    futures = await c.scatter(data, workers=[a.address, b.address], broadcast=True)
    m = s.extensions["amm"]
    policy = RetireWorker(a.address)
    m.add_policy(policy)
    s.stream_comms[b.address].abort()
    m.run_once()  # synchronous: b cannot have been removed yet
    assert b.address in s.workers
    assert policy in m.policies
    assert not policy.done()
    await async_poll_for(policy.done, timeout=5)
    # copied to w3 (and, at a later cycle, dropped from a: the manager is running)
    ws3 = s.workers[w3.address]
    assert all(ws3 in s.tasks[k].who_has for k in data)
    assert await c.gather(futures) == data


class SpansSlices(ActiveMemoryManagerPolicy):
    """Any policy whose work takes several time slices (ReduceReplicas or
    ReplicateN over many keys): while it runs, a new cycle can't start, so the
    RetireWorker policies added meanwhile have not run when done() is first polled
    """

    resumable = True

    def run(self):
        for _ in range(100):
            time.sleep(0.005)
            yield CHECKPOINT


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    config={**RUNNING, "amm.time-slice": "10ms"},
)
async def test_retire_two_workers_holding_the_only_copies(c, s, a, b, w3):
    """a and b hold the only copies of x and retire together. Each copy counting
    for the other (distributed's done()), both would be reported done before their
    policies ran, and close: x would be lost. (With remove=True the first one's
    removal happens to save the second; remove=False is the path of
    Worker.close_gracefully.)
    """
    wire(s)
    m = s.extensions["amm"]
    x = await c.scatter({"x": 1}, workers=[a.address, b.address], broadcast=True)
    m.add_policy(SpansSlices())
    m.run_once()
    assert m.cycle_in_progress
    out = await s.retire_workers(
        workers=[a.address, b.address], close_workers=False, remove=False
    )
    assert set(out) == {a.address, b.address}
    assert "x" in w3.data
    await a.close()
    await b.close()
    assert await c.gather(x) == {"x": 1}


class Stalls(ActiveMemoryManagerPolicy):
    """Looks for a recipient of x (which orders the workers by memory, as any
    search does), then keeps the cycle suspended, one slice after the other, until
    released
    """

    resumable = True

    def __init__(self):
        self.released = False
        self.choice = "not asked"

    def run(self):
        self.choice = yield ("replicate", self.manager.scheduler.tasks["x"], None)
        while not self.released:
            yield CHECKPOINT


@gen_cluster(client=True, config=RUNNING)
async def test_retire_in_a_cycle_begun_before_the_recipient_resumed(c, s, a, b):
    """The retirement joins a cycle that began while b, the only possible
    recipient, was paused. That cycle can't send x to b; the retirement must not
    conclude that nobody can take x (and abort), as b is running now.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    await pause(s, b)
    m = s.extensions["amm"]
    stalls = Stalls()
    m.add_policy(stalls)
    m.run_once()
    assert m.cycle_in_progress
    assert stalls.choice is None  # b paused: nowhere to send x
    b.status = Status.running
    await async_poll_for(lambda: s.workers[b.address].status == Status.running, 5)
    retiring = asyncio.create_task(c.retire_workers([a.address]))
    await async_poll_for(lambda: retire_policies(s), timeout=5)
    assert m.cycle_in_progress  # the retirement runs in the cycle begun before
    stalls.released = True
    assert list(await retiring) == [a.address]
    assert await c.gather(x) == {"x": 1}


@pytest.mark.parametrize("config", [RUNNING, STOPPED])
def test_removing_the_policy_cancels_the_retirement(config):
    """AMMClient.remove_policy("RetireWorker") while the data is on its way: the
    policy is no longer among the manager's, so done() is True (as in
    distributed), but that is a cancellation, not the end of the move. Taken for
    one, a would be removed with the only copy of y. With the AMM stopped, the
    policy runs on a temporary manager, which the client API reaches too.
    """
    gen_cluster(client=True, nthreads=[("", 1)], config=config)(
        _removing_the_policy_cancels_the_retirement
    )()


async def _removing_the_policy_cancels_the_retirement(c, s, a):
    wire(s)
    async with BlockedGatherDep(s.address) as b:
        y = c.submit(lambda: "y", workers=[a.address], key="y")
        await y
        retiring = asyncio.create_task(c.retire_workers([a.address]))
        await b.in_gather_dep.wait()  # y is on its way to b
        listed = [p["repr"] for p in await AMMClient(c).policies()]
        assert listed == [f"RetireWorker({a.address!r})"]
        with captured_logger(SCHEDULER_LOGGER, logging.WARNING) as log:
            assert await AMMClient(c).remove_policy("RetireWorker") == 1
            assert await retiring == {}
        assert "Retirement of worker" in log.getvalue()
        assert "cancelled" in log.getvalue()
        assert a.address in s.workers
        await async_poll_for(
            lambda: s.workers[a.address].status == Status.running, timeout=5
        )
        (event,) = retire_events(s)
        assert event["could-not-retire"] == [a.address]
        b.block_gather_dep.set()
        assert await y == "y"


TIMEOUT = {**RUNNING, "amm.retire.timeout": "500ms"}


@gen_cluster(client=True, nthreads=[("", 1)], config=TIMEOUT)
async def test_retire_timeout_aborts(c, s, a):
    """The only recipient never completes the transfer: the retirement is abandoned
    and the worker keeps its data and goes back to running.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    async with BlockedGatherDep(s.address) as b:
        await c.wait_for_workers(2)
        with captured_logger(SCHEDULER_LOGGER, logging.WARNING) as log:
            out = await c.retire_workers([a.address])
        assert out == {}
        assert "no progress towards other workers within 0.5s" in log.getvalue()
        assert not retire_policies(s)
        (event,) = retire_events(s)
        assert event["could-not-retire"] == event["timed-out"] == [a.address]
        assert a.address in s.workers
        while s.workers[a.address].status != Status.running:
            await asyncio.sleep(0.01)
        assert "x" in a.data
        b.block_gather_dep.set()
    assert await c.gather(x) == {"x": 1}


@gen_cluster(
    client=True, nthreads=[("", 1)] * 2, config={**RUNNING, "amm.retire.timeout": "2s"}
)
async def test_retire_asks_another_recipient_when_one_is_too_slow(c, s, a, w2):
    """The recipient chosen first never completes the transfer. Asked again and
    again, it would stall the retirement until the timeout, and under
    Worker.close_gracefully or adaptive scale-down (which close the worker whatever
    the outcome) x would be lost. After half the timeout, another worker is asked.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    clutter = await c.scatter({"clutter": b"0" * 2**20}, workers=[w2.address])
    async with BlockedGatherDep(s.address) as hung:  # the least loaded: chosen
        await c.wait_for_workers(3)
        retiring = asyncio.create_task(c.retire_workers([a.address]))
        await hung.in_gather_dep.wait()
        assert list(await retiring) == [a.address]
        assert holders_of(s, "x") == {w2.address}
        assert await c.gather(x) == {"x": 1}
        hung.block_gather_dep.set()
    del clutter


def holders_of(s, key) -> set[str]:
    return {ws.address for ws in s.tasks[key].who_has or ()}


@gen_cluster(
    client=True, nthreads=[("", 1)], config={**RUNNING, "amm.retire.timeout": "1s"}
)
async def test_retire_timeout_runs_from_the_last_progress(c, s, a):
    """The retirement takes longer than the timeout but keeps making progress (here
    a unique key goes away at 0.6s): it goes on, and ends when the data has moved
    """
    wire(s)
    xy = await c.scatter({"x": 1, "y": 2}, workers=[a.address])
    async with BlockedGatherDep(s.address) as b:
        await c.wait_for_workers(2)
        retiring = asyncio.create_task(c.retire_workers([a.address]))
        await asyncio.sleep(0.6)
        del xy["y"]  # a key less to move
        await asyncio.sleep(0.7)  # past 1s since the start, not since y left
        assert not retiring.done()
        b.block_gather_dep.set()
        assert list(await retiring) == [a.address]
        assert await c.gather(xy["x"]) == 1


@pytest.mark.parametrize("config", [STOPPED, RUNNING])
def test_retry_right_after_giving_up_leaves_the_worker_running(config):
    """The only other worker is paused: the retirement gives up, and the caller
    tries again at once. The scheduler only learns that a is running again once a
    says so; a retry that came first found it closing_gracefully, took that for
    the status to go back to, and left a retiring for good (so does distributed).
    """

    @gen_cluster(
        client=True,
        config={**config, "distributed.worker.memory.pause": False},
    )
    async def test(c, s, a, b):
        wire(s)
        x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
        await pause(s, b)
        for _ in range(3):
            assert await c.retire_workers([a.address]) == {}
        await async_poll_for(
            lambda: s.workers[a.address].status == Status.running, timeout=5
        )
        assert a.status == Status.running
        assert await c.submit(inc, 1, workers=[a.address]) == 2

    test()


@gen_cluster(client=True, config={**RUNNING, "distributed.worker.memory.pause": False})
async def test_retry_while_the_worker_is_put_back_leaves_it_running(c, s, a, b):
    """A retry starts after the first retirement gave up and told a to go back to
    running, before a has confirmed it; the retry gives up at once too. The
    first must not stay in charge of a (if it still counted, the retry would
    not put a back, and the first had sent its message already): the retry
    inherits the status from before and has the last word.
    """
    retirements = wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    await pause(s, b)
    first = asyncio.create_task(s.retire_workers(workers=[a.address]))
    while a.address not in retirements._restoring:
        await asyncio.sleep(0)
    assert s.workers[a.address].status == Status.closing_gracefully
    second = asyncio.create_task(s.retire_workers(workers=[a.address]))
    assert await first == {}
    assert await second == {}
    await async_poll_for(
        lambda: s.workers[a.address].status == Status.running, timeout=5
    )
    assert a.status == Status.running
    assert not retirements._in_progress
    assert not retirements._restoring
    assert await c.submit(inc, 1, workers=[a.address]) == 2


@gen_cluster(client=True, nthreads=[("", 1)], config=TIMEOUT)
async def test_overlapping_retirements_that_time_out_leave_the_worker_running(c, s, a):
    """The same worker retired twice at once (a retry; adaptive scale-down and a
    user): the second finds it closing_gracefully. Had the later one to end put
    it back in the status it found, the worker would stay closing_gracefully, with
    no retirement left to close it and no task landing on it.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    async with BlockedGatherDep(s.address) as b:
        await c.wait_for_workers(2)
        first = asyncio.create_task(s.retire_workers(workers=[a.address]))
        await asyncio.sleep(0.1)
        assert s.workers[a.address].status == Status.closing_gracefully
        second = asyncio.create_task(s.retire_workers(workers=[a.address]))
        with captured_logger(SCHEDULER_LOGGER, logging.WARNING) as log:
            assert await first == {}
            # the first ended, the second goes on: the worker stays retiring
            assert s.workers[a.address].status == Status.closing_gracefully
            assert await second == {}
        assert "another retirement of it is in progress" in log.getvalue()
        assert "goes back to running" in log.getvalue()
        await async_poll_for(
            lambda: s.workers[a.address].status == Status.running, timeout=5
        )
        await asyncio.sleep(0.1)
        assert s.workers[a.address].status == Status.running
        assert a.status == Status.running
        b.block_gather_dep.set()
    assert await c.gather(x) == {"x": 1}


def wait_for(ev):
    ev.wait()
    return 1


@gen_cluster(client=True, config=RUNNING)
async def test_a_drained_worker_stays_drained_after_a_retirement_gives_up(c, s, a, b):
    """retire_workers(remove=False) leaves a worker closing_gracefully on purpose
    (drained, to be closed some other way). A later retirement of it that gives up
    puts it back in that status, not running: it must get no new tasks.
    """
    wire(s)
    ev = Event()
    fut = c.submit(wait_for, ev, workers=[a.address], key="f")
    await wait_for_state("f", "executing", a)
    out = await s.retire_workers(workers=[a.address], close_workers=False, remove=False)
    assert list(out) == [a.address]
    assert s.workers[a.address].status == Status.closing_gracefully
    await ev.set()
    await wait(fut)  # in memory on a only
    await pause(s, b)
    assert await s.retire_workers(workers=[a.address], remove=False) == {}  # nowhere
    await asyncio.sleep(0.2)  # past the scheduler -> worker -> scheduler round trip
    assert s.workers[a.address].status == Status.closing_gracefully
    assert a.status == Status.closing_gracefully


@gen_cluster(
    client=True, nthreads=[("", 1)], config={**TIMEOUT, "amm.retire.on-timeout": "close"}
)
async def test_retire_timeout_closes(c, s, a):
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    async with BlockedGatherDep(s.address) as b:
        await c.wait_for_workers(2)
        with captured_logger(SCHEDULER_LOGGER, logging.WARNING) as log:
            out = await c.retire_workers([a.address])
        assert list(out) == [a.address]
        assert a.address not in s.workers
        assert "1 keys held only by it are lost: ['x']" in log.getvalue()
        (event,) = retire_events(s)
        assert event["retired"] == event["timed-out"] == [a.address]
        assert not retire_policies(s)
        b.block_gather_dep.set()


class Counter:
    n = 0

    def increment(self):
        self.n += 1
        return self.n


@gen_cluster(client=True, config=STOPPED)
async def test_retire_actors(c, s, a, b):
    """A worker with an actor can't retire; one with only a proxy can"""
    wire(s)
    x = c.submit(Counter, key="x", actor=True, workers=[a.address])
    y = c.submit(lambda cnt: cnt.increment().result(), x, key="y", workers=[b.address])
    await wait([x, y])
    assert "x" in b.data  # the proxy
    with captured_logger(AMM_LOGGER, logging.WARNING) as log:
        assert await c.retire_workers([a.address]) == {}
    assert "it holds actor(s)" in log.getvalue()
    assert "x" in a.state.actors
    while s.workers[a.address].status != Status.running:
        await asyncio.sleep(0.01)
    out = await c.retire_workers([b.address])
    assert list(out) == [b.address]
    assert "x" in a.state.actors
    assert "y" in a.data


@gen_cluster(client=True, config=STOPPED)
async def test_scheduler_retire_workers_to_close(c, s, a, b):
    """In-process callers of Scheduler.retire_workers, through workers_to_close"""
    wire(s)
    small = await c.scatter({"small": 1}, workers=[a.address])
    big = await c.scatter({"big": "x" * 100_000}, workers=[b.address])
    out = await s.retire_workers(n=1)
    assert list(out) == [a.address]
    assert set(b.data) == {"small", "big"}
    assert await c.gather(small) == {"small": 1}
    assert len(await c.gather(big)) == 1


@gen_test(timeout=60)
async def test_adaptive_scale_down():
    """distributed.deploy.Adaptive retires idle workers through the RPC handler,
    by name, without losing their data
    """
    with dask.config.set(STOPPED):
        async with LocalCluster(
            n_workers=3,
            processes=False,
            asynchronous=True,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster:
            s = cluster.scheduler
            assert isinstance(s.extensions["amm"], ActiveMemoryManager)
            wire(s)
            async with Client(cluster, asynchronous=True) as c:
                data = list(range(30))
                futures = await c.scatter(data)
                assert len({ws for f in futures for ws in s.tasks[f.key].who_has}) == 3
                adaptive = cluster.adapt(
                    minimum=1, maximum=3, interval="50ms", wait_count=1
                )
                while len(s.workers) > 1:
                    await asyncio.sleep(0.05)
                adaptive.stop()
                assert await c.gather(futures) == data
                events = retire_events(s)
                assert events and all("timed-out" in ev for ev in events)
                assert sum(len(ev["retired"]) for ev in events) == 2


# -- restarting stuck paused workers --------------------------------------------------


def events(s, action: str) -> list[dict]:
    return [ev for _, ev in s.get_events("all") if ev.get("action") == action]


#: Pauses a worker for good (memory.pause is off). A lambda is pickled by value, so
#: the nannies' worker processes needn't import this test module.
PAUSE = lambda dask_worker: setattr(dask_worker, "status", Status.paused)  # noqa: E731


PAUSED_RESTART = {
    **STOPPED,
    "amm.paused-restart.enabled": True,
    "amm.paused-restart.after": "200ms",
}


@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=PAUSED_RESTART)
async def test_paused_worker_is_restarted_without_losing_data(c, s, a, b):
    wire(s)
    assert PAUSED_RESTART_CALLBACK in s.periodic_callbacks
    nannies = {ws.nanny for ws in s.workers.values()}
    old = a.worker_address
    data = {f"x{i}": i for i in range(10)}
    futures = await c.scatter(data, workers=[old])
    # memory.pause is off: the worker stays paused until something restarts it
    await c.run(PAUSE, workers=[old])
    while old in s.workers or len(s.workers) < 2:
        await asyncio.sleep(0.05)
    # same nannies, a new worker process
    assert {ws.nanny for ws in s.workers.values()} == nannies
    await async_poll_for(
        lambda: all(ws.status == Status.running for ws in s.workers.values()), timeout=10
    )
    # scattered data can't be recomputed: it all moved before the restart
    assert await c.gather(futures) == data
    assert [ev["workers"] for ev in events(s, "restart-workers")] == [[old]]


@asynccontextmanager
async def restart_waiting_for_the_lock(c, s, addr: str, log) -> AsyncIterator[None]:
    """Pause the worker at ``addr`` for good, and hold the lock that rebalance()
    and replicate() take until its restart is about to drain it and waits for the
    lock; it drains once the block ends
    """
    async with s._replica_lock("rebalance"):
        await c.run(PAUSE, workers=[addr])
        while "moving its data to other workers" not in log.getvalue():
            await asyncio.sleep(0.05)
        yield


@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=PAUSED_RESTART)
async def test_retiring_a_worker_the_restart_drains_does_not_lie(c, s, a, b):
    """A user retires the worker just as the restart drains it. Whichever goes
    first, what the user is told holds: either the worker is retired (removed and
    closed, not restarted), or it is left out of the result (and restarted). It
    was reported retired, and its nanny then started it again.
    """
    wire(s)
    addr = a.worker_address
    futures = await c.scatter({f"x{i}": i for i in range(5)}, workers=[addr])
    with captured_logger(AMM_LOGGER, logging.INFO) as log:
        async with restart_waiting_for_the_lock(c, s, addr, log):
            user = asyncio.create_task(c.retire_workers([addr]))  # closes it
            await asyncio.sleep(0.5)  # both wait for the lock
        retired = list(await user)
        await async_poll_for(
            lambda: "not restarted" in log.getvalue() or events(s, "restart-workers"),
            timeout=10,
        )
    if retired:
        assert retired == [addr]
        assert not events(s, "restart-workers")
        await async_poll_for(lambda: a.status == Status.closed, timeout=10)
        assert list(s.workers) == [b.worker_address]
    else:
        assert [ev["workers"] for ev in events(s, "restart-workers")] == [[addr]]
        await async_poll_for(lambda: len(s.workers) == 2, timeout=10)
        assert addr not in s.workers
    assert await c.gather(futures) == {f"x{i}": i for i in range(5)}


RESUME = lambda dask_worker: setattr(dask_worker, "status", Status.running)  # noqa: E731


@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=PAUSED_RESTART)
async def test_worker_that_resumes_while_restart_waits_is_left_alone(c, s, a, b):
    """The restart waits for the lock that a rebalance() or replicate() in progress
    holds; the worker resumes meanwhile. It was drained and restarted all the same.
    """
    wire(s)
    addr = a.worker_address
    futures = await c.scatter({f"x{i}": i for i in range(5)}, workers=[addr])
    with captured_logger(AMM_LOGGER, logging.INFO) as log:
        async with restart_waiting_for_the_lock(c, s, addr, log):
            await c.run(RESUME, workers=[addr])
            while s.workers[addr].status != Status.running:
                await asyncio.sleep(0.01)
        while "not restarted" not in log.getvalue() and not events(
            s, "restart-workers"
        ):
            await asyncio.sleep(0.05)
    assert "resumed or left before its data was moved" in log.getvalue()
    assert s.workers[addr].status == Status.running
    assert not events(s, "restart-workers")
    assert not retire_events(s)
    held = await c.run(lambda dask_worker: sorted(dask_worker.data), workers=[addr])
    assert held[addr] == sorted(futures)


@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)], config=PAUSED_RESTART)
async def test_paused_worker_not_restarted_if_data_cant_move(c, s, a):
    wire(s)
    addr = a.worker_address
    futures = await c.scatter({"x": 1}, workers=[addr])
    with captured_logger(AMM_LOGGER, logging.WARNING) as log:
        await c.run(PAUSE, workers=[addr])
        while "was not restarted" not in log.getvalue():
            await asyncio.sleep(0.05)
    assert list(s.workers) == [addr]
    assert not events(s, "restart-workers")
    # back to paused, to be tried again later
    while s.workers[addr].status != Status.paused:
        await asyncio.sleep(0.01)
    assert await c.gather(futures) == {"x": 1}


@gen_cluster(client=True, config=PAUSED_RESTART)
async def test_paused_worker_without_nanny_is_only_logged(c, s, a, b):
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])
    with captured_logger(AMM_LOGGER, logging.WARNING) as log:
        await pause(s, a)
        while "has no nanny" not in log.getvalue():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # more checks: logged once per pause
    assert log.getvalue().count("has no nanny") == 1
    assert set(s.workers) == {a.address, b.address}
    assert s.workers[a.address].status == Status.paused
    assert "x" in a.data
    assert not retire_events(s)
    assert await c.gather(x) == {"x": 1}


@gen_cluster(client=True, config=RUNNING)
async def test_a_cycle_failing_as_a_retirement_starts_does_not_strand_the_worker(
    c, s, a, b
):
    """The cycle run as a retirement starts fails (an error in the manager, not in
    a policy, which would be isolated): the retirement goes on with the periodic
    cycles. Raised, the error left the worker closing_gracefully with nobody
    waiting for it.
    """
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    m = s.extensions["amm"]
    run_once = m.run_once
    failed = []

    def fails_once():
        if not failed:
            failed.append(True)
            raise ZeroDivisionError("a bug in the manager")
        run_once()

    m.run_once = fails_once
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        out = await c.retire_workers([a.address])
    assert failed
    assert "AMM cycle failed as a retirement started" in log.getvalue()
    assert a.address in out
    assert a.address not in s.workers
    assert s.tasks["x"].who_has == {s.workers[b.address]}


@gen_cluster(
    client=True,
    Worker=BlockedGetData,
    config={**RUNNING, "amm.retire.timeout": "3s"},
)
async def test_stopping_the_manager_does_not_stall_a_retirement(c, s, a, b):
    """The AMM is stopped while a retirement runs on it, and then y lands on a,
    unique there. The retirement goes on, on a manager of its own, as one that
    starts with the AMM stopped does. It gave up at the timeout (distributed's
    waits forever); Worker.close_gracefully would then have closed a with y.
    """
    wire(s)
    b.block_get_data.set()  # only a's transfers are held back
    x = await c.scatter({"x": 1}, workers=[a.address])
    y = c.submit(_slow, 2, key="y", workers=[a.address], allow_other_workers=True)
    await wait_for_state("y", "executing", a)
    retiring = asyncio.create_task(c.retire_workers([a.address]))
    await a.in_get_data.wait()  # b is fetching x from a
    await c.amm.stop()
    await async_poll_for(lambda: s.tasks["y"].state == "memory", timeout=5)
    a.block_get_data.set()
    assert list(await retiring) == [a.address]
    assert await c.gather([x["x"], y]) == [1, 2]
    assert not retire_policies(s)


@gen_cluster(client=True, config=STOPPED)
async def test_retirement_on_a_temporary_manager_shows_in_the_statistics(c, s, a, b):
    """With the AMM stopped, a retirement runs on a temporary manager: what it does
    counts in the installed manager's statistics (and Prometheus metrics), the
    only ones a user can read.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    assert list(await c.retire_workers([a.address])) == [a.address]
    stats = await AMMClient(c).statistics()
    assert stats["replicas_requested"] == 1
    assert stats["cycles"] >= 1
    assert stats["by_policy"] == {f"RetireWorker({a.address!r})": 1}
    assert not s.extensions["amm"].running



@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=RUNNING)
async def test_a_copy_on_a_closing_worker_does_not_count(c, s, a, b, w):
    """x is on a and on b, which is closing (Worker.close(): the scheduler sees it
    until b unregisters, with its replicas). Retiring a must copy x to w first,
    not take b's copy for one held elsewhere and close a with the other.
    """
    wire(s)
    x = await c.scatter({"x": 1}, workers=[a.address, b.address], broadcast=True)
    ws_b, ws_w = s.workers[b.address], s.workers[w.address]
    s.handle_worker_status_change(Status.closing, ws_b, "test")
    assert list(await c.retire_workers([a.address])) == [a.address]
    assert ws_w in s.tasks["x"].who_has
    assert await c.gather(x) == {"x": 1}
