"""aiohttp routes of the contract: /metrics and /healthz open, /api/v1 behind the token if configured."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from watchtower import __version__, clock
from watchtower.checklist import checklist, staff_sentence
from watchtower.checklist import notes as notes_of
from watchtower.config import NOTE_KINDS
from watchtower.drill import DrillError, DrillRunner
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import outage_start
from watchtower.engine.incidents import Incident
from watchtower.engine.monitor import Monitor, Snapshot
from watchtower.notify.outbox import Alerting
from watchtower.report import render_report
from watchtower.store import AsyncStore, Attempt, Drill, Notification, StoreError
from watchtower.web import metrics
from watchtower.web.page import page_incident, people_rows, render_login_page, render_status_page

__all__ = ["make_app", "render_status_page"]

MONITOR: web.AppKey[Monitor] = web.AppKey("monitor", Monitor)
# The incident store (history, notifications); None when the daemon runs without one (unit tests).
STORE: web.AppKey[AsyncStore | None] = web.AppKey("store")
ALERTING: web.AppKey[Alerting | None] = web.AppKey("alerting")
DRILLS: web.AppKey[DrillRunner | None] = web.AppKey("drills")
# A drill's confirmation link: its token is its authentication (one contact, once, until it expires).
_CONFIRM_PATH = re.compile(r"^/api/v1/drills/\d+/confirm/[0-9a-f]{1,64}$")

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


# The login cookie: an HMAC of a fixed string keyed with the token, so a stolen cookie is not
# the API token (it opens the page and the API of this daemon, until the token changes).
SESSION_COOKIE = "watchtower_session"
SESSION_MAX_AGE = 30 * 86400
_SESSION_PURPOSE = b"watchtower status page session v1"
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/login", "/logout"})
FORM_MAX = 4096  # bytes of a login or acknowledge form at most
# Slow clients: a connection must send its request head within IDLE_TIMEOUT of opening (or of its
# previous request: aiohttp's keep-alive timer, 3630 s by default, is the only bound on a trickled
# head), and a request body must arrive within BODY_TIMEOUT, so a trickle holds no task for long.
IDLE_TIMEOUT = 15.0
BODY_TIMEOUT = 10.0
LINGER = 2.0  # after answering early (401, 408, 413), read what is left of a body this long at most
LOGIN_FAIL_DELAY = 0.5  # seconds a wrong token waits: slows guessing, costs a person nothing

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on form
    # posts, and the origin check below could not tell our own forms from a forged one.
    "Referrer-Policy": "same-origin",
}


def api_token(request: web.Request) -> str | None:
    """The API token of the config now in force: read per request, so a SIGHUP that changes the
    token file takes effect at once (and the old token, and cookies made from it, stop working)."""
    token = request.app[MONITOR].config.secret("api_token")
    return token.get_secret_value() if token else None


def session_value(token: str) -> str:
    return hmac.new(token.encode(), _SESSION_PURPOSE, hashlib.sha256).hexdigest()


def _bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), token.encode())


def _cookie_ok(request: web.Request, token: str) -> bool:
    given = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(given.encode(), session_value(token).encode())


def _wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


def _same_origin(request: web.Request) -> bool:
    """A state-changing request from a browser must come from our own pages: its Origin (else its
    Referer), when it sends one, names this host. Clients that send neither (curl, the CLI) pass."""
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        return value != "null" and urlsplit(value).netloc.lower() == request.host.lower()
    return True


@web.middleware
async def body_timeout_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A request with a body (POST) is answered within BODY_TIMEOUT: a client trickling it gets 408."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await handler(request)
    except TimeoutError:
        return web.Response(status=408, text="request body too slow\n", headers={"Connection": "close"})


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(request):
        return web.Response(status=403, text="cross-site request refused\n")
    token = api_token(request)
    authenticated = not token or _bearer_ok(request, token) or _cookie_ok(request, token)
    if not authenticated and request.path not in OPEN_PATHS and not _CONFIRM_PATH.match(request.path):
        if _wants_html(request) and not request.path.startswith("/api/"):
            raise web.HTTPSeeOther("/login")
        return web.json_response(
            {"error": "authentication required"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return await handler(request)


async def handle_metrics(request: web.Request) -> web.Response:
    snap = request.app[MONITOR].snapshot()
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
    runner = request.app[DRILLS]
    verified = {v.contact: v.last_verified for v in runner.verification()} if runner is not None else None
    body = await asyncio.to_thread(metrics.render, snap, gzip_ok, verified)
    headers = {"Content-Type": metrics.CONTENT_TYPE}
    if gzip_ok:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def handle_healthz(request: web.Request) -> web.Response:
    stalled = time.monotonic() - request.app[MONITOR].scheduler.last_tick
    if stalled > STALL_AFTER:
        return web.Response(status=503, text=f"scheduler stalled for {stalled:.1f}s\n")
    alerting = request.app[ALERTING]
    if alerting is not None and not alerting.store_ok:
        return web.Response(status=503, text=f"state store not writable: {alerting.store_error}\n")
    return web.Response(text="ok\n")


async def _read_form(request: web.Request) -> dict[str, str] | None:
    """A small urlencoded form (login, acknowledge); None when it is too big or not a form."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    if request.content_length is not None and request.content_length > FORM_MAX:
        return None
    body = bytearray()
    while chunk := await request.content.read(FORM_MAX + 1 - len(body)):
        body += chunk
        if len(body) > FORM_MAX:
            return None
    try:
        fields = parse_qs(body.decode(), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in fields.items()}


