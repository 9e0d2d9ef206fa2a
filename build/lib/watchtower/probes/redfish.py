"""``redfish``: power, health, sensors and new event-log entries from a BMC's Redfish service.

What is read, all within one deadline (``ctx.timeout``):

* core: ``/redfish/v1/Systems`` and each member's ``PowerState`` and ``Status.Health``. This decides
  the result: up when the BMC answers and every system is On. A broken core answer is a failure
  (PROTOCOL / STATUS / TLS / ...), never an exception.
* extras, fetched concurrently with the core: ``Chassis/*/Thermal`` and ``Chassis/*/Power``
  (temperatures, fans, voltages, PSUs -> ``SensorReading``) and the entries of every LogService
  under ``Systems/*`` and ``Managers/*`` (the SEL and its vendor cousins -> ``SelEntry``). These only
  explain; a BMC whose Thermal resource is broken or slow still reports its power state, so an
  extra that fails or misses the deadline becomes a note in the detail, not a failed probe.

HTTP: one short-lived keep-alive session per probe, not the daemon's shared ``force_close``
session. A probe makes ~8-12 requests, a TLS handshake on a BMC's small CPU can take hundreds of
ms, and BMCs allow few concurrent connections. ``_CONNECTIONS = 2`` lets the core and the extras
overlap for two handshakes per probe (four would double the BMC's TLS work for little gain).
Closing the session at the end means no stale socket outlives the probe. Redirects are not
followed (credentials would travel along). TLS verification is on: ``ca_file`` trusts the BMC's
self-signed certificate, ``insecure`` opts out. Always https: the port defaults to 443.

Auth: ``session`` logs in once (POST SessionService/Sessions) and keeps the X-Auth-Token in
``ctx.state`` across runs, because BMCs cap concurrent sessions (often at a handful) and a login
per probe would exhaust them; a 401 drops the token and logs in again, once. ``basic`` sends the
credentials with every request.

SEL: new entries are reported once. ``ctx.state`` remembers the entries already seen per log by
Id (plus ``Created``, so a log that was cleared and renumbered from 1 still shows its new entries).
On the first look at a log (daemon start) only Critical entries from the last 24 h are reported:
they may explain an outage in progress, while replaying a years-long log would be noise.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import SecretStr

from watchtower.config import RedfishSpec
from watchtower.probes import BmcReading, Failure, ProbeContext, ProbeResult, SelEntry, SensorReading
from watchtower.probes.http import classify_client_error, ssl_context

# A Redfish resource is a few KB; an event-log page of a few hundred entries stays well under this.
# A bigger answer is a misbehaving peer, and reading it would cost memory and the deadline.
MAX_BODY = 512 * 1024
_CHUNK = 65536
_CONNECTIONS = 2
# A BMC listing thousands of members (buggy or hostile) must not turn one probe into thousands of
# requests: follow at most this many members of any collection.
_MAX_MEMBERS = 32
_MAX_NEW_EVENTS = 50  # listed per probe; more are marked seen and summarised as a count
_SEEN_KEEP = 4096  # entry keys remembered per log
FIRST_RUN_WINDOW = 24 * 3600.0
_SESSIONS_PATH = "/redfish/v1/SessionService/Sessions"

_STATE_SESSION = "redfish_session"
_STATE_SEEN = "redfish_sel_seen"

_HEALTH_RANK = {"OK": 0, "Warning": 1, "Critical": 2}
_SENSOR_RANK = {"unknown": -1, "ok": 0, "warning": 1, "critical": 2}
_SEVERITY = {"critical": "critical", "warning": "warning", "ok": "info"}

Json = dict[str, Any]


class _PeerError(Exception):
    """The BMC did something that makes this resource unusable: becomes a failure or a note."""

    def __init__(self, failure: Failure, detail: str):
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


class _Absent(Exception):
    """HTTP 404 for an optional resource: this BMC does not have it (sushy lacks Power, SEL)."""


@dataclass(frozen=True, slots=True)
class _Session:
    """A Redfish login kept in ctx.state. ``key`` ties it to the BMC and user it was made for."""

    key: tuple[str, str]
    token: SecretStr
    uri: str | None  # the session resource (Location header); for a future logout

    def __repr__(self) -> str:  # never show the token, even in a debugger or a crash dump
        return f"_Session({self.key!r}, uri={self.uri!r})"


@dataclass(slots=True)
class _System:
    path: str
    name: str
    power: str | None
    health: str | None
    log_services: str | None


@dataclass(slots=True)
class _Extras:
    # (chassis Id, Thermal/Power path, sensors); filled concurrently, so in no particular order
    groups: list[tuple[str, str, list[SensorReading]]] = field(default_factory=list)
    logs: list[tuple[str, list[SelEntry]]] = field(default_factory=list)  # (LogService path, entries)
    notes: list[str] = field(default_factory=list)
    # Resources already asked for: chassis (or systems) may share one Thermal or LogServices resource.
    asked: set[str] = field(default_factory=set)

    def first_time(self, path: str) -> bool:
        if path in self.asked:
            return False
        self.asked.add(path)
        return True


# --------------------------------------------------------------------------- HTTP client


async def _read_capped(response: aiohttp.ClientResponse, path: str) -> bytes:
    if response.content_length is not None and response.content_length > MAX_BODY:
        raise _PeerError(
            Failure.PROTOCOL, f"{path}: answer of {response.content_length} bytes, cap {MAX_BODY}"
        )
    body = bytearray()
    while chunk := await response.content.read(min(_CHUNK, MAX_BODY + 1 - len(body))):
        body += chunk
        if len(body) > MAX_BODY:
            raise _PeerError(Failure.PROTOCOL, f"{path}: answer larger than {MAX_BODY // 1024} KiB")
    return bytes(body)


def _parse_json(body: bytes, path: str) -> Json:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        start = body[:40].decode("utf-8", errors="replace")
        raise _PeerError(Failure.PROTOCOL, f"{path}: not JSON ({start!r}...)") from None
    if not isinstance(doc, dict):
        raise _PeerError(Failure.PROTOCOL, f"{path}: JSON {type(doc).__name__}, expected an object")
    return doc


class _Client:
    def __init__(
        self, session: aiohttp.ClientSession, spec: RedfishSpec, base: str, state: dict[str, Any]
    ) -> None:
        self.session = session
        self.spec = spec
        self.base = base
        self.state = state
        self.ssl = ssl_context(spec.ca_file, spec.insecure)
        self._login_lock = asyncio.Lock()
        self._key = (base, spec.username)
        self._auth_headers: dict[str, str] = {}
        if spec.auth == "basic":
            # Built by hand: aiohttp 3.14 deprecates BasicAuth/auth=, and older 3.x lack the successor.
            password = spec.secret("password")
            pair = f"{spec.username}:{password.get_secret_value() if password else ''}".encode()
            self._auth_headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")

    async def _request(
        self, method: str, path: str, headers: dict[str, str], body: Json | None = None
    ) -> tuple[int, bytes, str | None, str | None]:
        """(status, capped body, X-Auth-Token, Location). Transport errors propagate."""
        async with self.session.request(
            method,
            self.base + path,
            headers={"Accept": "application/json", "OData-Version": "4.0", **self._auth_headers, **headers},
            json=body,
            ssl=self.ssl,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None),  # the caller's deadline bounds everything
        ) as response:
            data = await _read_capped(response, path)
            return (
                response.status,
                data,
                response.headers.get("X-Auth-Token"),
                response.headers.get("Location"),
            )

    def _current(self) -> _Session | None:
        current = self.state.get(_STATE_SESSION)
        return current if isinstance(current, _Session) and current.key == self._key else None

    async def login(self) -> _Session:
        """The kept session, or a new one. Serialized: concurrent 401s lead to one login."""
        async with self._login_lock:
            if (current := self._current()) is not None:
                return current
            password = self.spec.secret("password")
            status, _, token, location = await self._request(
                "POST",
                _SESSIONS_PATH,
                {},
                {"UserName": self.spec.username, "Password": password.get_secret_value() if password else ""},
            )
            if status in (401, 403):
                raise _PeerError(
                    Failure.ERROR,
                    f"login as {self.spec.username!r} refused (HTTP {status}): wrong username or password?",
                )
            if status in (404, 405, 501):
                raise _PeerError(
                    Failure.STATUS,
                    f"no Redfish session service (HTTP {status} from {_SESSIONS_PATH}); try auth: basic",
                )
            if not 200 <= status < 300:
                raise _PeerError(Failure.STATUS, f"session login answered HTTP {status}")
            if not token:
                raise _PeerError(Failure.PROTOCOL, f"session login (HTTP {status}) returned no X-Auth-Token")
            uri = location if location and len(location) < 512 else None
            session = _Session(self._key, SecretStr(token), uri)
            self.state[_STATE_SESSION] = session
            return session

    def _drop(self, session: _Session) -> None:
        # Only the token that was refused: another request may already have logged in again.
        if self.state.get(_STATE_SESSION) is session:
            del self.state[_STATE_SESSION]

    async def get(self, path: str, optional: bool = False) -> Json:
        """GET a resource as a JSON object. 404 -> _Absent when optional, else a failure."""
        for attempt in range(2):
            headers = {}
            session = None
            if self.spec.auth == "session":
                session = await self.login()
                headers["X-Auth-Token"] = session.token.get_secret_value()
            status, body, _, _ = await self._request("GET", path, headers)
            if status == 401 and session is not None and attempt == 0:
                self._drop(session)  # expired or revoked (BMC reboot, idle timeout): log in again once
                continue
            break
        if status == 200:
            return _parse_json(body, path)
        if status == 404 and optional:
            raise _Absent(path)
        if status == 401:
            how = "right after a fresh login" if self.spec.auth == "session" else "with basic auth"
            raise _PeerError(
                Failure.ERROR,
                f"HTTP 401 for {path} {how}: credentials of {self.spec.username!r} not accepted",
            )
        if status == 403:
            raise _PeerError(
                Failure.ERROR, f"HTTP 403 for {path}: {self.spec.username!r} lacks the privilege"
            )
        if 300 <= status < 400:
            raise _PeerError(
                Failure.STATUS, f"HTTP {status} redirect for {path} (redirects are not followed)"
            )
        raise _PeerError(Failure.STATUS, f"HTTP {status} for {path}")


# --------------------------------------------------------------------------- shapes


def _link(doc: Json, key: str) -> str | None:
    """``doc[key]["@odata.id"]`` when it is a path on this BMC; None when absent."""
    value = doc.get(key)
    if isinstance(value, dict):
        target = value.get("@odata.id")
        if isinstance(target, str) and target.startswith("/"):
            return target.split("#", 1)[0].rstrip("/")
    return None


def _members(doc: Json, path: str) -> list[str]:
    """Member paths of a collection. Only server-relative paths: a member elsewhere is refused, so a
    BMC cannot send our credentials to another host."""
    members = doc.get("Members")
    if not isinstance(members, list):
        raise _PeerError(Failure.PROTOCOL, f"{path}: no Members list")
    out = []
    for member in members[:_MAX_MEMBERS]:
        target = member.get("@odata.id") if isinstance(member, dict) else None
        if not isinstance(target, str) or not target.startswith("/") or target.startswith("//"):
            raise _PeerError(Failure.PROTOCOL, f"{path}: a member without a usable @odata.id")
        out.append(target.split("#", 1)[0].rstrip("/"))
    return out


def _opt_str(doc: Json, key: str, path: str) -> str | None:
    value = doc.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _PeerError(Failure.PROTOCOL, f"{path}: {key} is {type(value).__name__}, expected a string")


def _status(doc: Json, path: str) -> Json:
    status = doc.get("Status")
    if status is None:
        return {}
    if not isinstance(status, dict):
        raise _PeerError(Failure.PROTOCOL, f"{path}: Status is not an object")
    return status


def _worst_health(values: Iterable[str | None]) -> str | None:
    known = [v for v in values if v in _HEALTH_RANK]
    return max(known, key=_HEALTH_RANK.__getitem__) if known else None


def _parse_system(doc: Json, path: str) -> _System:
    status = _status(doc, path)
    # HealthRollup covers the system's parts (a failed DIMM or PSU); Health may only cover the board.
    # (sushy-tools spells it "HealthRollUp".)
    rollup = _opt_str(status, "HealthRollup", path) or _opt_str(status, "HealthRollUp", path)
    health = _worst_health([_opt_str(status, "Health", path), rollup])
    name = doc.get("Id") or doc.get("Name") or path.rsplit("/", 1)[-1]
    return _System(path, str(name), _opt_str(doc, "PowerState", path), health, _link(doc, "LogServices"))


def _number(value: Any) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond any float (1e400 written out): not a reading
        return None


def _sensor(item: Json, name: str, reading: Any, unit: str) -> SensorReading | None:
    """One reading with its state from thresholds and the BMC's own Status.Health (the worse wins)."""
    status = item.get("Status")
    if not isinstance(status, dict):
        status = {}
    if status.get("State") == "Absent":  # an empty slot, not a sensor
        return None
    value = _number(reading)
    state = "unknown"
    if value is not None:
        state = "ok"
        for level, keys in (
            ("warning", ("UpperThresholdNonCritical",)),
            ("critical", ("UpperThresholdCritical", "UpperThresholdFatal")),
        ):
            if any((t := _number(item.get(k))) is not None and value >= t for k in keys):
                state = level
        for level, keys in (
            ("warning", ("LowerThresholdNonCritical",)),
            ("critical", ("LowerThresholdCritical", "LowerThresholdFatal")),
        ):
            if any((t := _number(item.get(k))) is not None and value <= t for k in keys) and (
                _SENSOR_RANK[level] > _SENSOR_RANK[state]
            ):
                state = level
    by_health = {"OK": "ok", "Warning": "warning", "Critical": "critical"}.get(str(status.get("Health")))
    if by_health is not None and _SENSOR_RANK[by_health] > _SENSOR_RANK[state]:
        state = by_health
    return SensorReading(name[:80], value, unit, state)


