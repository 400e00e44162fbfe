"""Replicating a dataset to n=3 on a local cluster: this project's ReplicateN vs
distributed's ``Client.replicate`` with its built-in AMM, in the same run.

For each side, on a fresh ``LocalCluster`` of worker processes (one thread each),
with the AMM running every ``--interval``:

1. compute ``--keys`` numpy arrays of ``--size`` bytes each on the workers;
2. ``client.replicate(futures, n=3)``, timed (both sides return once the copies
   exist; with this project installed the call is served by ReplicateN);
3. wait a few AMM intervals and count the keys that still have 3 replicas
   (distributed's ReduceReplicas drops them again, dask/distributed#8796);
4. kill the worker process holding the most keys (its nanny starts a new one), wait
   a few AMM intervals, and count again: ReplicateN makes the lost copies again;
5. ``client.scatter({key: small value}, broadcast=True)`` ``--broadcasts`` times in
   a loop, one call at a time, timed: the latency a replication request adds.

Usage::

    python benchmarks/replicate.py            # 256 x 4 MiB = 1 GiB, 4 workers
    python benchmarks/replicate.py --quick    # 32 x 256 KiB, well under a minute

Results go to benchmarks/results/replicate.{json,md} (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import time
from typing import Any

import dask.config
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client, wait

from amm.demo import process_cluster

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N = 3
#: AMM intervals waited before counting replicas again
SETTLE_INTERVALS = 6


def make_array(i: int, nbytes: int) -> Any:
    import numpy as np

    return np.random.default_rng(i).random(nbytes // 8)


def _replica_counts(dask_scheduler: Any, keys: list[str]) -> list[int]:
    tasks = dask_scheduler.tasks
    return [len(tasks[k].who_has or ()) if k in tasks else 0 for k in keys]


def _busiest_worker(dask_scheduler: Any) -> str:
    return max(dask_scheduler.workers.values(), key=lambda ws: len(ws.has_what)).address


def _amm_serves_replicate(dask_scheduler: Any) -> bool:
    from amm.replication import Replication

    return isinstance(getattr(dask_scheduler.replicate, "__self__", None), Replication)


def run_one(manager: str, args: argparse.Namespace) -> dict[str, Any]:
    interval = parse_timedelta(args.interval)
    if manager == "amm":
        config = {"amm.start": True, "amm.interval": args.interval}
        scheduler_kwargs = {"preload": ["amm"]}
    else:
        config = {
            "distributed.scheduler.active-memory-manager.start": True,
            "distributed.scheduler.active-memory-manager.interval": args.interval,
        }
        scheduler_kwargs = {}
    with dask.config.set(config), process_cluster(
        args.workers, scheduler_kwargs=scheduler_kwargs
    ) as cluster, Client(cluster) as client:
        if manager == "amm":
            assert client.run_on_scheduler(_amm_serves_replicate), "amm not installed"
        keys = [f"chunk-{i}" for i in range(args.keys)]
        futures = client.map(make_array, range(args.keys), nbytes=args.size, key=keys)
        wait(futures)

        def fraction_at_n() -> float:
            counts = client.run_on_scheduler(_replica_counts, keys=keys)
            return sum(c >= N for c in counts) / len(keys)

        start = time.perf_counter()
        client.replicate(futures, n=N)
        seconds = time.perf_counter() - start
        after_replicate = fraction_at_n()

        time.sleep(SETTLE_INTERVALS * interval)
        after_cycles = fraction_at_n()

        victim = client.run_on_scheduler(_busiest_worker)
        # a crash: SIGKILL the worker process; its nanny starts a new one
        (nanny,) = (n for n in cluster.workers.values() if n.worker_address == victim)
        os.kill(nanny.process.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in client.scheduler_info()["workers"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{victim} was killed but is still in the cluster")
            time.sleep(0.05)
        time.sleep(SETTLE_INTERVALS * interval)
        after_kill = fraction_at_n()
        wait(futures)  # lost keys are recomputed; none may be missing

        start = time.perf_counter()
        scattered = [
            client.scatter({f"small-{i}": i}, broadcast=True)
            for i in range(args.broadcasts)
        ]
        broadcast_seconds = time.perf_counter() - start
        del scattered

    return {
        "manager": manager,
        "seconds_to_n": seconds,
        "fraction_at_n_after_replicate": after_replicate,
        "fraction_at_n_after_cycles": after_cycles,
        "fraction_at_n_after_kill": after_kill,
        "broadcasts": args.broadcasts,
        "broadcast_seconds": broadcast_seconds,
    }


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        f"Replicating {p['keys']} x {format_bytes(p['size'])} "
        f"({format_bytes(p['keys'] * p['size'])}) to n={N} on {p['workers']} worker "
        f"processes, AMM interval {p['interval']}"
        + (" (--quick)" if p["quick"] else ""),
        "",
        "| manager | seconds to n | keys at n after replicate | "
        f"after {SETTLE_INTERVALS} AMM intervals | after a worker is killed | "
        f"{p['broadcasts']} x scatter(broadcast=True), ms per call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"amm": "amm (ReplicateN)", "distributed": "distributed built-in"}
    for r in results["runs"]:
        lines.append(
            f"| {names[r['manager']]} | {r['seconds_to_n']:.2f} | "
            f"{r['fraction_at_n_after_replicate']:.0%} | "
            f"{r['fraction_at_n_after_cycles']:.0%} | "
            f"{r['fraction_at_n_after_kill']:.0%} | "
            f"{1000 * r['broadcast_seconds'] / max(r['broadcasts'], 1):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--keys", type=int, default=None, help="default 256 (32 quick)")
    parser.add_argument("--size", default=None, help="bytes per key; 4 MiB (256 KiB quick)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--broadcasts", type=int, default=None, help="default 500 (20 quick)"
    )
    parser.add_argument("--interval", default=None, help="AMM interval; 500ms (250ms quick)")
    parser.add_argument("--out", default=RESULTS, help="folder for replicate.{json,md}")
    args = parser.parse_args(argv)
    args.keys = args.keys or (32 if args.quick else 256)
    args.size = parse_bytes(args.size or ("256 KiB" if args.quick else "4 MiB"))
    args.interval = args.interval or ("250ms" if args.quick else "500ms")
    if args.broadcasts is None:
        args.broadcasts = 20 if args.quick else 500
    logging.getLogger("distributed").setLevel(logging.ERROR)

    runs = [run_one(manager, args) for manager in ("distributed", "amm")]
    results = {
        "params": {
            "keys": args.keys,
            "size": args.size,
            "workers": args.workers,
            "interval": args.interval,
            "n": N,
            "broadcasts": args.broadcasts,
            "quick": args.quick,
        },
        "platform": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "replicate.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.out, "replicate.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
