"""Time to retire a worker holding many keys: this project vs distributed's built-in
AMM, on real local clusters (worker processes), one after the other in the same run.

Each side gets a fresh ``LocalCluster`` of ``--workers`` single-threaded worker
processes with the default AMM settings of that side (started, 2s interval,
ReduceReplicas). One worker computes ``--keys`` blocks of random bytes
(``--total`` bytes overall, so nothing compresses), then
``client.retire_workers([that worker])`` is timed. Also measured:

- ``requested``: replicas the scheduler asked workers to acquire during the
  retirement (counted at ``Scheduler.request_acquire_replicas``); ideally equal to
  the number of keys. distributed asks again, at every cycle, for every key not yet
  arrived, and once the first recipients have grown some requests go to another
  worker: a second transfer of the same data;
- ``extra replicas``: copies beyond one per key right after the retirement;
- ``max loop lag``: the longest the scheduler's event loop (this process) was late
  to wake a 10ms sleeper during the retirement, i.e. how long the cluster stalled.

Usage::

    python benchmarks/retire.py            # 10k keys, 1 GiB total, 3 workers, 3 runs
    python benchmarks/retire.py --quick    # 2k keys, 100 MiB, 1 run (< 60s)

Results go to benchmarks/results/retire.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

from distributed import Client, wait

from amm.demo import process_cluster

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SIDES = ("distributed", "amm")


def make_block(i: int, size: int) -> bytes:
    """Incompressible, so transfers cost what they would with real data"""
    return os.urandom(size)


class LoopLag:
    """Longest delay of the event loop in waking a task sleeping 10ms"""

    def __init__(self) -> None:
        self.max = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.max = max(self.max, time.perf_counter() - t - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task
        self._task.cancel()


async def run_side(side: str, nworkers: int, nkeys: int, total: int) -> dict[str, Any]:
    size = total // nkeys
    t_start = time.perf_counter()
    scheduler_kwargs: dict[str, Any] = {}
    if side == "amm":
        scheduler_kwargs["preload"] = ["amm"]
    async with process_cluster(
        nworkers,
        memory_limit=max(4 * total, 2**30),
        asynchronous=True,
        scheduler_kwargs=scheduler_kwargs,
    ) as cluster:
        s = cluster.scheduler
        if side == "amm":
            from amm import ActiveMemoryManager
            from amm.retirement import Retirements

            # the plugin installed the manager and this project's retire_workers
            assert isinstance(s.extensions["amm"], ActiveMemoryManager)
            assert isinstance(s.retire_workers.__self__, Retirements)

        requested = 0
        request = s.request_acquire_replicas

        def counting_request(addr: str, keys: list, *, stimulus_id: str) -> None:
            nonlocal requested
            requested += len(keys)
            request(addr, keys, stimulus_id=stimulus_id)

        s.request_acquire_replicas = counting_request  # type: ignore[method-assign]

        async with Client(cluster, asynchronous=True) as client:
            t_data = time.perf_counter()
            victim = sorted(s.workers)[0]
            futures = client.map(
                make_block, range(nkeys), size=size, workers=[victim], pure=False
            )
            await wait(futures)
            assert all(s.tasks[f.key].who_has == {s.workers[victim]} for f in futures)

            t_retire = time.perf_counter()
            with LoopLag() as lag:
                t0 = time.perf_counter()
                out = await client.retire_workers([victim])
                elapsed = time.perf_counter() - t0
            assert victim in out, out
            assert victim not in s.workers
            lost = [f.key for f in futures if not s.tasks[f.key].who_has]
            assert not lost, f"{len(lost)} keys lost"
            replicas = sum(len(s.tasks[f.key].who_has) for f in futures)
            result = {
                "side": side,
                "seconds": elapsed,
                "requested": requested,
                "extra_replicas": replicas - nkeys,
                "max_loop_lag": lag.max,
            }
            if side == "amm":
                stats = s.extensions["amm"].statistics()
                result["amm_max_cycle_seconds"] = stats["max_cycle_seconds"]
            del futures
    result["setup_seconds"] = t_data - t_start
    result["data_seconds"] = t_retire - t_data
    result["side_seconds"] = time.perf_counter() - t_start
    return result


async def bench(nworkers: int, nkeys: int, total: int, repeat: int) -> list[dict]:
    runs = []
    for i in range(repeat):
        for side in SIDES:
            r = await run_side(side, nworkers, nkeys, total)
            r["run"] = i
            print(
                f"{side:12s} run {i}: {r['seconds']:.2f}s, requested {r['requested']}, "
                f"extra replicas {r['extra_replicas']}, max loop lag "
                f"{r['max_loop_lag'] * 1000:.0f}ms (cluster start "
                f"{r['setup_seconds']:.1f}s, data {r['data_seconds']:.1f}s, "
                f"all {r['side_seconds']:.1f}s)",
                flush=True,
            )
            runs.append(r)
    return runs


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side]
        out[side] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("seconds", "requested", "extra_replicas", "max_loop_lag")
        }
    return out


def to_markdown(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        f"# Retiring one worker: {p['keys']} keys, {p['total'] / 2**20:.0f} MiB, "
        f"{p['workers']} worker processes ({report['mode']}, median of {p['repeat']})",
        "",
        "| side | seconds | replicas requested | extra replicas | max loop lag |",
        "|---|---|---|---|---|",
    ]
    for side, m in report["summary"].items():
        lines.append(
            f"| {side} | {m['seconds']:.2f} | {m['requested']:.0f} | "
            f"{m['extra_replicas']:.0f} | {m['max_loop_lag'] * 1000:.0f} ms |"
        )
    lines += [
        "",
        f"Python {report['python']}, {report['platform']}, "
        f"dask {report['dask']}, distributed {report['distributed']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k keys, 100 MiB, 1 run")
    parser.add_argument("--keys", type=int)
    parser.add_argument("--total", type=int, help="bytes held by the retiring worker")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    nkeys = args.keys or (2_000 if args.quick else 10_000)
    total = args.total or (100 * 2**20 if args.quick else 2**30)
    repeat = args.repeat or (1 if args.quick else 3)

    import dask
    import distributed

    # Quiet: the clusters log every worker start and retirement
    logging.getLogger("distributed").setLevel(logging.WARNING)
    runs = asyncio.run(bench(args.workers, nkeys, total, repeat))
    report = {
        "mode": "quick" if args.quick else "full",
        "params": {
            "keys": nkeys,
            "total": total,
            "workers": args.workers,
            "repeat": repeat,
        },
        "summary": summarize(runs),
        "runs": runs,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "retire.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "retire.md"), "w") as f:
        f.write(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
