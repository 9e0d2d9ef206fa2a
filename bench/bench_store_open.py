"""What checking the state store at start costs: ``Store`` runs SQLite's ``quick_check`` over every
page at open (issue 15), so a corrupt page is one clear error at start, not a crash while alerting.

Fills a store in a temporary directory with N incidents (timeline of two events each), three
messages each and their steps, closes it, and times opening it (connect, migrations, quick_check)
a few times. Writes its section of bench/RESULTS.md.

    .venv/bin/python bench/bench_store_open.py [--incidents 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, stats, write_section

from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident
from watchtower.store import NewNotification, Store

CHANNELS = ("mail", "sms", "signal")


def incident(n: int) -> Incident:
    at = 1_000_000.0 + n * 600
    root = f"pve{n % 40}"
    return (
        Incident(
            n, Scope.HYPERVISOR, root, at, cause=Cause.POWER_OFF, affected=("dc1", "mail1"),
            first_failure_at=at - 12,
        )
        .noted(at - 12, "first_failure", f"first failed probe of {root}")
        .noted(at, "opened", f"confirmed: hypervisor {root} down")
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incidents", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "watchtower.sqlite"
        store = Store(path)
        for start in range(1, args.incidents + 1, 500):
            ids = range(start, min(start + 500, args.incidents + 1))
            store.commit(
                [incident(n) for n in ids],
                [
                    NewNotification(n, "step0", "page", c, "title", "body " * 40)
                    for n in ids
                    for c in CHANNELS
                ],
                [(n, "step0") for n in ids],
                1.0,
            )
        store.close()
        size = path.stat().st_size / 1e6
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            Store(path).close()
            times.append((time.perf_counter() - started) * 1000)
    median, _, worst = stats(times)
    lines = [
        f"Machine: {machine()}. Command: {command_line()}.",
        "",
        f"{args.incidents:,} incidents, {3 * args.incidents:,} messages, {size:.1f} MB: opening the store "
        f"(connect, migrations, `quick_check` of every page) took {median:.0f} ms median, {worst:.0f} ms "
        f"worst of {args.runs}.",
    ]
    print("\n".join(lines))
    write_section("## Store check at start (bench/bench_store_open.py)", lines)


if __name__ == "__main__":
    main()
