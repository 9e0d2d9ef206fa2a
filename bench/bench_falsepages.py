#!/usr/bin/env python3
"""False pages: how often a monitor pages for a target that is lossy but up, or one that flaps.

On the demo site, at the same time: (1) 30 % packet loss on pve2's production NIC
(``break_host('pve2', 'loss', 30)``: its prod ICMP and HTTP paths; its management path stays clean;
the VMs erp1 and files1, whose traffic enters through that NIC, see the loss on every path);
(2) mail1 flapping: powered off 20 s, back 20 s, for the whole window. Counted: pages (a first
page or a "failed again") per channel. Target: 0 for the loss, <= 1 for the flapping target.
The Prometheus stack (Debian defaults and tuned) watches the same outage for comparison.

    .venv/bin/python bench/bench_falsepages.py              # 30 min, writes bench/RESULTS.md
    .venv/bin/python bench/bench_falsepages.py --quick      # 5 min
    .venv/bin/python bench/bench_falsepages.py --duration 60 --no-prometheus --no-write  # smoke

Traffic: 127.0.0.1 and the demo's 10.213.x.x namespaces only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import textwrap
import threading
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
    write_section,
)

from watchtower.lab import Lab

MARKER = "## False pages under loss and flapping (bench/bench_falsepages.py)"
LOSSY, LOSS_PCT = "pve2", 30
LOSSY_SET = {"pve2", "erp1", "files1"}  # the NIC's traffic: pve2 and the VMs behind it
FLAPPER, FLAP_DOWN, FLAP_UP = "mail1", 20.0, 20.0
ROUTES = [
    Route("debian", DEBIAN, DEBIAN_GROUP_BY, group_wait="30s", group_interval="5m"),
    Route("tuned", TUNED, ("alertname", "host"), group_wait="1s", group_interval="5s"),
]
ROUTE_LABEL = {
    "debian": "Prometheus stack, Debian defaults (15 s, `for: 0m`, group_wait 30 s)",
    "tuned": "Prometheus stack, tuned (5 s, `for: 10s`, group_wait 1 s)",
}
PAGE_RE = re.compile(r"#\d+ (?:FAILED AGAIN \(flap \d+\): )?(\w+) (\S+) DOWN")
SMS_PAGE_RE = re.compile(r"WT \S+ #\d+ (?:FAILED AGAIN flap \d+ )?([A-Z]+) (\S+) DOWN")
ABOUT = (
    "Both faults run at once on the demo site for {duration:.0f} s, after every system saw the site "
    "healthy: pve2's prod NIC drops {pct} % of what it receives (nft netdev ingress, `numgen random`), so "
    "pve2's prod ICMP and HTTP paths and every path of its VMs erp1 and files1 lose 30 % while pve2's "
    "management path stays clean; mail1 is powered off for {down:.0f} s and back for {up:.0f} s, over and "
    "over. A page is a message that says DOWN (first page or 'failed again'); all-clears are counted "
    "separately. watchtower runs config/demo.yaml as shipped (fail_after 2, confirm_paths 2, 1 s retry). "
    "For the Prometheus stack a page is a firing webhook notification naming a host of that fault."
)


class Flapper(threading.Thread):
    def __init__(self, lab: Lab, stop: threading.Event):
        super().__init__(name="flapper", daemon=True)
        self.lab, self.stop, self.cycles = lab, stop, 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.lab.break_host(FLAPPER, "poweroff")
            self.stop.wait(FLAP_DOWN)
            self.lab.repair(FLAPPER)
            self.cycles += 1
            self.stop.wait(FLAP_UP)


def watchtower_pages(http: HttpSink, smtp: TimedSmtpSink, since: float, until: float) -> dict[str, Any]:
    """Per channel: DOWN messages by root, and the number of other messages (all-clears, acks)."""
    texts: dict[str, list[str]] = {"signal": [], "sms": [], "mail": []}
    for r in list(http.requests):
        if since <= r.at <= until and r.path == "/v2/send":
            texts["signal"].append(r.json["message"].split("\r\n")[0])
        elif since <= r.at <= until and r.path == "/jsonrpc/sms":
            texts["sms"].append(r.json["params"]["message"])
    for at, rcpt, subject in list(smtp.arrivals):
        if since <= at <= until and rcpt == "oncall@lab.test":
            texts["mail"].append(subject)
    out: dict[str, Any] = {}
    for channel, items in texts.items():
        roots = []
        for text in items:
            m = (SMS_PAGE_RE if channel == "sms" else PAGE_RE).search(text)
            if m:
                roots.append(m.group(2))
        out[channel] = {"roots": roots, "other": len(items) - len(roots), "texts": items}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| fault | system | channel | pages | other messages | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fault']} | {r['system']} | {r['channel']} | {r['pages']} | {r['other']} | {r['target']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    parser.add_argument("--quick", action="store_true", help="5 minutes")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--wait-lab", type=float, default=900.0, help="max seconds to wait for the demo site")
    parser.add_argument(
        "--use-running-lab", action="store_true", help="use the demo site already up, leave it up"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_falsepages: needs root (network namespaces)", file=sys.stderr)
        return 2
    duration = 300.0 if args.quick else args.duration
    routes = [] if args.no_prometheus else ROUTES
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-false-") as tmp:
        work = Path(tmp)
        smtp, http = TimedSmtpSink().start(), HttpSink().start()
        lab: Lab | None = None
        stack: PromStack | None = None
        wt: Watchtower | None = None
        stop = threading.Event()
        flapper: Flapper | None = None
        try:
            lab = open_demo_lab(args.use_running_lab, args.wait_lab)
            flapper = Flapper(lab, stop)
            if routes:
                stack = PromStack(routes, http, work / "prom").start()
            wt = Watchtower(demo_watchtower_config(smtp, http, work / "state"), work)
            wt.wait_settled(180)
            if stack is not None:
                stack.wait_healthy(180)
                stack.restart_alertmanagers()
            t0 = time.monotonic()
            lab.break_host(LOSSY, "loss", LOSS_PCT)
            flapper.start()
            log(f"{LOSSY} at {LOSS_PCT} % loss and {FLAPPER} flapping for {duration:.0f}s")
            while time.monotonic() < t0 + duration:
                time.sleep(min(30.0, max(0.0, t0 + duration - time.monotonic())))
                got = watchtower_pages(http, smtp, t0, time.monotonic())
                log(f"  {time.monotonic() - t0:.0f}s: signal pages {got['signal']['roots']}")
            end = time.monotonic()
        finally:
            stop.set()
            if flapper is not None and flapper.is_alive():
                flapper.join(FLAP_DOWN + 30)
            for host in (LOSSY, FLAPPER):
                try:
                    if lab is not None:
                        lab.repair(host)
                except Exception as exc:  # the lab may not be up
                    log(f"repair {host}: {exc}")
            if wt is not None:
                wt.stop()
            if stack is not None:
                stack.stop()
            if lab is not None and not args.use_running_lab:
                lab.down()
            smtp.stop()
            http.stop()
    got = watchtower_pages(http, smtp, t0, end)
    cycles = flapper.cycles if flapper is not None else 0
    faults = [
        (f"{LOSSY} prod NIC {LOSS_PCT} % loss ({duration / 60:.0f} min)", LOSSY_SET, "0"),
        (f"{FLAPPER} flapping {FLAP_DOWN:.0f} s down / {FLAP_UP:.0f} s up ({cycles} cycles)",
         {FLAPPER}, "<= 1"),
    ]  # fmt: skip
    for fault, hosts, target in faults:
        limit = 0 if target == "0" else 1
        for channel in ("signal", "sms", "mail"):
            pages = [r for r in got[channel]["roots"] if r in hosts]
            rows.append(
                {"fault": fault, "system": "watchtower, shipped defaults", "channel": channel,
                 "pages": len(pages) if not pages else f"{len(pages)} ({', '.join(sorted(set(pages)))})",
                 "other": got[channel]["other"],
                 "target": f"{target}: " + ("met" if len(pages) <= limit else "**missed**")}
            )  # fmt: skip
        for route in routes:
            notes = [n for n in hook_notifications(http, route.name, t0) if n.at <= end]
            hit = [n for n in notes if {a["labels"].get("host") for a in n.json["alerts"]} & hosts]
            rows.append(
                {"fault": fault, "system": ROUTE_LABEL[route.name], "channel": "webhook", "pages": len(hit),
                 "other": "-", "target": "(reference)"}
            )  # fmt: skip
    out = table(rows)
    print(out)
    if not args.no_write:
        write_section(
            MARKER,
            [
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.",
                f"Command: {command_line()}",
                "",
                *textwrap.wrap(
                    ABOUT.format(duration=duration, pct=LOSS_PCT, down=FLAP_DOWN, up=FLAP_UP), 100
                ),
                "",
                out,
                "",
                "watchtower's Signal page titles in the window: "
                + ("; ".join(f"`{t}`" for t in got["signal"]["texts"][:12]) or "(none)"),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