def _items(doc: Json, key: str, path: str) -> list[Json]:
    items = doc.get(key, [])
    if not isinstance(items, list):
        raise _PeerError(Failure.PROTOCOL, f"{path}: {key} is not a list")
    return [i for i in items if isinstance(i, dict)]


def _item_name(item: Json, fallback: str) -> str:
    for key in ("Name", "FanName", "MemberId"):
        if isinstance(item.get(key), str | int) and str(item[key]):
            return str(item[key])
    return fallback


def _thermal_sensors(doc: Json, path: str) -> list[SensorReading]:
    out = []
    for i, item in enumerate(_items(doc, "Temperatures", path)):
        out.append(
            _sensor(item, _item_name(item, f"Temperature {i}"), item.get("ReadingCelsius"), "degrees C")
        )
    for i, item in enumerate(_items(doc, "Fans", path)):
        unit = "percent" if item.get("ReadingUnits") == "Percent" else "RPM"
        out.append(_sensor(item, _item_name(item, f"Fan {i}"), item.get("Reading"), unit))
    return [s for s in out if s is not None]


def _power_sensors(doc: Json, path: str) -> list[SensorReading]:
    out = []
    for i, item in enumerate(_items(doc, "PowerSupplies", path)):
        # The input voltage is the telling number: 0 V on an enabled PSU is a lost feed (A/B power).
        out.append(_sensor(item, _item_name(item, f"PSU {i}"), item.get("LineInputVoltage"), "Volts"))
    for i, item in enumerate(_items(doc, "Voltages", path)):
        out.append(_sensor(item, _item_name(item, f"Voltage {i}"), item.get("ReadingVolts"), "Volts"))
    for i, item in enumerate(_items(doc, "PowerControl", path)):
        name = _item_name(item, f"Power {i}")
        out.append(_sensor(item, f"{name} consumed", item.get("PowerConsumedWatts"), "Watts"))
    return [s for s in out if s is not None]


