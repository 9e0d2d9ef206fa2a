"""aiohttp routes of the contract: /metrics and /healthz open, /api/v1 behind the token if configured."""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from watchtower import __version__
from watchtower.engine.incidents import Incident
from watchtower.engine.monitor import Monitor, Snapshot
from watchtower.store import AsyncStore
from watchtower.web import metrics

MONITOR: web.AppKey[Monitor] = web.AppKey("monitor", Monitor)
TOKEN: web.AppKey[str | None] = web.AppKey("token")
# The incident store (history, notifications); None when the daemon runs without one (unit tests).
STORE: web.AppKey[AsyncStore | None] = web.AppKey("store")

# /healthz turns 503 when the scheduler loop has not ticked for this long (it ticks >= 1/s).
STALL_AFTER = 5.0


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def state_document(snap: Snapshot, monitor: Monitor) -> dict[str, Any]:
    targets: dict[str, Any] = {
        name: {"role": role, "state": state.value, "paths": []} for name, role, state in snap.targets
    }
    vantage_paths: list[dict[str, Any]] = []
    for row in snap.paths:
        entry = {
            "name": row.name,
            "kind": row.kind,
            "state": row.state.value,
            "last_ok": iso(row.last_ok),
            "latency": row.latency,
            "detail": row.detail,
        }
        (targets[row.target]["paths"] if row.target in targets else vantage_paths).append(entry)
    for name, bmc in snap.bmc:
        if name in targets:
            targets[name]["bmc"] = {
                "reachable": bmc.reachable,
                "power_on": bmc.power_on,
                "health": bmc.health,
                "critical_events": bmc.critical_total,
                "recent_events": [
                    {"at": iso(at), "severity": e.severity, "text": e.text}
                    for at, e in list(bmc.events)[-10:]
                ],
                "sensors": [
                    {"name": s.name, "value": s.value, "unit": s.unit, "state": s.state} for s in bmc.sensors
                ],
            }
    sched = monitor.scheduler
    p50, p99 = sched.lag.quantile(0.5), sched.lag.quantile(0.99)
    return {
        "site": snap.site,
        "generated_at": iso(snap.taken_at),
        "vantage": "up" if snap.vantage_up else "down",
        "vantage_paths": vantage_paths,
        "targets": targets,
        "scheduler": {
            "paths": len(sched),
            "runs": sched.runs,
            "in_flight": sched.in_flight,
            "lag_p50": p50,
            "lag_p99": p99,
        },
    }


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path not in ("/metrics", "/healthz"):
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response(
                {"error": "authentication required"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
    return await handler(request)


async def handle_metrics(request: web.Request) -> web.Response:
    snap = request.app[MONITOR].snapshot()
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
    body = await asyncio.to_thread(metrics.render, snap, gzip_ok)
    headers = {"Content-Type": metrics.CONTENT_TYPE}
    if gzip_ok:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def handle_healthz(request: web.Request) -> web.Response:
    stalled = time.monotonic() - request.app[MONITOR].scheduler.last_tick
    if stalled > STALL_AFTER:
        return web.Response(status=503, text=f"scheduler stalled for {stalled:.1f}s\n")
    return web.Response(text="ok\n")


ROLE_ORDER = ("network", "hypervisor", "storage", "vm", "service")
_SEVERITY = {"down": 0, "unreachable": 1, "degraded": 2, "unknown": 3, "up": 4}


@functools.cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("watchtower.web", "templates"),
        autoescape=True,  # target and path names come from the config: render them as text
        undefined=jinja2.StrictUndefined,
    )


SCOPE_ORDER = ("monitor", "network", "hypervisor", "storage", "vm", "service")


def render_status_page(doc: dict[str, Any], incidents: list[dict[str, Any]] | None = None) -> str:
    """The server-rendered status page: works without JavaScript, refreshes itself."""
    targets = [{"name": name, **t} for name, t in doc["targets"].items()]
    bad = sorted((t for t in targets if t["state"] in ("down", "unreachable", "degraded")),
                 key=lambda t: _SEVERITY[t["state"]])  # fmt: skip
    incidents = sorted(incidents or [], key=lambda i: (SCOPE_ORDER.index(i["scope"]), i["id"]))
    if incidents and doc["vantage"] != "down":
        first = incidents[0]
        since = (first["opened_at"] or "")[11:16]
        more = f" (+{len(incidents) - 1} more incidents)" if len(incidents) > 1 else ""
        affected = f": {', '.join(first['affected'])}" if first["affected"] else ""
        banner = f"#{first['id']} {first['headline']} since {since} UTC{affected}{more}"
        color = "#b3261e"
    elif doc["vantage"] == "down":
        banner, color = (
            "watchtower is cut off: its own uplink is down, target states are not trustworthy",
            "#5f6368",
        )
    elif bad:
        worst = bad[0]
        others = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        banner, color = (
            f"{worst['role']} {worst['name']} {worst['state']}{others}",
            ("#b3261e" if worst["state"] != "degraded" else "#b06000"),
        )
    else:
        banner, color = "all targets up", "#137333"
    counts: dict[str, int] = {}
    for t in targets:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    groups = [(role, [t for t in targets if t["role"] == role]) for role in ROLE_ORDER]
    return (
        _templates()
        .get_template("status.html")
        .render(
            site=doc["site"],
            banner=banner,
            banner_short=banner.split(":")[0],
            banner_color=color,
            vantage=doc["vantage"],
            counts=", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: _SEVERITY[kv[0]])),
            groups=[(role, ts) for role, ts in groups if ts],
            generated=doc["generated_at"],
            incidents=incidents,
        )
    )


async def handle_page(request: web.Request) -> web.Response:
    monitor = request.app[MONITOR]
    incidents = [incident_document(i) for i in monitor.tracker.open_incidents()]
    html = render_status_page(state_document(monitor.snapshot(), monitor), incidents)
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return web.Response(text=html, content_type="text/html", headers=headers)


def incident_document(incident: Incident) -> dict[str, Any]:
    """An incident in the contract's JSON shape (plus evidence, flaps and merged_into)."""
    return {
        "id": incident.id,
        "scope": incident.scope.value,
        "root": incident.root,
        "cause": incident.cause.value if incident.cause else None,
        "affected": list(incident.affected),
        "state": incident.state.value,
        "opened_at": iso(incident.opened_at),
        "acknowledged_at": iso(incident.acknowledged_at),
        "acknowledged_by": incident.acknowledged_by,
        "resolved_at": iso(incident.resolved_at),
        "first_failure_at": iso(incident.first_failure_at),
        "headline": incident.headline(),
        "evidence": list(incident.evidence),
        "flaps": incident.flaps,
        "merged_into": incident.merged_into,
        "notifications": [],
        "timeline": [{"at": iso(e.at), "event": e.text, "kind": e.kind} for e in incident.timeline],
    }


def _incident_or_404(request: web.Request) -> Incident:
    try:
        incident_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound(text="incident ids are numbers\n") from None
    incident = request.app[MONITOR].tracker.get(incident_id)
    if incident is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    return incident


async def handle_incidents(request: web.Request) -> web.Response:
    tracker = request.app[MONITOR].tracker
    show_all = request.query.get("all") in ("1", "true", "yes")
    chosen = tracker.incidents.values() if show_all else tracker.open_incidents()
    return web.json_response([incident_document(i) for i in sorted(chosen, key=lambda i: i.id, reverse=True)])


async def handle_incident(request: web.Request) -> web.Response:
    return web.json_response(incident_document(_incident_or_404(request)))


async def handle_ack(request: web.Request) -> web.Response:
    incident = _incident_or_404(request)
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": 'body must be JSON like {"by": "alice"}'}, status=400)
    by = body.get("by") if isinstance(body, dict) else None
    if not isinstance(by, str) or not by.strip() or len(by) > 100:
        return web.json_response({"error": '"by" must be a name of 1 to 100 characters'}, status=400)
    incident = request.app[MONITOR].acknowledge(incident.id, by.strip())
    return web.json_response(incident_document(incident))


async def handle_state(request: web.Request) -> web.Response:
    monitor = request.app[MONITOR]
    return web.json_response(state_document(monitor.snapshot(), monitor))


def make_app(monitor: Monitor, store: AsyncStore | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_middleware], client_max_size=64 * 1024)
    app[MONITOR] = monitor
    app[STORE] = store
    token = monitor.config.secret("api_token")
    app[TOKEN] = token.get_secret_value() if token else None
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/api/v1/state", handle_state)
    app.router.add_get("/", handle_page)
    app.router.add_get("/api/v1/incidents", handle_incidents)
    app.router.add_get("/api/v1/incidents/{id}", handle_incident)
    app.router.add_post("/api/v1/incidents/{id}/ack", handle_ack)

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = f"watchtower/{__version__}"

    app.on_response_prepare.append(server_header)
    return app
