"""Randomized, seeded stress test of the manager on a real cluster. Opt-in: it is
skipped unless ``AMM_STRESS=1``.

Why: the other tests check one behaviour at a time, in an order they choose. The
bugs this test is for come from interleavings nobody chose: a recipient hanging in
the middle of a retirement, the same worker retired by two calls at once, a key
released and scattered again under the same name while a cycle is suspended
between two time slices, a worker pausing while its data is being replicated. So
it runs a seeded random sequence of operations (scatter, compute, replicate,
release, pause, resume, retire, close_gracefully, kill and add workers, make
fetches slow, stop and start the manager, add and remove Rebalance, ...) against a
cluster running ReduceReplicas, Rebalance, ReplicateN and RetireWorker with tiny
time slices, and after every step checks what must hold whatever happened:

- every future the client holds gathers to the value it should have, unless the
  test itself destroyed the only copy: it killed a worker, or closed one with
  ``Worker.close_gracefully`` and its retirement failed (timed out, say): the
  worker closes all the same, as docs/retire.md says;
- the scheduler's state is consistent (``Scheduler.validate_state``), no policy
  raised and the manager logged no ERROR;
- replication targets (``ReplicationClient.replicate``, ``Client.replicate``,
  ``scatter(broadcast=True)``) are met when the call returns, stay met while the
  running workers don't change, and are met again once things calm down (every
  50 steps paused workers are resumed and retirements awaited);
- nothing hangs: retirements, scatters and replications end within bounds.

A seed fixes the sequence of operations, not every race (threads and sockets
decide those), so a failing seed may pass when run again. Each seed's trace (one
line per step) is written to the test's ``tmp_path``; a failure says where.

Run it::

    AMM_STRESS=1 python -m pytest tests/stress
    AMM_STRESS=1 AMM_STRESS_SEEDS=1,2,3 AMM_STRESS_STEPS=300 python -m pytest tests/stress -s

``AMM_STRESS_SEEDS`` (default 1,2,3) and ``AMM_STRESS_STEPS`` (random steps per
seed, default 300) choose the runs; each seed runs on in-process workers and on
nannies (worker processes, restarted when stuck paused). A seed of 300 steps takes
about a minute or two.

``AMM_STRESS_SABOTAGE=retire`` (retirements end at once, before the data has
moved) or ``=desired`` (no policy protects the replicas ReplicateN made) breaks the
manager on purpose: the runs must then fail, which shows that the checks can
(``desired`` takes minutes: replications wait for their 30s bound).
``test_checks_catch_lost_data`` shows it on every run of the suite, in a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distributed import Client, Nanny, Scheduler, Worker
from distributed.client import Future, FutureCancelledError, FuturesCancelledError
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils_test import gen_cluster

from amm import ActiveMemoryManager, AMMClient, ReplicateN, RetireWorker
from amm.replication import ReplicationClient
from amm.retirement import PAUSED_RESTART_CALLBACK
from conftest import amm_config
from stress import workload
from stress.workload import SlowGatherDep

ENABLED = os.environ.get("AMM_STRESS", "0") not in ("", "0")
SEEDS = [int(s) for s in os.environ.get("AMM_STRESS_SEEDS", "1,2,3").split(",") if s]
STEPS = int(os.environ.get("AMM_STRESS_STEPS", "300"))
SABOTAGE = os.environ.get("AMM_STRESS_SABOTAGE", "")

opt_in = pytest.mark.skipif(
    not ENABLED,
    reason="opt-in stress test: run it with AMM_STRESS=1 "
    "(AMM_STRESS_SEEDS=1,2,3 and AMM_STRESS_STEPS=300 choose the runs)",
)

AMM_LOGGER = "distributed.active_memory_manager"
#: amm.retire.timeout: short, so that slow recipients make retirements time out
RETIRE_TIMEOUT = 4.0
#: How long past amm.retire.timeout a retirement may take. The timeout runs from
#: the last progress, so a retirement may legitimately take longer; with the little
#: data here, one that takes this much longer has hung
MARGIN = 4.0
#: A call taking this long has hung
HUNG = 30.0
MEMORY_LIMIT = "64MB"
MIN_RUNNING = 3
MAX_WORKERS = 7
QUIESCE_EVERY = 50
#: A run stops early past this many failures: what follows is mostly their echo
MAX_FAILURES = 20
#: How long quiesce() waits for the replication targets to be met
TARGET_PATIENCE = 15.0
#: Time limit of one seed (pytest-timeout's is a minute more)
SEED_TIMEOUT = 300 + 3 * STEPS

#: The operations and their relative frequencies
OPS = {
    "scatter": 14,
    "compute": 14,
    "replicate": 10,
    "client_replicate": 3,
    "unreplicate": 4,
    "release": 9,
    "pause": 5,
    "resume": 6,
    "retire": 6,
    "add_worker": 5,
    "kill": 2,
    "run_once": 8,
    "sleep": 4,
    "slow": 4,
    "rescatter": 4,
    "toggle_amm": 1,
    "toggle_rebalance": 1,
    "bulk": 3,
    "bulk_release": 2,
    "close_gracefully": 2,
    "pinned": 4,
    "actor": 1,
}
#: Operations on the worker object, which a nanny's worker is not in this process
IN_PROCESS_ONLY = {"slow", "close_gracefully"}


def stress_config(nanny: bool = False) -> dict[str, Any]:
    """The manager started, cycling often, with tiny time slices (cycles end in the
    middle of policies) and settings that make every policy busy on a few MB
    """
    config = amm_config(
        start=True,
        interval="50ms",
        # every in-process worker reports the same process memory
        measure="managed",
        policies=[{"class": "amm.ReduceReplicas"}, {"class": "amm.Rebalance"}],
        **{
            "time-slice": "20us",
            "retire.timeout": f"{RETIRE_TIMEOUT}s",
            # the default; the checks rely on it: a timed-out retirement leaves the
            # worker with its data
            "retire.on-timeout": "abort",
            "replicate.retry-after": "2s",
            "replicate.serve-client-replicate": True,
            "rebalance.sender-min": 0.0,
            "rebalance.recipient-max": 0.6,
            "rebalance.sender-recipient-gap": 0.02,
            "rebalance.key-cooldown": 3,
            "rebalance.move-timeout": 5,
            # restart a worker paused for 1s (nannies only)
            "paused-restart.enabled": nanny,
            "paused-restart.after": "1s",
        },
    )
    config.update(
        {
            "distributed.worker.memory.spill": False,
            "distributed.worker.memory.terminate": False,
            # Rebalance sheds data off workers near it
            "distributed.worker.memory.target": 0.6,
        }
    )
    return config


@dataclass
class Held:
    """A future the client holds, and what gathering it must give"""

    fut: Future
    expected: Any
    #: the scattered keys it was computed from, itself included if scattered: they
    #: can't be recomputed, so losing one loses it
    lineage: frozenset[str]


class Watch(SchedulerPlugin):
    """Tells the harness when the workers change (to know whether a replication
    target may have been lost), and which retirements failed
    """

    name = "amm-stress"

    def __init__(self, stress: Stress):
        self.stress = stress

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.stress.epoch += 1

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.stress.epoch += 1

    def log_event(self, topic: str, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if msg.get("action") == "worker-status-change":
            self.stress.epoch += 1
        elif msg.get("action") == "retire-workers":
            # with amm.retire.on-timeout: close, a worker that timed out is retired
            # (closed) and listed as timed out
            for addr in {*msg.get("could-not-retire", ()), *msg.get("timed-out", ())}:
                self.stress.not_retired(addr)


class ErrorLog(logging.Handler):
    """The manager's ERROR records. Attached beside pytest's own handlers, so that
    the manager's warnings still show in the captured log of a failure
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Stress:
    """Random operations on a cluster, and the checks that follow each"""

    def __init__(
        self, c: Client, s: Scheduler, workers: list[Worker | Nanny], seed: int
    ):
        self.c = c
        self.s = s
        self.seed = seed
        self.rng = random.Random(seed)
        self.nanny = isinstance(workers[0], Nanny)
        self.initial = list(workers)
        self._handles: list[Worker | Nanny] = list(workers)
        self.rep = ReplicationClient(c)
        self.amm = AMMClient(c)
        self.step = 0
        self.last_key = 0
        self.held: dict[str, Held] = {}
        #: replication targets in force: key -> (n, workers or None)
        self.targets: dict[str, tuple[Any, frozenset[str] | None]] = {}
        #: targets found met: key -> (n, workers, running workers, epoch) then
        self.met: dict[str, tuple[Any, frozenset[str] | None, frozenset, int]] = {}
        #: changes of the workers' membership or status
        self.epoch = 0
        #: held keys whose loss the test caused (not checked any more)
        self.lost_ok: set[str] = set()
        #: workers the test killed, or closed gracefully after a failed retirement
        self.gone: set[str] = set()
        self.closing_gracefully: set[str] = set()
        self.released: set[str] = set()
        self.groups: list[list[str]] = []
        self.actors: list[Future] = []
        self.retiring: Counter[str] = Counter()
        self.retire_tasks: list[asyncio.Task] = []
        self.trace: list[str] = []
        self.failures: list[str] = []
        self.op_counts: Counter[str] = Counter()
        self.errors = ErrorLog()
        logging.getLogger(AMM_LOGGER).addHandler(self.errors)
        self.errors_seen = 0
        self.policy_errors = 0
        s.add_plugin(Watch(self))

    async def close(self) -> None:
        """Stop what is still running and close the workers the test added"""
        logging.getLogger(AMM_LOGGER).removeHandler(self.errors)
        for task in self.retire_tasks:
            task.cancel()
        await asyncio.gather(*self.retire_tasks, return_exceptions=True)
        for h in self._handles:
            if h not in self.initial:
                try:
                    await asyncio.wait_for(h.close(), 10)
                except Exception:
                    pass  # not what this test checks; gen_cluster reports leaks

    # -- bookkeeping ---------------------------------------------------------

    def note(self, msg: str) -> None:
        self.trace.append(f"[seed {self.seed} step {self.step}] {msg}")

    def fail(self, msg: str) -> None:
        line = f"[seed {self.seed} step {self.step}] FAIL {msg}"
        self.trace.append(line)
        self.failures.append(line)

    def new_key(self, prefix: str) -> str:
        self.last_key += 1
        return f"{prefix}{self.last_key}"

    @property
    def manager(self) -> ActiveMemoryManager:
        return self.s.extensions["amm"]

    @property
    def handles(self) -> dict[str, Worker | Nanny]:
        """The workers by address (a nanny's changes when it restarts its worker)"""
        out = {}
        for h in self._handles:
            addr = h.worker_address if isinstance(h, Nanny) else h.address
            if addr:
                out[addr] = h
        return out

    def alive(self) -> dict[str, Worker | Nanny]:
        return {a: h for a, h in self.handles.items() if a in self.s.workers}

    def running(self) -> list[str]:
        """Running workers not being retired by the test"""
        return [ws.address for ws in self.s.running if ws.address not in self.retiring]

    def stable(self) -> bool:
        """No change of the running workers is in flight"""
        return not self.retiring and all(t.done() for t in self.retire_tasks)

    def checkable(self) -> list[tuple[str, Held]]:
        return [(k, h) for k, h in self.held.items() if k not in self.lost_ok]

    def bytes_held(self) -> list[Held]:
        return [h for _, h in self.checkable() if isinstance(h.expected, bytes)]

    def max_delay(self) -> float:
        return max(
            [getattr(h, "gather_delay", 0.0) for h in self.handles.values()] + [0.0]
        )

    def restarting(self) -> set[str]:
        """Workers whose restart (amm.paused-restart) is under way: drained (what
        they hold is held elsewhere too) and about to go with their copies
        """
        pc = self.s.periodic_callbacks.get(PAUSED_RESTART_CALLBACK)
        restarter = getattr(getattr(pc, "callback", None), "__self__", None)
        return set(getattr(restarter, "restarting", ()))

    def expect_loss(self, addr: str, why: str) -> None:
        """``addr`` is about to go with its data: the keys held only there (and
        those computed from them, which can't be recomputed) are no longer checked.
        Nor are those held there and on a worker being restarted: that worker was
        drained while ``addr`` held a copy, and the two go at once (a double
        failure, which no manager can survive).
        """
        restarting = self.restarting()
        if restarting:
            self.note(f"restart under way of {sorted(restarting)}")
        gone = self.gone | {addr} | restarting
        lost = {
            key
            for key, ts in self.s.tasks.items()
            if ts.who_has and {ws.address for ws in ts.who_has} <= gone
        }
        newly = {
            key
            for key, h in self.held.items()
            if key not in self.lost_ok
            # a computed key that is lost is recomputed, unless it depends on
            # scattered data: that may have been released since
            and (h.lineage & lost or (key in lost and h.lineage))
        }
        self.lost_ok |= newly
        self.gone.add(addr)
        self.note(f"{why} {addr}: may lose {sorted(newly)}")

    def not_retired(self, addr: str) -> None:
        """Called by :class:`Watch` when a retirement fails (times out, finds no
        recipient). ``Worker.close_gracefully`` then closes the worker all the same,
        with the data it still holds alone (docs/retire.md)
        """
        if addr in self.closing_gracefully and addr not in self.gone:
            self.expect_loss(addr, "close_gracefully after a failed retirement of")

    def pool_goal_have(
        self, key: str, n: Any, workers: frozenset[str] | None
    ) -> tuple[int, int]:
        """How many replicas ``key`` should have on running workers, and has"""
        ts = self.s.tasks[key]
        pool = {ws for ws in self.s.running if workers is None or ws.address in workers}
        goal = len(pool) if n == "all" else min(n, len(pool))
        return goal, len((ts.who_has or set()) & pool)

    # -- checks --------------------------------------------------------------

    async def check(self) -> None:
        """What must hold after every step"""
        s = self.s
        for task in [t for t in self.retire_tasks if t.done()]:
            self.retire_tasks.remove(task)
            if not task.cancelled() and task.exception():
                self.fail(f"retirement raised {task.exception()!r}")
        try:
            s.validate_state()
        except Exception as e:
            self.fail(
                "validate_state: " + "".join(traceback.format_exception(e))[-1500:]
            )
        errors = self.manager.statistics()["policy_errors"]
        if errors > self.policy_errors:
            self.fail(f"{errors - self.policy_errors} policy errors")
            self.policy_errors = errors
        new_errors = self.errors.messages[self.errors_seen :]
        if new_errors:
            self.fail("manager logged ERROR: " + "\n".join(new_errors)[:3000])
            self.errors_seen = len(self.errors.messages)
        self.check_sticky()
        await self.check_values()

    async def check_values(self) -> None:
        """Every future held gathers to its value; if not, find which"""
        items = self.checkable()
        if not items or not self.s.running:
            return
        try:
            values = await asyncio.wait_for(
                self.c.gather([h.fut for _, h in items]), HUNG
            )
        except (Exception, FutureCancelledError, FuturesCancelledError):
            pass
        else:
            bad = [
                k for (k, h), v in zip(items, values, strict=True) if v != h.expected
            ]
            if bad:
                self.fail(f"wrong values for {bad}")
            return
        for key, h in items:
            if key in self.lost_ok:
                continue  # its loss was expected while the gather above waited
            try:
                value = await asyncio.wait_for(self.c.gather(h.fut), 10)
            except (Exception, FutureCancelledError) as e:
                if key in self.lost_ok:
                    # expected meanwhile: a retirement failed, and close_gracefully
                    # closed the worker with the data only it held
                    continue
                ts = self.s.tasks.get(key)
                self.fail(
                    f"gather {key} (lineage={sorted(h.lineage)}) raised {e!r}; "
                    f"state={getattr(ts, 'state', None)} "
                    f"who_has={getattr(ts, 'who_has', None)}"
                )
                self.lost_ok.add(key)  # report it once
            else:
                if value != h.expected:
                    self.fail(f"wrong value for {key}")

    def check_returned(
        self, what: str, keys: list[str], n: Any, workers: Any, before: set[str]
    ) -> None:
        """Client.replicate and scatter(broadcast=True) return once the copies exist"""
        if not self.stable() or {ws.address for ws in self.s.running} != before:
            return
        workers = frozenset(workers) if workers else None
        for key in keys:
            ts = self.s.tasks.get(key)
            if ts is None or ts.state != "memory" or key in self.lost_ok:
                continue
            goal, have = self.pool_goal_have(key, n, workers)
            if have < goal:
                self.fail(
                    f"{what} returned but {key} has {have}/{goal} replicas: "
                    f"who_has={sorted(ws.address for ws in ts.who_has)} "
                    f"running={sorted(ws.address for ws in self.s.running)}"
                )

    def check_sticky(self) -> None:
        """A target met stays met while the running workers don't change"""
        running = frozenset(self.s.running)
        for key, (n, workers) in self.targets.items():
            ts = self.s.tasks.get(key)
            if (
                key not in self.held
                or key in self.lost_ok
                or ts is None
                or ts.state != "memory"
            ):
                self.met.pop(key, None)
                continue
            goal, have = self.pool_goal_have(key, n, workers)
            # a new target for the key (replicate again) must be met anew
            state = (n, workers, running, self.epoch)
            if have >= goal:
                self.met[key] = state
            else:
                if self.met.get(key) == state and self.stable():
                    self.fail(
                        f"{key} had its {goal} replicas (n={n}) and lost some with no "
                        f"change in the running workers: who_has="
                        f"{sorted((ws.address, ws.status.name) for ws in ts.who_has)}"
                    )
                self.met.pop(key, None)
        for key in [k for k in self.met if k not in self.targets]:
            del self.met[key]

    def unmet_targets(self) -> list[str]:
        out = []
        for key, (n, workers) in sorted(self.targets.items()):
            if key not in self.held or key in self.lost_ok:
                continue
            ts = self.s.tasks.get(key)
            if ts is None or ts.state != "memory":
                out.append(f"{key}: state={getattr(ts, 'state', None)}")
                continue
            goal, have = self.pool_goal_have(key, n, workers)
            if have < goal:
                out.append(
                    f"{key}: n={n} workers={workers and sorted(workers)} have={have} "
                    f"goal={goal} who_has={sorted(ws.address for ws in ts.who_has)} "
                    f"running={sorted(ws.address for ws in self.s.running)}"
                )
        return out

    async def quiesce(self) -> None:
        """Resume paused workers, make fetches fast, wait for the retirements: the
        replication targets must then be met
        """
        self.note("quiesce")
        if not self.manager.running:
            await self.c.amm.start()
        for h in self.alive().values():
            if isinstance(h, SlowGatherDep):
                h.gather_delay = 0.0
        for ws in list(self.s.workers.values()):
            if ws.status == Status.paused and ws.address in self.handles:
                await self.set_status(ws.address, Status.running)
        if self.retire_tasks:
            _, pending = await asyncio.wait(
                self.retire_tasks, timeout=RETIRE_TIMEOUT + HUNG
            )
            if pending:
                self.fail(f"{len(pending)} retirements still running at quiesce")
        await self.check()
        deadline = time.monotonic() + TARGET_PATIENCE
        while (unmet := self.unmet_targets()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for line in unmet:
            self.fail("replication target not met: " + line)

    async def run(self, steps: int) -> None:
        ops = {
            name: weight
            for name, weight in OPS.items()
            if not (self.nanny and name in IN_PROCESS_ONLY)
        }
        names, weights = list(ops), list(ops.values())
        for step in range(steps):
            self.step = step
            op = self.rng.choices(names, weights)[0]
            self.op_counts[op] += 1
            try:
                await getattr(self, f"op_{op}")()
            except Exception as e:
                self.fail(f"{op} raised {e!r}\n{traceback.format_exc()[-2000:]}")
            await asyncio.sleep(self.rng.uniform(0, 0.03))
            await self.check()
            if len(self.failures) > MAX_FAILURES:
                break
            if step % QUIESCE_EVERY == QUIESCE_EVERY - 1:
                await self.quiesce()
            if len(self.running()) < MIN_RUNNING and len(self.s.workers) < MAX_WORKERS:
                await self.op_add_worker()
        await self.quiesce()
        stats = self.manager.statistics()
        counts = ("cycles", "cycles_sliced", "replicas_requested", "drops_requested")
        self.note(
            f"done: ops={dict(self.op_counts)} workers={len(self.s.workers)} "
            f"held={len(self.held)} lost_ok={len(self.lost_ok)} "
            f"manager: { ({k: stats[k] for k in counts}) } {dict(stats['by_class'])}"
        )

    # -- operations ----------------------------------------------------------

    async def op_scatter(self) -> None:
        key = self.new_key("s")
        value = self.rng.randbytes(self.rng.choice([1_000, 50_000, 500_000, 2_000_000]))
        broadcast = self.rng.random() < 0.25
        workers = None
        running = self.running()
        if running and self.rng.random() < 0.3:
            workers = self.rng.sample(
                running, self.rng.randint(1, min(3, len(running)))
            )
        self.note(
            f"scatter {key} size={len(value)} broadcast={broadcast} workers={workers}"
        )
        before = {ws.address for ws in self.s.running}
        start = time.monotonic()
        try:
            futs = await asyncio.wait_for(
                self.c.scatter({key: value}, broadcast=broadcast, workers=workers), HUNG
            )
        except asyncio.TimeoutError:
            self.fail(f"scatter {key} broadcast={broadcast} hung")
            return
        except Exception as e:  # a chosen worker left meanwhile
            self.note(f"  scatter raised {e!r}")
            return
        elapsed = time.monotonic() - start
        if elapsed > 10 + 3 * self.max_delay():
            self.fail(f"scatter {key} broadcast={broadcast} took {elapsed:.1f}s")
        self.held[key] = Held(futs[key], value, frozenset({key}))
        if broadcast:
            self.targets[key] = ("all", frozenset(workers) if workers else None)
            self.check_returned(
                "scatter(broadcast=True)", [key], "all", workers, before
            )

    async def op_compute(self) -> None:
        c, rng = self.c, self.rng
        pool = self.bytes_held()
        kind = (
            rng.choice(["fresh", "concat", "head", "slow", "fan-in"])
            if pool
            else "fresh"
        )
        if kind == "fresh":
            key = self.new_key("f")
            n, seed = rng.choice([1000, 100_000, 1_000_000]), rng.randint(0, 1000)
            fut = c.submit(workload.make_bytes, n, seed, key=key)
            held = Held(fut, workload.make_bytes(n, seed), frozenset())
        elif kind == "concat":
            a, b = rng.choice(pool), rng.choice(pool)
            key = self.new_key("cat")
            fut = c.submit(workload.concat, a.fut, b.fut, key=key)
            held = Held(
                fut, workload.concat(a.expected, b.expected), a.lineage | b.lineage
            )
        elif kind == "head":
            a = rng.choice(pool)
            n = rng.randint(0, 200_000)
            key = self.new_key("head")
            fut = c.submit(workload.head, a.fut, n, key=key)
            held = Held(fut, a.expected[:n], a.lineage)
        elif kind == "slow":
            a = rng.choice(pool)
            key = self.new_key("slow")
            fut = c.submit(workload.slow_len, a.fut, rng.uniform(0.01, 0.3), key=key)
            held = Held(fut, len(a.expected), a.lineage)
        else:  # a small graph: several heads, concatenated
            parts, expected, lineage = [], b"", frozenset()
            for src in [rng.choice(pool) for _ in range(rng.randint(2, 4))]:
                n = rng.randint(1, 50_000)
                parts.append(
                    c.submit(workload.head, src.fut, n, key=self.new_key("part"))
                )
                expected = workload.concat(expected, src.expected[:n])
                lineage |= src.lineage
            fut = parts[0]
            for part in parts[1:]:
                fut = c.submit(workload.concat, fut, part, key=self.new_key("acc"))
            key = fut.key
            held = Held(fut, expected, lineage)
        self.held[key] = held
        self.note(f"compute {kind} -> {key}")

    async def op_replicate(self) -> None:
        pool = self.checkable()
        if not pool:
            return
        items = self.rng.sample(pool, min(len(pool), self.rng.randint(1, 3)))
        n = self.rng.choice([1, 2, 2, 3, 3, "all"])
        workers = None
        running = self.running()
        if len(running) >= 2 and self.rng.random() < 0.15:
            workers = self.rng.sample(running, self.rng.randint(1, len(running)))
        keys = [k for k, _ in items]
        self.note(f"ReplicationClient.replicate {keys} n={n} workers={workers}")
        try:
            await asyncio.wait_for(
                self.rep.replicate([h.fut for _, h in items], n, workers=workers), HUNG
            )
        except asyncio.TimeoutError:
            self.fail("ReplicationClient.replicate hung")
            return
        except Exception as e:  # a chosen worker left meanwhile
            self.note(f"  replicate raised {e!r}")
            return
        for key in keys:
            if n == 1:
                self.targets.pop(key, None)
            else:
                self.targets[key] = (n, frozenset(workers) if workers else None)

    async def op_client_replicate(self) -> None:
        pool = self.checkable()
        if not pool or not self.running():
            return
        items = self.rng.sample(pool, min(len(pool), self.rng.randint(1, 2)))
        keys = [k for k, _ in items]
        n = self.rng.choice([2, 3])
        self.note(f"Client.replicate {keys} n={n}")
        before = {ws.address for ws in self.s.running}
        start = time.monotonic()
        try:
            await asyncio.wait_for(
                self.c.replicate([h.fut for _, h in items], n=n), HUNG
            )
        except asyncio.TimeoutError:
            self.fail(f"Client.replicate {keys} hung")
            return
        except Exception as e:
            self.note(f"  Client.replicate raised {e!r}")
            return
        elapsed = time.monotonic() - start
        if elapsed > 15 + 3 * self.max_delay():
            self.fail(f"Client.replicate took {elapsed:.1f}s")
        for key in keys:
            self.targets[key] = (n, None)
        self.check_returned("Client.replicate", keys, n, None, before)

    async def op_unreplicate(self) -> None:
        if not self.targets:
            return
        key = self.rng.choice(sorted(self.targets))
        self.note(f"unreplicate {key}")
        await self.rep.unreplicate(self.held[key].fut)
        del self.targets[key]

    async def op_release(self) -> None:
        if not self.held:
            return
        keys = self.rng.sample(
            sorted(self.held), min(len(self.held), self.rng.randint(1, 3))
        )
        self.note(f"release {keys}")
        self.released.update(keys)
        for key in keys:
            del self.held[key]
            self.targets.pop(key, None)

    async def set_status(self, addr: str, status: Status) -> None:
        h = self.handles.get(addr)
        if isinstance(h, Nanny):
            await self.c.run(workload.set_status, status.name, workers=[addr])
        elif h is not None:
            h.status = status

    async def op_pause(self) -> None:
        running = [a for a in self.running() if a in self.handles]
        if len(running) < MIN_RUNNING:
            return
        addr = self.rng.choice(running)
        self.note(f"pause {addr}")
        await self.set_status(addr, Status.paused)

    async def op_resume(self) -> None:
        paused = [
            ws.address
            for ws in self.s.workers.values()
            if ws.status == Status.paused and ws.address in self.handles
        ]
        if paused:
            addr = self.rng.choice(paused)
            self.note(f"resume {addr}")
            await self.set_status(addr, Status.running)

    async def retire(self, addrs: list[str], remove: bool, close: bool) -> None:
        self.retiring.update(addrs)
        start = time.monotonic()
        try:
            out = await self.c.retire_workers(
                workers=addrs, close_workers=close, remove=remove
            )
        except Exception as e:
            self.fail(f"retire_workers({addrs}) raised {e!r}")
            out = {}
        finally:
            self.retiring.subtract(addrs)
            self.retiring = +self.retiring  # drop the zeros
        elapsed = time.monotonic() - start
        self.note(f"  retired {sorted(out)} of {addrs} in {elapsed:.2f}s")
        if elapsed > RETIRE_TIMEOUT + MARGIN:
            self.fail(f"retire_workers({addrs}, remove={remove}) took {elapsed:.1f}s")

    async def op_retire(self) -> None:
        """One worker, two at once (in one call or two), the same one twice at once,
        or one kept in the cluster (remove=False)
        """
        candidates = [a for a in self.s.workers if a not in self.retiring]
        running = self.running()
        if not candidates or len(running) < MIN_RUNNING:
            return
        mode = self.rng.choice(["one", "one", "two", "same", "keep"])
        if mode == "two" and (len(candidates) < 2 or len(running) < MIN_RUNNING + 1):
            mode = "one"
        addrs = self.rng.sample(candidates, 2 if mode == "two" else 1)
        remove = mode != "keep"
        close = remove or self.rng.random() < 0.5
        self.note(f"retire {mode} {addrs} remove={remove} close={close}")
        if mode == "same":
            calls = [addrs, addrs]
        elif mode == "two" and self.rng.random() < 0.5:
            calls = [[a] for a in addrs]
        else:
            calls = [addrs]
        for call in calls:
            self.retire_tasks.append(
                asyncio.create_task(self.retire(call, remove, close))
            )
        await asyncio.sleep(0)

    async def op_close_gracefully(self) -> None:
        """A retirement started by the worker. Closes the worker whatever its
        outcome: see :meth:`not_retired`
        """
        if not self.stable():
            return
        running = [a for a in self.running() if a in self.handles]
        if len(running) < MIN_RUNNING:
            return
        addr = self.rng.choice(running)
        if self.s.workers[addr].actors:
            return  # can't be retired, and closes slowly
        self.note(f"close_gracefully {addr}")
        self.closing_gracefully.add(addr)
        worker = self.handles[addr]

        async def close() -> None:
            self.retiring[addr] += 1
            start = time.monotonic()
            try:
                await worker.close_gracefully()
            finally:
                self.retiring[addr] -= 1
                self.retiring = +self.retiring
            elapsed = time.monotonic() - start
            self.note(f"  close_gracefully {addr} done in {elapsed:.2f}s")
            if elapsed > RETIRE_TIMEOUT + MARGIN + 5:
                self.fail(f"close_gracefully({addr}) took {elapsed:.1f}s")

        self.retire_tasks.append(asyncio.create_task(close()))
        await asyncio.sleep(0)

    async def op_add_worker(self) -> None:
        if len(self.s.workers) >= MAX_WORKERS:
            return
        cls = Nanny if self.nanny else SlowGatherDep
        h = cls(self.s.address, nthreads=1, memory_limit=MEMORY_LIMIT)
        await h
        self._handles.append(h)
        self.note(
            f"add worker {h.worker_address if isinstance(h, Nanny) else h.address}"
        )

    async def op_kill(self) -> None:
        if not self.stable():
            return  # the data it loses would be ambiguous
        alive = self.alive()
        if len(self.running()) < MIN_RUNNING or not alive:
            return
        addr = self.rng.choice(sorted(alive))
        self.expect_loss(addr, "kill")
        h = alive[addr]
        await h.close()
        self._handles.remove(h)

    async def op_slow(self) -> None:
        """Make a worker's fetches slow, or fast again"""
        workers = [h for h in self.alive().values() if isinstance(h, SlowGatherDep)]
        if workers:
            h = self.rng.choice(workers)
            h.gather_delay = self.rng.choice([0.0, 0.0, 0.5, 2.0, 6.0])
            self.note(f"slow {h.address} gather_delay={h.gather_delay}")

    async def op_rescatter(self) -> None:
        """Scatter new data under the name of a released key: a new TaskState for
        an old key, which policies may still know
        """
        old = [
            k
            for k in self.released
            if k not in self.held and k[:1] == "s" and k[1:].isdigit()
        ]
        if not old:
            return
        key = self.rng.choice(sorted(old))
        if key in self.s.tasks:
            return  # not forgotten yet
        value = self.rng.randbytes(self.rng.choice([1_000, 300_000]))
        broadcast = self.rng.random() < 0.3
        self.note(f"rescatter {key} broadcast={broadcast}")
        try:
            futs = await asyncio.wait_for(
                self.c.scatter({key: value}, broadcast=broadcast), HUNG
            )
        except asyncio.TimeoutError:
            self.fail(f"rescatter {key} hung")
            return
        self.held[key] = Held(futs[key], value, frozenset({key}))
        self.released.discard(key)
        if broadcast:
            self.targets[key] = ("all", None)

    async def op_bulk(self) -> None:
        """Many small keys at once: cycles with hundreds of suggestions per policy,
        so that time slices end in the middle of a policy
        """
        group = self.new_key("b")
        data = {
            f"{group}-{i}": self.rng.randbytes(self.rng.randint(10, 3000))
            for i in range(self.rng.choice([70, 150, 300]))
        }
        broadcast = self.rng.random() < 0.3
        self.note(f"bulk scatter {group} x{len(data)} broadcast={broadcast}")
        before = {ws.address for ws in self.s.running}
        try:
            futs = await asyncio.wait_for(
                self.c.scatter(data, broadcast=broadcast), 2 * HUNG
            )
        except asyncio.TimeoutError:
            self.fail(f"bulk scatter {group} hung")
            return
        for key, value in data.items():
            self.held[key] = Held(futs[key], value, frozenset({key}))
        if broadcast:
            for key in data:
                self.targets[key] = ("all", None)
            self.check_returned(
                "bulk scatter(broadcast=True)", list(data), "all", None, before
            )
        elif self.rng.random() < 0.6:
            n = self.rng.choice([2, 3, "all"])
            self.note(f"  replicate bulk {group} n={n}")
            await self.rep.replicate(list(futs.values()), n)
            for key in data:
                self.targets[key] = (n, None)
        self.groups.append(list(data))

    async def op_bulk_release(self) -> None:
        if not self.groups:
            return
        keys = self.groups.pop(self.rng.randrange(len(self.groups)))
        mode = self.rng.choice(["release", "unreplicate"])
        self.note(f"bulk {mode} {keys[0]}.. x{len(keys)}")
        if mode == "unreplicate":
            await self.rep.unreplicate(
                [self.held[k].fut for k in keys if k in self.held]
            )
            self.groups.append(keys)
        for key in keys:
            self.targets.pop(key, None)
            if mode == "release":
                self.held.pop(key, None)

    async def op_pinned(self) -> None:
        """A long task that prefers one worker and depends on held data: dependents
        processing on workers that then pause or retire
        """
        pool = self.bytes_held()
        running = self.running()
        if not pool or not running:
            return
        a = self.rng.choice(pool)
        addr = self.rng.choice(running)
        key = self.new_key("pin")
        fut = self.c.submit(
            workload.slow_len,
            a.fut,
            self.rng.uniform(0.3, 2.0),
            key=key,
            workers=[addr],
            allow_other_workers=True,
        )
        self.held[key] = Held(fut, len(a.expected), a.lineage)
        self.note(f"pinned {key} on {addr}")

    async def op_actor(self) -> None:
        """A worker holding an actor can't be retired"""
        running = self.running()
        if len(self.actors) >= 2 or not running:
            return
        addr = self.rng.choice(running)
        key = self.new_key("actor")
        self.actors.append(
            self.c.submit(workload.Counter, key=key, actor=True, workers=[addr])
        )
        self.note(f"actor {key} on {addr}")

    async def op_toggle_amm(self) -> None:
        if self.manager.running:
            self.note("amm.stop()")
            await self.c.amm.stop()
        else:
            self.note("amm.start()")
            await self.c.amm.start()

    async def op_toggle_rebalance(self) -> None:
        if any(p["class"].endswith("Rebalance") for p in await self.amm.policies()):
            self.note("remove_policy Rebalance")
            await self.amm.remove_policy("Rebalance")
        else:
            self.note("add_policy Rebalance")
            await self.amm.add_policy("amm.Rebalance")

    async def op_run_once(self) -> None:
        """A cycle on top of the periodic ones, maybe while one is suspended"""
        if self.rng.random() < 0.5:
            self.note("manager.run_once()")
            self.manager.run_once()
        else:
            self.note("client.amm.run_once()")
            await self.c.amm.run_once()

    async def op_sleep(self) -> None:
        delay = self.rng.uniform(0.05, 0.3)
        self.note(f"sleep {delay:.2f}")
        await asyncio.sleep(delay)


def sabotage(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Break the manager on purpose (AMM_STRESS_SABOTAGE): the run must fail"""
    if kind == "retire":
        # retirements end at once: workers close with the only copies of keys
        monkeypatch.setattr(RetireWorker, "done", lambda self: True)
    elif kind == "desired":
        # nothing protects the replicas ReplicateN made: ReduceReplicas drops them
        monkeypatch.setattr(ReplicateN, "desired_replicas", lambda self, ts: 1)
    elif kind:
        pytest.fail(f"AMM_STRESS_SABOTAGE={kind!r}: expected retire or desired")


async def run_stress(
    c: Client, s: Scheduler, workers: tuple, seed: int, tmp_path: Path, name: str
) -> None:
    """One seed. Its trace goes to ``tmp_path``; a failure shows the first failing
    step and what failed
    """
    stress = Stress(c, s, list(workers), seed)
    try:
        await stress.run(STEPS)
    finally:
        await stress.close()
        trace = tmp_path / f"{name}-{seed}.txt"
        trace.write_text("\n".join(stress.trace) + "\n")
    print(stress.trace[-1])
    if stress.failures:
        # what the first failing step did, then the first failures
        step = stress.failures[0].split(" FAIL ")[0]
        did = [
            line
            for line in stress.trace
            if line.startswith(step) and " FAIL " not in line
        ]
        pytest.fail(
            "\n".join(did[:5] + stress.failures[:10])
            + f"\n({len(stress.failures)} failures; every step is in {trace})",
            pytrace=False,
        )


@pytest.mark.slow
@opt_in
@pytest.mark.timeout(SEED_TIMEOUT + 60)
@pytest.mark.parametrize("seed", SEEDS)
@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 5,
    Worker=SlowGatherDep,
    worker_kwargs={"memory_limit": MEMORY_LIMIT},
    config=stress_config(),
    timeout=SEED_TIMEOUT,
)
async def test_stress(c, s, *workers, seed, tmp_path, monkeypatch):
    """In-process workers: some fetch slowly; closing one is killing it"""
    sabotage(monkeypatch, SABOTAGE)
    await run_stress(c, s, workers, seed, tmp_path, "workers")


@pytest.mark.slow
@opt_in
@pytest.mark.timeout(SEED_TIMEOUT + 60)
@pytest.mark.parametrize("seed", SEEDS)
@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 4,
    Worker=Nanny,
    worker_kwargs={"memory_limit": MEMORY_LIMIT},
    config=stress_config(nanny=True),
    timeout=SEED_TIMEOUT,
)
async def test_stress_nanny(c, s, *workers, seed, tmp_path, monkeypatch):
    """Worker processes: killing one ends its process, and a worker paused for a
    second is restarted (amm.paused-restart) once its data has moved
    """
    sabotage(monkeypatch, SABOTAGE)
    await run_stress(c, s, workers, seed, tmp_path, "nannies")


@gen_cluster(
    client=True, nthreads=[("", 1)] * 3, Worker=SlowGatherDep, config=stress_config()
)
async def test_checks_catch_lost_data(c, s, a, b, w, monkeypatch):
    """The checks can fail: with retirements that end at once (sabotage "retire"),
    retiring the only holder of a key loses it, and the check after the step says
    so. In the default run, so that the opt-in harness can't rot unnoticed.
    """
    stress = Stress(c, s, [a, b, w], seed=0)
    try:
        x = await c.scatter({"x": b"x" * 1000}, workers=[a.address])
        stress.held["x"] = Held(x["x"], b"x" * 1000, frozenset({"x"}))
        await stress.check()
        assert not stress.failures

        sabotage(monkeypatch, "retire")
        await c.retire_workers([a.address])
        await stress.check()
    finally:
        await stress.close()
    assert len(stress.failures) == 1
    assert "gather x " in stress.failures[0]