def _page(html: str, status: int = 200) -> web.Response:
    return web.Response(text=html, status=status, content_type="text/html", headers=PAGE_HEADERS)


def checklist_document(
    incident: Incident, notes: Sequence[Notification], monitor: Monitor
) -> list[dict[str, Any]]:
    others = [i for i in monitor.tracker.open_incidents() if i.id != incident.id]
    return [
        {
            "item": item.key,
            "label": item.label,
            "state": item.state,
            "due_at": iso(item.due_at),
            "done_at": iso(item.done_at),
            "detail": item.detail,
            "line": item.line(),
        }
        for item in checklist(incident, notes, monitor.config, clock.now(), others)
    ]


async def handle_page(request: web.Request) -> web.Response:
    monitor = request.app[MONITOR]
    config = monitor.config
    alerting = request.app[ALERTING]
    incidents = []
    for i in monitor.tracker.open_incidents():
        doc = page_incident(incident_document(i), i, config)
        sent = (alerting.notifications_of(i.id) if alerting is not None else None) or []
        doc["checklist"] = checklist_document(i, sent, monitor)
        doc["notes"] = [{"at": iso(e.at), "kind": e.kind[5:], "text": e.text} for e in notes_of(i)]
        doc["staff"] = staff_sentence(i, config)
        incidents.append(doc)
    runner = request.app[DRILLS]
    people: list[dict[str, Any]] = []
    drill = None
    if runner is not None and config.contacts:
        with contextlib.suppress(StoreError):
            latest = await runner.drills(limit=1)
            drill = drill_document(latest[0], config) if latest else None
        people = people_rows(config, runner.verification(), drill)
    text = render_status_page(
        state_document(monitor.snapshot(), monitor),
        incidents,
        config=config,
        logout=bool(api_token(request)) and SESSION_COOKIE in request.cookies,
        people=people,
        drill=drill,
    )
    return _page(text)


async def handle_login_form(request: web.Request) -> web.Response:
    token = api_token(request)
    if not token or _cookie_ok(request, token):
        raise web.HTTPSeeOther("/")
    return _page(render_login_page(request.app[MONITOR].config.site))


