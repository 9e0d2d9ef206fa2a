#!/usr/bin/env python3
"""Detection to message: the demo site's pve1 (with its VMs) powered off at T0, at a random phase of
the 5 s probe interval; time until the SMTP sink holds watchtower's mail and the Signal receiver holds
its request, and, for the same outage in the same run, until Alertmanager's webhook fires for
Prometheus + blackbox_exporter at Debian's default timings and tuned.

    .venv/bin/python bench/bench_detect.py                 # 10 runs, writes bench/RESULTS.md
    .venv/bin/python bench/bench_detect.py --quick         # CI smoke: 1 run, tuned Prometheus only

watchtower runs with config/demo.yaml's timings (5 s interval, 1 s retry, fail_after 2,
confirm_paths 2); its channels point at in-process sinks, the on-call mail is tier1 too.
Traffic: 127.0.0.1 and the demo's 10.213.x.x namespaces only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from common import (
    DEBIAN,
    DEBIAN_GROUP_BY,
    TUNED,
    HttpSink,
    PromStack,
    Route,
    TimedSmtpSink,
    Watchtower,
    command_line,
    demo_watchtower_config,
    hook_notifications,
    log,
    machine,
    open_demo_lab,
    random_phase,
    stats,
    write_section,
)

from watchtower.lab import Lab

MARKER = "## Detection to message (bench/bench_detect.py)"
MARKER_KEEP = "## Detection to message, one daemon for all runs (bench/bench_detect.py --keep-daemon)"
HOST = "pve1"
TARGET_MEDIAN, TARGET_MAX = 8.0, 12.0
ABOUT = (
    "The demo site; `{host}` powered off (`break_host('{host}', 'poweroff')`: the BMC says chassis off, "
    "every link down, its VMs dc1 and mail1 vanish with it) at T0, after a random 0-5 s wait, once every "
    "system saw the site healthy. Times are from T0 to the moment the receiver accepted the first message "
    "that says DOWN (a page or a 'failed again'; all-clears do not count). Alertmanagers are restarted "
    "empty before each run and, unless `--keep-daemon`, watchtower too (fresh store): each outage is the "
    "day's first, as on a quiet site. All systems watch the same outage at the same time."
)
ROUTES = {
    "debian": Route("debian", DEBIAN, DEBIAN_GROUP_BY, group_wait="30s", group_interval="5m"),
    "tuned": Route("tuned", TUNED, ("alertname", "host"), group_wait="1s", group_interval="5s"),
}


def first_request(http: HttpSink, path: str, since: float, contains: str = "") -> Any:
    for r in list(http.requests):
        if r.path == path and r.at >= since and contains in r.json["message"].split("\r\n")[0]:
            return r
    return None


def one_run(
    i: int, lab: Lab, wt: Watchtower, stack: PromStack | None, http: HttpSink, mails: TimedSmtpSink,
    routes: list[str], deadline_s: float,
) -> dict[str, Any]:  # fmt: skip
    wt.wait_settled(180)
    time.sleep(2)  # a little past "all up": every path has had a regular probe
    if stack is not None:
        stack.wait_healthy(180)
        stack.restart_alertmanagers()  # a fresh Alertmanager each run: the day's first outage
    phase = random_phase(5.0)
    t0 = time.monotonic()
    lab.break_host(HOST, "poweroff")
    broke = time.monotonic() - t0
    row: dict[str, Any] = {"run": i, "phase": phase, "break_s": broke, "t0": t0}
    try:
        deadline = t0 + deadline_s
        while time.monotonic() < deadline:
            mail = mails.first("oncall@lab.test", t0, " DOWN")  # a page or a "failed again", no all-clear
            if mail and "mail" not in row:
                row["mail"], row["mail_subject"] = mail[0] - t0, mail[1]
            sig = first_request(http, "/v2/send", t0, " DOWN")
            if sig is not None and "signal" not in row:
                row["signal"], row["signal_text"] = sig.at - t0, sig.json["message"].split("\r\n")[0]
            for name in routes:
                notes = hook_notifications(http, name, t0)
                if notes and name not in row:
                    row[name] = notes[0].at - t0
                    row[f"{name}_alerts"] = len(notes[0].json["alerts"])
            if all(k in row for k in ("mail", "signal", *routes)):
                break
            time.sleep(0.02)
    finally:
        lab.repair(HOST)
    row["named_root"] = f"hypervisor {HOST} DOWN" in row.get("signal_text", "")
    log(
        f"run {i}: phase {phase:.2f}s {row.get('signal_text', '-')!r} "
        + ", ".join(f"{k} {row[k]:.1f}s" for k in ("mail", "signal", *routes) if k in row)
    )
    return row


def keep_log(src: Path, dst: Path, t0: float) -> None:
    """``src``'s lines (prefixed with the bench's monotonic time) with that time made relative to T0."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for line in src.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            out.append(f"{float(stamp) - t0:+9.3f} {rest}")
        except ValueError:
            out.append(line)
    dst.write_text("\n".join(out) + "\n")
    log(f"log of the run: {dst}")


