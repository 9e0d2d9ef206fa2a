"""The ``watchtower`` command. Parses arguments, calls into the rest, maps errors to exit codes.

User errors (a bad config, an unknown target, a daemon that is not running) print one line per
problem and exit with the contract's code; tracebacks are for watchtower's own bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import sys
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from watchtower import __version__
from watchtower.config import NOTE_KINDS, ClientConfig, Config, ConfigError, load_client_config, load_config

if TYPE_CHECKING:
    from watchtower.store import Store

EXIT_OK, EXIT_DOWN, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_CONFIG = "/etc/watchtower/watchtower.yaml"


def default_config() -> str:
    return os.environ.get("WATCHTOWER_CONFIG") or DEFAULT_CONFIG


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def _load_client(path: str) -> ClientConfig:
    """For commands that only talk to the daemon (or read its store): the API token is the only
    secret they need, so an unreadable BMC password does not stop an ``ack``."""
    try:
        return load_client_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


# --------------------------------------------------------------------------- commands


def _channel_problems(cfg: Config) -> list[str]:
    """Channel URLs apprise refuses (at check and at start): one line each, never the URL."""
    if not cfg.notify.channels:
        return []
    from watchtower.notify.sender import channel_problems

    return channel_problems(cfg.notify.channels)


def cmd_check(args: argparse.Namespace) -> int:
    from watchtower.config import unplaced_paths
    from watchtower.people import coverage_warnings

    cfg = _load(args.config)
    problems = _channel_problems(cfg)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    for line in coverage_warnings(cfg):
        print(f"warning: {line}", file=sys.stderr)
    print(f"ok: {len(cfg.targets)} targets, {len(cfg.paths)} paths")
    if args.explain:
        print(explain_networks(cfg))
    for p in unplaced_paths(cfg):
        print(
            f"warning: targets.{p.target} path {p.name!r} ({p.host}) is on no network: no cidr of "
            f"networks: holds it; set network: on the path",
            file=sys.stderr,
        )
    return EXIT_OK


def explain_networks(cfg: Config) -> str:
    """Which network each path landed on, and what it depends on (``check --explain``)."""
    from watchtower.engine.correlate import inferred_network
    from watchtower.engine.topology import Topology

    topology = Topology.from_config(cfg)
    lines = []
    if cfg.networks:
        lines.append("networks:")
        for name, net in cfg.networks.items():
            cidrs = ", ".join(map(str, net.cidr))
            lines.append(f"  {name}: {cidrs}" + (f" via {' -> '.join(net.via)}" if net.via else ""))
    else:
        lines.append("networks: none configured; inferred from address prefixes (shown in brackets)")
    for name in cfg.targets:
        node = topology.nodes[name]
        needs = f" (depends on {', '.join(node.parents)})" if node.parents else ""
        lines.append(f"{name}{needs}:")
        for p in (x for x in (*cfg.paths, *cfg.bmc_paths) if x.target == name):
            if cfg.networks:
                placed = cfg.networks.get(p.network or "")
                where = "NO NETWORK" if placed is None else f"{p.network}"
                if placed is not None and placed.via:
                    where += f" via {', '.join(placed.via)}"
            else:
                where = f"[{inferred_network(p.host) or 'no address'}]"
            served = "BMC" if p.by_bmc else "OS"
            lines.append(f"  {p.name:<40} {served:<3} {where}")
    return "\n".join(lines)


def cmd_schema(args: argparse.Namespace) -> int:
    from watchtower.config import json_schema

    try:
        print(json.dumps(json_schema(), indent=2))
        sys.stdout.flush()
    except BrokenPipeError:  # `watchtower schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from watchtower.daemon import run_daemon, setup_logging

    cfg = _load(args.config)
    problems = _channel_problems(cfg)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    setup_logging(args.log_level, cfg.log_format)
    try:
        asyncio.run(run_daemon(cfg, config_path=args.config))
    except OSError as exc:  # e.g. the listen port is taken, or no ICMP socket is allowed
        print(f"watchtower: cannot start: {exc}", file=sys.stderr)
        return EXIT_DOWN
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.target not in cfg.targets:
        close = difflib.get_close_matches(args.target, list(cfg.targets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"no target named {args.target!r}{hint}", file=sys.stderr)
        return EXIT_INVALID
    rows = asyncio.run(_probe_target(cfg, args.target))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["path"]) for r in rows)
        for r in rows:
            latency = f"{r['latency'] * 1000:8.1f} ms" if r["latency"] is not None else " " * 11
            print(f"{'UP  ' if r['ok'] else 'DOWN'}  {r['path']:<{width}}  {latency}  {r['detail']}")
            bmc = r.get("bmc")
            if bmc:
                power = {True: "on", False: "OFF", None: "unknown"}[bmc["power_on"]]
                print(f"      chassis power {power}" + (f", health {bmc['health']}" if bmc["health"] else ""))
                for e in bmc["events"][-5:]:
                    print(f"      SEL {e['severity']:<8} {e['timestamp']}  {e['text']}")
                bad = [s for s in bmc["sensors"] if s["state"] != "ok"]
                print(f"      sensors: {len(bmc['sensors'])} read, {len(bad)} not ok")
                for s in bad:
                    print(f"      sensor {s['state']:<8} {s['name']} = {s['value']} {s['unit']}")
    _record_manual_check(cfg, args.target, rows)
    # The BMC is consulted, not a witness: only the target's own paths decide the exit code.
    return EXIT_OK if all(r["ok"] for r in rows if not r["bmc_block"]) else EXIT_DOWN


def _record_manual_check(cfg: Config, target: str, rows: list[dict[str, Any]]) -> None:
    """During an open incident involving ``target``, a probe run is the playbook's manual check:
    it goes on that incident's timeline (best effort: no daemon, no record)."""
    own = [r for r in rows if not r["bmc_block"]]
    up = [r["path"] for r in own if r["ok"]]
    text = f"watchtower probe {target}: {len(up)} of {len(own)} paths up" + (
        f" ({', '.join(up)})" if up else ""
    )
    by = os.environ.get("SUDO_USER") or os.environ.get("USER") or "cli"
    try:
        incidents = asyncio.run(_api(cfg, "GET", "/api/v1/incidents"))
        for incident in incidents:
            if target == incident["root"] or target in incident["affected"]:
                body = {"kind": "manual_check", "text": text, "by": by}
                asyncio.run(_api(cfg, "POST", f"/api/v1/incidents/{incident['id']}/notes", body))
                print(f"recorded on incident #{incident['id']} as the manual check", file=sys.stderr)
    except Exception:  # no daemon running (or it refused): the probe's own output is what counts
        return


