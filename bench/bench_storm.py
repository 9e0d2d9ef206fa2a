#!/usr/bin/env python3
"""Storm precision: one root failure that takes many targets with it, and how many notifications each
channel gets in the first minutes, and whether the first one names the right root and scope.

Scenarios on the demo site: (a) hypervisor pve1 powered off with its VMs dc1, mail1; (b) the switch
core-sw1 powered off, with everything behind it on prod; (c) the NAS nas1 powered off and the four
VMs on it hang (their disks are gone). Side by side, for the same outage at the same time:
Prometheus + blackbox_exporter + Alertmanager at Debian's defaults and tuned, each with and without
an inhibit rule that encodes the same topology (switch > hypervisor/NAS > VM).

    .venv/bin/python bench/bench_storm.py                  # 5 min window, writes bench/RESULTS.md
    .venv/bin/python bench/bench_storm.py --quick          # CI smoke: scenario (a), 25 s window

Traffic: 127.0.0.1 and the demo's 10.213.x.x namespaces only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
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
    poll,
    random_phase,
    write_section,
)

from watchtower.lab import Lab

MARKER = "## Storm precision (bench/bench_storm.py)"
ABOUT = (
    "Each scenario breaks the demo site at T0 (random 0-5 s phase) once every system saw it healthy, and "
    "counts what each receiver got in the next {window:.0f} s; then repairs. watchtower runs "
    "config/demo.yaml as shipped (channels at the sinks; tier 2 after 15 min and tier 4 are not due in the "
    "window, so they must stay silent). The Prometheus stack probes the same addresses (ICMP, plus TCP "
    "where the demo has it) with labels `host`, `role`, `hv`, `storage`, `switch`; the inhibit rule mutes "
    "VM alerts while their hypervisor's or NAS's alert fires and everything behind the switch while the "
    "switch's fires. Alertmanagers start empty per scenario; after each repair the bench waits for "
    "watchtower's all-clear (sent once recovery held `notify.all_clear_after`, 60 s), so it cannot fall "
    "into the next scenario's window. For the Prometheus rows, the count lists "
    "`alerts@seconds after T0` per notification; 'right' means one notification and it is about the root "
    "alone."
)
ROUTES = [
    Route("debian", DEBIAN, DEBIAN_GROUP_BY, group_wait="30s", group_interval="5m"),
    Route("debian+inhibit", DEBIAN, DEBIAN_GROUP_BY, group_wait="30s", group_interval="5m", inhibit=True),
    Route("tuned", TUNED, ("alertname", "host"), group_wait="1s", group_interval="5s"),
    Route("tuned+inhibit", TUNED, ("alertname", "host"), group_wait="1s", group_interval="5s", inhibit=True),
]
ROUTE_LABEL = {
    "debian": "Prometheus stack, Debian defaults (15 s, `for: 0m`, group_wait 30 s, Debian's group_by)",
    "debian+inhibit": "... same + inhibit rule",
    "tuned": "Prometheus stack, tuned (5 s, `for: 10s`, group_wait 1 s, group_by host)",
    "tuned+inhibit": "... same + inhibit rule",
}
WT_CHANNELS = {"signal": "Signal", "sms": "SMS", "mail-oncall": "mail (on-call)"}


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    root: str
    scope: str
    breaks: tuple[tuple[str, str], ...]  # (host, mode), in order
    dependents: frozenset[str]


SCENARIOS = [
    Scenario("a", "(a) hypervisor pve1 + its 2 VMs", "pve1", "hypervisor", (("pve1", "poweroff"),),
             frozenset({"dc1", "mail1"})),
    Scenario("b", "(b) switch core-sw1 + everything behind it", "core-sw1", "network",
             (("core-sw1", "poweroff"),),
             frozenset({"pve1", "pve2", "nas1", "dc1", "mail1", "erp1", "files1"})),
    Scenario("c", "(c) NAS nas1 + the 4 VMs on it", "nas1", "storage",
             (("nas1", "poweroff"), ("dc1", "hang"), ("mail1", "hang"), ("erp1", "hang"), ("files1", "hang")),
             frozenset({"dc1", "mail1", "erp1", "files1"})),
]  # fmt: skip


def watchtower_messages(
    http: HttpSink, smtp: TimedSmtpSink, since: float, until: float
) -> dict[str, list[str]]:
    """Each tier-1 channel's message titles in [since, until] (SMTP arrival times from the MailClock)."""
    out: dict[str, list[str]] = {k: [] for k in (*WT_CHANNELS, "later steps")}
    for r in list(http.requests):
        if not since <= r.at <= until:
            continue
        if r.path == "/v2/send":
            out["signal"].append(r.json["message"].split("\r\n")[0])
        elif r.path == "/jsonrpc/sms":
            out["sms"].append(r.json["params"]["message"].split("\r\n")[0])
    for at, rcpt, subject in list(smtp.arrivals):
        if since <= at <= until:
            out["mail-oncall" if rcpt == "oncall@lab.test" else "later steps"].append(subject)
    return out