async def handle_login(request: web.Request) -> web.Response:
    """POST /login: the token in a form -> the session cookie, then always to / (no open redirect)."""
    token = api_token(request)
    if not token:
        raise web.HTTPSeeOther("/")
    site = request.app[MONITOR].config.site
    form = await _read_form(request)
    if form is None:
        return _page(render_login_page(site, "the login form was malformed or too large"), status=400)
    if not hmac.compare_digest(form.get("token", "").strip().encode(), token.encode()):
        await asyncio.sleep(LOGIN_FAIL_DELAY)
        return _page(render_login_page(site, "wrong token"), status=401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        SESSION_COOKIE,
        session_value(token),
        max_age=SESSION_MAX_AGE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise response


async def handle_logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login" if api_token(request) else "/")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def handle_page_ack(request: web.Request) -> web.Response:
    """POST /incidents/{id}/ack from the page's form (field ``by``, or ``name``), then back to /."""
    incident = _incident_or_404(request)
    form = await _read_form(request) or {}
    by = (form.get("by") or form.get("name") or "").strip()
    if not by or len(by) > 100:
        return web.Response(status=400, text="acknowledging needs a name of 1 to 100 characters\n")
    request.app[MONITOR].acknowledge(incident.id, by)
    raise web.HTTPSeeOther("/")


def notification_document(n: Notification) -> dict[str, Any]:
    """One message in an incident's JSON: the contract's at/channel/step/ok, plus its delivery state."""
    return {
        "at": iso(n.sent_at or n.last_attempt_at or n.created_at),
        "channel": n.channel,
        "step": n.step,
        "ok": n.state == "sent",
        "kind": n.kind,
        "state": n.state,
        "attempts": n.attempts,
        "error": n.error,
    }


def incident_document(incident: Incident, notifications: Sequence[Notification] = ()) -> dict[str, Any]:
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
        "notifications": [notification_document(n) for n in notifications],
        "timeline": [{"at": iso(e.at), "event": e.text, "kind": e.kind} for e in incident.timeline],
    }


def _incident_or_404(request: web.Request) -> Incident:
    """An incident the daemon holds in memory (open or recently resolved)."""
    try:
        incident_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound(text="incident ids are numbers\n") from None
    incident = request.app[MONITOR].tracker.get(incident_id)
    if incident is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    return incident


async def _documents(request: web.Request, incidents: Sequence[Incident]) -> list[dict[str, Any]]:
    """Incidents with their notifications: from the alerting's memory, else from the store."""
    alerting, store = request.app[ALERTING], request.app[STORE]
    out = []
    for incident in incidents:
        notes = alerting.notifications_of(incident.id) if alerting is not None else None
        if notes is None and store is not None:
            try:
                notes = await store.call(store.store.notifications, incident.id)
            except StoreError:
                notes = None
        doc = incident_document(incident, notes or ())
        doc["checklist"] = checklist_document(incident, notes or (), request.app[MONITOR])
        out.append(doc)
    return out


async def handle_incidents(request: web.Request) -> web.Response:
    tracker = request.app[MONITOR].tracker
    show_all = request.query.get("all") in ("1", "true", "yes")
    chosen = {i.id: i for i in (tracker.incidents.values() if show_all else tracker.open_incidents())}
    store = request.app[STORE]
    if show_all and store is not None:
        try:
            limit = max(1, min(int(request.query.get("limit", "200")), 5000))
        except ValueError:
            return web.json_response({"error": "limit must be a number"}, status=400)
        try:
            stored = await store.call(store.store.incidents, limit=limit)
        except StoreError:
            stored = []
        for incident in stored:
            chosen.setdefault(incident.id, incident)  # the live one wins
    ordered = sorted(chosen.values(), key=lambda i: i.id, reverse=True)
    return web.json_response(await _documents(request, ordered))


async def handle_incident(request: web.Request) -> web.Response:
    try:
        incident: Incident | None = _incident_or_404(request)
    except web.HTTPNotFound:
        store = request.app[STORE]
        incident = None
        if store is not None and request.match_info["id"].isdigit():
            incident_id = int(request.match_info["id"])
            try:
                incident = await store.call(store.store.incident, incident_id)
            except StoreError:
                incident = None
        if incident is None:
            raise
    assert incident is not None
    (doc,) = await _documents(request, [incident])
    return web.json_response(doc)


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
    (doc,) = await _documents(request, [incident])
    return web.json_response(doc)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _note_fields(fields: dict[str, Any]) -> tuple[str, str, str] | str:
    """(kind, text, by) of a note, or what is wrong with it."""
    kind, text, by = fields.get("kind"), fields.get("text"), fields.get("by")
    if kind not in NOTE_KINDS:
        return f'"kind" must be one of {", ".join(NOTE_KINDS)}'
    if not isinstance(text, str) or not text.strip() or len(text) > 2000:
        return '"text" must be 1 to 2000 characters'
    if not isinstance(by, str) or not by.strip() or len(by) > 100:
        return '"by" must be a name of 1 to 100 characters'
    # one line each: the timeline, the logs and the report are line-oriented
    return str(kind), _CONTROL.sub(" ", text).strip(), _CONTROL.sub(" ", by).strip()


