"""Alertmanager sink: every incident is also one alert in Alertmanager's API v2 (``POST /api/v2/alerts``).

An MSP with many sites already runs Alertmanager for routing, silences, inhibition and
deduplication; this hands watchtower's incidents to it, next to the channels of ``notify:``.

- **One alert per incident**, labels ``alertname="WatchtowerIncident"``, ``site``, ``scope``,
  ``root``, ``cause`` (when known) and the configured extra ``labels``. The labels say *what* is
  down, never *who saw it*: this watchtower's name (``instance``) and its incident id go into the
  annotations. Two vantage points of one site therefore post the same label set, Alertmanager
  treats it as one alert, and on-call gets one notification.
- **Re-posted every** ``every`` while open with ``endsAt = now + 4 x every``, so the alerts of a
  watchtower that died expire by themselves instead of firing forever (Prometheus does the same).
- **Resolved** by one more post with ``endsAt`` = the time the incident resolved. A label set
  that changes while open (a cause found, a VM incident re-rooted to its hypervisor) resolves the
  old set the same way.
- Posts are sent from their own task with a timeout; a slow or dead Alertmanager delays nothing
  else, and what could not be posted is posted on the next round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from watchtower import clock
from watchtower.config import Alertmanager, Config
from watchtower.engine.incidents import Incident, IncidentTracker

log = logging.getLogger("watchtower.alertmanager")

ALERTNAME = "WatchtowerIncident"
LOOK_EVERY = 1.0  # how often the incident list is compared with what was last posted
EXPIRY_FACTOR = 4  # an alert not re-posted expires after this many `every`
# Alertmanager unreachable: the next post waits 2 s, 4 s, ... up to BACKOFF_MAX (with jitter), not
# LOOK_EVERY; one WARNING when it goes down, one INFO when it is back.
BACKOFF_MAX = 60.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Posted:
    labels: Labels
    starts_at: float
    alert: dict[str, Any]
    delivered: bool = False


def incident_labels(incident: Incident, site: str, extra: dict[str, str]) -> Labels:
    labels = {
        **extra,
        "alertname": ALERTNAME,
        "site": site,
        "scope": str(incident.scope),
        "root": incident.root,
    }
    if incident.cause is not None:
        labels["cause"] = str(incident.cause)
    return tuple(sorted(labels.items()))


class AlertmanagerSink:
    """Posts the tracker's incidents to Alertmanager; inert while ``alertmanager:`` is not configured."""

    def __init__(self, config: Config, tracker: IncidentTracker):
        self.tracker = tracker
        self._posted: dict[int, _Posted] = {}  # incidents posted as open, by id
        self._resolve: list[dict[str, Any]] = []  # resolutions not yet accepted by Alertmanager
        self._last_post = float("-inf")
        self.posts = self.failures = 0
        # Incidents in maintenance are not posted (Alertmanager would route them to someone's pager);
        # set by the daemon from the alerting's mutes and windows.
        self.muted: Callable[[Incident], bool] = lambda incident: False
        self.down_since: float | None = None  # monotonic: first failed post of the current outage
        self._backoff = 0.0
        self._retry_at = float("-inf")  # monotonic
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config: Alertmanager | None = config.alertmanager
        self.site = config.site
        self.status_url = config.notify.status_url
        self.instance = (self.config.instance if self.config else None) or socket.gethostname()

    # ------------------------------------------------------------------ what to post
    def alert(self, incident: Incident, labels: Labels, now: float) -> dict[str, Any]:
        assert self.config is not None
        annotations = {
            "summary": f"{self.site}: {incident.headline()}",
            "description": self._description(incident),
            "instance": self.instance,
            "incident_id": str(incident.id),
        }
        alert: dict[str, Any] = {
            "labels": dict(labels),
            "annotations": annotations,
            "startsAt": iso(incident.first_failure_at or incident.opened_at),
            "endsAt": iso(now + EXPIRY_FACTOR * self.config.every),
        }
        if self.status_url:
            alert["generatorURL"] = self.status_url
        return alert

    def _description(self, incident: Incident) -> str:
        lines = [f"{incident.headline()}, seen by watchtower {self.instance} (incident #{incident.id})."]
        if incident.affected:
            lines.append(f"Affected: {', '.join(incident.affected)}.")
        if incident.acknowledged_by:
            lines.append(f"Acknowledged by {incident.acknowledged_by}.")
        if incident.evidence:
            lines.append("Evidence: " + "; ".join(incident.evidence[:5]))
        return "\n".join(lines)

    def plan(self, now: float, *, repost: bool) -> list[dict[str, Any]]:
        """The alerts to post now: open incidents that are new or changed (all of them when
        ``repost``), and one resolving post for each incident (or old label set) that ended."""
        assert self.config is not None
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for incident in self.tracker.open_incidents():
            if self.muted(incident):
                continue
            seen.add(incident.id)
            labels = incident_labels(incident, self.site, self.config.labels)
            before = self._posted.get(incident.id)
            if before is not None and before.labels != labels:
                self._resolve.append(self._ended(before, now))  # the old label set is over
                before = None
            alert = self.alert(incident, labels, now)
            changed = (
                before is None or not before.delivered or before.alert["annotations"] != alert["annotations"]
            )
            if repost or changed:
                out.append(alert)
            starts = incident.first_failure_at or incident.opened_at
            self._posted[incident.id] = _Posted(labels, starts, alert, delivered=not changed)
        for incident_id in [i for i in self._posted if i not in seen]:
            posted = self._posted.pop(incident_id)
            gone = self.tracker.get(incident_id)
            ended = gone.resolved_at if gone is not None and gone.resolved_at else now
            self._resolve.append(self._ended(posted, ended))
        return out + self._resolve

    @staticmethod
    def _ended(posted: _Posted, at: float) -> dict[str, Any]:
        return {**posted.alert, "endsAt": iso(max(at, posted.starts_at))}

    # ------------------------------------------------------------------ posting
    async def post(self, alerts: list[dict[str, Any]]) -> bool:
        assert self.config is not None
        secret = self.config.secret("url")
        assert secret is not None
        url = secret.get_secret_value().rstrip("/") + "/api/v2/alerts"
        self.posts += 1
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as session,
                session.post(url, json=alerts) as response,
            ):
                ok = response.status < 300
                detail = "" if ok else (await response.text())[:200]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, detail = False, exc.__class__.__name__
        self._account(ok, len(alerts), detail.strip())
        return ok

    def _account(self, ok: bool, count: int, detail: str) -> None:
        """Backoff and state-change logging (the URL may hold credentials: never logged)."""
        mono = time.monotonic()
        if ok:
            if self.down_since is not None:
                log.info(
                    "alertmanager reachable again after=%ds failed_posts=%d",
                    mono - self.down_since, self.failures,
                )  # fmt: skip
            else:
                log.debug("alertmanager post ok alerts=%d", count)
            self.down_since, self._backoff, self._retry_at = None, 0.0, float("-inf")
            return
        self.failures += 1
        if self.down_since is None:
            self.down_since = mono
            log.warning("alertmanager post failed alerts=%d error=%s (retrying with backoff)", count, detail)
        else:
            log.debug("alertmanager post failed again alerts=%d error=%s", count, detail)
        self._backoff = min(BACKOFF_MAX, max(2 * LOOK_EVERY, 2 * self._backoff))
        self._retry_at = mono + self._backoff * random.uniform(0.8, 1.2)

    async def tick(self, *, force: bool = False) -> None:
        """One round: post what changed, and everything once ``every`` has passed since the last post."""
        if self.config is None:
            self._posted.clear()
            self._resolve.clear()
            return
        if not force and time.monotonic() < self._retry_at:
            return  # backing off while Alertmanager is down
        now = clock.now()
        repost = force or now - self._last_post >= self.config.every
        alerts = self.plan(now, repost=repost)
        if not alerts:
            return
        resolving = len(self._resolve)
        ok = await self.post(alerts)
        for posted in self._posted.values():
            posted.delivered = ok  # not known to have arrived: posted again next round
        if ok:
            del self._resolve[:resolving]
            if repost:
                self._last_post = now

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug here must not take the daemon (and its paging) down
                log.exception("alertmanager sink round failed")
            await asyncio.sleep(LOOK_EVERY)
