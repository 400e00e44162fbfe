"""End-to-end peak memory: the same computation with the AMM off, with
distributed's built-in AMM and with this project's (at its defaults, and with
``amm.reduce-replicas.unassigned-waiters: each``, distributed's rule for the
dependents not assigned yet), one after another in one run.

The workload is amm.demo's: ``(x @ x.T).sum()`` on a LocalCluster of worker
processes with one thread each; memory is sampled by distributed's MemorySampler
(process and managed). Each mode gets a fresh cluster. The bytes the workers sent
each other are counted too: a replica dropped early is one that may have to be
fetched again, and on a slow network that is what keeping fewer replicas costs.

One run's peak varies by about 5% from the next on the same machine (when exactly
the workers' threads finish decides which replicas coexist), more than the gaps
being measured. So the modes run in ``--repeat`` rounds, interleaved (off,
distributed, amm, off, ...) so that drifts of the machine hit them alike, and the
table shows each mode's median peak and run time; every run is in the JSON.

Usage::

    python benchmarks/memory.py            # 8 workers, 10k x 10k in 1k chunks, 3 rounds
    python benchmarks/memory.py --quick    # 4 workers, 2k x 2k in 250 chunks, 1 round

Results go to benchmarks/results/memory{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, replace
from typing import Any

from amm import demo

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ORDER = ("off", "distributed", "on", "each")
LABELS = {
    "off": "AMM off",
    "distributed": "distributed's AMM",
    "on": "amm",
    "each": "amm, unassigned-waiters: each",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--interval", default=None, help="both AMMs (default 2s)")
    parser.add_argument("--memory-limit", default="2.5GiB")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--repeat",
        type=int,
        help="rounds of all modes, medians reported (default 3; 1 with --quick)",
    )
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.workers = args.workers or (4 if args.quick else 8)
    args.size = args.size or (2000 if args.quick else 10_000)
    args.chunk = args.chunk or (250 if args.quick else 1000)

    runs: dict[str, list[demo.Result]] = {mode: [] for mode in ORDER}
    for round_ in range(args.repeat):
        for mode in ORDER:
            print(f"{LABELS[mode]} (round {round_ + 1}/{args.repeat}) ...", flush=True)
            runs[mode].append(demo.run(mode, args))
    values = {round(r.value, 3) for rs in runs.values() for r in rs}
    assert len(values) == 1, f"results differ: {values}"
    results = {mode: median_result(rs) for mode, rs in runs.items()}

    off = results["off"]
    rows = []
    for mode in ORDER:
        r = results[mode]
        rows.append(
            {
                "mode": LABELS[mode],
                "peak_managed_mib": r.peak_managed / 2**20,
                "peak_process_mib": r.peak_process / 2**20,
                "peak_managed_vs_off": r.peak_managed / off.peak_managed,
                "peak_process_vs_off": r.peak_process / off.peak_process,
                "seconds": r.seconds,
                "speed_vs_off": off.seconds / r.seconds,
                "replicas_dropped": r.replicas_dropped,
                "transferred_mib": r.bytes_transferred / 2**20,
                # a single worker sends nothing
                "transferred_vs_off": r.bytes_transferred / max(off.bytes_transferred, 1),
            }
        )
    table = [
        "| mode | peak managed | vs off | peak process | vs off | run time | speed vs off "
        "| sent between workers | vs off |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {row['mode']} | {row['peak_managed_mib']:,.0f} MiB | {row['peak_managed_vs_off']:.2f}x "
        f"| {row['peak_process_mib']:,.0f} MiB | {row['peak_process_vs_off']:.2f}x "
        f"| {row['seconds']:.1f} s | {row['speed_vs_off']:.2f}x "
        f"| {row['transferred_mib']:,.0f} MiB | {row['transferred_vs_off']:.2f}x |"
        for row in rows
    ]
    setup = (
        f"(x @ x.T).sum(), x {args.size}x{args.size} float64 in {args.chunk}x{args.chunk} "
        f"chunks, {args.workers} workers x 1 thread, memory_limit {args.memory_limit}, "
        f"AMM interval {args.interval or '2s (default)'}"
        + (f", median of {args.repeat} interleaved rounds" if args.repeat > 1 else "")
    )
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "memory_quick" if args.quick else "memory")
    report = {
        "setup": setup,
        "python": sys.version.split()[0],
        "rows": rows,
        "results": {m: {k: v for k, v in asdict(r).items() if k != "samples"} for m, r in results.items()},
        "runs": {
            m: [{k: v for k, v in asdict(r).items() if k != "samples"} for r in rs]
            for m, rs in runs.items()
        },
    }
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(setup + "\n\n" + "\n".join(table) + "\n")
    report["plot"] = plot(results, prefix + ".png", setup)
    print(setup)
    print("\n".join(table))
    return report


def median_result(results: list[demo.Result]) -> demo.Result:
    """The run whose peak managed memory is the median (its samples make the
    plot), with the median peak process memory, run time and bytes transferred of
    all the runs: each column of the table is the middle value of its own measure
    """
    ranked = sorted(results, key=lambda r: r.peak_managed)
    middle = ranked[(len(ranked) - 1) // 2]
    return replace(
        middle,
        peak_process=int(statistics.median_low(r.peak_process for r in results)),
        seconds=statistics.median(r.seconds for r in results),
        bytes_transferred=int(
            statistics.median_low(r.bytes_transferred for r in results)
        ),
    )


def plot(results: dict[str, demo.Result], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, measure in zip(axes, ("managed", "process")):
        for mode in ORDER:
            samples = results[mode].samples[measure]
            t0 = samples[0][0]
            ax.plot(
                [t - t0 for t, _ in samples],
                [nbytes / 2**30 for _, nbytes in samples],
                label=LABELS[mode],
            )
        ax.set_title(f"cluster {measure} memory")
        ax.set_xlabel("seconds")
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
