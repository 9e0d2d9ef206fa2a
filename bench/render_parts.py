#!/usr/bin/env python3
"""The loop's and the renderer's CPU for one ``/metrics`` scrape and one correlation pass at 10,000
paths, without the network: a Monitor on bench_scale's config shape (2,000 targets of 4 ICMP + 1 TCP
path, every path up), timed in this process (thread CPU time, best of 3 after a warm-up pass).

    .venv/bin/python bench/render_parts.py          # prints a table, writes nothing
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watchtower.config import parse_config  # noqa: E402
from watchtower.engine.monitor import Monitor  # noqa: E402
from watchtower.probes import Failure, ProbeContext, ProbeResult  # noqa: E402
from watchtower.web import metrics  # noqa: E402

TARGETS = 2000


def main() -> None:
    targets = {
        f"t{i:05d}": {
            "role": "service",
            "paths": [
                {"icmp": f"10.213.{(i * 4 + j) // 250 % 250}.{(i * 4 + j) % 250 + 1}"} for j in range(4)
            ]
            + [{"tcp": f"10.214.{i // 250 % 250}.{i % 250 + 1}:7000"}],
        }
        for i in range(TARGETS)
    }
    monitor = Monitor(
        parse_config({"site": "s", "targets": targets}, Path(".")), shared=ProbeContext(timeout=0)
    )
    result = ProbeResult(True, 0.0004, None, "rtt 0.40 ms")
    for status in monitor.statuses.values():
        for k in range(2):
            monitor.record(status, result, 1.0 + k)

    def timed(step: Callable[[], object]) -> tuple[float, object]:
        start = time.thread_time()
        out = step()
        return time.thread_time() - start, out

    # The first pass after start (or a reload) builds every path's view (engine/views.py); the
    # later ones rebuild only targets whose paths moved, or that have a path down.
    first_s, _ = timed(lambda: monitor.evaluate(3.0))

    snap_s, render_s, evaluate_s = [], [], []
    body = b""
    for _ in range(4):  # the first pass warms caches (label strings); the best of the other 3 counts
        took, snap = timed(monitor.snapshot)
        snap_s.append(took)
        took, rendered = timed(lambda: metrics.render(snap))  # type: ignore[arg-type]  # noqa: B023
        render_s.append(took)
        body = rendered  # type: ignore[assignment]
        took, _ = timed(lambda: monitor.evaluate(4.0))
        evaluate_s.append(took)
    # 1 % of the targets failing: one path of each down, the others answering
    fail = ProbeResult.fail(Failure.TIMEOUT, "no echo reply")
    failing = [monitor.target_paths(name)[0] for name in list(monitor.config.targets)[:: TARGETS // 20]]
    for status in failing:
        for k in range(2):
            monitor.record(status, fail, 5.0 + k)
    failing_s = [timed(lambda: monitor.evaluate(7.0 + k))[0] for k in range(4)]  # noqa: B023
    best = {
        "snapshot, on the loop (`Monitor.snapshot`)": min(snap_s[1:]),
        "render, in a thread (`metrics.render`)": min(render_s[1:]),
        "correlation pass, on the loop (`Monitor.evaluate`)": min(evaluate_s[1:]),
        "correlation pass, first after start or reload (every view built)": first_s,
        "correlation pass, 20 targets with a path down (rebuilt every pass)": min(failing_s[1:]),
    }
    lines = len(body.splitlines())
    print(f"| {len(monitor.statuses):,} paths, {lines:,} lines of /metrics | CPU ms |\n|---|---|")
    for what, took in best.items():
        print(f"| {what} | {took * 1000:.1f} |")


if __name__ == "__main__":
    main()
