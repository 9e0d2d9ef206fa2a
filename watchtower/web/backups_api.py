"""HTTP for backups and readiness (issue 16).

- ``POST /api/v1/backups/{name}`` and ``.../{name}/fail``: a backup job reports its end, with the
  push token of *that* backup (``Authorization: Bearer TOKEN``), not the API token: a job's token
  opens nothing else. Open to the auth middleware for that reason (see :data:`PUSH_PREFIX`).
- ``GET /api/v1/backups``: every backup's last reading (API token).
- ``GET /api/v1/readiness``: the readiness report as JSON (API token); 200 even when red (the
  CLI's exit status is the gate).
- ``watchtower_backup_*``, ``watchtower_readiness_*`` and ``watchtower_tls_cert_expiry_days``
  metrics, added to ``/metrics`` by :func:`collectors`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from watchtower import clock
from watchtower.backups.watch import BackupWatch
from watchtower.certificates import readings
from watchtower.people import ContactVerification
from watchtower.readiness import LEVELS, Readiness, assess_site, recorded_tests

PUSH_PREFIX = "/api/v1/backups/"
WATCH: web.AppKey[BackupWatch] = web.AppKey("backup_watch", BackupWatch)
# The drills' record per contact (watchtower.drill.DrillRunner.verification), when drills run
Verify = Callable[[], list[ContactVerification]] | None
VERIFY: web.AppKey[Verify] = web.AppKey("contact_verification")


def is_push(request: web.Request) -> bool:
    return request.method == "POST" and request.path.startswith(PUSH_PREFIX)


def _token_ok(request: web.Request, watch: BackupWatch, name: str) -> bool:
    backup = watch.backups.get(name)
    if backup is None or backup.spec.push is None:
        return False
    token = backup.spec.push.secret("token")
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return token is not None and hmac.compare_digest(given.encode(), token.get_secret_value().encode())


async def handle_push(request: web.Request) -> web.Response:
    watch = request.app[WATCH]
    name = request.match_info["name"]
    ok = not request.path.endswith("/fail")
    # Unknown name and wrong token answer alike: the endpoint does not tell which names exist.
    if not _token_ok(request, watch, name):
        return web.json_response({"error": "unknown backup or wrong token"}, status=401)
    status = watch.push(name, ok, clock.now())
    return web.json_response({"backup": name, "newest": status.newest, "failed_at": status.failed_at})


def _backup_doc(watch: BackupWatch) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "target": s.target,
            "service": s.service,
            "kind": s.kind,
            "read_at": s.read_at,
            "ok": s.ok,
            "detail": s.detail,
            "newest": s.newest,
            "newest_verified": s.newest_verified,
            "count": s.count,
            "max_age": watch.backups[s.name].max_age,
        }
        for s in watch.status.values()
    ]


async def handle_backups(request: web.Request) -> web.Response:
    return web.json_response(_backup_doc(request.app[WATCH]))


def _report(watch: BackupWatch, verify: Verify) -> Readiness:
    verified = verify() if verify is not None else None
    return assess_site(watch.config, watch.status, clock.now(), recorded_tests(watch.config), verified)


async def handle_readiness(request: web.Request) -> web.Response:
    return web.json_response(_report(request.app[WATCH], request.app.get(VERIFY)).document())


def page_sections(watch: BackupWatch | None, verify: Verify = None) -> dict[str, Any]:
    """The status page's restore points (restore board) and readiness section."""
    if watch is None:
        return {}
    report = _report(watch, verify)
    return {"restore_points": watch.restore_by_target(clock.now()), "readiness": report.document()}


def register(app: web.Application, watch: BackupWatch, verify: Verify = None) -> None:
    app[WATCH] = watch
    app[VERIFY] = verify
    app.router.add_post("/api/v1/backups/{name}", handle_push)
    app.router.add_post("/api/v1/backups/{name}/fail", handle_push)
    app.router.add_get("/api/v1/backups", handle_backups)
    app.router.add_get("/api/v1/readiness", handle_readiness)


def collectors(watch: BackupWatch | None, statuses: Any, verify: Verify = None) -> Iterator[Metric]:
    """Metrics of backups, readiness and certificates (no secret, no URL in any label)."""
    certs = GaugeMetricFamily(
        "watchtower_tls_cert_expiry_days",
        "days until the certificate an https path verified expires",
        labels=["target", "path"],
    )
    for reading in readings(list(statuses.values())):
        certs.add_metric([reading.target, reading.path], reading.days_left)
    yield certs
    if watch is None:
        return
    newest = GaugeMetricFamily(
        "watchtower_backup_newest_timestamp_seconds",
        "when the newest restore point was made",
        labels=["backup", "service", "kind"],
    )
    verified = GaugeMetricFamily(
        "watchtower_backup_newest_verified_timestamp_seconds",
        "when the newest verified restore point was made",
        labels=["backup", "service", "kind"],
    )
    read_ok = GaugeMetricFamily(
        "watchtower_backup_read_ok",
        "1 if the last read of the source worked",
        labels=["backup", "service", "kind"],
    )
    max_age = GaugeMetricFamily(
        "watchtower_backup_max_age_seconds",
        "the RPO the newest restore point is held to",
        labels=["backup", "service"],
    )
    for s in watch.status.values():
        labels = [s.name, s.service, s.kind]
        if s.newest is not None:
            newest.add_metric(labels, s.newest)
        if s.newest_verified is not None:
            verified.add_metric(labels, s.newest_verified)
        if s.ok is not None:
            read_ok.add_metric(labels, float(s.ok))
        limit = watch.backups[s.name].max_age
        if limit is not None:
            max_age.add_metric([s.name, s.service], limit)
    yield newest
    yield verified
    yield read_ok
    yield max_age
    report = _report(watch, verify)
    score = GaugeMetricFamily("watchtower_readiness_score", "per cent of readiness items that are green")
    score.add_metric([], float(report.score))
    level = GaugeMetricFamily(
        "watchtower_readiness_level", "per service: 0 green, 1 amber, 2 red", labels=["service", "target"]
    )
    items = GaugeMetricFamily("watchtower_readiness_items", "readiness items by level", labels=["level"])
    counts = dict.fromkeys(LEVELS, 0)
    for sr in report.services:
        level.add_metric([sr.service, sr.target], float(LEVELS.index(sr.level)))
        for i in sr.items:
            counts[i.level] += 1
    for name, n in counts.items():
        items.add_metric([name], float(n))
    yield score
    yield level
    yield items
