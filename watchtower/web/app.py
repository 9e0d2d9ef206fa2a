"""aiohttp routes of the contract: /metrics and /healthz open, /api/v1 behind the token if configured."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import ipaddress
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from prometheus_client.core import Metric

from watchtower import __version__, clock
from watchtower.backups.watch import BackupWatch
from watchtower.checklist import checklist, staff_sentence
from watchtower.checklist import notes as notes_of
from watchtower.config import NOTE_KINDS, Config, parse_duration
from watchtower.drill import DrillError, DrillRunner
from watchtower.engine.incidents import Incident
from watchtower.engine.maintenance import SITE, Mute, check_mute_end, window_span
from watchtower.engine.monitor import Monitor, Snapshot
from watchtower.notify.outbox import Alerting
from watchtower.readmodel import IncidentReadModel
from watchtower.report import render_report
from watchtower.store import AsyncStore, Drill, Notification, StoreError
from watchtower.web import backups_api, metrics
from watchtower.web.page import page_incident, people_rows, render_login_page, render_status_page

__all__ = ["make_app", "render_status_page"]

MONITOR: web.AppKey[Monitor] = web.AppKey("monitor", Monitor)
# Every read of incidents, their messages and the channels' health goes through this.
INCIDENTS: web.AppKey[IncidentReadModel] = web.AppKey("incidents", IncidentReadModel)
# The state store, for the writes it takes from here (mutes); None without one (unit tests).
STORE: web.AppKey[AsyncStore | None] = web.AppKey("store")
ALERTING: web.AppKey[Alerting | None] = web.AppKey("alerting")
METRICS: web.AppKey[metrics.MetricsCache] = web.AppKey("metrics", metrics.MetricsCache)
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


# The login cookie: a random session id the daemon keeps (in memory) with its expiry and the
# token it was made under: logout revokes it, a changed token or a restart ends every session,
# and a stolen cookie is not the API token.
SESSION_COOKIE = "watchtower_session"
SESSION_MAX_AGE = 30 * 86400
SESSIONS_MAX = 1000  # the oldest session goes when a new one would exceed this
_SESSION_PURPOSE = b"watchtower status page session v1"
# Guessing the token: a client (by address) with this many wrong tokens (bearer or login form)
# within the window gets 429 for every token it presents, right or wrong, until the window passes.
AUTH_FAILURES_MAX = 10
AUTH_FAILURE_WINDOW = 60.0
CLIENTS_MAX = 10_000  # addresses remembered at most (the oldest are forgotten first)
INCIDENT_ID_DIGITS = 18  # an SQLite INTEGER holds 19 digits; longer is no incident of ours
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


def _token_mark(token: str) -> bytes:
    return hmac.new(token.encode(), _SESSION_PURPOSE, hashlib.sha256).digest()


class Sessions:
    """Server-side login sessions: id -> (expiry on the monotonic clock, mark of the token)."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[float, bytes]] = {}

    def create(self, token: str, now: float) -> str:
        self._by_id = {k: v for k, v in self._by_id.items() if v[0] > now}
        while len(self._by_id) >= SESSIONS_MAX:
            del self._by_id[next(iter(self._by_id))]
        session = secrets.token_urlsafe(32)
        self._by_id[session] = (now + SESSION_MAX_AGE, _token_mark(token))
        return session

    def valid(self, session: str, token: str, now: float) -> bool:
        entry = self._by_id.get(session)
        return entry is not None and entry[0] > now and hmac.compare_digest(entry[1], _token_mark(token))

    def revoke(self, session: str) -> None:
        self._by_id.pop(session, None)

    def __len__(self) -> int:
        return len(self._by_id)


class FailureLimiter:
    """Wrong tokens per client address within a sliding window."""

    def __init__(self) -> None:
        self._fails: dict[str, deque[float]] = {}

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        times = self._fails.get(client)
        if times is None:
            return None
        while times and times[0] <= now - AUTH_FAILURE_WINDOW:
            times.popleft()
        if not times:
            del self._fails[client]
            return None
        return times[0] + AUTH_FAILURE_WINDOW - now if len(times) >= AUTH_FAILURES_MAX else None

    def fail(self, client: str, now: float) -> None:
        times = self._fails.pop(client, None) or deque(maxlen=AUTH_FAILURES_MAX)
        times.append(now)
        self._fails[client] = times  # re-inserted: the dict's order is the order of last failure
        while len(self._fails) > CLIENTS_MAX:
            del self._fails[next(iter(self._fails))]


SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
LIMITER: web.AppKey[FailureLimiter] = web.AppKey("limiter", FailureLimiter)


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def _bearer_given(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""


def _bearer_ok(request: web.Request, token: str) -> bool:
    given = _bearer_given(request) or ""
    return hmac.compare_digest(given.encode(), token.encode())


def _cookie_ok(request: web.Request, token: str) -> bool:
    given = request.cookies.get(SESSION_COOKIE, "")
    return bool(given) and request.app[SESSIONS].valid(given, token, time.monotonic())


def _host_allowed(request: web.Request) -> bool:
    """Without a token, the Host header must be an IP address, localhost, the name in ``listen``
    or a name in ``allowed_hosts``: a DNS-rebinding page (Host: rebind.example, resolving to 127.0.0.1)
    would otherwise be same-origin with us and could read the state and acknowledge incidents."""
    host = request.host.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    config = request.app[MONITOR].config
    allowed = {h.strip().lower().rstrip(".") for h in config.allowed_hosts}
    allowed.add(config.listen_host_port[0].strip("[]").lower().rstrip("."))  # listen: by a name
    return host == "localhost" or host in allowed


def _too_many(retry_after: float) -> web.Response:
    return web.json_response(
        {"error": "too many wrong tokens from this address; try again later"},
        status=429,
        headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
    )


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
    token = api_token(request)
    if (
        not token
        and request.path not in ("/metrics", "/healthz")
        and not _CONFIRM_PATH.match(request.path)
        and not backups_api.is_push(request)
        and not _host_allowed(request)
    ):
        return web.Response(status=403, text="unknown Host; list the name in allowed_hosts\n")
    if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(request):
        return web.Response(status=403, text="cross-site request refused\n")
    confirm = _CONFIRM_PATH.match(request.path) is not None  # carries its own token
    push = backups_api.is_push(request)  # carries its backup's own token
    open_path = (request.path in OPEN_PATHS or confirm or push) and not (
        request.path == "/metrics" and request.app[MONITOR].config.metrics_auth
    )
    authenticated = not token
    if token and _bearer_given(request) is not None and not open_path:
        limiter, client, now = request.app[LIMITER], _client(request), time.monotonic()
        wait = limiter.retry_after(client, now)
        if wait is not None:
            return _too_many(wait)
        authenticated = _bearer_ok(request, token)
        if not authenticated:
            limiter.fail(client, now)  # counted before the wait: parallel guesses count too
            await asyncio.sleep(LOGIN_FAIL_DELAY)
    elif token:
        authenticated = _cookie_ok(request, token)
    if not authenticated and not open_path:
        if _wants_html(request) and not request.path.startswith("/api/"):
            raise web.HTTPSeeOther("/login")
        return web.json_response(
            {"error": "authentication required"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return await handler(request)


async def handle_metrics(request: web.Request) -> web.Response:
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
    app = request.app

    def take() -> metrics.RenderArgs:
        # on the loop, and only when the cached body is stale: what the render thread needs, copied
        reads = app[INCIDENTS]
        snap = replace(
            app[MONITOR].snapshot(),
            incidents_open=reads.open_by_scope(),
            channels=reads.channels(),
            store_ok=reads.store_problem() is None,
        )
        alerting = app[ALERTING]
        muted = set(alerting.muted(snap.taken_at)) if alerting is not None else set()
        runner = app[DRILLS]
        verified = {v.contact: v.last_verified for v in runner.verification()} if runner is not None else None
        watch = app.get(backups_api.WATCH)
        statuses = dict(app[MONITOR].statuses)
        verify = app.get(backups_api.VERIFY)
        extra = _Extra(lambda: backups_api.collectors(watch, statuses, verify))
        return snap, verified, muted, extra

    body = await app[METRICS].body(take, gzip_ok)
    headers = {"Content-Type": metrics.CONTENT_TYPE}
    if gzip_ok:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


class _Extra:
    def __init__(self, collect: Callable[[], Iterator[Metric]]):
        self.collect = collect


async def handle_healthz(request: web.Request) -> web.Response:
    stalled = time.monotonic() - request.app[MONITOR].scheduler.last_tick
    if stalled > STALL_AFTER:
        return web.Response(status=503, text=f"scheduler stalled for {stalled:.1f}s\n")
    problem = request.app[INCIDENTS].store_problem()
    if problem is not None:
        return web.Response(status=503, text=f"state store not writable: {problem}\n")
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
    incident: Incident, notes: Sequence[Notification], config: Config, open_incidents: Sequence[Incident]
) -> list[dict[str, Any]]:
    others = [i for i in open_incidents if i.id != incident.id]
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
        for item in checklist(incident, notes, config, clock.now(), others)
    ]


async def handle_page(request: web.Request) -> web.Response:
    monitor = request.app[MONITOR]
    config = monitor.config
    alerting = request.app[ALERTING]
    reads = request.app[INCIDENTS]
    open_incidents = await reads.open_incidents()
    incidents = []
    for i, sent in zip(open_incidents, await reads.notifications(open_incidents), strict=True):
        doc = page_incident(incident_document(i), i, config)
        doc["checklist"] = checklist_document(i, sent, config, open_incidents)
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
    mutes = None
    if alerting is not None:  # what is muted now, and the targets the mute form offers
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        for name, why in mutes_document(alerting, clock.now())["muted"].items():  # one row per mute
            key = (why["source"], why["until"], why["reason"], why["id"])
            rows.setdefault(key, {**why, "names": []})["names"].append(name)
        every = len(config.targets)
        active = [{**r, "target": "every target" if len(r["names"]) == every > 1 else ", ".join(r["names"])}
                  for r in rows.values()]  # fmt: skip
        mutes = {"active": active, "targets": list(config.targets)}
    text = render_status_page(
        state_document(monitor.snapshot(), monitor),
        incidents,
        config=config,
        logout=bool(api_token(request)) and SESSION_COOKIE in request.cookies,
        **backups_api.page_sections(request.app.get(backups_api.WATCH), request.app.get(backups_api.VERIFY)),
        mutes=mutes,
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
    limiter, client, now = request.app[LIMITER], _client(request), time.monotonic()
    wait = limiter.retry_after(client, now)
    if wait is not None:
        return _page(render_login_page(site, "too many wrong tokens; try again in a minute"), status=429)
    if not hmac.compare_digest(form.get("token", "").strip().encode(), token.encode()):
        limiter.fail(client, now)
        await asyncio.sleep(LOGIN_FAIL_DELAY)
        return _page(render_login_page(site, "wrong token"), status=401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        SESSION_COOKIE,
        request.app[SESSIONS].create(token, now),
        max_age=SESSION_MAX_AGE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise response


async def handle_logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login" if api_token(request) else "/")
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        request.app[SESSIONS].revoke(session)  # a copy of the cookie stops working too
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def handle_page_ack(request: web.Request) -> web.Response:
    """POST /incidents/{id}/ack from the page's form (field ``by``, or ``name``), then back to /."""
    incident = _incident_or_404(request)
    form = await _read_form(request) or {}
    by = (form.get("by") or form.get("name") or "").strip()
    if not by or len(by) > 100 or not by.isprintable():
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


def _incident_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not (text.isascii() and text.isdigit()) or len(text) > INCIDENT_ID_DIGITS:
        raise web.HTTPNotFound(text="incident ids are numbers\n")
    return int(text)


def _incident_or_404(request: web.Request) -> Incident:
    """An incident the daemon holds in memory (open or recently resolved): one that can change."""
    incident_id = _incident_id(request)
    incident = request.app[INCIDENTS].live(incident_id)
    if incident is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    return incident


async def _documents(request: web.Request, incidents: Sequence[Incident]) -> list[dict[str, Any]]:
    """Incidents with their notifications and checklists."""
    reads = request.app[INCIDENTS]
    config = request.app[MONITOR].config
    open_incidents = await reads.open_incidents()
    out = []
    for incident, notes in zip(incidents, await reads.notifications(incidents), strict=True):
        doc = incident_document(incident, notes)
        doc["checklist"] = checklist_document(incident, notes, config, open_incidents)
        out.append(doc)
    return out


async def handle_incidents(request: web.Request) -> web.Response:
    show_all = request.query.get("all") in ("1", "true", "yes")
    limit = 200
    if show_all:
        try:
            limit = max(1, min(int(request.query.get("limit", "200")), 5000))
        except ValueError:
            return web.json_response({"error": "limit must be a number"}, status=400)
    listed = await request.app[INCIDENTS].listing(include_resolved=show_all, limit=limit)
    return web.json_response(await _documents(request, listed))


async def handle_incident(request: web.Request) -> web.Response:
    incident_id = _incident_id(request)
    incident = await request.app[INCIDENTS].incident(incident_id)
    if incident is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    (doc,) = await _documents(request, [incident])
    return web.json_response(doc)


async def handle_ack(request: web.Request) -> web.Response:
    incident = _incident_or_404(request)
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: [[[[... 40 KB deep
        return web.json_response({"error": 'body must be JSON like {"by": "alice"}'}, status=400)
    by = body.get("by") if isinstance(body, dict) else None
    if not isinstance(by, str) or not by.strip() or len(by) > 100 or not by.strip().isprintable():
        # control characters (a newline) in a name would forge lines in the log and the report
        return web.json_response(
            {"error": '"by" must be a name of 1 to 100 printable characters'}, status=400
        )
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
    """The post-mortem of one incident as Markdown (see :meth:`IncidentReadModel.report` for which
    copy of the incident and its messages it is written from)."""
    incident_id = _incident_id(request)
    report = await request.app[INCIDENTS].report(incident_id)
    if report is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}\n")
    text = render_report(
        report.incident,
        report.notifications,
        report.attempts,
        report.blind_windows,
        request.app[MONITOR].config,
        clock.now(),
    )
    return web.Response(
        text=text,
        content_type="text/markdown",
        charset="utf-8",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def handle_state(request: web.Request) -> web.Response:
    monitor, alerting = request.app[MONITOR], request.app[ALERTING]
    doc = state_document(monitor.snapshot(), monitor)
    if alerting is not None:
        for name, why in alerting.muted(clock.now()).items():
            if name in doc["targets"]:
                doc["targets"][name]["muted_until"] = iso(why.until)
    return web.json_response(doc)


# --------------------------------------------------------------------------- maintenance mutes


def mute_document(m: Mute) -> dict[str, Any]:
    return {
        "id": m.id,
        "target": None if m.target == SITE else m.target,
        "site": m.target == SITE,
        "start": iso(m.start),
        "end": iso(m.end),
        "reason": m.reason,
        "by": m.by,
        "created_at": iso(m.created_at),
    }


def mutes_document(alerting: Alerting, now: float) -> dict[str, Any]:
    """Mutes still to come or running, the config's windows, and who is muted now (and why)."""
    muted = alerting.muted(now)
    windows = []
    for w in alerting.config.maintenance_windows:
        span = window_span(w, now)
        windows.append({
            "every": w.text, "timezone": w.timezone, "targets": list(w.targets) or None,
            "reason": w.reason, "active_until": iso(span[1]) if span else None,
        })  # fmt: skip
    by_source = {f"mute #{m.id} by {m.by}": m.id for m in alerting.mutes}
    return {
        "mutes": [mute_document(m) for m in alerting.mutes if m.end > now],
        "windows": windows,
        "muted": {
            name: {
                "until": (iso(why.until) or "")[:16].replace("T", " "),
                "source": why.source,
                "reason": why.reason,
                "id": by_source.get(why.source),
            }
            for name, why in muted.items()
        },
    }


def _alerting_or_503(request: web.Request) -> Alerting:
    alerting = request.app[ALERTING]
    if alerting is None:
        raise web.HTTPServiceUnavailable(text="no alerting in this daemon\n")
    return alerting


async def _new_mute(request: web.Request, fields: dict[str, Any]) -> Mute | str:
    """A mute from API or form fields (target or site, for or until, reason, by); an error text
    when they do not make one."""
    alerting = _alerting_or_503(request)
    config = alerting.config
    now = clock.now()
    target = fields.get("target")
    if fields.get("site") is True or target in (SITE, "--site"):
        target = SITE
    if not isinstance(target, str) or (target != SITE and target not in config.targets):
        return f"no target named {target!r} (give a target of the config, or site: true)"
    for key in ("reason", "by"):
        value = fields.get(key)
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            return f'"{key}" must be a text of 1 to 200 characters'
    length, until = fields.get("for"), fields.get("until")
    if (length is None) == (until is None):
        return 'give exactly one of "for" (a duration like 2h) or "until" (ISO 8601 with a time zone)'
    try:
        if length is not None:
            end = now + parse_duration(length)
        else:
            when = datetime.fromisoformat(str(until).replace("Z", "+00:00"))
            if when.tzinfo is None:
                return '"until" needs a time zone, like 2026-12-08T04:00:00Z or +01:00'
            end = when.timestamp()
        check_mute_end(now, end)
    except ValueError as exc:
        return f"{'for' if length is not None else 'until'}: {exc}"
    store = request.app[STORE]
    reason, by = str(fields["reason"]).strip(), str(fields["by"]).strip()
    if store is not None:
        try:
            mute = await store.call(store.store.add_mute, target, now, end, reason, by, now)
        except StoreError as exc:
            return f"cannot record the mute: {exc}"
    else:
        mute = Mute(max((m.id for m in alerting.mutes), default=0) + 1, target, now, end, reason, by, now)
    alerting.mutes = [m for m in alerting.mutes if m.end > now] + [mute]
    alerting.changed.set()
    return mute


async def _end_mute(request: web.Request, by: str) -> Mute | None:
    alerting = _alerting_or_503(request)
    try:
        mute_id = int(request.match_info["id"])
    except ValueError:
        return None
    now = clock.now()
    store = request.app[STORE]
    ended: Mute | None = None
    if store is not None:
        try:
            ended = await store.call(store.store.end_mute, mute_id, by, now)
        except StoreError:
            ended = None
    for k, m in enumerate(alerting.mutes):
        if m.id == mute_id and m.end > now:
            ended = Mute(m.id, m.target, m.start, now, m.reason, m.by, m.created_at)
            alerting.mutes[k] = ended
    alerting.changed.set()
    return ended


async def handle_mutes(request: web.Request) -> web.Response:
    return web.json_response(mutes_document(_alerting_or_503(request), clock.now()))


async def handle_add_mute(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return web.json_response(
            {"error": 'body must be JSON like {"target": "pve1", "for": "2h", "reason": "..", "by": "bo"}'},
            status=400,
        )
    mute = await _new_mute(request, body)
    if isinstance(mute, str):
        return web.json_response({"error": mute}, status=400)
    return web.json_response(mute_document(mute), status=201)


async def handle_delete_mute(request: web.Request) -> web.Response:
    by = request.query.get("by", "api").strip()[:100] or "api"
    ended = await _end_mute(request, by)
    if ended is None:
        return web.json_response({"error": "no such mute running"}, status=404)
    return web.json_response(mute_document(ended))


async def handle_page_mute(request: web.Request) -> web.Response:
    """POST /mutes from the page's form (target, for, reason, by), then back to /."""
    form = await _read_form(request) or {}
    mute = await _new_mute(request, {k: form.get(k) for k in ("target", "for", "reason", "by")})
    if isinstance(mute, str):
        return web.Response(status=400, text=f"cannot mute: {mute}\n")
    raise web.HTTPSeeOther("/#maintenance")


async def handle_page_unmute(request: web.Request) -> web.Response:
    form = await _read_form(request) or {}
    by = (form.get("by") or "").strip()
    if not by or len(by) > 100:
        return web.Response(status=400, text="unmuting needs a name of 1 to 100 characters\n")
    if await _end_mute(request, by) is None:
        return web.Response(status=404, text="no such mute running\n")
    raise web.HTTPSeeOther("/#maintenance")


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
    backups: BackupWatch | None = None,
    incidents: IncidentReadModel | None = None,
) -> web.Application:
    """``incidents``: the daemon's read model; without one, a read model over ``monitor``'s
    tracker, ``alerting`` and ``store``."""
    app = web.Application(middlewares=[body_timeout_middleware, auth_middleware], client_max_size=64 * 1024)
    app[MONITOR] = monitor
    app[INCIDENTS] = incidents or IncidentReadModel(monitor.tracker, alerting, store)
    app[STORE] = store
    app[ALERTING] = alerting
    app[METRICS] = metrics.MetricsCache()
    app[SESSIONS] = Sessions()
    app[LIMITER] = FailureLimiter()
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
    if backups is not None:
        backups_api.register(app, backups, drills.verification if drills is not None else None)
    app.router.add_get("/api/v1/mutes", handle_mutes)
    app.router.add_post("/api/v1/mutes", handle_add_mute)
    app.router.add_delete("/api/v1/mutes/{id}", handle_delete_mute)
    app.router.add_post("/mutes", handle_page_mute)
    app.router.add_post("/mutes/{id}/end", handle_page_unmute)
    app.router.add_get("/api/v1/drills", handle_drills)
    app.router.add_post("/api/v1/drills", handle_drill_start)
    app.router.add_get(r"/api/v1/drills/{id:\d+}/confirm/{token:[0-9a-f]{1,64}}", handle_drill_confirm_form)
    app.router.add_post(r"/api/v1/drills/{id:\d+}/confirm/{token:[0-9a-f]{1,64}}", handle_drill_confirm)

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = f"watchtower/{__version__}"

    app.on_response_prepare.append(server_header)
    return app