_SENSOR_PARSERS = (("Thermal", _thermal_sensors), ("Power", _power_sensors))


# --------------------------------------------------------------------------- event logs


def _entry(item: Json) -> SelEntry | None:
    ident = item.get("Id")
    if not isinstance(ident, str | int) or isinstance(ident, bool) or str(ident) == "":
        return None  # no identity: cannot be reported exactly once
    text = next(
        (
            str(item[k]).strip()
            for k in ("Message", "Name", "MessageId")
            if isinstance(item.get(k), str) and item[k]
        ),
        "(no message)",
    )
    severity = item.get("Severity") or item.get("MessageSeverity")
    created = item.get("Created")
    return SelEntry(
        record_id=str(ident)[:64],
        text=text[:300],
        severity=_SEVERITY.get(str(severity).lower(), "info"),
        timestamp=created[:40] if isinstance(created, str) else "",
    )


def _recent(entry: SelEntry, now: dt.datetime) -> bool:
    try:
        when = dt.datetime.fromisoformat(entry.timestamp)
    except ValueError:
        return False  # no usable time: on a first look we cannot tell it is recent
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)  # BMCs without an offset mostly run on UTC
    return (now - when).total_seconds() <= FIRST_RUN_WINDOW


def _key(entry: SelEntry) -> str:
    return f"{entry.record_id}\x1f{entry.timestamp}"


