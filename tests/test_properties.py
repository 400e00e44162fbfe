"""Property tests: random cluster states built from real WorkerState / TaskState
objects, random (often nonsensical) suggestions, and the invariants checked on what
the manager actually sends.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed.core import Status

from amm import ActiveMemoryManager, ActiveMemoryManagerPolicy, Suggestion
from amm.ordering import WorkerMemoryOrder
from amm.testing import Recorder, add_task, add_worker, new_scheduler, set_status

STATUSES = [Status.running, Status.running, Status.paused, Status.closing_gracefully]


class FakeWorker:
    """What WorkerMemoryOrder needs of a worker: an address (the tie-break)"""

    __slots__ = ("address",)

    def __init__(self, i: int):
        self.address = f"tcp://w{i:03d}"  # address order = position


def memory_order(mem: dict, walkable=None) -> WorkerMemoryOrder:
    """An order over the workers of ``mem``, reading their memory from a copy of
    it as it is now (``mem`` itself then tracks the expected values)
    """
    initial = dict(mem)
    return WorkerMemoryOrder(
        {ws.address: ws for ws in mem}, initial.__getitem__, walkable  # type: ignore[arg-type]
    )


@st.composite
def cluster_states(draw):
    nworkers = draw(st.integers(1, 7))
    statuses = draw(st.lists(st.sampled_from(STATUSES), min_size=nworkers, max_size=nworkers))
    ntasks = draw(st.integers(1, 8))
    tasks = []
    for i in range(ntasks):
        holders = draw(st.sets(st.integers(0, nworkers - 1)))
        tasks.append(
            {
                "holders": sorted(holders),
                "nbytes": draw(st.integers(0, 1000)),
                "actor": draw(st.booleans()) if holders else False,
                # workers where a dependent of this task is processing
                "waiters_on": sorted(draw(st.sets(st.integers(0, nworkers - 1), max_size=3))),
                "desired": draw(st.integers(1, 4)),
            }
        )
    suggestions = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["replicate", "drop"]),
                st.integers(0, ntasks - 1),
                st.one_of(st.none(), st.sets(st.integers(0, nworkers - 1))),
            ),
            max_size=40,
        )
    )
    return statuses, tasks, suggestions


def build(statuses, tasks):
    s = new_scheduler()
    recorder = Recorder(s)
    wss = [add_worker(s, f"tcp://w{i}:1") for i in range(len(statuses))]
    for ws, status in zip(wss, statuses):
        set_status(s, ws, status)
    tss = []
    for i, spec in enumerate(tasks):
        holders = [wss[j] for j in spec["holders"]]
        ts = add_task(s, f"t{i}", spec["nbytes"], holders, state="memory" if holders else "released")
        ts.actor = spec["actor"]
        for j in spec["waiters_on"]:
            dts = s.new_task(f"dep-{i}-{j}", None, "released")
            dts.state = "processing"
            dts.processing_on = wss[j]
            ts.waiters = (ts.waiters or set()) | {dts}
            ts.dependents.add(dts)
        tss.append(ts)
    return s, recorder, wss, tss


class Random(ActiveMemoryManagerPolicy):
    def __init__(self, suggestions, wss, tss, desired):
        self.suggestions = suggestions
        self.wss = wss
        self.tss = tss
        self.desired = desired

    def desired_replicas(self, ts):
        return self.desired.get(ts, 1)

    def run(self):
        for op, i, cands in self.suggestions:
            candidates = None if cands is None else {self.wss[j] for j in cands}
            yield Suggestion(op, self.tss[i], candidates)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_states())
def test_invariants_hold_on_what_is_sent(state):
    statuses, tasks, suggestions = state
    s, recorder, wss, tss = build(statuses, tasks)
    before = {ts: set(ts.who_has or ()) for ts in tss}
    desired = {ts: spec["desired"] for ts, spec in zip(tss, tasks)}
    policy = Random(suggestions, wss, tss, desired)
    ActiveMemoryManager(s, [policy], register=False, start=False).run_once()

    sent = recorder.pop()
    acquired: dict = {ts: [] for ts in tss}
    dropped: dict = {ts: [] for ts in tss}
    for op, addr, keys in sent:
        ws = s.workers[addr]
        for key in keys:
            (acquired if op == "acquire-replicas" else dropped)[s.tasks[key]].append(ws)

    for ts, spec in zip(tss, tasks):
        holders = before[ts]
        if not holders or ts.actor:
            assert not acquired[ts] and not dropped[ts], ts
            continue
        # drops only from holders, at most once each, never where a dependent runs
        assert len(dropped[ts]) == len(set(dropped[ts]))
        assert set(dropped[ts]) <= holders
        assert not set(dropped[ts]) & {wss[j] for j in spec["waiters_on"]}
        # never the last replica, never below the desired count
        remaining = len(holders) - len(dropped[ts])
        assert remaining >= 1
        if dropped[ts]:
            assert remaining >= desired[ts]
        # replicate only to running non-holders, once each
        assert len(acquired[ts]) == len(set(acquired[ts]))
        for ws in acquired[ts]:
            assert ws.status == Status.running
            assert ws not in holders


@settings(max_examples=300, deadline=None)
@given(
    memory=st.lists(st.integers(0, 50), min_size=1, max_size=60),
    candidates=st.one_of(st.none(), st.sets(st.integers(0, 59))),
    rejected=st.sets(st.integers(0, 59)),
    required=st.one_of(st.none(), st.sets(st.integers(0, 59))),
    updates=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 50)), max_size=10),
)
def test_order_matches_brute_force(memory, candidates, rejected, required, updates):
    """Both search strategies (scan, walk) agree with a brute-force min/max over
    (memory, position), also after in-place updates.
    """
    workers = [FakeWorker(i) for i in range(len(memory))]
    mem = dict(zip(workers, memory))
    # as in the manager: only the required workers (running ones) are walkable
    walkable = None if required is None else {workers[i] for i in required if i < len(workers)}
    order = memory_order(mem, walkable)
    for i, nbytes in updates:
        if i < len(workers):
            order.update(workers[i], nbytes - mem[workers[i]])  # type: ignore[arg-type]
            mem[workers[i]] = nbytes
    cands = None if candidates is None else {workers[i] for i in candidates if i < len(workers)}
    rej = {workers[i] for i in rejected if i < len(workers)}
    req = None if required is None else {workers[i] for i in required if i < len(workers)}
    pool = [
        ws
        for ws in workers
        if (cands is None or ws in cands) and (req is None or ws in req) and ws not in rej
    ]

    def key(ws):
        return (mem[ws], workers.index(ws))

    assert order.lowest(cands, req, (rej,)) is min(pool, key=key, default=None)  # type: ignore[arg-type]
    assert order.highest(cands, req, (rej,)) is max(pool, key=key, default=None)  # type: ignore[arg-type]
    walked = [ws for ws in workers if walkable is None or ws in walkable]
    assert list(order.ascending()) == sorted(walked, key=key)
    if cands is not None:
        assert order.scan_highest(cands, req, (rej,)) is max(pool, key=key, default=None)  # type: ignore[arg-type]
    # every worker, read or not so far, in address order
    assert list(order.complete().items()) == list(mem.items())


@settings(max_examples=200, deadline=None)
@given(
    memory=st.lists(st.integers(0, 30), min_size=16, max_size=80),
    members=st.sets(st.integers(0, 79), min_size=5),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["lowest", "highest", "leave", "update"]),
            st.integers(0, 79),
            st.integers(0, 30),
        ),
        max_size=60,
    ),
    excluded=st.sets(st.integers(0, 79), max_size=5),
    bunched=st.booleans(),
)
def test_searches_over_a_shrinking_set_match_brute_force(
    memory, members, steps, excluded, bunched
):
    """A candidate set searched again and again while it loses members and while
    worker memory changes, as ReplicateN's open recipients or a key's remaining
    workers are: whether the whole order, or a sub-order of the set, is walked,
    every answer is the brute-force min/max.
    """
    if bunched:
        # the candidates above every other worker: walks from the low end step over
        # all the others, and the set gets a sub-order
        memory = [m + (100 if i in members else 0) for i, m in enumerate(memory)]
    workers = [FakeWorker(i) for i in range(len(memory))]
    mem = dict(zip(workers, memory))
    order = memory_order(mem)
    cands = {workers[i] for i in members if i < len(workers)}
    exc = {workers[i] for i in excluded if i < len(workers)}

    def key(ws):
        return (mem[ws], workers.index(ws))

    for op, i, nbytes in steps:
        ws = workers[i % len(workers)]
        if op == "leave":
            cands.discard(ws)
        elif op == "update":
            order.update(ws, nbytes - mem[ws])  # type: ignore[arg-type]
            mem[ws] = nbytes
        else:
            pool = [w for w in cands if w not in exc]
            expect = (min if op == "lowest" else max)(pool, key=key, default=None)
            assert getattr(order, op)(cands, None, (exc,)) is expect
    assert list(order.ascending()) == sorted(workers, key=key)
