"""The demo runs end to end on a real local cluster (small sizes)"""

from __future__ import annotations

import subprocess
import sys


def test_demo_command_prints_comparison():
    out = subprocess.run(
        [sys.executable, "-m", "amm", "demo", "--workers", "2", "--size", "600",
         "--chunk", "100", "--interval", "100ms"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("AMM"))
    off, on = lines[header + 1].split(), lines[header + 2].split()
    assert off[0] == "off" and off[5] == "-"
    assert on[0] == "on" and int(on[5]) > 0  # replicas dropped
    assert "'on' vs 'off': peak managed memory x" in out


def test_unknown_command():
    proc = subprocess.run(
        [sys.executable, "-m", "amm", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown command 'frobnicate'" in proc.stderr