SMS_SCOPE = {"network": "NET", "hypervisor": "HV", "storage": "STOR"}


def judge_watchtower(title: str, sc: Scenario) -> tuple[bool, str]:
    full = rf"#\d+ {sc.scope} {re.escape(sc.root)} DOWN"
    sms = rf"#\d+ {SMS_SCOPE[sc.scope]} {re.escape(sc.root)} DOWN"
    ok = re.search(full, title) is not None or re.search(sms, title) is not None
    return ok, title.replace("|", "/")


def judge_prometheus(note: Any, sc: Scenario) -> tuple[bool, str]:
    hosts = sorted({a["labels"].get("host", "?") for a in note.json["alerts"]})
    n = len(note.json["alerts"])
    if hosts == [sc.root]:
        return True, f"{n} alert(s), all of {sc.root}"
    if sc.root in hosts:
        return False, f"{n} alerts of {len(hosts)} hosts ({', '.join(hosts)}): root not singled out"
    return False, f"{n} alerts, only dependents ({', '.join(hosts)}): root not named"


def wait_all_clear(http: HttpSink, titles: list[str], since: float, timeout: float = 300.0) -> float:
    """Wait until the Signal receiver got the all-clear of every incident paged in ``titles``, so a
    late all-clear (sent once recovery held ``notify.all_clear_after``) does not fall into the next
    scenario's window. Returns the seconds waited."""
    ids = {m for t in titles for m in re.findall(r"#(\d+) ", t)}
    start = time.monotonic()

    def cleared() -> bool:
        sent = [r.json["message"] for r in list(http.requests) if r.path == "/v2/send" and r.at >= since]
        return all(any(f"#{i} RESOLVED" in m for m in sent) for i in ids)

    poll(cleared, timeout, f"watchtower's all-clear of incident(s) {sorted(ids)}", every=0.5)
    return time.monotonic() - start


