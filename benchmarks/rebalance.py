"""Rebalancing a skewed cluster: the ``amm.Rebalance`` policy vs distributed's
``client.rebalance()``, on one local cluster of worker processes, in the same run.

The cluster has ``--workers`` single-threaded worker processes with the same memory
limit and this project's manager (ReduceReplicas, ``--interval``); memory is measured
as managed memory on both sides (``amm.measure`` and
``distributed.worker.memory.rebalance.measure``), so the comparison is not blurred
by the processes' unmanaged memory. Scenarios, each starting from an empty cluster:

1. **idle**: one worker computes blocks of random bytes worth ``--skew`` of its
   memory limit; then either ``await client.rebalance()`` is timed, or the policy is
   added (``AMMClient.add_policy``) and timed until nothing moves any more. Reported:
   max/mean managed memory, bytes that changed worker, seconds to converge.
2. **computing**: the same, while a computation reads every block (one task per
   block, then a sum). distributed documents ``rebalance()`` as unsafe then; what
   happens is reported as it is (errors caught, result checked, keys lost counted).
3. **spill**: one worker keeps computing blocks until it holds ``--spill-load`` of
   its memory limit, above ``distributed.worker.memory.target`` (0.6); bytes
   spilled to disk on all workers, with and without the policy. Process-memory
   thresholds (spill, pause, terminate) are off, so only the target spills.

Usage::

    python benchmarks/rebalance.py            # 8 workers x 2 GiB, 8 MiB blocks
    python benchmarks/rebalance.py --quick    # 4 x 400 MiB, 2 MiB blocks (< 60 s)

Results go to benchmarks/results/rebalance.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import sys
import time
import zlib
from typing import Any

import dask
import distributed
from distributed import Client, wait

from amm import AMMClient, Rebalance
from amm.demo import process_cluster

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MiB = 2**20


def make_block(i: int, size: int, delay: float = 0.0) -> bytes:
    """Incompressible, and reproducible on the client to check results"""
    if delay:
        time.sleep(delay)
    return random.Random(i).randbytes(size)


def checksum(block: bytes, i: int) -> int:
    time.sleep(0.01)
    return zlib.crc32(block) + i


def spilled_bytes(dask_worker: Any) -> float:
    return dask_worker.data.cumulative_metrics.get(("disk-write", "bytes"), 0.0)


# -- measuring the scheduler's state -----------------------------------------------


def locations(s: Any, keys: list) -> dict:
    return {k: frozenset(ws.address for ws in s.tasks[k].who_has or ()) for k in keys}


def bytes_moved(s: Any, before: dict, after: dict) -> int:
    return sum(
        s.tasks[k].nbytes for k in before if k in after and after[k] != before[k]
    )


def balance(s: Any) -> dict[str, float]:
    managed = [ws.memory.managed for ws in s.workers.values()]
    limit = next(iter(s.workers.values())).memory_limit
    mean = sum(managed) / len(managed)
    return {
        "max_over_mean": max(managed) / mean if mean else float("nan"),
        "max_minus_mean_fraction": (max(managed) - mean) / limit,
    }


def policy_of(s: Any) -> Rebalance | None:
    for p in s.extensions["amm"].policies:
        if isinstance(p, Rebalance):
            return p
    return None


async def wait_converged(policy: Rebalance, interval: float, timeout: float) -> float:
    """Seconds until the policy last changed anything, once it has been still (no
    move started, none in flight) for 3 cycles; NaN on timeout.
    """
    t0 = last_change = time.perf_counter()
    last = None
    while time.perf_counter() - t0 < timeout:
        state = (policy.moves_started, policy.moves_completed, policy.in_flight)
        now = time.perf_counter()
        if state != last:
            last, last_change = state, now
        elif not policy.in_flight and now - last_change > 3 * interval:
            return last_change - t0
        await asyncio.sleep(interval / 4)
    return float("nan")


async def empty(client: Client, s: Any, futures: list) -> None:
    """Release the scenario's data and wait until the workers hold nothing"""
    await client.cancel(futures)
    futures.clear()
    deadline = time.perf_counter() + 30
    while any(ws.nbytes for ws in s.workers.values()):
        if time.perf_counter() > deadline:
            raise TimeoutError("the workers did not release the previous data")
        await asyncio.sleep(0.05)


# -- scenarios ---------------------------------------------------------------------


async def skew(client: Client, s: Any, args: argparse.Namespace) -> list:
    victim = sorted(s.workers)[0]
    nblocks = int(args.skew * args.memory_limit / args.block)
    futures = client.map(
        make_block, range(nblocks), size=args.block, workers=[victim], pure=False
    )
    await wait(futures)
    # Managed memory is capped by the process memory of the last heartbeat: wait
    # for one that has seen the new data, so both sides start from the same view
    deadline = time.perf_counter() + 10
    while any(ws.memory.managed < ws.nbytes for ws in s.workers.values()):
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.05)
    return futures