async def _probe_target(cfg: Config, target: str) -> list[dict[str, Any]]:
    from watchtower.engine.monitor import open_shared
    from watchtower.engine.runner import run_probe

    paths = [p for p in (*cfg.paths, *cfg.bmc_paths) if p.target == target]
    async with AsyncExitStack() as stack:
        try:
            shared = await open_shared(stack, cfg)
        except OSError as exc:
            raise SystemExit(f"watchtower: cannot open probe sockets: {exc}") from None
        results = await asyncio.gather(*(run_probe(p, shared) for p in paths))
    return [
        {
            "path": p.name,
            "kind": p.kind,
            "ok": r.ok,
            "latency": r.latency,
            "failure": r.failure.value if r.failure else None,
            "detail": r.detail,
            "bmc_block": p.is_bmc,
            "values": dict(r.values),
            "bmc": None
            if r.bmc is None
            else {
                "power_on": r.bmc.power_on,
                "health": r.bmc.health,
                "events": [
                    {"severity": e.severity, "timestamp": e.timestamp, "text": e.text, "id": e.record_id}
                    for e in r.bmc.new_events
                ],
                "sensors": [
                    {"name": s.name, "value": s.value, "unit": s.unit, "state": s.state}
                    for s in r.bmc.sensors
                ],
            },
        }
        for p, r in zip(paths, results, strict=True)
    ]


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_client(args.config)
    doc = _call_daemon(cfg, "GET", "/api/v1/state")
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"site {doc['site']}  vantage {doc['vantage']}")
    for name, target in doc["targets"].items():
        down = [p["name"] for p in target["paths"] if p["state"] == "down"]
        extra = f"  down: {', '.join(down)}" if down else ""
        if target.get("muted_until"):
            extra += f"  (muted until {target['muted_until'][:16].replace('T', ' ')} UTC)"
        print(f"  {target['state']:<11} {name:<20} {target['role']:<10}{extra}")
    return EXIT_OK


class ApiError(Exception):
    """The daemon answered with an error status."""

    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"HTTP {status}: {text.strip()}")


async def _api(cfg: Config | ClientConfig, method: str, path: str, body: Any = None) -> Any:
    """Call the running daemon's API on ``listen`` with the configured token."""
    import aiohttp

    host, port = cfg.listen_host_port
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    token = cfg.secret("api_token")
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), trust_env=False) as session,
        session.request(method, f"http://{shown}:{port}{path}", headers=headers, json=body) as response,
    ):
        if response.status >= 400:
            raise ApiError(response.status, await response.text())
        if response.content_type != "application/json":
            return await response.text()  # e.g. the Markdown report
        return await response.json()