def run_scenario(
    sc: Scenario, lab: Lab, wt: Watchtower, stack: PromStack | None, http: HttpSink, smtp: TimedSmtpSink,
    window: float, last: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    wt.wait_settled(240)
    if stack is not None:
        stack.wait_healthy(240)
        stack.restart_alertmanagers()
    random_phase(5.0)
    t0 = time.monotonic()
    try:
        for host, mode in sc.breaks:
            lab.break_host(host, mode)
        log(f"{sc.title}: broken at T0, watching {window:.0f}s")
        time.sleep(max(0.0, t0 + window - time.monotonic()))
        end = time.monotonic()
        got = watchtower_messages(http, smtp, t0, end)
        incidents = wt.incidents()
    finally:
        for host, _ in reversed(sc.breaks):
            lab.repair(host)
    if not last:
        waited = wait_all_clear(http, got["signal"], t0)
        log(f"{sc.title}: all-clear {waited:.0f}s after the repair")
    rows: list[dict[str, Any]] = []
    opened = ", ".join(
        f"#{i['id']} {i['scope']} {i['root']} ({len(i['affected'])} affected)" for i in incidents
    )
    for key, label in WT_CHANNELS.items():
        titles = got[key]
        ok, text = judge_watchtower(titles[0], sc) if titles else (False, "(nothing)")
        rows.append(
            {"scenario": sc, "system": "watchtower, shipped defaults", "channel": label, "count": len(titles),
             "first": text, "right": ok and len(titles) == 1, "note": opened}
        )  # fmt: skip
    rows.append(
        {"scenario": sc, "system": "watchtower, shipped defaults", "channel": "tier2/tier4 mail",
         "count": len(got["later steps"]), "first": "(none due in the window)" if not got["later steps"]
         else got["later steps"][0], "right": not got["later steps"], "note": ""}
    )  # fmt: skip
    if stack is not None:
        for route in stack.routes:
            notes = [n for n in hook_notifications(http, route.name, t0) if n.at <= end]
            ok, text = judge_prometheus(notes[0], sc) if notes else (False, "(nothing)")
            at = f" at {notes[0].at - t0:.0f} s" if notes else ""
            rows.append(
                {"scenario": sc, "system": ROUTE_LABEL[route.name], "channel": "webhook", "count": len(notes),
                 "first": text + at, "right": ok and len(notes) == 1,
                 "note": ", ".join(f"{len(n.json['alerts'])}@{n.at - t0:.0f}s" for n in notes)}
            )  # fmt: skip
    for r in rows:
        log(f"  {r['system'][:40]:40} {r['channel']:16} {r['count']:3}  {r['first'][:90]}")
    return rows


def table(rows: list[dict[str, Any]], window: float) -> str:
    lines = [
        f"| scenario | system | channel | notifications in the first {window:.0f} s "
        "| first one says | 1 per channel-step, right root and scope |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        count = str(r["count"])
        if r["system"].startswith("Prometheus") or r["system"].startswith("..."):
            count += f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"| {r['scenario'].title} | {r['system']} | {r['channel']} | {count} | {r['first']} "
            f"| {'yes' if r['right'] else '**no**'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=300.0, help="seconds watched after T0 (default 300)")
    parser.add_argument("--scenarios", default="abc", help="which of a, b, c (default all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    parser.add_argument("--quick", action="store_true", help="CI smoke: scenario a, 25 s, tuned only")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--wait-lab", type=float, default=900.0, help="max seconds to wait for the demo site")
    parser.add_argument(
        "--use-running-lab", action="store_true", help="use the demo site already up, leave it up"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_storm: needs root (network namespaces)", file=sys.stderr)
        return 2
    window = 25.0 if args.quick else args.window
    chosen = [s for s in SCENARIOS if s.key in ("a" if args.quick else args.scenarios)]
    routes = [] if args.no_prometheus else [r for r in ROUTES if not args.quick or r.timing == TUNED]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-storm-") as tmp:
        work = Path(tmp)
        smtp, http = TimedSmtpSink().start(), HttpSink().start()
        lab: Lab | None = None
        stack: PromStack | None = None
        wt: Watchtower | None = None
        try:
            lab = open_demo_lab(args.use_running_lab, args.wait_lab)
            if routes:
                stack = PromStack(routes, http, work / "prom").start()
            wt = Watchtower(demo_watchtower_config(smtp, http, work / "state"), work)
            runs = [sc for _ in range(args.repeat) for sc in chosen]
            for i, sc in enumerate(runs):
                rows.extend(run_scenario(sc, lab, wt, stack, http, smtp, window, last=i == len(runs) - 1))
        finally:
            if wt is not None:
                wt.stop()
            if stack is not None:
                stack.stop()
            if lab is not None and not args.use_running_lab:
                lab.down()
            smtp.stop()
            http.stop()
    out = table(rows, window)
    print(out)
    summary = Counter((r["system"].startswith("watchtower"), r["right"]) for r in rows)
    print(f"watchtower rows right: {summary[(True, True)]}/{summary[(True, True)] + summary[(True, False)]}")
    if not args.no_write:
        write_section(
            MARKER,
            [
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.",
                f"Command: {command_line()}",
                "",
                *textwrap.wrap(ABOUT.format(window=window), 100),
                "",
                out,
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
