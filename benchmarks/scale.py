"""Cost of AMM cycles at scale: this project vs distributed's built-in manager.

Each scenario builds a synthetic scheduler state (a real, unstarted Scheduler with
real WorkerState / TaskState objects, see amm.testing) and runs, on an identical
fresh copy for each side:

- one cycle, timed (the best of ``--repeat`` runs on fresh copies, since timings
  on a shared machine vary by tens of percent from one run to the next), with
  the garbage collector paused (the algorithms alone) and again with it on (as in
  a scheduler, where the collections a cycle's allocations set off are its cost);
- cycles to convergence, applying what each cycle sent as if every transfer
  succeeded: number of cycles, the longest time the event loop was held in one go
  (for this project, the longest time slice), total time;
- for this project, the same convergence with no time slice and no per-cycle
  bound ("unbounded"): the total of the bounded run over it is what slicing the
  work and spreading it over cycles costs;
- peak Python memory of one cycle (tracemalloc, in a separate run so that tracing
  does not distort the timings).

Usage::

    python benchmarks/scale.py            # W in {10, 100, 1000}, K in {10k, 100k, 1M}
    python benchmarks/scale.py --quick    # W in {10, 100}, K = 10k
    python benchmarks/scale.py --workers 1000 --keys 100000 --scenario retire_one

Results go to benchmarks/results/scale.{json,md} and scale_vs_*.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import dask.config
from distributed.active_memory_manager import ActiveMemoryManagerExtension
from distributed.active_memory_manager import ActiveMemoryManagerPolicy as DistPolicy
from distributed.active_memory_manager import ReduceReplicas as DistReduceReplicas
from distributed.active_memory_manager import RetireWorker as DistRetireWorker
from distributed.active_memory_manager import Suggestion
from distributed.core import Status

import amm
from amm.testing import Recorder, add_task, add_worker, apply_cycle, new_scheduler, set_status

RESULTS = os.path.join(os.path.dirname(__file__), "results")
#: Give up converging after this many cycles
MAX_CYCLES = 500
#: Consecutive cycles that send nothing after which a scenario has converged
IDLE_CYCLES = 4
#: Skip the convergence run of a side whose single cycle took longer than this
MAX_CONVERGE_CYCLE_SECONDS = 30.0
#: Time the first cycle only once if it takes longer than this
MAX_REPEATED_CYCLE_SECONDS = 5.0


# -- states --------------------------------------------------------------------


@dataclass
class State:
    scheduler: Any
    recorder: Recorder
    workers: list[Any]
    keys: list[Any]


def build(nworkers: int, nkeys: int, layout: str, seed: int = 0) -> State:
    """Keys of 1-8 MiB spread over workers per ``layout``:

    - ``one``: each key on one random worker
    - ``two``: each key on two random workers (one superfluous replica)
    - ``skewed``: 10% of the workers hold half of the data
    """
    rng = random.Random(seed)
    s = new_scheduler()
    recorder = Recorder(s)
    # Rebalance thresholds are fractions of the memory limit: size it so that the
    # cluster is 1/8 full on average, the hot workers well above sender-min
    memory_limit = 8 * nkeys * 4.5 * 2**20 / nworkers if layout == "skewed" else 2**40
    wss = [
        add_worker(s, f"tcp://10.0.{i // 250}.{i % 250}:1", memory_limit=int(memory_limit))
        for i in range(nworkers)
    ]
    hot = wss[: max(1, nworkers // 10)]
    tss = []
    for i in range(nkeys):
        nbytes = rng.randint(1, 8) * 2**20
        if layout == "one":
            holders = [rng.choice(wss)]
        elif layout == "two":
            holders = rng.sample(wss, 2) if nworkers > 1 else wss
        elif layout == "skewed":
            holders = [rng.choice(hot) if i % 2 == 0 else rng.choice(wss)]
        else:
            raise ValueError(layout)
        tss.append(add_task(s, f"k-{i}", nbytes, holders))
    return State(s, recorder, wss, tss)


# -- scenarios -----------------------------------------------------------------


class DocsReplicate(DistPolicy):
    """A replicate-N policy written the documented way for distributed's manager:
    one replicate suggestion per missing replica, the manager picks the worker.
    """

    def __init__(self, keys: list[Any], n: int | str):
        self.keys = keys
        self.n = n

    def run(self):
        nrunning = len(self.manager.scheduler.running)
        for ts in self.keys:
            want = nrunning if self.n == "all" else self.n
            entry = self.manager.pending.get(ts)
            npending = len(entry[0]) if entry else 0
            for _ in range(want - len(ts.who_has) - npending):
                yield Suggestion("replicate", ts)


@dataclass
class Scenario:
    name: str
    layout: str
    #: keys used instead of K, if set (replicate to all)
    nkeys: int | None
    prepare: Callable[[State], None]
    ours: Callable[[State], list[Any]]
    theirs: Callable[[State], list[Any]]
    done: Callable[[State, list[Any]], bool]
    #: what the result is measured by, besides time
    quality: Callable[[State], dict[str, float]] = lambda state: {}
    #: called once the manager (and so policy.manager) exists
    setup: Callable[[State, list[Any]], None] = lambda state, policies: None
    #: our policies with their per-cycle bounds lifted, if they have any
    ours_unbounded: Callable[[State], list[Any]] | None = None


def _retiring(fraction: float | None) -> Callable[[State], list[Any]]:
    def pick(state: State) -> list[Any]:
        n = 1 if fraction is None else max(1, int(len(state.workers) * fraction))
        return state.workers[-n:]

    return pick


def _prepare_retire(fraction: float | None) -> Callable[[State], None]:
    def prepare(state: State) -> None:
        for ws in _retiring(fraction)(state):
            set_status(state.scheduler, ws, Status.closing_gracefully)

    return prepare


def _retire_policies(cls: type, fraction: float | None) -> Callable[[State], list[Any]]:
    return lambda state: [cls(ws.address) for ws in _retiring(fraction)(state)]


def _our_retire_worker() -> type:
    return getattr(amm, "RetireWorker", DistRetireWorker)


def _our_replicate(n: int | str) -> Callable[[State], list[Any]]:
    return lambda state: [amm.ReplicateN()]


def _our_replicate_unbounded(n: int | str) -> Callable[[State], list[Any]]:
    return lambda state: [amm.ReplicateN(max_per_worker={"keys": None, "bytes": None})]


def _track(n: int | str) -> Callable[[State, list[Any]], None]:
    """Once the manager exists: the keys ReplicateN keeps at n"""

    def track(state: State, policies: list[Any]) -> None:
        if isinstance(policies[0], amm.ReplicateN):
            policies[0].set([ts.key for ts in state.keys], n)

    return track


def _replicated(n: int | str) -> Callable[[State, list[Any]], bool]:
    def done(state: State, policies: list[Any]) -> bool:
        want = len(state.scheduler.running) if n == "all" else n
        return all(len(ts.who_has) >= want for ts in state.keys)

    return done


def _max_over_mean(state: State) -> dict[str, float]:
    mem = [ws.nbytes for ws in state.workers]
    mean = sum(mem) / len(mem)
    return {"max_over_mean": max(mem) / mean if mean else 1.0}


#: Both rebalancers are asked for the same balance: within 4% of the memory limit
#: around the mean (the default, 10%, is 0.8x the mean with these limits)
REBALANCE_GAP = 0.04
#: Transfers complete at once here, so the bound on bytes a worker sends per cycle
#: (256 MiB by default, there to spare the network) would only count cycles; it is
#: lifted so that the cost of deciding, not of waiting, is measured
REBALANCE_BYTES_PER_CYCLE = "1 TiB"


def _our_rebalance() -> Callable[[State], list[Any]]:
    return lambda state: [
        amm.Rebalance(
            sender_recipient_gap=REBALANCE_GAP,
            max_bytes_per_cycle=REBALANCE_BYTES_PER_CYCLE,
        )
    ]


def _reduce_replicas(name: str, layout: str) -> Scenario:
    """ReduceReplicas on both sides, done once no key has a spare replica"""
    return Scenario(
        name,
        layout,
        None,
        lambda state: None,
        lambda state: [amm.ReduceReplicas()],
        lambda state: [DistReduceReplicas()],
        lambda state, policies: not state.scheduler.replicated_tasks,
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        # A cycle with nothing to do (no key has a spare replica): what every
        # cycle costs the scheduler, every interval, before any suggestion; for
        # this project also the floor of each eager pass
        _reduce_replicas("idle_cycle", "one"),
        _reduce_replicas("reduce_replicas", "two"),
        Scenario(
            "retire_one",
            "one",
            None,
            _prepare_retire(None),
            lambda state: _retire_policies(_our_retire_worker(), None)(state),
            _retire_policies(DistRetireWorker, None),
            lambda state, policies: all(p.done() for p in policies),
        ),
        Scenario(
            "retire_10pct",
            "one",
            None,
            _prepare_retire(0.1),
            lambda state: _retire_policies(_our_retire_worker(), 0.1)(state),
            _retire_policies(DistRetireWorker, 0.1),
            lambda state, policies: all(p.done() for p in policies),
        ),
        Scenario(
            "replicate_3",
            "one",
            None,
            lambda state: None,
            _our_replicate(3),
            lambda state: [DocsReplicate(state.keys, 3)],
            _replicated(3),
            setup=_track(3),
            ours_unbounded=_our_replicate_unbounded(3),
        ),
        Scenario(
            "replicate_all_1000",
            "one",
            1000,
            lambda state: None,
            _our_replicate("all"),
            lambda state: [DocsReplicate(state.keys, "all")],
            _replicated("all"),
            setup=_track("all"),
            ours_unbounded=_our_replicate_unbounded("all"),
        ),
        Scenario(
            "rebalance_skewed",
            "skewed",
            None,
            lambda state: None,
            _our_rebalance(),
            lambda state: [],  # distributed's rebalance() planner, see run_theirs
            lambda state, policies: False,
            _max_over_mean,
        ),
    ]
}


# -- running -------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    side: str
    workers: int
    keys: int
    one_cycle_seconds: float = math.nan
    cycles: int = 0
    converged: bool = False
    longest_slice_seconds: float = math.nan
    total_seconds: float = math.nan
    peak_memory_mib: float = math.nan
    suggestions_first_cycle: int = 0
    #: every timing of the first cycle (on fresh copies of the state); the
    #: reported one is the fastest, the least disturbed by the machine
    one_cycle_runs: list[float] = field(default_factory=list)
    #: the same with the garbage collector on, as in a scheduler
    one_cycle_gc_on_seconds: float = math.nan
    one_cycle_gc_on_runs: list[float] = field(default_factory=list)
    #: ours only: the same policies with no time slice and no per-cycle bound,
    #: run to convergence: what the slicing and the bounds cost in total
    unbounded_cycles: int = 0
    unbounded_seconds: float = math.nan
    quality: dict[str, float] = field(default_factory=dict)
    note: str = ""


def make_manager(side: str, state: State, policies: list[Any]) -> Any:
    if side == "ours":
        return amm.ActiveMemoryManager(
            state.scheduler, policies, register=False, start=False, measure="managed"
        )
    return ActiveMemoryManagerExtension(
        state.scheduler, set(policies), register=False, start=False, measure="managed"
    )


def timed_cycle(manager: Any, gc_on: bool = False) -> tuple[float, float]:
    """(total seconds, longest time holding the event loop) of one cycle.

    By default the garbage collector is paused while timing, which compares the
    algorithms alone: converging, a full collection of a state with millions of
    objects would land in whichever cycle happens to trigger it. ``gc_on`` times
    the cycle as a scheduler runs it, with the collector on from a freshly
    collected heap: the collections a cycle's own allocations trigger count as
    its cost.
    """
    gc.collect()
    if gc_on:
        return _timed_cycle(manager)
    gc.disable()
    try:
        return _timed_cycle(manager)
    finally:
        gc.enable()


def _timed_cycle(manager: Any) -> tuple[float, float]:
    if isinstance(manager, amm.ActiveMemoryManager):
        before = manager.stats.max_slice_seconds
        manager.stats.max_slice_seconds = 0.0
        t0 = time.perf_counter()
        manager.run_once()
        elapsed = time.perf_counter() - t0
        longest = manager.stats.max_slice_seconds
        manager.stats.max_slice_seconds = max(before, longest)
        return elapsed, longest
    t0 = time.perf_counter()
    manager.run_once()
    elapsed = time.perf_counter() - t0
    return elapsed, elapsed


def fresh(scn: Scenario, side: str, nworkers: int, nkeys: int, unbounded: bool = False):
    """A new state, its policies and a manager, ready for the first cycle"""
    state = build(nworkers, nkeys, scn.layout)
    scn.prepare(state)
    factory = scn.ours if side == "ours" else scn.theirs
    if unbounded and scn.ours_unbounded is not None:
        factory = scn.ours_unbounded
    policies = factory(state)
    manager = make_manager(side, state, policies)
    if unbounded:
        manager.time_slice = math.inf
    scn.setup(state, policies)
    return state, policies, manager


def converge(scn: Scenario, state: State, policies: list[Any], manager: Any) -> dict[str, Any]:
    """Cycles until the scenario is done or nothing is sent for IDLE_CYCLES cycles"""
    out: dict[str, Any] = {"first": math.nan, "sent_first": 0, "note": ""}
    total = 0.0
    longest = 0.0
    idle = 0
    for cycle in range(1, MAX_CYCLES + 1):
        elapsed, slice_ = timed_cycle(manager)
        sent = state.recorder.pop()
        if cycle == 1:
            out["first"] = elapsed
            out["sent_first"] = sum(len(keys) for _, _, keys in sent)
        total += elapsed
        longest = max(longest, slice_)
        apply_cycle(state.scheduler, sent)
        out["cycles"] = cycle
        idle = 0 if sent else idle + 1
        # Rebalance pauses while cooldowns run out: only several quiet cycles in a
        # row mean it has nothing left to do
        if scn.done(state, policies) or idle >= IDLE_CYCLES:
            out["converged"] = scn.done(state, policies) or scn.name == "rebalance_skewed"
            out["cycles"] = cycle - idle
            break
        if elapsed > MAX_CONVERGE_CYCLE_SECONDS:
            out["note"] = f"stopped after {cycle} cycles of > {MAX_CONVERGE_CYCLE_SECONDS}s"
            break
    out.setdefault("converged", False)
    out["longest"] = longest
    out["total"] = total
    return out


def run_side(
    scn: Scenario,
    side: str,
    nworkers: int,
    nkeys: int,
    memory: bool = True,
    repeat: int = 1,
) -> Run:
    result = Run(scn.name, side, nworkers, nkeys)
    if scn.name == "rebalance_skewed" and side == "theirs":
        return run_rebalance_planner(scn, nworkers, nkeys, result, memory)

    if memory:
        # peak memory of one cycle, on its own copy of the state
        state, policies, manager = fresh(scn, side, nworkers, nkeys)
        gc.collect()
        tracemalloc.start()
        manager.run_once()
        result.peak_memory_mib = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        del state, manager, policies
        gc.collect()

    state, policies, manager = fresh(scn, side, nworkers, nkeys)
    run = converge(scn, state, policies, manager)
    result.one_cycle_runs.append(run["first"])
    result.suggestions_first_cycle = run["sent_first"]
    result.cycles = run["cycles"]
    result.converged = run["converged"]
    result.longest_slice_seconds = run["longest"]
    result.total_seconds = run["total"]
    result.note = run["note"]
    result.quality = scn.quality(state)
    del state, manager, policies

    # Timings on this machine vary by tens of percent from one run to the next:
    # time the first cycle again on fresh copies, unless it is long enough that
    # the variation does not matter
    for _ in range(repeat - 1):
        if run["first"] > MAX_REPEATED_CYCLE_SECONDS:
            break
        state, policies, manager = fresh(scn, side, nworkers, nkeys)
        result.one_cycle_runs.append(timed_cycle(manager)[0])
        del state, manager, policies
    result.one_cycle_seconds = min(result.one_cycle_runs)
    for i in range(repeat):
        if i and run["first"] > MAX_REPEATED_CYCLE_SECONDS:
            break
        state, policies, manager = fresh(scn, side, nworkers, nkeys)
        result.one_cycle_gc_on_runs.append(timed_cycle(manager, gc_on=True)[0])
        del state, manager, policies
    result.one_cycle_gc_on_seconds = min(result.one_cycle_gc_on_runs)

    if side == "ours":
        state, policies, manager = fresh(scn, side, nworkers, nkeys, unbounded=True)
        unbounded = converge(scn, state, policies, manager)
        result.unbounded_cycles = unbounded["cycles"]
        result.unbounded_seconds = unbounded["total"]
    return result


def run_rebalance_planner(
    scn: Scenario, nworkers: int, nkeys: int, result: Run, memory: bool
) -> Run:
    """distributed's rebalance(): its planner, then the moves applied at once"""
    state = build(nworkers, nkeys, scn.layout)
    s = state.scheduler
    dask.config.set(
        {"distributed.worker.memory.rebalance.sender-recipient-gap": REBALANCE_GAP}
    )
    if memory:
        gc.collect()
        tracemalloc.start()
        s._rebalance_find_msgs(None, s.workers.values())
        result.peak_memory_mib = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    # the planner reads process memory (ws.memory.process), which amm.testing keeps
    # equal to managed memory
    gc.collect()
    t0 = time.perf_counter()
    s._rebalance_find_msgs(None, s.workers.values())
    result.one_cycle_gc_on_seconds = time.perf_counter() - t0
    result.one_cycle_gc_on_runs.append(result.one_cycle_gc_on_seconds)
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    msgs = s._rebalance_find_msgs(None, s.workers.values())
    result.one_cycle_seconds = result.total_seconds = time.perf_counter() - t0
    gc.enable()
    result.longest_slice_seconds = result.one_cycle_seconds
    result.suggestions_first_cycle = len(msgs)
    for snd, rec, ts in msgs:
        s.add_replica(ts, rec)
        s.remove_replica(ts, snd)
    for ws in state.workers:
        ws.metrics["memory"] = ws.nbytes
    result.cycles = 1
    result.converged = True
    result.quality = scn.quality(state)
    result.note = "stop-the-world planner, applied in one go"
    return result