def _new_events(state: dict[str, Any], log: str, entries: list[SelEntry]) -> list[SelEntry]:
    seen_logs = state.setdefault(_STATE_SEEN, {})
    previous = seen_logs.get(log)
    keys = [_key(e) for e in entries]
    if previous is None:
        now = dt.datetime.now(dt.UTC)
        new = [e for e in entries if e.severity == "critical" and _recent(e, now)]
    else:
        known = set(previous)
        new = [e for e in entries if _key(e) not in known]
    # Everything on this page is now seen, including what exceeds _MAX_NEW_EVENTS: a flood is
    # summarised once ("N more"), not trickled out over the next runs.
    seen_logs[log] = list(dict.fromkeys([*(previous or []), *keys]))[-_SEEN_KEEP:]
    return new


async def _log_entries(client: _Client, service: str) -> list[SelEntry]:
    path = f"{service}/Entries"
    doc = await client.get(path, optional=True)
    page = _items(doc, "Members", path)
    count = doc.get("Members@odata.count")
    # A paged log that lists oldest first shows its newest entries only on the last page; ask for it
    # once with $skip (a BMC without $skip support returns the first page again, which is harmless).
    if (
        isinstance(doc.get("Members@odata.nextLink"), str)
        and isinstance(count, int)
        and count > len(page) > 1
        and str(page[0].get("Created", "")) < str(page[-1].get("Created", ""))
    ):
        tail = await client.get(f"{path}?$skip={count - len(page)}", optional=True)
        page = _items(tail, "Members", path)
    return [e for e in map(_entry, page) if e is not None]