async def handle_note(request: web.Request) -> web.Response:
    """POST /api/v1/incidents/{id}/notes {"kind", "text", "by"}: a timeline note."""
    incident = _incident_or_404(request)
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(
            {"error": 'body must be JSON like {"kind": "decision", "text": "...", "by": "alice"}'}, status=400
        )
    fields = _note_fields(body if isinstance(body, dict) else {})
    if isinstance(fields, str):
        return web.json_response({"error": fields}, status=400)
    incident = request.app[MONITOR].note(incident.id, *fields)
    (doc,) = await _documents(request, [incident])
    return web.json_response(doc, status=201)


async def handle_page_note(request: web.Request) -> web.Response:
    """POST /incidents/{id}/notes from the page's note form, then back to /."""
    incident = _incident_or_404(request)
    fields = _note_fields(await _read_form(request) or {})
    if isinstance(fields, str):
        return web.Response(status=400, text=fields + "\n")
    request.app[MONITOR].note(incident.id, *fields)
    raise web.HTTPSeeOther("/")


async def handle_report(request: web.Request) -> web.Response:
    """The post-mortem of one incident as Markdown. The live incident where the daemon still
    holds it (the freshest timeline), else the store's; notifications, delivery attempts and blind
    windows from the store (from memory when there is no store)."""
    try:
        incident_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound(text="incident ids are numbers\n") from None
    monitor, store, alerting = request.app[MONITOR], request.app[STORE], request.app[ALERTING]
    live = monitor.tracker.get(incident_id)
    incident, notes, attempts, windows = live, None, None, None
    if store is not None:
        db = store.store

        def read() -> tuple[
            Incident | None, list[Notification], list[Attempt], list[tuple[float, float | None]]
        ]:
            found = live or db.incident(incident_id)
            if found is None:
                return None, [], [], []
            window = db.blind_windows(outage_start(found), found.resolved_at)
            return found, db.notifications(incident_id), db.attempts(incident_id), window

        try:
            incident, notes, attempts, windows = await store.call(read)
        except StoreError:
            incident = live
    if incident is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    if notes is None:
        notes = (alerting.notifications_of(incident_id) if alerting is not None else None) or []
    if windows is None:
        windows = [(i.opened_at, i.resolved_at) for i in monitor.tracker.incidents.values()
                   if i.scope is Scope.MONITOR]  # fmt: skip
    text = render_report(incident, notes, attempts or [], windows, monitor.config, clock.now())
    return web.Response(
        text=text,
        content_type="text/markdown",
        charset="utf-8",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def handle_state(request: web.Request) -> web.Response:
    monitor = request.app[MONITOR]
    return web.json_response(state_document(monitor.snapshot(), monitor))


def drill_document(drill: Drill, config: Any) -> dict[str, Any]:
    """A drill in the API: per contact when they were due, confirmed, and the sentence (no tokens)."""
    return {
        "id": drill.id,
        "started_at": iso(drill.started_at),
        "finished_at": iso(drill.finished_at),
        "state": drill.state,
        "compress": drill.compress,
        "requested_by": drill.requested_by,
        "contacts": [
            {
                "contact": c.contact,
                "name": (config.contacts[c.contact].name if c.contact in config.contacts else None)
                or c.contact,
                "step": c.step,
                "due_at": iso(c.due_at),
                "expires_at": iso(c.expires_at),
                "confirmed_at": iso(c.confirmed_at),
                "confirmed_via": c.confirmed_via,
                "result": c.result,
            }
            for c in drill.contacts
        ],
    }


def _drills_or_503(request: web.Request) -> DrillRunner:
    runner = request.app[DRILLS]
    if runner is None:
        raise web.HTTPServiceUnavailable(text="drills need the daemon's state store\n")
    return runner


async def handle_drills(request: web.Request) -> web.Response:
    runner = _drills_or_503(request)
    drills = await runner.drills()
    return web.json_response(
        {
            "drills": [drill_document(d, runner.config) for d in drills],
            "contacts": [
                {
                    "contact": v.contact,
                    "last_verified": iso(v.last_verified),
                    "due_at": iso(v.due_at),
                    "overdue": v.overdue,
                    "last_result": v.last_result,
                }
                for v in runner.verification()
            ],
        }
    )


async def handle_drill_start(request: web.Request) -> web.Response:
    runner = _drills_or_503(request)
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return web.json_response(
            {"error": 'body must be JSON like {"compress": 0.1, "by": "alice"}'}, status=400
        )
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    compress, by = body.get("compress"), body.get("by") or "api"
    if compress is not None and (
        isinstance(compress, bool) or not isinstance(compress, int | float) or not 0 < compress <= 1
    ):
        return web.json_response({"error": '"compress" must be a number in (0, 1]'}, status=400)
    if not isinstance(by, str) or len(by) > 100:
        return web.json_response({"error": '"by" must be a name of at most 100 characters'}, status=400)
    try:
        drill = await runner.start(by.strip() or "api", None if compress is None else float(compress))
    except DrillError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    return web.json_response(drill_document(drill, runner.config), status=201)


_CONFIRM_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>watchtower drill</title></head>
<body style="font: 16px system-ui, sans-serif; margin: 2rem"><h1>{title}</h1><p>{text}</p>{form}</body></html>
"""


async def handle_drill_confirm_form(request: web.Request) -> web.Response:
    """GET on a confirmation link: a button (a link preview or scanner must not confirm)."""
    form = (
        '<form method="post"><button type="submit" style="font-size: 1.3rem">'
        "I got the drill message</button></form>"
    )
    text = "This confirms that the DRILL alert reached you. The link works once."
    return _page(_CONFIRM_FORM.format(title="watchtower alert-chain drill", text=text, form=form))


async def handle_drill_confirm(request: web.Request) -> web.Response:
    runner = _drills_or_503(request)
    drill_id, token = int(request.match_info["id"]), request.match_info["token"]
    browser = request.content_type == "application/x-www-form-urlencoded"
    via = "link" if browser else request.query.get("via", "api")[:20]
    try:
        contact = await runner.confirm(drill_id, token, via)
    except DrillError as exc:
        if browser:
            text = html.escape(str(exc))
            return _page(_CONFIRM_FORM.format(title="Not confirmed", text=text, form=""), status=exc.status)
        return web.json_response({"error": str(exc)}, status=exc.status)
    if browser:
        text = f"Thank you, {html.escape(contact)}: you are confirmed as reachable."
        return _page(_CONFIRM_FORM.format(title="Confirmed", text=text, form=""))
    return web.json_response({"drill": drill_id, "contact": contact, "confirmed": True})


def make_app(
    monitor: Monitor,
    store: AsyncStore | None = None,
    alerting: Alerting | None = None,
    drills: DrillRunner | None = None,
) -> web.Application:
    app = web.Application(middlewares=[body_timeout_middleware, auth_middleware], client_max_size=64 * 1024)
    app[MONITOR] = monitor
    app[STORE] = store
    app[ALERTING] = alerting
    app[DRILLS] = drills
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/api/v1/state", handle_state)
    app.router.add_get("/", handle_page)
    app.router.add_get("/login", handle_login_form)
    app.router.add_post("/login", handle_login)
    app.router.add_post("/logout", handle_logout)
    app.router.add_post("/incidents/{id}/ack", handle_page_ack)
    app.router.add_post("/incidents/{id}/notes", handle_page_note)
    app.router.add_post("/api/v1/incidents/{id}/notes", handle_note)
    app.router.add_get("/api/v1/incidents", handle_incidents)
    app.router.add_get("/api/v1/incidents/{id}", handle_incident)
    app.router.add_post("/api/v1/incidents/{id}/ack", handle_ack)
    app.router.add_get("/api/v1/incidents/{id}/report", handle_report)
    app.router.add_get("/api/v1/drills", handle_drills)
    app.router.add_post("/api/v1/drills", handle_drill_start)
    app.router.add_get(r"/api/v1/drills/{id:\d+}/confirm/{token:[0-9a-f]{1,64}}", handle_drill_confirm_form)
    app.router.add_post(r"/api/v1/drills/{id:\d+}/confirm/{token:[0-9a-f]{1,64}}", handle_drill_confirm)

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = f"watchtower/{__version__}"

    app.on_response_prepare.append(server_header)
    return app
