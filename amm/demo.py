"""``python -m amm demo``: the same workload on a local cluster with the AMM off and
with this project's AMM on, and what it changed.

The workload is a dask.array matrix product, ``(x @ x.T).sum()``: every chunk of
``x`` is needed by many multiplications on different workers, so the cluster fills
with replicas that nothing needs once those multiplications are done. That is what
ReduceReplicas removes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.memory_sampler import MemorySampler

from amm.client import AMMClient


@dataclass
class Result:
    mode: str
    peak_managed: int
    peak_process: int
    replicas_dropped: int | None
    seconds: float
    value: float
    #: bytes the workers sent each other (dependencies fetched, replicas made):
    #: what keeping fewer replicas may cost in transfers
    bytes_transferred: int = 0
    #: (time, bytes) samples per measure
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict, repr=False)


def process_cluster(n_workers: int, **kwargs: Any) -> LocalCluster:
    """A LocalCluster of worker processes with one thread each, listening on the
    loopback interface only: the setup of the demo and of every benchmark that runs
    a real cluster
    """
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        **kwargs,
    )


#: dask config of each mode: no AMM, distributed's built-in one, this project's
MODES: dict[str, dict[str, Any]] = {
    "off": {"distributed.scheduler.active-memory-manager.start": False},
    "distributed": {},
    "on": {"distributed.scheduler.preload": ["amm"]},
    # this project's, keeping distributed's rule for unassigned dependents
    "each": {
        "distributed.scheduler.preload": ["amm"],
        "amm.reduce-replicas.unassigned-waiters": "each",
    },
}


def run(mode: str, args: argparse.Namespace) -> Result:
    """The workload on a fresh local cluster configured per ``MODES[mode]``, with
    cluster memory sampled every 0.1 s by distributed's MemorySampler
    """
    import dask.array as da

    config = dict(MODES[mode])
    if args.interval is not None:
        config["amm.interval"] = args.interval
        config["distributed.scheduler.active-memory-manager.interval"] = args.interval

    with dask.config.set(config), process_cluster(
        args.workers, memory_limit=args.memory_limit
    ) as cluster, Client(cluster) as client:
        x = da.random.RandomState(0).random((args.size, args.size), chunks=args.chunk)
        product = (x @ x.T).sum()
        process, managed = MemorySampler(), MemorySampler()
        start = time.perf_counter()
        with process.sample(mode, measure="process", interval=0.1), managed.sample(
            mode, measure="managed", interval=0.1
        ):
            value = float(product.compute())
        seconds = time.perf_counter() - start
        dropped = (
            AMMClient(client).statistics()["drops_requested"]
            if mode in ("on", "each")
            else None
        )
        samples = {"process": process.samples[mode], "managed": managed.samples[mode]}
        sent = client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total)
        return Result(
            mode=mode,
            peak_managed=max(nbytes for _, nbytes in managed.samples[mode]),
            peak_process=max(nbytes for _, nbytes in process.samples[mode]),
            replicas_dropped=dropped,
            seconds=seconds,
            value=value,
            bytes_transferred=sum(sent.values()),
            samples=samples,
        )


def report(results: list[Result]) -> str:
    off = results[0]
    lines = [
        f"{'AMM':<5}{'peak managed':>16}{'peak process':>16}{'replicas dropped':>18}"
        f"{'run time':>11}{'transferred':>14}",
    ]
    for r in results:
        dropped = "-" if r.replicas_dropped is None else str(r.replicas_dropped)
        lines.append(
            f"{r.mode:<5}{_mib(r.peak_managed):>16}{_mib(r.peak_process):>16}"
            f"{dropped:>18}{r.seconds:>10.1f}s{_mib(r.bytes_transferred):>14}"
        )
    for r in results[1:]:
        lines.append(
            f"\n'{r.mode}' vs 'off': peak managed memory x{r.peak_managed / off.peak_managed:.2f}, "
            f"peak process memory x{r.peak_process / off.peak_process:.2f}, "
            f"run time x{r.seconds / off.seconds:.2f}, "
            f"transferred x{r.bytes_transferred / max(off.bytes_transferred, 1):.2f}"
        )
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        prog="python -m amm demo",
        description="Peak cluster memory with the AMM off and on, same workload",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--size", type=int, default=8000, help="x is size x size")
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument(
        "--interval", default=None, help="AMM interval (default: the configured 2s)"
    )
    parser.add_argument("--memory-limit", default="4GiB", help="per worker")
    args = parser.parse_args(argv)

    nbytes = args.size**2 * 8
    print(
        f"(x @ x.T).sum() for a {args.size}x{args.size} float64 array "
        f"({nbytes / 2**20:,.0f} MiB) in {args.chunk}x{args.chunk} chunks, "
        f"{args.workers} workers x 1 thread\n"
    )
    results = []
    for mode in ("off", "on"):
        print(f"running with the AMM {mode} ...", flush=True)
        results.append(run(mode, args))
    values = {round(r.value, 3) for r in results}
    assert len(values) == 1, f"results differ: {values}"
    print()
    print(report(results))
    return results
