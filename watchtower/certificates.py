"""TLS certificates about to expire on ``http`` paths: a ``certificate`` warning, never a page.

The http probe reports the days left on the certificate it verified (``tls_cert_expiry_days`` in
its values); :func:`expiring` is the pure rule, :class:`CertificateWatch` looks at the latest
results once a minute and opens one warning per path whose certificate expires within the path's
``tls_warn_days`` (default 14), cleared when a renewed certificate is seen. Routing and hours are
``notify.warnings``'s, like backup warnings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from watchtower import clock
from watchtower.config import HttpPath
from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import Change, IncidentTracker
from watchtower.probes.http import CERT_EXPIRY_VALUE

log = logging.getLogger(__name__)
LOOK_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class CertReading:
    target: str
    path: str
    days_left: float
    warn_days: float

    @property
    def root(self) -> str:
        return f"{self.target} {self.path}"


def readings(statuses: Iterable[object]) -> list[CertReading]:
    """From the monitor's path statuses: the https paths whose last probe saw a certificate."""
    out = []
    for status in statuses:
        path = getattr(status, "path", None)
        last = getattr(status, "last", None)
        if path is None or last is None or not isinstance(path.spec, HttpPath):
            continue
        days = dict(last.values).get(CERT_EXPIRY_VALUE)
        if days is not None:
            out.append(CertReading(path.target, path.name, days, path.spec.tls_warn_days))
    return out


def expiring(reading: CertReading) -> str | None:
    """The warning text when this certificate expires within its threshold, else None."""
    if reading.warn_days <= 0 or reading.days_left >= reading.warn_days:
        return None
    if reading.days_left <= 0:
        return f"{reading.target}: TLS certificate of {reading.path} has expired"
    # whole days: the warning's text (and its timeline) changes once a day, not at every probe
    left = f"{int(reading.days_left)} days" if reading.days_left >= 1 else "less than a day"
    return (
        f"{reading.target}: TLS certificate of {reading.path} expires in {left} "
        f"(warning below {reading.warn_days:g} days)"
    )


def evaluate(tracker: IncidentTracker, found: list[CertReading], now: float) -> list[Change]:
    changes: list[Change] = []
    for reading in found:
        text = expiring(reading)
        if text is not None:
            changes += tracker.raise_warning(Scope.CERTIFICATE, reading.root, text, [text], now)
        else:
            left = f"{reading.days_left:.0f} days left"
            text = f"{reading.target}: certificate of {reading.path} renewed ({left})"
            changes += tracker.clear_warning(Scope.CERTIFICATE, reading.root, text, now)
    return changes


class CertificateWatch:
    def __init__(self, monitor: object, tracker: IncidentTracker, changed: asyncio.Event | None = None):
        self.monitor = monitor
        self.tracker = tracker
        self.changed = changed

    def look(self, now: float) -> list[Change]:
        statuses = getattr(self.monitor, "statuses", {})
        changes = evaluate(self.tracker, readings(list(statuses.values())), now)
        for change in changes:
            log.info("certificate warning id=%d change=%s: %s", change.incident, change.kind, change.text)
        if changes and self.changed is not None:
            self.changed.set()
        return changes

    async def run(self) -> None:
        while True:
            await asyncio.sleep(LOOK_EVERY)
            try:
                self.look(clock.now())
            except Exception:  # a bug here must not end the daemon; the trace says where
                log.exception("certificate look failed")