# -- reporting -----------------------------------------------------------------


def ratio(theirs: float, ours: float) -> float:
    return theirs / ours if ours and not math.isnan(ours) and not math.isnan(theirs) else math.nan


def markdown(runs: list[Run]) -> str:
    lines = [
        "| scenario | W | K | side | one cycle | speed-up | one cycle, gc on "
        "| speed-up, gc on | cycles | longest slice "
        "| total | vs unbounded | peak MiB | quality | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.scenario, r.workers, r.keys, r.side): r for r in runs}
    for r in runs:
        other = by_key.get((r.scenario, r.workers, r.keys, "theirs"))
        mine = other and r.side == "ours"
        speedup = ratio(other.one_cycle_seconds, r.one_cycle_seconds) if mine else math.nan
        speedup_gc = (
            ratio(other.one_cycle_gc_on_seconds, r.one_cycle_gc_on_seconds)
            if mine
            else math.nan
        )
        quality = ", ".join(f"{k} {v:.2f}" for k, v in r.quality.items())
        lines.append(
            f"| {r.scenario} | {r.workers} | {r.keys} | {r.side} "
            f"| {_t(r.one_cycle_seconds)} | {_x(speedup)} "
            f"| {_t(r.one_cycle_gc_on_seconds)} | {_x(speedup_gc)} "
            f"| {r.cycles}{'' if r.converged else ' (not converged)'} "
            f"| {_t(r.longest_slice_seconds)} | {_t(r.total_seconds)} "
            f"| {_vs_unbounded(r)} "
            f"| {r.peak_memory_mib:.1f} | {quality} | {r.note} |"
        )
    return "\n".join(lines)


def _vs_unbounded(r: Run) -> str:
    if r.side != "ours" or math.isnan(r.unbounded_seconds) or not r.unbounded_seconds:
        return ""
    return f"{r.total_seconds / r.unbounded_seconds:.2f}x of {_t(r.unbounded_seconds)}"


def _x(speedup: float) -> str:
    return "" if math.isnan(speedup) else f"{speedup:.1f}x"


def _t(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fit_growth(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Log-log slope of one-cycle time vs suggestions and vs W, per scenario and
    side: 1 means linear, 0 constant.
    """
    out: dict[str, dict[str, float]] = {}
    for scenario in sorted({r.scenario for r in runs}):
        for side in ("ours", "theirs"):
            pts = [r for r in runs if r.scenario == scenario and r.side == side and r.one_cycle_seconds > 0]
            fits = {}
            for name, xs in (
                ("vs_suggestions", [r.suggestions_first_cycle for r in pts]),
                ("vs_workers", [r.workers for r in pts]),
            ):
                sel = [(x, r.one_cycle_seconds) for x, r in zip(xs, pts) if x > 0]
                if name == "vs_workers":
                    # per suggestion, so that more work done is not counted as cost of W
                    sel = [
                        (r.workers, r.one_cycle_seconds / max(1, r.suggestions_first_cycle))
                        for r in pts
                    ]
                if len({x for x, _ in sel}) >= 2:
                    lx = [math.log(x) for x, _ in sel]
                    ly = [math.log(y) for _, y in sel]
                    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
                    den = sum((x - mx) ** 2 for x in lx)
                    fits[name] = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den if den else math.nan
            out[f"{scenario}/{side}"] = fits
    return out


def plot(runs: list[Run], path_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("workers", "keys"):
        fig, ax = plt.subplots(figsize=(8, 5))
        # a color per scenario, solid for this project and dashed for distributed
        for i, scenario in enumerate(sorted({r.scenario for r in runs})):
            for side, style in (("ours", "-o"), ("theirs", "--x")):
                pts = sorted(
                    (getattr(r, axis), r.one_cycle_seconds)
                    for r in runs
                    if r.scenario == scenario and r.side == side and not math.isnan(r.one_cycle_seconds)
                    and (axis == "workers" and r.keys == max(x.keys for x in runs) or axis == "keys" and r.workers == max(x.workers for x in runs))
                )
                if len(pts) >= 1:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{scenario} ({'amm' if side == 'ours' else 'distributed'})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("workers (W)" if axis == "workers" else "keys (K)")
        ax.set_ylabel("one cycle (s)")
        ax.set_title(f"AMM cycle cost vs {axis}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = f"{path_prefix}_vs_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="W in {10, 100}, K = 10k")
    parser.add_argument("--workers", type=int, nargs="*")
    parser.add_argument("--keys", type=int, nargs="*")
    parser.add_argument("--scenario", nargs="*", choices=sorted(SCENARIOS))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the tracemalloc pass"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="time the first cycle this many times (best kept), if under "
        f"{MAX_REPEATED_CYCLE_SECONDS:.0f}s",
    )
    args = parser.parse_args(argv)

    workers = args.workers or ([10, 100] if args.quick else [10, 100, 1000])
    keys = args.keys or ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    scenarios = args.scenario or list(SCENARIOS)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    runs = []
    for name in scenarios:
        scn = SCENARIOS[name]
        for k in ([scn.nkeys] if scn.nkeys else keys):
            for w in workers:
                for side in ("ours", "theirs"):
                    r = run_side(
                        scn, side, w, k, memory=not args.no_memory, repeat=args.repeat
                    )
                    runs.append(r)
                    print(
                        f"{name:<20} W={w:<5} K={k:<8} {side:<6} one={_t(r.one_cycle_seconds):>10} "
                        f"gc_on={_t(r.one_cycle_gc_on_seconds):>10} "
                        f"cycles={r.cycles:<4} slice={_t(r.longest_slice_seconds):>10} "
                        f"total={_t(r.total_seconds):>10} {_vs_unbounded(r)} "
                        f"mem={r.peak_memory_mib:.1f}MiB {r.quality} {r.note}",
                        flush=True,
                    )
    os.makedirs(args.out, exist_ok=True)
    report = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "runs": [asdict(r) for r in runs],
        "growth": fit_growth(runs),
    }
    prefix = os.path.join(
        args.out, ("scale_quick" if args.quick else "scale") + args.tag
    )
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(runs) + "\n")
    if not args.no_plot:
        report["plots"] = plot(runs, prefix)
    print(markdown(runs))
    print(json.dumps(report["growth"], indent=1))
    return report


if __name__ == "__main__":
    main()