async def rebalance_idle(
    client: Client, s: Any, side: str, args: argparse.Namespace
) -> dict:
    futures = await skew(client, s, args)
    keys = [f.key for f in futures]
    before = locations(s, keys)
    start = balance(s)
    t0 = time.perf_counter()
    if side == "distributed":
        status = await client.rebalance()
        seconds = time.perf_counter() - t0
        out: dict[str, Any] = {"status": status}
    else:
        await AMMClient(client).add_policy("amm.Rebalance")
        policy = policy_of(s)
        assert policy is not None
        seconds = await wait_converged(policy, args.interval, args.timeout)
        out = {"cycles": policy.cycle, "bytes_requested": policy.bytes_started}
        await AMMClient(client).remove_policy("Rebalance")
    after = locations(s, keys)
    lost = sum(1 for k in keys if not after[k])
    out.update(
        side=side,
        start=start,
        end=balance(s),
        bytes_moved=bytes_moved(s, before, after),
        seconds=seconds,
        keys_lost=lost,
    )
    await empty(client, s, futures)
    return out


async def rebalance_computing(
    client: Client, s: Any, side: str, args: argparse.Namespace, expected: int
) -> dict:
    futures = await skew(client, s, args)
    keys = [f.key for f in futures]
    before = locations(s, keys)
    out: dict[str, Any] = {"side": side, "error": None}
    policy = None
    if side == "amm":
        await AMMClient(client).add_policy("amm.Rebalance")
        policy = policy_of(s)
    ys = [client.submit(checksum, x, i, pure=False) for i, x in enumerate(futures)]
    total = client.submit(sum, ys, pure=False)
    t0 = time.perf_counter()
    if side == "distributed":
        try:
            out["status"] = await asyncio.wait_for(client.rebalance(), args.timeout)
        except Exception as e:  # what this scenario is about
            out["error"] = repr(e)
        out["rebalance_seconds"] = time.perf_counter() - t0
    try:
        result = await asyncio.wait_for(total.result(), args.timeout)
        out["result_correct"] = result == expected
    except Exception as e:
        out["result_correct"] = False
        failed = f"computation failed: {e!r}"
        out["error"] = f"{out['error']}; {failed}" if out["error"] else failed
    out["compute_seconds"] = time.perf_counter() - t0
    out["end_of_compute"] = balance(s)
    if policy is not None:
        out["seconds"] = out["compute_seconds"] + await wait_converged(
            policy, args.interval, args.timeout
        )
        await AMMClient(client).remove_policy("Rebalance")
    after = locations(s, keys)
    out["keys_lost"] = sum(1 for k in keys if not after[k])
    out["bytes_moved"] = bytes_moved(s, before, after)
    out["end"] = balance(s)
    await empty(client, s, futures + ys + [total])
    return out


async def spill(client: Client, s: Any, side: str, args: argparse.Namespace) -> dict:
    if side == "amm":
        await AMMClient(client).add_policy("amm.Rebalance")
    before = sum((await client.run(spilled_bytes)).values())
    victim = sorted(s.workers)[0]
    nblocks = int(args.spill_load * args.memory_limit / args.block)
    t0 = time.perf_counter()
    futures = client.map(
        make_block,
        range(nblocks),
        size=args.block,
        delay=args.block_delay,
        workers=[victim],
        pure=False,
    )
    await wait(futures)
    seconds = time.perf_counter() - t0
    after = sum((await client.run(spilled_bytes)).values())
    out = {
        "side": side,
        "spilled_bytes": after - before,
        "produced_bytes": nblocks * args.block,
        "seconds": seconds,
        "victim_holds_fraction": s.workers[victim].nbytes / args.memory_limit,
    }
    if side == "amm":
        await AMMClient(client).remove_policy("Rebalance")
    await empty(client, s, futures)
    return out


# -- driver ------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    async with process_cluster(
        args.workers,
        memory_limit=args.memory_limit,
        asynchronous=True,
        scheduler_kwargs={"preload": ["amm"]},
    ) as cluster, Client(cluster, asynchronous=True) as client:
        s = cluster.scheduler
        nblocks = int(args.skew * args.memory_limit / args.block)
        expected = sum(
            zlib.crc32(make_block(i, args.block)) + i for i in range(nblocks)
        )
        out: dict[str, Any] = {"idle": [], "computing": [], "spill": []}
        for side in ("distributed", "amm"):
            r = await rebalance_idle(client, s, side, args)
            print(f"idle      {side:12s} {summary(r)}", flush=True)
            out["idle"].append(r)
        for side in ("distributed", "amm"):
            r = await rebalance_computing(client, s, side, args, expected)
            print(f"computing {side:12s} {summary(r)}", flush=True)
            out["computing"].append(r)
        for side in ("off", "amm"):
            r = await spill(client, s, side, args)
            print(
                f"spill     {side:12s} spilled {r['spilled_bytes'] / MiB:.0f} MiB "
                f"of {r['produced_bytes'] / MiB:.0f} MiB produced",
                flush=True,
            )
            out["spill"].append(r)
        return out