# --------------------------------------------------------------------------- probe parts


async def _optional(extras: _Extras, what: str, work: Awaitable[None]) -> None:
    """Run one optional read. Absent is fine; any other problem becomes a note, never a failure:
    the extras explain an outage, they do not decide whether the BMC answers."""
    try:
        await work
    except _Absent:
        pass
    except _PeerError as exc:
        extras.notes.append(exc.detail)
    except aiohttp.ClientError as exc:
        extras.notes.append(f"{what}: {exc.__class__.__name__}")
    except OSError as exc:
        extras.notes.append(f"{what}: {exc.strerror or exc.__class__.__name__}")


async def _each(extras: _Extras, parts: Iterable[tuple[str, Awaitable[None]]]) -> None:
    await asyncio.gather(*(_optional(extras, what, work) for what, work in parts))


async def _read_log(client: _Client, extras: _Extras, service: str) -> None:
    extras.logs.append((service, await _log_entries(client, service)))


async def _read_log_services(client: _Client, extras: _Extras, collection: str) -> None:
    services = _members(await client.get(collection, optional=True), collection)
    await _each(extras, ((s, _read_log(client, extras, s)) for s in services))


async def _read_sensors(
    client: _Client,
    extras: _Extras,
    chassis: str,
    link: str,
    parse: Callable[[Json, str], list[SensorReading]],
) -> None:
    extras.groups.append((chassis, link, parse(await client.get(link, optional=True), link)))


