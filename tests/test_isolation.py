"""A misbehaving policy is logged with its name and withdrawn for the cycle; the
other policies and the cluster carry on.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from distributed.utils_test import captured_logger, gen_cluster

from amm import ActiveMemoryManager, ActiveMemoryManagerPolicy, Suggestion
from amm.testing import add_task, add_worker, new_scheduler
from conftest import amm_config


class Raises(ActiveMemoryManagerPolicy):
    """Makes a valid suggestion, then fails"""

    def run(self):
        yield Suggestion("drop", self.manager.scheduler.tasks["x"])
        raise ZeroDivisionError("boom")


class RaisesAtCall(ActiveMemoryManagerPolicy):
    def run(self):  # not a generator: fails when called
        raise KeyError("early")


class Yields(ActiveMemoryManagerPolicy):
    def __init__(self, what):
        self.what = what

    def __repr__(self):
        return f"Yields({self.what!r})"

    def run(self):
        yield Suggestion("drop", self.manager.scheduler.tasks["x"])
        what = self.what(self.manager.scheduler) if callable(self.what) else self.what
        yield what


class DropAll(ActiveMemoryManagerPolicy):
    """Asks to drop every replica of every key; the manager keeps what it must"""

    def run(self):
        for ts in list(self.manager.scheduler.tasks.values()):
            for _ in range(len(ts.who_has)):
                yield Suggestion("drop", ts)


class DropY(ActiveMemoryManagerPolicy):
    def run(self):
        yield Suggestion("drop", self.manager.scheduler.tasks["y"])


def stale_worker(s):
    from amm.testing import WorkerState  # a worker the scheduler does not know

    return Suggestion(
        "drop",
        s.tasks["x"],
        {
            WorkerState(
                address="tcp://gone:1",
                status=next(iter(s.workers.values())).status,
                pid=0,
                name="gone",
                memory_limit=0,
                local_directory="",
                nanny=None,
                server_id="gone",
            )
        },
    )


def forgotten_task(s):
    from distributed.scheduler import TaskState

    ts = s.tasks["x"]
    return Suggestion("drop", TaskState("x", None, "memory", ts.group, validate=False))


BAD = [
    pytest.param("garbage", "which is not a Suggestion", id="string"),
    pytest.param(("drop",), "which is not a Suggestion", id="short-tuple"),
    pytest.param(lambda s: ("move", s.tasks["x"], None), "op 'move'", id="bad-op"),
    pytest.param(("drop", "x", None), "where a TaskState was expected", id="key-not-ts"),
    pytest.param(forgotten_task, "key 'x', unknown to the scheduler", id="stale-task"),
    pytest.param(stale_worker, "not a worker of this scheduler", id="stale-worker"),
    pytest.param(lambda s: ("drop", s.tasks["x"], 42), "expected a set", id="bad-candidates"),
    pytest.param(lambda s: (["drop"], s.tasks["x"], None), "op ['drop']", id="unhashable-op"),
    pytest.param(
        lambda s: ("drop", s.tasks["x"], [[1]]), "expected a set", id="unhashable-candidates"
    ),
]


@pytest.fixture
def cluster():
    s = new_scheduler()
    from amm.testing import Recorder

    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(3)]
    add_task(s, "x", 10, wss)
    add_task(s, "y", 10, wss)
    return s, recorder


def run(s, *policies):
    m = ActiveMemoryManager(s, list(policies), register=False, start=False)
    m.run_once()
    return m


@pytest.mark.parametrize("bad,message", BAD)
def test_invalid_suggestion_withdraws_policy(cluster, bad, message):
    s, recorder = cluster
    policy = Yields(bad)
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(s, policy, DropY())
    text = log.getvalue()
    assert repr(policy) in text
    assert message in text
    assert "its 1 suggestions of this cycle are withdrawn" in text
    # the bad policy's earlier, valid drop of x was withdrawn; DropY still ran
    assert recorder.pop() == [("remove-replicas", "tcp://w2:1", ["y"])]
    assert len(s.tasks["x"].who_has) == 3
    assert m.stats.total.policy_errors == 1


@pytest.mark.parametrize("policy", [Raises(), RaisesAtCall()], ids=["midway", "at-call"])
def test_raising_policy_is_isolated(cluster, policy):
    s, recorder = cluster
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(s, policy, DropY())
    text = log.getvalue()
    assert f"Policy {policy!r} raised" in text
    assert "Traceback" in text
    assert recorder.pop() == [("remove-replicas", "tcp://w2:1", ["y"])]
    assert len(s.tasks["x"].who_has) == 3
    # rollback restored the expected memory bookkeeping: a second run is clean
    m.policies.discard(policy)
    m.run_once()
    assert m.stats.total.policy_errors == 1


def test_policy_fails_again_next_cycle_and_others_keep_running(cluster):
    s, recorder = cluster
    m = run(s, Raises())
    m.add_policy(DropY())
    m.run_once()
    m.run_once()
    assert m.stats.total.policy_errors == 3
    assert len(s.tasks["y"].who_has) == 1


class ProtectsX(ActiveMemoryManagerPolicy):
    """Keeps 3 replicas of x"""

    def run(self):
        return ()

    def desired_replicas(self, ts):
        return 3 if ts.key == "x" else 1


class ProtectorRaises(ActiveMemoryManagerPolicy):
    def run(self):
        return ()

    def desired_replicas(self, ts):
        raise KeyError(ts.key)  # a bug in the user's code


def test_raising_protector_is_isolated(cluster):
    """A policy whose desired_replicas() raises is left out for the rest of the
    cycle; the drops go on, under the other protectors. Unguarded, the error went
    through the manager and ended every cycle: nothing was ever sent.
    """
    s, recorder = cluster
    bad = ProtectorRaises()
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(s, ProtectsX(), bad, DropAll())
    text = log.getvalue()
    assert f"Policy {bad!r} raised in desired_replicas" in text
    assert "KeyError" in text
    assert m.stats.total.policy_errors == 1
    assert len(s.tasks["x"].who_has) == 3  # still protected by ProtectsX
    assert len(s.tasks["y"].who_has) == 1
    assert [keys for _, _, keys in recorder.pop()] == [["y"], ["y"]]


class ProtectorForgetsToReturn(ActiveMemoryManagerPolicy):
    def run(self):
        return ()

    def desired_replicas(self, ts):
        if ts.key == "x":
            return 3
        # and None for the others


@pytest.mark.parametrize("drop_first", [True, False], ids=["drops-first", "protector-first"])
def test_protector_returning_none_is_isolated(cluster, drop_first):
    """desired_replicas() returning None (a forgotten return) is a failure of that
    protector, named in the log; the drops go on. Compared with the other counts,
    the None raised a TypeError that blamed the dropping policy or ended the cycle.
    """
    s, recorder = cluster
    bad = ProtectorForgetsToReturn()
    policies = [DropAll(), bad] if drop_first else [bad, DropAll()]
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(s, *policies)
    text = log.getvalue()
    assert f"Policy {bad!r} raised in desired_replicas" in text
    assert "returned None; expected an int" in text
    assert m.stats.total.policy_errors == 1
    assert len(s.tasks["y"].who_has) == 1


class Restricts(ActiveMemoryManagerPolicy):
    def __init__(self, answer):
        self.answer = answer

    def __repr__(self):
        return "Restricts()"

    def run(self):
        return ()

    def restricted_to(self, ts):
        return self.answer(list(self.manager.scheduler.workers.values()))


def test_restrictions_combine_and_a_failing_one_is_left_out(cluster):
    """A key may live where every restricting policy allows; one that raises, or
    answers something other than a set, restricts nothing and is logged by name
    """
    s, _ = cluster
    w0, w1, w2 = s.workers.values()
    x = s.tasks["x"]
    m = run(s, Restricts(lambda ws: {ws[0], ws[1]}), Restricts(lambda ws: {ws[1], ws[2]}))
    assert m.restricted_to(x) == {w1}
    assert run(s).restricted_to(x) is None  # nobody restricts it
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(
            s,
            Restricts(lambda ws: 1 / 0),
            Restricts(lambda ws: [ws[0]]),
            Restricts(lambda ws: {ws[2]}),
        )
        assert m.restricted_to(x) == {w2}
    text = log.getvalue()
    assert text.count("Policy Restricts() raised in restricted_to('x')") == 2
    assert "ZeroDivisionError" in text
    assert "expected a set of WorkerState or None" in text


class AsksRestrictions(ActiveMemoryManagerPolicy):
    """Asks where each key may live, as Rebalance does before moving one"""

    def run(self):
        self.answers = [
            self.manager.restricted_to(ts) for ts in self.manager.scheduler.tasks.values()
        ]
        return ()


def test_a_failing_restriction_is_left_out_for_the_cycle(cluster):
    """Asked about every key in a cycle, a failing restrictor is reported once and
    counted as a policy error, not logged again for each key
    """
    s, _ = cluster
    w0, w1, w2 = s.workers.values()
    asks = AsksRestrictions()
    with captured_logger("distributed.active_memory_manager", logging.ERROR) as log:
        m = run(s, Restricts(lambda ws: 1 / 0), Restricts(lambda ws: {ws[2]}), asks)
    assert asks.answers == [{w2}, {w2}]
    assert log.getvalue().count("raised in restricted_to") == 1
    assert m.stats.total.policy_errors == 1


def test_non_generator_iterables_are_accepted(cluster):
    s, recorder = cluster

    class ListPolicy(ActiveMemoryManagerPolicy):
        def run(self):
            return [Suggestion("drop", self.manager.scheduler.tasks["x"])]

    run(s, ListPolicy())
    assert recorder.pop() == [("remove-replicas", "tcp://w2:1", ["x"])]


@gen_cluster(client=True, config=amm_config(start=True, interval="50ms"))
async def test_bad_policy_on_live_cluster(c, s, a, b):
    """With a broken policy installed, ReduceReplicas still does its job"""
    s.extensions["amm"].add_policy(Yields("garbage"))
    x = await c.scatter({"x": 1}, broadcast=True)  # noqa: F841
    while len(s.tasks["x"].who_has) > 1:
        await asyncio.sleep(0.01)
    assert s.extensions["amm"].stats.total.policy_errors >= 1
    assert await c.submit(lambda x: x + 1, x["x"]) == 2


class ReplicateEach(ActiveMemoryManagerPolicy):
    """Replicate each of ``keys`` once, to the workers at ``addresses`` in turn"""

    def __init__(self, keys, addresses):
        self.keys = keys
        self.addresses = addresses
        self.choices = {}

    def run(self):
        s = self.manager.scheduler
        for i, key in enumerate(self.keys):
            candidates = {s.workers[self.addresses[i % len(self.addresses)]]}
            self.choices[key] = yield Suggestion("replicate", s.tasks[key], candidates)


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=amm_config(policies=[]))
async def test_a_worker_whose_stream_closed_does_not_stop_the_others(c, s, a, b, w3):
    """A worker's connection can close a turn of the event loop before the
    scheduler removes the worker. Sending to it then fails; the other workers still
    get their messages, and the cycle completes.
    """
    keys = [f"x{i}" for i in range(10)]
    futures = await c.scatter(dict(zip(keys, range(10))), workers=[w3.address])
    m = s.extensions["amm"]
    policy = ReplicateEach(keys, [a.address, b.address])
    with captured_logger("distributed.active_memory_manager", logging.WARNING) as log:
        s.stream_comms[b.address].abort()  # what BatchedSend does on a write error
        m.run_policies_once([policy])
    assert m.stats.cycles == 1
    assert f"Could not reach worker {b.address}" in log.getvalue()
    to_a = {k for k, ws in policy.choices.items() if ws.address == a.address}
    to_b = {k for k, ws in policy.choices.items() if ws.address == b.address}
    assert len(to_a) == len(to_b) == 5
    while not to_a <= set(a.data):
        await asyncio.sleep(0.01)
    assert await c.gather(list(futures.values())) == list(range(10))


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=amm_config(measure="managed"))
async def test_no_drop_leaves_a_key_only_on_a_worker_that_cannot_be_reached(c, s, a, b):
    """b's stream has closed and the scheduler has not removed b yet, so b still
    counts as a holder. ReduceReplicas would drop the copies on a (the more loaded
    worker) and keep b's, which vanish a moment later with b. Those drops are
    withdrawn at send time instead.
    """
    keys = [f"x{i}" for i in range(20)]
    futures = await c.scatter(dict(zip(keys, range(20))), broadcast=True)
    pad = await c.scatter({"pad": b"0" * 2**20}, workers=[a.address])  # noqa: F841
    m = s.extensions["amm"]
    with captured_logger("distributed.active_memory_manager", logging.WARNING) as log:
        s.stream_comms[b.address].abort()
        m.run_once()
    assert "Kept 20 replicas whose other copies are only on workers" in log.getvalue()
    assert m.stats.total.drops_requested == 0
    assert m.stats.total.drop_rejected == 20
    while b.address in s.workers:
        await asyncio.sleep(0.01)
    assert all(s.tasks[k].who_has == {s.workers[a.address]} for k in keys)
    assert await c.gather(list(futures.values())) == list(range(20))
