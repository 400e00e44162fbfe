"""The benchmarks' quick modes run end to end and write well-formed results.
Nothing here looks at a timing: those are measured side by side in the benchmarks
themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def run(script: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout


def test_scale_quick(tmp_path):
    run(
        "scale.py", "--quick", "--workers", "10", "20", "--keys", "1000", "2000",
        "--out", str(tmp_path),
    )
    report = json.loads((tmp_path / "scale_quick.json").read_text())
    runs = report["runs"]
    scenarios = {r["scenario"] for r in runs}
    assert scenarios == {
        "idle_cycle", "reduce_replicas", "retire_one", "retire_10pct", "replicate_3",
        "replicate_all_1000", "rebalance_skewed",
    }
    for r in runs:
        assert r["side"] in ("ours", "theirs")
        assert r["one_cycle_seconds"] > 0, r
        assert r["one_cycle_gc_on_seconds"] > 0, r
        # cycles that sent something: the idle cycle has nothing to send
        assert r["cycles"] == 0 if r["scenario"] == "idle_cycle" else r["cycles"] >= 1, r
    # this project's side converges in every scenario
    assert all(r["converged"] for r in runs if r["side"] == "ours"), [
        (r["scenario"], r["workers"], r["keys"]) for r in runs if not r["converged"]
    ]
    rebalanced = [r for r in runs if r["scenario"] == "rebalance_skewed"]
    assert all("max_over_mean" in r["quality"] for r in rebalanced)
    table = (tmp_path / "scale_quick.md").read_text().splitlines()
    assert table[0].startswith("| scenario | W | K | side |")
    assert len(table) == 2 + len(runs)
    assert set(report["growth"]) == {f"{s}/{side}" for s in scenarios for side in ("ours", "theirs")}
    for axis in ("workers", "keys"):
        assert (tmp_path / f"scale_quick_vs_{axis}.png").stat().st_size > 0


@pytest.mark.timeout(600)
def test_memory_quick(tmp_path):
    out = run(
        "memory.py", "--quick", "--workers", "2", "--size", "800", "--chunk", "200",
        "--repeat", "2", "--out", str(tmp_path),
    )
    report = json.loads((tmp_path / "memory_quick.json").read_text())
    assert [row["mode"] for row in report["rows"]] == [
        "AMM off", "distributed's AMM", "amm", "amm, unassigned-waiters: each",
    ]
    for row in report["rows"]:
        assert row["peak_managed_mib"] > 0
        assert row["peak_process_mib"] >= row["peak_managed_mib"] * 0.5
        assert row["seconds"] > 0
        # x is computed on several workers: its chunks travel to the products
        assert row["transferred_mib"] > 0
    assert report["rows"][0]["peak_managed_vs_off"] == 1.0
    assert report["rows"][0]["transferred_vs_off"] == 1.0
    # two interleaved rounds; the row of a mode is one of its runs' peaks
    for mode, row in zip(["off", "distributed", "on", "each"], report["rows"]):
        runs = report["runs"][mode]
        assert len(runs) == 2
        assert row["peak_managed_mib"] * 2**20 in [r["peak_managed"] for r in runs]
    assert report["rows"][2]["replicas_dropped"] >= 0
    assert (tmp_path / "memory_quick.png").stat().st_size > 0
    assert "| amm |" in out