async def _read_one_chassis(client: _Client, extras: _Extras, member: str) -> None:
    doc = await client.get(member, optional=True)
    name = member.rsplit("/", 1)[-1]
    links = [
        (link, parse)
        for key, parse in _SENSOR_PARSERS
        if (link := _link(doc, key)) is not None and extras.first_time(link)
    ]
    await _each(extras, ((link, _read_sensors(client, extras, name, link, parse)) for link, parse in links))


async def _read_chassis(client: _Client, extras: _Extras) -> None:
    path = "/redfish/v1/Chassis"
    chassis = _members(await client.get(path, optional=True), path)
    await _each(extras, ((m, _read_one_chassis(client, extras, m)) for m in chassis))


async def _read_manager_logs(client: _Client, extras: _Extras) -> None:
    path = "/redfish/v1/Managers"
    managers = _members(await client.get(path, optional=True), path)
    # The standard path (Redfish 1.6+ fixes URI patterns) saves reading each Manager resource.
    collections = [f"{m}/LogServices" for m in managers]
    await _each(extras, ((c, _read_log_services(client, extras, c)) for c in collections))


async def _read_system_logs(client: _Client, extras: _Extras, systems: list[_System]) -> None:
    collections = [s.log_services for s in systems if s.log_services and extras.first_time(s.log_services)]
    await _each(extras, ((c, _read_log_services(client, extras, c)) for c in collections))


async def _read_systems(client: _Client) -> list[_System]:
    path = "/redfish/v1/Systems"
    members = _members(await client.get(path), path)
    docs = await asyncio.gather(*(client.get(m) for m in members))
    return [_parse_system(doc, m) for doc, m in zip(docs, members, strict=True)]


# --------------------------------------------------------------------------- result


def _sensor_text(s: SensorReading) -> str:
    return f"{s.name} {s.value:g} {s.unit}" if s.value is not None else s.name


def _sensors(groups: list[tuple[str, str, list[SensorReading]]]) -> list[SensorReading]:
    with_sensors = sorted((g for g in groups if g[2]), key=lambda g: (g[0], g[1]))
    several = len({chassis for chassis, _, _ in with_sensors}) > 1
    out = []
    for chassis, _, sensors in with_sensors:
        # Sensor names repeat across chassis (every blade has a "CPU1 Temp"): then say which one.
        prefix = f"{chassis}: " if several else ""
        out += [SensorReading(prefix + s.name, s.value, s.unit, s.state) for s in sensors]
    return out