def _call_daemon(
    cfg: Config | ClientConfig, method: str, path: str, body: Any = None, *, api_errors: bool = False
) -> Any:
    """The daemon's answer. Not reachable (or, unless ``api_errors``, answering with an error)
    prints one line and exits 3; with ``api_errors`` an error status raises ApiError."""
    try:
        return asyncio.run(_api(cfg, method, path, body))
    except ApiError as exc:
        if api_errors:
            raise
        print(f"watchtower daemon at {cfg.listen} refused: {exc}", file=sys.stderr)
    except Exception as exc:  # any failure to talk to the daemon means: not reachable
        print(
            f"watchtower daemon not reachable at {cfg.listen}: {exc.__class__.__name__}: {exc}",
            file=sys.stderr,
        )
    raise SystemExit(EXIT_UNREACHABLE)


class DaemonUnreachable(Exception):
    """Nothing answers on ``listen``: the daemon is not running (or not reachable from here)."""


def _ask_daemon(cfg: Config | ClientConfig, path: str) -> Any:
    """GET from the running daemon: raises DaemonUnreachable when it does not answer, ApiError
    when it answers with an error status."""
    try:
        return asyncio.run(_api(cfg, "GET", path))
    except ApiError:
        raise
    except Exception as exc:  # any failure to talk to the daemon means: not reachable
        raise DaemonUnreachable(f"{exc.__class__.__name__}: {exc}") from exc


