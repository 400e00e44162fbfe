"""A cycle longer than the time slice yields the event loop and resumes"""

from __future__ import annotations

import asyncio
import gc

from distributed import Worker
from distributed.utils_test import gen_cluster

from amm import ActiveMemoryManager, ActiveMemoryManagerPolicy, ReduceReplicas, Suggestion
from amm.policy import CHECKPOINT
from amm.testing import Recorder, add_task, add_worker, new_scheduler
from conftest import amm_config


def synthetic(nkeys=500, nworkers=4):
    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(nworkers)]
    for i in range(nkeys):
        add_task(s, f"k{i}", 10, wss)
    return s, recorder, wss


def test_sliced_cycle_without_event_loop_runs_to_completion():
    s, recorder, wss = synthetic()
    m = ActiveMemoryManager(s, [ReduceReplicas()], register=False, start=False)
    m.time_slice = 0  # every check point is past the deadline
    m.run_once()
    assert m.stats.cycles == 1
    assert m.stats.cycles_sliced == 1
    assert m.stats.total.drops_requested == 500 * 3
    # one message per worker per slice: several slices happened
    assert len(recorder.sent) > 3
    assert all(len(ts.who_has) == 1 for ts in s.tasks.values())


def test_slices_ending_between_two_drops_of_one_key():
    """A slice can end between two drops of the same key. The drop sent at the end
    of the first slice is already gone from who_has, so it must no longer count as
    pending either: counted twice, it would make the second drop look like it takes
    the last replica, and the key would keep two.
    """
    s, recorder, wss = synthetic(nkeys=500, nworkers=3)  # 2 drops per key
    m = ActiveMemoryManager(s, [ReduceReplicas()], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    assert m.stats.cycles_sliced == 1
    assert m.stats.total.drops_requested == 500 * 2
    assert m.stats.total.drop_rejected == 0
    assert all(len(ts.who_has) == 1 for ts in s.tasks.values())


class NotResumable(ActiveMemoryManagerPolicy):
    """Iterates a live set: must never be suspended in the middle"""

    def run(self):
        for ts in self.manager.scheduler.replicated_tasks.copy():
            for _ in range(len(ts.who_has) - 1):
                yield Suggestion("drop", ts)


def test_policies_not_declaring_resumable_run_in_one_go():
    s, recorder, wss = synthetic()
    m = ActiveMemoryManager(s, [NotResumable(), ReduceReplicas()], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    # the first slice ran NotResumable to the end, then stopped at the boundary
    first = [msg for msg in recorder.sent[:4]]
    assert sum(len(keys) for _, _, keys in first) == 1500
    assert m.stats.total.by_policy == {"NotResumable()": 1500}


@gen_cluster(client=True, config=amm_config())
async def test_sliced_cycle_yields_the_event_loop(c, s, a, b):
    x = await c.scatter({f"x{i}": i for i in range(200)}, broadcast=True)  # noqa: F841
    m = s.extensions["amm"]
    m.time_slice = 0
    m.run_once()
    # run_once returned with the cycle suspended; a new cycle is refused meanwhile
    assert m.stats.cycles == 0
    m.run_once()
    while m.stats.cycles == 0:
        await asyncio.sleep(0)
    assert m.stats.cycles == 1
    assert m.stats.total.drops_requested == 200
    while any(len(s.tasks[f"x{i}"].who_has) > 1 for i in range(200)):
        await asyncio.sleep(0.01)
    assert await c.gather(list(x.values())) == list(range(200))


class Bookkeeping(ActiveMemoryManagerPolicy):
    """Long work that suggests nothing, with CHECKPOINTs in it, then one drop"""

    resumable = True

    def __init__(self, steps):
        self.steps = steps
        self.visited = []

    def run(self):
        for i in range(self.steps):
            self.visited.append(i)
            yield CHECKPOINT
        ts = next(iter(self.manager.scheduler.replicated_tasks))
        yield Suggestion("drop", ts)


def test_checkpoint_suspends_a_resumable_policy():
    s, recorder, wss = synthetic(nkeys=1)
    policy = Bookkeeping(5)
    m = ActiveMemoryManager(s, [policy], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    # one slice per checkpoint, then one for the drop; nothing was lost or redone
    assert m.stats.cycles == 1
    assert m.stats.last_cycle_slices == 6
    assert policy.visited == list(range(5))
    assert m.stats.total.drops_requested == 1


def test_checkpoint_is_ignored_in_a_policy_not_declaring_resumable():
    s, recorder, wss = synthetic(nkeys=1)

    class NotResumableBookkeeping(Bookkeeping):
        resumable = False

    m = ActiveMemoryManager(s, [NotResumableBookkeeping(5)], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    assert m.stats.last_cycle_slices == 1
    assert m.stats.total.drops_requested == 1


class SplitAcrossSlices(ActiveMemoryManagerPolicy):
    """A replication and a drop, a checkpoint, then the same replication again"""

    resumable = True

    def run(self):
        x, y = self.manager.scheduler.tasks["x"], self.manager.scheduler.tasks["y"]
        target = frozenset(self.manager.scheduler.workers.values()) - x.who_has
        self.first = yield ("replicate", x, target)
        yield ("drop", y, None)
        yield CHECKPOINT
        # the replication sent in the first slice is still pending: the copy
        # doesn't show in who_has until it is made
        self.pending = self.manager.pending.get(x)
        self.second = yield ("replicate", x, target)


def test_replications_sent_in_an_earlier_slice_stay_pending():
    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(3)]
    add_task(s, "x", 10, wss[:2])
    add_task(s, "y", 10, wss[:2])
    policy = SplitAcrossSlices()
    m = ActiveMemoryManager(s, [policy], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    assert m.stats.last_cycle_slices == 2
    assert policy.first is wss[2]
    assert policy.pending == ({wss[2]}, set())
    assert policy.second is None  # not asked to fetch x twice
    assert [(op, addr) for op, addr, _ in recorder.sent] == [
        ("acquire-replicas", "tcp://w2:1"),
        ("remove-replicas", "tcp://w1:1"),
    ]

class ReplicateAfterAJoin(ActiveMemoryManagerPolicy):
    """Suspends the cycle until told a worker joined, then replicates a key"""

    resumable = True

    def __init__(self, key):
        self.key = key
        self.joined = False
        self.done = asyncio.Event()

    def run(self):
        while not self.joined:
            yield CHECKPOINT
        self.choice = yield Suggestion("replicate", self.manager.scheduler.tasks[self.key])
        self.memory = list(self.manager.workers_memory)
        self.done.set()


@gen_cluster(client=True, config=amm_config(policies=[], measure="managed"))
async def test_a_worker_joining_a_suspended_cycle_waits_for_the_next(c, s, a, b):
    """The workers of a cycle are those present when it began, as in distributed's
    single-step cycle: one that joins while the cycle is suspended is neither
    chosen nor in workers_memory until the next cycle, even if it is the least
    loaded.
    """
    x = await c.scatter({"x": 1}, workers=[a.address])  # noqa: F841
    pad = await c.scatter({"pad": b"0" * 2**20}, workers=[b.address])  # noqa: F841
    m = s.extensions["amm"]
    m.time_slice = 0
    policy = ReplicateAfterAJoin("x")
    m.run_policies_once([policy])
    async with Worker(s.address) as w:
        policy.joined = True
        await policy.done.wait()
        assert policy.choice is s.workers[b.address]
        # in scheduler order, as in distributed
        assert policy.memory == [ws for ws in s.workers.values() if ws.address != w.address]
        while m.cycle_in_progress:
            await asyncio.sleep(0.01)

        again = ReplicateAfterAJoin("x")
        again.joined = True
        m.run_policies_once([again])
        await again.done.wait()
        assert again.choice is s.workers[w.address]


def nreduced(s, keys) -> int:
    return sum(len(s.tasks[k].who_has) == 1 for k in keys)


@gen_cluster(client=True, config=amm_config(start=True))
async def test_stop_ends_a_suspended_cycle(c, s, a, b):
    """stop() (client.amm.stop()) between two slices: nothing more is decided or
    sent
    """
    keys = [f"x{i}" for i in range(200)]
    x = await c.scatter(dict(zip(keys, range(200))), broadcast=True)  # noqa: F841
    m = s.extensions["amm"]
    m.time_slice = 0
    m.run_once()
    assert m.cycle_in_progress
    sent = nreduced(s, keys)
    assert 0 < sent < 200
    m.stop()
    assert not m.cycle_in_progress
    assert m.stats.total.drops_requested == sent  # the ended cycle is counted
    await asyncio.sleep(0.05)  # past the resumption the cycle had scheduled
    assert nreduced(s, keys) == sent
    # nothing left behind: the next cycle runs and finishes the job
    m.time_slice = 1.0
    m.run_once()
    assert nreduced(s, keys) == 200


@gen_cluster(client=True, config=amm_config(policies=[]))
async def test_a_policy_removed_while_suspended_in_it_decides_nothing_more(c, s, a, b):
    """e.g. a retirement that timed out: its RetireWorker is removed, and must not
    go on moving data in the cycle that was suspended in it
    """
    keys = [f"x{i}" for i in range(200)]
    x = await c.scatter(dict(zip(keys, range(200))), broadcast=True)  # noqa: F841
    m = s.extensions["amm"]
    policy = ReduceReplicas()
    m.add_policy(policy)
    m.time_slice = 0
    m.run_once()
    sent = nreduced(s, keys)
    assert 0 < sent < 200
    m.policies.discard(policy)
    while m.cycle_in_progress:
        await asyncio.sleep(0)
    assert nreduced(s, keys) == sent
    assert m.stats.total.by_policy == {"ReduceReplicas()": sent}


def test_stop_tells_the_policy_its_last_choice():
    """The last suggestion before the cycle suspended was sent, but the policy has
    not heard which worker was chosen. stop() tells it before ending it: else
    ReplicateN would not wait for that copy, and ask for it again next cycle.
    """
    from amm import ReplicateN

    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(8)]
    keys = [f"k{i:03d}" for i in range(200)]
    for i, key in enumerate(keys):
        add_task(s, key, 100, [wss[i % 8]])
    policy = ReplicateN(max_per_worker={"keys": None, "bytes": None})
    m = ActiveMemoryManager(s, [policy], register=False, start=False)
    policy.set(keys, 2)

    async def run():
        m.time_slice = 0
        m.run_once()
        assert m.cycle_in_progress
        m.stop()
        m.time_slice = 10.0
        m.run_once()  # no copy has arrived yet

    asyncio.run(run())
    requested = [key for _, _, batch in recorder.pop() for key in batch]
    assert sorted(requested) == keys  # one copy each, none asked for twice


class KeepsAll(ActiveMemoryManagerPolicy):
    """Protects every replica"""

    def run(self):
        return ()

    def desired_replicas(self, ts):
        return len(ts.who_has or ())


def test_reduce_replicas_can_be_suspended_with_nothing_to_drop():
    """Keys that need nothing make no suggestion, which was the policy's only
    point of suspension: a cycle over many protected keys held the event loop in
    one go, however long
    """
    s, recorder, wss = synthetic(nkeys=2000)
    m = ActiveMemoryManager(s, [ReduceReplicas(), KeepsAll()], register=False, start=False)
    m.time_slice = 0
    m.run_once()
    assert m.stats.cycles == 1
    assert m.stats.last_cycle_slices >= 2000 // 256
    assert not recorder.sent


class Allocating(ActiveMemoryManagerPolicy):
    """Keeps many containers alive while it runs, as a cycle's bookkeeping does,
    and records the collections that ran meanwhile
    """

    resumable = True

    def __init__(self):
        self.collections = []

    def run(self):
        before = sum(g["collections"] for g in gc.get_stats())
        kept = [[i] for i in range(20_000)]  # ~30 young collections' worth
        for ts in list(self.manager.scheduler.replicated_tasks):
            yield Suggestion("drop", ts)
        self.collections.append(sum(g["collections"] for g in gc.get_stats()) - before)
        del kept


def test_garbage_collector_paused_while_a_slice_runs():
    """The cyclic garbage collector does not run during a slice: what a slice
    allocates would otherwise be promoted and trigger collections of the whole
    scheduler's heap. It runs again once the slice is over.
    """
    s, recorder, wss = synthetic(nkeys=100)
    policy = Allocating()
    m = ActiveMemoryManager(s, [policy], register=False, start=False)
    assert gc.isenabled()
    m.run_once()
    assert policy.collections == [0]
    assert gc.isenabled()
    assert m.stats.total.drops_requested == 100


def test_garbage_collector_turned_off_stays_off():
    s, recorder, wss = synthetic(nkeys=100)
    m = ActiveMemoryManager(s, [ReduceReplicas()], register=False, start=False)
    m.time_slice = 0
    gc.disable()
    try:
        m.run_once()
        assert m.stats.cycles_sliced == 1
        assert not gc.isenabled()
    finally:
        gc.enable()


@gen_cluster(client=True, config=amm_config())
async def test_garbage_collector_runs_between_slices(c, s, a, b):
    """Between two slices, the event loop runs with the collector on"""
    seen = []

    class Watch(ActiveMemoryManagerPolicy):
        resumable = True

        def run(self):
            for _ in range(3):
                seen.append(("slice", gc.isenabled()))
                asyncio.get_running_loop().call_soon(
                    lambda: seen.append(("loop", gc.isenabled()))
                )
                yield CHECKPOINT

    m = s.extensions["amm"]
    m.policies = {Watch()}
    m.time_slice = 0
    m.run_once()
    while m.cycle_in_progress:
        await asyncio.sleep(0.01)
    assert ("slice", False) in seen and ("loop", True) in seen
    assert ("slice", True) not in seen and ("loop", False) not in seen
    assert gc.isenabled()