def _detail(
    systems: list[_System],
    health: str | None,
    sensors: list[SensorReading],
    notes: list[str],
    new: list[SelEntry],
) -> list[str]:
    parts = []
    powers = sorted({s.power or "unknown" for s in systems})
    if powers != ["On"]:
        bad = [s for s in systems if s.power != "On"]
        which = f" ({', '.join(s.name for s in bad)})" if len(systems) > 1 else ""
        parts.append(f"power is {'/'.join(sorted({s.power or 'not reported' for s in bad}))}{which}")
    else:
        parts.append(f"power On ({len(systems)} system{'s' if len(systems) > 1 else ''})")
    if health is not None:
        parts.append(f"health {health}")
    for level in ("critical", "warning"):
        hit = [s for s in sensors if s.state == level]
        if hit:
            shown = ", ".join(_sensor_text(s) for s in hit[:3]) + (", ..." if len(hit) > 3 else "")
            parts.append(f"{len(hit)} sensor{'s' if len(hit) > 1 else ''} {level}: {shown}")
    if new:
        top = max(new, key=lambda e: _SENSOR_RANK.get(e.severity, 0))
        more = f" (+{len(new) - 1} more)" if len(new) > 1 else ""
        parts.append(f"new {top.severity} event: {top.text}{more}")
    return parts + notes


async def probe(spec: RedfishSpec, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    base = f"https://{host}:{spec.effective_port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.timeout
    extras = _Extras()
    extras_tasks: list[asyncio.Task[None]] = []

    def spawn(what: str, work: Awaitable[None]) -> None:
        extras_tasks.append(asyncio.ensure_future(_optional(extras, what, work)))

    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_CONNECTIONS, ttl_dns_cache=10),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        ) as session:
            client = _Client(session, spec, base, ctx.state)
            try:
                async with asyncio.timeout_at(deadline):
                    if spec.auth == "session":
                        await client.login()  # once, before the concurrent reads
                    spawn("Chassis", _read_chassis(client, extras))
                    spawn("Managers", _read_manager_logs(client, extras))
                    systems = await _read_systems(client)
                    spawn("System logs", _read_system_logs(client, extras, systems))
                latency = time.perf_counter() - start
                # The extras may use what is left of the deadline; late ones are cancelled below.
                _, pending = await asyncio.wait(extras_tasks, timeout=max(0.001, deadline - loop.time()))
                if pending:
                    extras.notes.append("some sensors/logs not read within the deadline")
            finally:
                for task in extras_tasks:
                    task.cancel()
                await asyncio.gather(*extras_tasks, return_exceptions=True)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except _PeerError as exc:
        return ProbeResult.fail(exc.failure, exc.detail, time.perf_counter() - start)
    except (aiohttp.ClientError, OSError) as exc:
        return ProbeResult.fail(*classify_client_error(exc))
    return _result(systems, extras, ctx.state, latency)


def _result(systems: list[_System], extras: _Extras, state: dict[str, Any], latency: float) -> ProbeResult:
    new: list[SelEntry] = []
    shown: set[tuple[str, str]] = set()
    for log, entries in extras.logs:
        for entry in _new_events(state, log, entries):
            # A BMC may expose the same SEL under both Systems and Managers: report a record once.
            if (entry.timestamp, entry.text) not in shown:
                shown.add((entry.timestamp, entry.text))
                new.append(entry)
    new.sort(key=lambda e: e.timestamp)
    if len(new) > _MAX_NEW_EVENTS:
        extras.notes.append(f"{len(new) - _MAX_NEW_EVENTS} older new events not listed")
        new = new[-_MAX_NEW_EVENTS:]
    health = _worst_health(s.health for s in systems)
    powers = {s.power for s in systems}
    power_on = True if powers == {"On"} else False if "Off" in powers else None
    sensors = _sensors(extras.groups)
    bmc = BmcReading(power_on=power_on, health=health, new_events=tuple(new), sensors=tuple(sensors))
    if not systems:
        return ProbeResult(False, latency, Failure.CONTENT, "the BMC lists no systems", bmc)
    detail = "; ".join(_detail(systems, health, sensors, extras.notes, new))
    if power_on is not True:
        return ProbeResult(False, latency, Failure.CONTENT, detail, bmc)
    return ProbeResult(True, latency, None, detail, bmc)