def _stored(cfg: Config | ClientConfig, why: DaemonUnreachable) -> Store | None:
    """The daemon's store, opened to read while the daemon is down (None: there is none yet).
    Says on stderr that the answer comes from the store."""
    from watchtower.store import DB_NAME, Store, StoreError

    path = cfg.state_dir / DB_NAME
    where = f"watchtower daemon not reachable at {cfg.listen} ({why})"
    print(f"{where}; reading the store {path}", file=sys.stderr)
    if not path.exists():  # do not create a store (or a state_dir) just to read it
        print(f"no store at {path}: the daemon has not recorded anything there", file=sys.stderr)
        return None
    try:
        return Store(path)
    except StoreError as exc:
        print(f"cannot read the store: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None


def _age(doc: dict[str, Any], now: float) -> str:
    """How long an incident (JSON) lasted: first failed probe (else confirmation) to resolution (else now)."""
    from datetime import datetime

    from watchtower.report import span

    start = datetime.fromisoformat(doc.get("first_failure_at") or doc["opened_at"]).timestamp()
    end = datetime.fromisoformat(doc["resolved_at"]).timestamp() if doc.get("resolved_at") else now
    return span(end - start) + ("" if doc.get("resolved_at") else "+")


def cmd_incidents(args: argparse.Namespace) -> int:
    cfg = _load_client(args.config)
    try:
        incidents = _ask_daemon(cfg, "/api/v1/incidents" + ("?all=1" if args.all else ""))
    except ApiError as exc:
        print(f"watchtower daemon at {cfg.listen} refused: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DaemonUnreachable as exc:
        store = _stored(cfg, exc)
        incidents = []
        if store is not None:
            from watchtower.web.app import incident_document

            try:
                incidents = [
                    incident_document(i, store.notifications(i.id))
                    for i in store.incidents(open_only=not args.all)
                ]
            finally:
                store.close()
    if args.json:
        print(json.dumps(incidents, indent=2))
        return EXIT_OK
    if not incidents:
        print("no open incidents" if not args.all else "no incidents")
        return EXIT_OK
    now = time.time()
    header = ("ID", "STATE", "SCOPE", "ROOT", "CAUSE", "OPENED (UTC)", "DURATION", "AFFECTED", "ACKED BY")
    rows = [
        (
            f"#{i['id']}", i["state"], i["scope"], i["root"], i["cause"] or "-",
            i["opened_at"][:19].replace("T", " "), _age(i, now), str(len(i["affected"])),
            " ".join(str(i["acknowledged_by"] or "-").split()),
        )
        for i in incidents
    ]  # fmt: skip
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    for r in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """The post-mortem as Markdown: from the daemon, else straight from its store."""
    cfg = _load_client(args.config)
    try:
        text = _ask_daemon(cfg, f"/api/v1/incidents/{args.id}/report")
    except ApiError as exc:
        if exc.status == 404:
            print(f"no incident #{args.id}", file=sys.stderr)
            return EXIT_DOWN
        print(f"watchtower daemon at {cfg.listen} refused: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DaemonUnreachable as exc:
        from watchtower.engine.escalation import outage_start
        from watchtower.report import render_report

        full = _load(args.config)  # the report quotes targets and services of the config
        store = _stored(full, exc)
        incident = store.incident(args.id) if store is not None else None
        if store is None or incident is None:
            if store is not None:
                store.close()
            print(f"no incident #{args.id}", file=sys.stderr)
            return EXIT_DOWN
        try:
            text = render_report(
                incident,
                store.notifications(incident.id),
                store.attempts(incident.id),
                store.blind_windows(outage_start(incident), incident.resolved_at),
                full,
                time.time(),
            )
        finally:
            store.close()
    sys.stdout.write(str(text) if str(text).endswith("\n") else f"{text}\n")
    return EXIT_OK


def cmd_ack(args: argparse.Namespace) -> int:
    cfg = _load_client(args.config)
    try:
        incident = _call_daemon(
            cfg, "POST", f"/api/v1/incidents/{args.id}/ack", {"by": args.by}, api_errors=True
        )
    except ApiError as exc:
        print(f"cannot acknowledge #{args.id}: {exc}", file=sys.stderr)
        return EXIT_DOWN if exc.status == 404 else EXIT_INVALID
    print(f"#{incident['id']} {incident['state']} by {incident['acknowledged_by']}: {incident['headline']}")
    return EXIT_OK


def _until_iso(text: str, now: float) -> str:
    """``--until``: ISO 8601 (without a zone: this box's local time) or ``HH:MM`` (the next one, local)."""
    from datetime import datetime, timedelta

    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", text.strip()):
            hour, minute = (int(p) for p in text.strip().split(":"))
            local = datetime.fromtimestamp(now).astimezone()
            when = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if when.timestamp() <= now:
                when += timedelta(days=1)
        else:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.astimezone()  # the box's local time zone
    except ValueError:
        raise SystemExit(f"--until {text!r}: give a time like 04:30 or 2026-12-08T04:30") from None
    return when.isoformat()


def cmd_mute(args: argparse.Namespace) -> int:
    cfg = _load_client(args.config)
    if (args.target is None) == (not args.site):
        print("give a TARGET or --site (every target)", file=sys.stderr)
        return EXIT_INVALID
    body: dict[str, Any] = {"reason": args.reason, "by": args.by}
    body.update({"site": True} if args.site else {"target": args.target})
    if args.until is not None:
        body["until"] = _until_iso(args.until, time.time())
    else:
        body["for"] = args.for_
    try:
        mute = _call_daemon(cfg, "POST", "/api/v1/mutes", body, api_errors=True)
    except ApiError as exc:
        print(f"cannot mute: {exc}", file=sys.stderr)
        return EXIT_INVALID
    what = "the whole site" if mute["site"] else mute["target"]
    print(f"mute #{mute['id']}: {what} muted until {mute['end']} by {mute['by']}: {mute['reason']}")
    return EXIT_OK


def cmd_unmute(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    cfg = _load_client(args.config)
    if (args.target is None) == (not args.site):
        print("give a TARGET or --site", file=sys.stderr)
        return EXIT_INVALID
    doc = _call_daemon(cfg, "GET", "/api/v1/mutes")
    ids = [
        m["id"]
        for m in doc["mutes"]
        if (args.site and m["site"]) or (not args.site and m["target"] == args.target)
        or str(m["id"]) == args.target
    ]  # fmt: skip
    if not ids:
        windows = [w["every"] for w in doc["windows"] if w["active_until"]]
        extra = f" (a config window is running: {', '.join(windows)})" if windows else ""
        print(f"no running mute of {args.target or 'the site'}{extra}", file=sys.stderr)
        return EXIT_DOWN
    for mute_id in ids:
        _call_daemon(cfg, "DELETE", f"/api/v1/mutes/{mute_id}?by={quote(args.by)}")
        print(f"mute #{mute_id} ended by {args.by}")
    return EXIT_OK


def cmd_note(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    body = {"kind": args.kind, "text": " ".join(args.text), "by": args.by}
    try:
        incident = _call_daemon(cfg, "POST", f"/api/v1/incidents/{args.id}/notes", body, api_errors=True)
    except ApiError as exc:
        print(f"cannot add a note to #{args.id}: {exc}", file=sys.stderr)
        return EXIT_DOWN if exc.status == 404 else EXIT_INVALID
    print(f"#{incident['id']} noted ({args.kind}) by {args.by}")
    return EXIT_OK


def _drill_lines(drill: dict[str, Any]) -> list[str]:
    head = f"drill #{drill['id']} {drill['state']} started {drill['started_at']} by {drill['requested_by']}"
    lines = [head + (f", compress {drill['compress']:g}" if drill["compress"] != 1 else "")]
    for c in drill["contacts"]:
        if c["result"]:
            state = c["result"]
        elif c["confirmed_at"]:
            state = f"confirmed at {c['confirmed_at']}"
        else:
            state = f"waiting (link expires {c['expires_at']})"
        lines.append(f"  {c['contact']:<12} {state}")
    return lines


def cmd_drill(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        if args.action == "run":
            body: dict[str, Any] = {"by": args.by}
            if args.compress is not None:
                body["compress"] = args.compress
            drill = _call_daemon(cfg, "POST", "/api/v1/drills", body, api_errors=True)
            print("\n".join(_drill_lines(drill)))
            print(f"every contact gets a DRILL message; follow it with: watchtower drills -c {args.config}")
            return EXIT_OK
        if args.drill is None or args.token is None:
            print("usage: watchtower drill confirm DRILL_ID TOKEN", file=sys.stderr)
            return EXIT_INVALID
        answer = _call_daemon(
            cfg, "POST", f"/api/v1/drills/{args.drill}/confirm/{args.token}?via=cli", {}, api_errors=True
        )
    except ApiError as exc:
        print(f"drill {args.action}: {exc}", file=sys.stderr)
        return EXIT_INVALID if exc.status in (400, 404, 409, 410) else EXIT_DOWN
    print(f"drill #{answer['drill']}: {answer['contact']} confirmed")
    return EXIT_OK


def cmd_drills(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    doc = _call_daemon(cfg, "GET", "/api/v1/drills")
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    for v in doc["contacts"]:
        when = v["last_verified"] or "never"
        flag = "  OVERDUE" if v["overdue"] else ""
        print(
            f"{v['contact']:<12} last verified {when}{flag}"
            + (f": {v['last_result']}" if v["last_result"] else "")
        )
    for drill in doc["drills"]:
        print("\n".join(_drill_lines(drill)))
    if not doc["drills"]:
        print("no drills yet: watchtower drill run")
    return EXIT_OK


def cmd_lab(args: argparse.Namespace) -> int:
    from watchtower.lab import lab_main

    return lab_main(args.lab_args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the simulated site, run the daemon against it, tear the site down on exit."""
    from watchtower.daemon import run_daemon, setup_logging
    from watchtower.lab import DEMO, Lab

    cfg = _load(args.config)
    if os.geteuid() != 0:
        print("watchtower demo: needs root (it creates network namespaces)", file=sys.stderr)
        return EXIT_INVALID
    setup_logging(args.log_level, cfg.log_format)
    lab = Lab(DEMO)  # the default run dir, where `watchtower lab break/repair` find its helpers
    started = time.monotonic()
    lab.up()
    host, port = cfg.listen_host_port
    print(
        f"\nsimulated site up in {time.monotonic() - started:.1f}s; watchtower on http://{host}:{port}/\n"
        f"  watch:   curl -s http://{host}:{port}/metrics | grep watchtower_path_up\n"
        f"           watchtower status -c {args.config}\n"
        f"  break:   watchtower lab break pve1 poweroff   (or psufail | hang | bmcdown | mgmtdown |\n"
        f"           linkdown | loss 100 | icmpdrop | delay 2000); watchtower lab cut-monitor\n"
        f"  repair:  watchtower lab repair pve1\n"
        f"  stop:    Ctrl-C (the site is removed)\n",
        file=sys.stderr,
        flush=True,
    )
    receivers = _demo_receivers()
    try:
        asyncio.run(run_daemon(cfg, config_path=args.config))
    finally:
        for receiver in receivers:
            receiver.stop()
        lab.down()
    return EXIT_OK


def _demo_receivers() -> list[Any]:
    """Stand-ins for the demo's alert channels (see config/demo.yaml): what arrives is printed."""
    from watchtower.lab.sinks import HttpRequest, HttpSink, SmtpMessage, SmtpSink

    def show_mail(m: SmtpMessage) -> None:
        print(f"\n--- mail to {m.to}: {m.subject}\n{m.text}\n", file=sys.stderr, flush=True)

    def show_request(r: HttpRequest) -> None:
        doc = r.json if isinstance(r.json, dict) else {}
        if r.path == "/v2/send":
            print(
                f"\n--- Signal to {doc.get('recipients')}:\n{doc.get('message')}\n",
                file=sys.stderr,
                flush=True,
            )
        elif r.path == "/jsonrpc/sms":
            params = doc.get("params") or {}
            print(f"\n--- SMS to {params.get('to')}: {params.get('message')}\n", file=sys.stderr, flush=True)

    receivers: list[Any] = []
    for make in (
        lambda: SmtpSink(2525, on_message=show_mail),
        lambda: HttpSink(8089, on_request=show_request),
    ):
        receiver = make()
        try:
            receivers.append(receiver.start())
        except (OSError, RuntimeError, ImportError) as exc:
            print(f"demo: alert receiver on port {receiver.port} not started: {exc}", file=sys.stderr)
    return receivers


def cmd_notify_test(args: argparse.Namespace) -> int:
    """A marked test message through every channel (or the one named), all at once; one line each."""
    cfg = _load(args.config)
    channels = list(cfg.notify.channels)
    if args.channel is not None:
        channels = [c for c in channels if c.name == args.channel]
        if not channels:
            known = ", ".join(c.name for c in cfg.notify.channels) or "none"
            print(f"no channel named {args.channel!r} (known: {known})", file=sys.stderr)
            return EXIT_INVALID
    if not channels:
        print("no channels configured (notify.channels)", file=sys.stderr)
        return EXIT_INVALID
    results, hung = asyncio.run(_notify_test(cfg, channels))
    width = max(len(c.name) for c in channels)
    for channel, r in zip(channels, results, strict=True):
        state = "ok    " if r.ok else "FAILED"
        print(f"{channel.name:<{width}}  {state}  {r.elapsed:.2f}s" + (f"  {r.error}" if r.error else ""))
    code = EXIT_OK if all(r.ok for r in results) else EXIT_DOWN
    if hung:  # a send still blocked in its thread would hold up interpreter exit until it ends
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


async def _notify_test(cfg: Config, channels: list[Any]) -> tuple[list[Any], bool]:
    from watchtower.notify.messages import is_sms_channel, test_message
    from watchtower.notify.sender import make_senders

    senders = make_senders(channels)
    now = time.time()

    async def one(channel: Any) -> Any:
        message = test_message(cfg, channel.name, now)
        if is_sms_channel(channel):
            return await senders[channel.name].send("", message.sms)
        return await senders[channel.name].send(message.title, message.body)

    try:
        results = await asyncio.gather(*(one(c) for c in channels))
    finally:
        for sender in senders.values():
            sender.close()
    return list(results), any(s.hung_threads for s in senders.values())


def _verified(cfg: Config, now: float) -> Any:
    """The drills' record per contact, from the daemon's store (None when there is none yet)."""
    from watchtower.drill import verification_of
    from watchtower.store import DB_NAME, Store, StoreError

    path = cfg.state_dir / DB_NAME
    if not cfg.contacts or not path.exists():
        return None
    try:
        store = Store(path)
    except StoreError:
        return None
    try:
        return verification_of(store, cfg, now)
    finally:
        store.close()


def cmd_readiness(args: argparse.Namespace) -> int:
    """Reads every backup source once (push backups: their last report), then judges."""
    from watchtower import clock
    from watchtower.backups.watch import BackupWatch
    from watchtower.readiness import assess_site, recorded_tests

    cfg = _load(args.config)

    watch: BackupWatch = asyncio.run(_read_backups(cfg))
    report = assess_site(cfg, watch.status, clock.now(), recorded_tests(cfg), _verified(cfg, clock.now()))
    print(json.dumps(report.document(), indent=2) if args.json else report.text())
    return 1 if report.red else 0


async def _read_backups(cfg: Config) -> Any:
    from watchtower import clock
    from watchtower.backups.watch import BackupWatch
    from watchtower.engine.incidents import IncidentTracker
    from watchtower.probes import ProbeContext
    from watchtower.probes.http import new_session

    async with new_session() as session:
        watch = BackupWatch(cfg, IncidentTracker(), ProbeContext(timeout=0, http_session=session))
        await watch.read_all(clock.now())
        return watch


def cmd_plan(args: argparse.Namespace) -> int:
    """The plan as HTML, PDF or vCard, on stdout or into -o FILE."""
    from watchtower import clock
    from watchtower.plan import PdfUnavailable, export

    cfg = _load(args.config)
    watch = asyncio.run(_read_backups(cfg)) if args.format != "vcard" else None
    try:
        data = asyncio.run(export(cfg, args.format, watch.status if watch else {}, clock.now()))
    except PdfUnavailable as exc:
        print(f"plan export: {exc}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "wb") as out:
            out.write(data)
        print(f"wrote {args.output} ({len(data)} bytes)", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def cmd_restore_test(args: argparse.Namespace) -> int:
    from watchtower.config import RestoreTest
    from watchtower.readiness import record_test

    cfg = _load(args.config)
    target = cfg.targets.get(args.target)
    if target is None or target.service is None:
        with_service = sorted(n for n, t in cfg.targets.items() if t.service is not None)
        print(
            f"restore-test: no target {args.target!r} with a service; one of: {', '.join(with_service)}",
            file=sys.stderr,
        )
        return 2
    try:
        test = RestoreTest.model_validate(
            {"date": args.date, "duration": args.duration, "result": args.result, "note": args.note}
        )
    except ValueError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())  # type: ignore[attr-defined]
        print(f"restore-test: {problems}", file=sys.stderr)
        return 2
    path = record_test(cfg, args.target, test)
    print(f"recorded: {target.service.name} restored {test.date} ({test.result}) in {path}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """The way out when the state store is broken: look, salvage, or start afresh."""
    from watchtower.store import DB_NAME, StoreError, StoreLocked, check_file, rebuild

    cfg = _load(args.config)
    path = cfg.state_dir / DB_NAME
    if args.action == "check":
        ok, lines = check_file(path)
        for line in lines:
            print(line)
        if not ok:
            print("run `watchtower store repair` (keeps a copy of this file) with the daemon stopped")
        return EXIT_OK if ok else EXIT_DOWN
    if args.action == "repair" and check_file(path)[0] and not args.force:
        print(f"{path}: ok, nothing to repair (--force rebuilds it anyway)")
        return EXIT_OK
    try:
        backup, salvage = rebuild(cfg.state_dir, salvage=args.action == "repair")
    except (StoreLocked, StoreError, OSError) as exc:
        print(f"watchtower: store {args.action}: {exc}", file=sys.stderr)
        return EXIT_DOWN
    if backup is not None:
        print(f"kept the old database as {backup}")
    if salvage is not None:
        print(f"copied into a new {path}: {salvage.summary()}")
    else:
        print(f"created a new, empty {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


INVALID = "2 invalid config or arguments"
UNREACHABLE = "3 daemon not reachable"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watchtower",
        description="out-of-band monitor for on-call admins",
        epilog="exit codes: 0 ok, 1 something is down or failed, 2 invalid config or arguments, "
        "3 the daemon is not reachable (each command's --help says which apply)",
    )
    parser.add_argument("--version", action="version", version=f"watchtower {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Any, help_text: str, exits: str, config: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"exit codes: {exits}")
        if config:
            p.add_argument(
                "-c", "--config", default=default_config(),
                help="config file (default: $WATCHTOWER_CONFIG, then /etc/watchtower/watchtower.yaml)",
            )  # fmt: skip
        p.set_defaults(func=func)
        return p

    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    p = command("run", cmd_run, "run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads)",
                f"0 clean stop, 1 cannot start (port taken, no ICMP socket), {INVALID}")  # fmt: skip
    p.add_argument("--log-level", default="INFO", choices=levels, help="least severe log lines shown")
    p = command("check", cmd_check, "validate the config (and try every channel URL with apprise)",
                f"0 ok, {INVALID}")  # fmt: skip
    p.add_argument(
        "--explain", action="store_true", help="show the network each path is on and what it depends on"
    )
    p = command("probe", cmd_probe, "probe every path of one target once",
                f"0 all up, 1 some down, {INVALID}")  # fmt: skip
    p.add_argument("target", help="a target of the config")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command("status", cmd_status, "ask the running daemon for the state of every target",
                f"0, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p = command("incidents", cmd_incidents,
                "list incidents of the running daemon (open ones by default; from the store when it is down)",
                f"0, {INVALID}, 3 the daemon refused")  # fmt: skip
    p.add_argument("--all", action="store_true", help="also resolved incidents")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command("ack", cmd_ack, "acknowledge an incident (stops further escalation)",
                f"0, 1 unknown incident, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("id", type=int, help="the incident's number, as in the alert (#ID)")
    p.add_argument("--by", required=True, help="who takes it")
    p = command("mute", cmd_mute, "mute a target (or the site) for maintenance: recorded, not paged",
                f"0, 2 refused (unknown target, no or too long an end), {UNREACHABLE}")  # fmt: skip
    p.add_argument("target", nargs="?", metavar="TARGET", help="the target to mute (or give --site)")
    p.add_argument("--site", action="store_true", help="mute every target of the site")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--for", dest="for_", metavar="DURATION", help="how long, e.g. 2h (at most 7d)")
    when.add_argument("--until", metavar="TIME", help="HH:MM or ISO 8601 (local time unless zoned)")
    p.add_argument("--reason", required=True, help="why (shown in the incident's timeline)")
    p.add_argument("--by", required=True, help="who mutes")
    p = command("unmute", cmd_unmute, "end the running mutes of a target (or of the site, or one mute by id)",
                f"0, 1 no mute running, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("target", nargs="?", metavar="TARGET|ID", help="the target (or a mute id)")
    p.add_argument("--site", action="store_true", help="end the site-wide mutes")
    p.add_argument("--by", required=True, help="who unmutes")
    p = command("note", cmd_note, "add a note to an incident's timeline (first-hour checklist items)",
                f"0, 1 unknown incident, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("id", type=int, help="the incident's number")
    p.add_argument("--kind", required=True, choices=NOTE_KINDS, help="which checklist item it records")
    p.add_argument("--by", required=True, help="who writes it")
    p.add_argument("text", nargs="+", help="the note")
    p = command("drill", cmd_drill, "alert-chain drill: run one now, or confirm a drill message",
                f"0, 1 failed, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("action", choices=["run", "confirm"], help="run a drill, or confirm a drill message")
    p.add_argument("drill", nargs="?", type=int, help="confirm: the drill id")
    p.add_argument("token", nargs="?", help="confirm: the token from the message")
    p.add_argument("--compress", type=float, help="run: multiply the escalation delays by this (0.1)")
    p.add_argument("--by", default=os.environ.get("USER") or "cli", help="run: who starts it")
    p = command("drills", cmd_drills, "drills and when each contact was last verified",
                f"0, {INVALID}, {UNREACHABLE}")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p = command("report", cmd_report, "print the post-mortem of an incident as Markdown",
                f"0, 1 unknown incident, {INVALID}, 3 the daemon refused")  # fmt: skip
    p.add_argument("id", type=int, help="the incident's number")
    p = command("notify-test", cmd_notify_test, "send a marked test message through every channel (or one)",
                f"0 all delivered, 1 some failed, {INVALID}")  # fmt: skip
    p.add_argument("--channel", metavar="NAME", help="only this channel")
    p = command("readiness", cmd_readiness, "is every service ready for its outage (exit 1 when not)",
                f"0 all ready, 1 something is red, {INVALID}")  # fmt: skip
    p.add_argument("--json", action="store_true", help="the readiness data as JSON")
    p = command("plan", cmd_plan, "export the recovery plan: plan export --format html|pdf|vcard [-o FILE]",
                f"0, 1 could not render, {INVALID}")  # fmt: skip
    p.add_argument("action", choices=["export"], help="what to do with the plan")
    p.add_argument("--format", default="html", choices=["html", "pdf", "vcard"], help="the output format")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    p = command("restore-test", cmd_restore_test, "record a restore test: restore-test record TARGET",
                f"0, {INVALID}")  # fmt: skip
    p.add_argument("action", choices=["record"], help="what to do")
    p.add_argument("target", help="the target whose service was restored")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()), help="YYYY-MM-DD (today)")
    p.add_argument("--duration", help="how long the restore took, e.g. 2h30m")
    p.add_argument("--result", default="ok", choices=["ok", "failed", "partial"], help="how it went (ok)")
    p.add_argument("--note", help="what was restored, by whom")
    p = command("store", cmd_store, "the state store: check it, repair it (salvage), or reset it",
                f"0 ok, 1 damaged or failed, {INVALID}")  # fmt: skip
    p.add_argument("action", choices=["check", "repair", "reset"], help="what to do with the store")
    p.add_argument("--force", action="store_true", help="repair: rebuild even a store that checks ok")
    command("schema", cmd_schema, "print the config's JSON Schema", "0", config=False)
    lab_help = (
        "the simulated site: up | down | status | break HOST MODE [ARG] | repair HOST | "
        "cut-monitor | restore-monitor"
    )
    p = command("lab", cmd_lab, lab_help, "0 ok, 1 failed, 2 bad arguments", config=False)
    p.add_argument("lab_args", nargs=argparse.REMAINDER, metavar="ARGS", help="what to do, as listed above")
    from watchtower.sim.cli import add_arguments, cmd_sim

    p = command("sim", cmd_sim, "score the engine against random fault sequences on virtual time",
                f"0 no run failed, 1 some runs failed, {INVALID}")  # fmt: skip
    add_arguments(p)
    p = command("demo", cmd_demo, "build the simulated site and run watchtower against it (root)",
                f"0 clean stop, {INVALID}")  # fmt: skip
    p.set_defaults(config="config/demo.yaml")
    p.add_argument("--log-level", default="INFO", choices=levels, help="least severe log lines shown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