def summary(r: dict) -> str:
    return (
        f"max/mean {r['end']['max_over_mean']:.2f}, moved "
        f"{r['bytes_moved'] / MiB:.0f} MiB, {r.get('seconds', float('nan')):.2f}s, "
        f"lost {r['keys_lost']}, error {r.get('error')}"
        + (f", result correct {r['result_correct']}" if "result_correct" in r else "")
    )


def to_markdown(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        f"# Rebalancing a skewed cluster ({report['mode']})",
        "",
        f"{p['workers']} worker processes x 1 thread, memory_limit "
        f"{p['memory_limit'] / MiB:.0f} MiB; one worker holds {p['skew']:.0%} of its "
        f"limit in {p['block'] / MiB:.0f} MiB blocks; amm cycle every "
        f"{p['interval']}s; memory measure: managed.",
        "",
        "## Idle cluster",
        "",
        "| side | max/mean before | max/mean after | (max-mean)/limit after "
        "| moved | seconds to converge | keys lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["idle"]:
        lines.append(
            f"| {r['side']} | {r['start']['max_over_mean']:.2f} | "
            f"{r['end']['max_over_mean']:.2f} | "
            f"{r['end']['max_minus_mean_fraction']:.3f} | "
            f"{r['bytes_moved'] / MiB:.0f} MiB | {r['seconds']:.2f} | "
            f"{r['keys_lost']} |"
        )
    lines += [
        "",
        "## While a computation reads the data",
        "",
        "| side | result correct | error | keys lost | max/mean at end of compute "
        "| max/mean after | moved | compute seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["computing"]:
        lines.append(
            f"| {r['side']} | {r['result_correct']} | {r['error'] or '-'} | "
            f"{r['keys_lost']} | {r['end_of_compute']['max_over_mean']:.2f} | "
            f"{r['end']['max_over_mean']:.2f} | {r['bytes_moved'] / MiB:.0f} MiB | "
            f"{r['compute_seconds']:.2f} |"
        )
    lines += [
        "",
        f"## Spilling: one worker produces {p['spill_load']:.0%} of its limit "
        "(target 60%)",
        "",
        "| policy | spilled to disk | produced | seconds | left on the producer |",
        "|---|---|---|---|---|",
    ]
    for r in report["spill"]:
        name = "amm.Rebalance" if r["side"] == "amm" else "none (ReduceReplicas only)"
        lines.append(
            f"| {name} | {r['spilled_bytes'] / MiB:.0f} MiB | "
            f"{r['produced_bytes'] / MiB:.0f} MiB | {r['seconds']:.2f} | "
            f"{r['victim_holds_fraction']:.0%} of its limit |"
        )
    lines += [
        "",
        f"Python {report['python']}, {report['platform']}, "
        f"dask {report['dask']}, distributed {report['distributed']}; "
        f"total {report['seconds']:.0f}s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small, < 60 s")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--memory-limit", type=int, help="bytes per worker")
    parser.add_argument("--block", type=int, help="bytes per key")
    parser.add_argument("--skew", type=float, default=0.45, help="fraction of limit")
    parser.add_argument("--spill-load", type=float, default=0.8)
    parser.add_argument("--interval", type=float, default=0.2, help="amm cycle, s")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.workers = args.workers or (4 if args.quick else 8)
    args.memory_limit = args.memory_limit or (400 * MiB if args.quick else 2048 * MiB)
    args.block = args.block or (2 * MiB if args.quick else 8 * MiB)
    # Slow enough production that a cycle sees each step of the spill workload
    args.block_delay = 0.02

    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    with dask.config.set(
        {
            "amm.interval": args.interval,
            "amm.measure": "managed",
            "amm.policies": [{"class": "amm.ReduceReplicas"}],
            "distributed.worker.memory.rebalance.measure": "managed",
            "distributed.worker.memory.target": 0.6,
            "distributed.worker.memory.spill": False,
            "distributed.worker.memory.pause": False,
            "distributed.worker.memory.terminate": False,
        }
    ):
        results = asyncio.run(bench(args))
    report = {
        "mode": "quick" if args.quick else "full",
        "params": {
            k: getattr(args, k)
            for k in (
                "workers",
                "memory_limit",
                "block",
                "skew",
                "spill_load",
                "interval",
            )
        },
        **results,
        "seconds": time.perf_counter() - t0,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rebalance.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "rebalance.md"), "w") as f:
        f.write(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
