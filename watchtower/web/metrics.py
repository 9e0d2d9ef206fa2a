"""Prometheus metrics rendered from a :class:`~watchtower.engine.monitor.Snapshot` on scrape.

A custom collector instead of labelled Gauges: the daemon already holds the state, so mirroring
it into 20,000 locked ``.labels()`` children would cost ~30x more per update and ~12 MB of RSS
(measured: see ../shared/notes).

The per-path families (four series per path: 40,000 at 10,000 paths) are written as text here,
byte for byte what ``generate_latest`` writes for them (label names sorted, values through
``floatToGoString``), because prometheus_client's sample objects and per-sample formatting cost
575 ms for 40k series (bench/RESULTS.md); the few site-wide families still go through the
collector. :class:`MetricsCache` renders in a thread from an immutable snapshot and serves the
body again for a while, so scrapers never make the daemon render back to back.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from watchtower import __version__
from watchtower.engine.monitor import Snapshot, TargetState
from watchtower.engine.paths import PathState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@functools.lru_cache(maxsize=1 << 17)
def _path_labels(target: str, path: str, kind: str) -> tuple[str, str]:
    """``kind=..,path=..,target=..`` and ``path=..,target=..``: sorted by label name, as
    prometheus_client writes them; kept across scrapes (a path's labels do not change)."""
    t, p = _escape(target), _escape(path)
    return f'kind="{_escape(kind)}",path="{p}",target="{t}"', f'path="{p}",target="{t}"'


def _family(out: list[str], name: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")


def render_paths(snap: Snapshot) -> str:
    """The per-path and per-target families as exposition text."""
    success: list[str] = []
    duration: list[str] = []
    path_up: list[str] = []
    values: list[str] = []
    _family(success, "watchtower_probe_success", "1 if the last probe of the path succeeded")
    _family(duration, "watchtower_probe_duration_seconds", "round trip / time to answer of the last probe")
    _family(
        path_up, "watchtower_path_up", "1 up, 0 down after fail_after/recover_after (absent while unknown)"
    )
    _family(
        values, "watchtower_probe_value", "numeric readings of the last probe (UPS charge, disk used %, ...)"
    )
    fmt = floatToGoString
    up, unknown = PathState.UP, PathState.UNKNOWN
    for row in snap.paths:
        with_kind, plain = _path_labels(row.target, row.name, row.kind)
        if row.ok is not None:
            success.append(f"watchtower_probe_success{{{with_kind}}} {'1.0' if row.ok else '0.0'}\n")
        if row.latency is not None:
            duration.append(f"watchtower_probe_duration_seconds{{{with_kind}}} {fmt(row.latency)}\n")
        if row.state is not unknown:
            path_up.append(f"watchtower_path_up{{{plain}}} {'1.0' if row.state is up else '0.0'}\n")
        for name, value in row.values:
            values.append(f'watchtower_probe_value{{name="{_escape(name)}",{plain}}} {fmt(value)}\n')
    target_state: list[str] = []
    _family(target_state, "watchtower_target_state", "1 for the target's current state (one-hot)")
    for name, role, state in snap.targets:
        role_label, target_label = _escape(role), _escape(name)
        for candidate in TargetState:
            one = "1.0" if candidate is state else "0.0"
            target_state.append(
                f'watchtower_target_state{{role="{role_label}",state="{candidate.value}",'
                f'target="{target_label}"}} {one}\n'
            )
    return "".join(success + duration + path_up + target_state + values)


class SnapshotCollector:
    """The site-wide and per-target families, through prometheus_client (the per-path ones:
    :func:`render_paths`)."""

    def __init__(
        self,
        snapshot: Snapshot,
        verified: Mapping[str, float | None] | None = None,
        muted: Collection[str] = (),
    ):
        self.snapshot = snapshot
        self.verified = verified or {}
        self.muted = muted

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        muted = GaugeMetricFamily(
            "watchtower_muted",
            "1 while the target is in maintenance (muted or in a window): recorded, not paged",
            labels=["target"],
        )
        for name, _, _ in snap.targets:
            muted.add_metric([name], 1.0 if name in self.muted else 0.0)
        yield muted

        yield GaugeMetricFamily(
            "watchtower_vantage_up",
            "1 while the monitor itself can reach the outside",
            value=float(snap.vantage_up),
        )
        power = GaugeMetricFamily(
            "watchtower_bmc_power_on", "1 chassis on, 0 off, per the BMC", labels=["target"]
        )
        sel = CounterMetricFamily(
            "watchtower_bmc_sel_critical",
            "critical SEL entries seen since watchtower started",
            labels=["target"],
        )
        sensors = GaugeMetricFamily(
            "watchtower_sensor_value", "BMC sensor readings", labels=["target", "sensor", "unit"]
        )
        for target, bmc in snap.bmc:
            if bmc.power_on is not None:
                power.add_metric([target], float(bmc.power_on))
            sel.add_metric([target], float(bmc.critical_total))
            for s in bmc.sensors:
                if s.value is not None:
                    sensors.add_metric([target, s.name, s.unit], s.value)
        yield power
        yield sel
        yield sensors
        incidents = GaugeMetricFamily(
            "watchtower_incidents_open", "open incidents by scope", labels=["scope"]
        )
        for scope, count in snap.incidents_open:
            incidents.add_metric([scope], float(count))
        yield incidents
        notifications = CounterMetricFamily(
            "watchtower_notifications",
            "delivery attempts by channel and result",
            labels=["channel", "result"],
        )
        pending = GaugeMetricFamily(
            "watchtower_notifications_pending", "messages waiting for delivery", labels=["channel"]
        )
        channel_up = GaugeMetricFamily(
            "watchtower_channel_up", "1 unless the channel's last delivery attempt failed", labels=["channel"]
        )
        for ch in snap.channels:
            notifications.add_metric([ch.name, "sent"], ch.sent)
            notifications.add_metric([ch.name, "failed"], ch.failed)
            pending.add_metric([ch.name], ch.pending)
            channel_up.add_metric([ch.name], 0 if ch.failing_since is not None else 1)
        yield notifications
        yield pending
        yield channel_up
        yield GaugeMetricFamily(
            "watchtower_store_writable", "1 while the state store accepts writes", value=int(snap.store_ok)
        )
        lag = HistogramMetricFamily(
            "watchtower_scheduler_lag_seconds", "delay between a probe's due time and its start"
        )
        lag.add_metric([], [(b, float(c)) for b, c in snap.lag_buckets], snap.lag_sum)
        yield lag
        yield GaugeMetricFamily(
            "watchtower_config_last_reload_success",
            "1 if the last config (re)load was applied, 0 if it was rejected",
            value=float(snap.reload_ok),
        )
        yield GaugeMetricFamily(
            "watchtower_config_last_reload_success_timestamp_seconds",
            "when the config was last (re)loaded or a reload was rejected",
            value=snap.reload_at,
        )
        if self.verified:
            last = GaugeMetricFamily(
                "watchtower_contact_last_verified_timestamp_seconds",
                "when an alert-chain drill last reached the contact (0: never)",
                labels=["contact"],
            )
            for contact, at in self.verified.items():
                last.add_metric([contact], at or 0.0)
            yield last
        info = GaugeMetricFamily("watchtower_build_info", "watchtower version", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        yield from PROCESS_COLLECTOR.collect()
        yield from PLATFORM_COLLECTOR.collect()


class _Chained:
    def __init__(self, *collectors: Any):
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()


def render(
    snapshot: Snapshot,
    compress: bool = False,
    verified: Mapping[str, float | None] | None = None,
    muted: Collection[str] = (),
    extra: Any = None,
) -> bytes:
    """The exposition text for one snapshot (blocking: call it in a thread); ``verified``: contact
    -> last drill confirmation; ``muted``: targets in maintenance; ``extra``: another collector (an
    object with ``collect()``), e.g. backups and readiness."""
    collector: Any = SnapshotCollector(snapshot, verified, muted)
    if extra is not None:
        collector = _Chained(collector, extra)
    body = render_paths(snapshot).encode() + generate_latest(collector)  # type: ignore[arg-type,unused-ignore]
    return gzip.compress(body, compresslevel=5) if compress else body


RenderArgs = tuple[Snapshot, Mapping[str, float | None] | None, Collection[str], Any]


class MetricsCache:
    """The ``/metrics`` body, rendered in a thread from a snapshot and served again while fresh.

    A body stays fresh ``FRESH_FACTOR`` times as long as it took to render, at most ``MAX_AGE``
    seconds, and only when it took at least ``CACHE_FROM``: at 10,000 paths (~0.1 s to render with
    the loop busy) scrapes inside ~2 s share one render, so rendering never takes more than ~5 % of
    a core however often it is scraped, while a small site is rendered afresh on every scrape.
    Concurrent scrapes of a stale body wait for the one render in progress.
    """

    MAX_AGE = 5.0
    FRESH_FACTOR = 20.0
    # A render cheaper than this is not kept: a small site's metrics follow every change at once
    # (a mute ended, a message sent), and re-rendering costs next to nothing there.
    CACHE_FROM = 0.05

    def __init__(self) -> None:
        self._bodies: dict[bool, tuple[float, bytes]] = {}  # gzip? -> (fresh until, body)
        self._rendering: dict[bool, asyncio.Future[bytes]] = {}
        self.renders = 0

    async def body(self, take: Callable[[], RenderArgs], compress: bool) -> bytes:
        """The body; ``take()`` (on the loop, only when a render is due) gives what :func:`render`
        needs besides ``compress``: the snapshot, drill verifications, muted targets, extra."""
        cached = self._bodies.get(compress)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        pending = self._rendering.get(compress)
        if pending is None:
            pending = asyncio.ensure_future(self._render(take(), compress))
            self._rendering[compress] = pending
            pending.add_done_callback(lambda _: self._rendering.pop(compress, None))
        return await asyncio.shield(pending)

    async def _render(self, args: RenderArgs, compress: bool) -> bytes:
        snap, verified, muted, extra = args
        start = time.monotonic()
        body = await asyncio.to_thread(render, snap, compress, verified, muted, extra)
        took = time.monotonic() - start
        self.renders += 1
        fresh = min(self.MAX_AGE, took * self.FRESH_FACTOR) if took >= self.CACHE_FROM else 0.0
        self._bodies[compress] = (time.monotonic() + fresh, body)
        return body