def table(rows: list[dict[str, Any]], routes: list[str]) -> str:
    lines = [
        "| system, configuration | message at | runs (received) | median s | p90 s | max s | target "
        "| first message names the root (`hypervisor pve1`) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n = len(rows)
    specs: list[tuple[str, str, str]] = [
        ("watchtower, shipped defaults (5 s, fail_after 2, confirm_paths 2)", "SMTP sink (mail)", "mail"),
        ("watchtower, shipped defaults (5 s, fail_after 2, confirm_paths 2)", "Signal receiver", "signal"),
    ]
    labels = {
        "debian": "Prometheus + blackbox + Alertmanager, Debian defaults (scrape/eval 15 s, `for: 0m`, "
        "group_wait 30 s)",
        "tuned": "Prometheus + blackbox + Alertmanager, tuned (scrape/eval 5 s, timeout 2 s, `for: 10s`, "
        "group_wait 1 s)",
    }
    specs += [(labels[r], "webhook", r) for r in routes]
    for system, where, key in specs:
        values = [row[key] for row in rows if key in row]
        med, p90, mx = stats(values)
        if key in ("mail", "signal"):
            ok = med <= TARGET_MEDIAN and mx <= TARGET_MAX and len(values) == n
            target = f"median <= {TARGET_MEDIAN:g}, max <= {TARGET_MAX:g}: " + ("met" if ok else "**missed**")
            named = f"{sum(1 for row in rows if row.get('named_root'))} of {n}"
        else:
            target, named = "(reference)", "(no notion of a root)"
        lines.append(
            f"| {system} | {where} | {n} ({len(values)}) | {med:.1f} | {p90:.1f} | {mx:.1f} | {target} "
            f"| {named} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 run, tuned Prometheus only")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument(
        "--keep-daemon", action="store_true", help="one watchtower for all runs (outages ~70 s apart)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("--wait-lab", type=float, default=900.0, help="max seconds to wait for the demo site")
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep the daemon's INFO log of each run here (run-N.log, lines prefixed with seconds since T0)",
    )
    parser.add_argument(
        "--use-running-lab", action="store_true", help="use the demo site already up, leave it up"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_detect: needs root (network namespaces)", file=sys.stderr)
        return 2
    runs = 1 if args.quick else args.runs
    routes = [] if args.no_prometheus else (["tuned"] if args.quick else ["debian", "tuned"])
    deadline_s = 45.0 if args.quick else 150.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-detect-") as tmp:
        work = Path(tmp)
        smtp, http = TimedSmtpSink().start(), HttpSink().start()
        mails = smtp
        lab: Lab | None = None
        stack: PromStack | None = None
        wt: Watchtower | None = None
        try:
            lab = open_demo_lab(args.use_running_lab, args.wait_lab)
            if routes:
                stack = PromStack([ROUTES[r] for r in routes], http, work / "prom").start()
            for i in range(1, runs + 1):
                if wt is None or not args.keep_daemon:
                    if wt is not None:
                        wt.stop()
                    # a fresh daemon and store per run, like the fresh Alertmanagers: each outage is the
                    # day's first (with --keep-daemon one daemon sees all runs, ~70 s apart: flapping)
                    state = work / ("state" if args.keep_daemon else f"state-{i}")
                    wt = Watchtower(
                        demo_watchtower_config(smtp, http, state),
                        work,
                        log_level="INFO" if args.logs else "WARNING",
                        stamped=args.logs is not None,
                    )
                row = one_run(i, lab, wt, stack, http, mails, routes, deadline_s)
                rows.append(row)
                if args.logs is not None:
                    time.sleep(0.5)  # the last lines through the pipe
                    keep_log(wt.logfile, args.logs / f"run-{i}.log", row["t0"])
        finally:
            if wt is not None:
                wt.stop()
            if stack is not None:
                stack.stop()
            if lab is not None and not args.use_running_lab:
                lab.down()
            smtp.stop()
            http.stop()
    out = table(rows, routes)
    print(out)
    if not args.no_write:
        per_run = ", ".join(
            "/".join(f"{row[k]:.1f}" if k in row else "-" for k in ("mail", "signal", *routes))
            for row in rows
        )
        write_section(
            MARKER_KEEP if args.keep_daemon else MARKER,
            [
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.",
                f"Command: {command_line()}",
                "",
                *textwrap.wrap(ABOUT.format(host=HOST), 100),
                "",
                out,
                "",
                f"Per run (mail/signal/{'/'.join(routes) or '-'}, s): {per_run}.",
                "First Signal title per run: " + "; ".join(f"`{r.get('signal_text', '-')}`" for r in rows),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
