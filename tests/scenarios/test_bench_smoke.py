"""CI smoke of the benchmarks in bench/: each script runs in its quick mode on the demo site this test
session already has up (``--use-running-lab``) or, for the scale bench, its own bulk site, and must
print its table. Keeps the scripts working; the figures themselves are not asserted (bench/RESULTS.md
holds a full run). Quick modes leave bench/RESULTS.md alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from watchtower.lab import Lab

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_STACK = all(
    shutil.which(tool) for tool in ("prometheus", "prometheus-blackbox-exporter", "prometheus-alertmanager")
)


def run_bench(script: str, *args: str, timeout: float = 90) -> str:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} failed ({time.monotonic() - start:.0f}s):\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_benches_print_their_tables(demo_lab: Lab) -> None:
    prom = [] if PROMETHEUS_STACK else ["--no-prometheus"]
    out = run_bench("bench_detect.py", "--quick", "--no-write", "--use-running-lab", *prom)
    assert "| watchtower, shipped defaults" in out and "| SMTP sink (mail) | 1 (1) |" in out, out
    assert "| Signal receiver | 1 (1) |" in out, out

    out = run_bench(
        "bench_storm.py", "--no-write", "--use-running-lab", "--scenarios", "a", "--window", "15",
        "--no-prometheus",
    )  # fmt: skip
    assert "| (a) hypervisor pve1 + its 2 VMs | watchtower, shipped defaults | Signal |" in out, out

    out = run_bench(
        "bench_falsepages.py", "--duration", "12", "--no-prometheus", "--no-write", "--use-running-lab"
    )
    assert "| pve2 prod NIC 30 % loss" in out and "| mail1 flapping" in out, out

    out = run_bench("bench_scale.py", "--sizes", "100", "--duration", "5", "--no-blackbox", "--no-write")
    assert "| 100 (80+20) |" in out, out
