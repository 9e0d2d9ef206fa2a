"""Prometheus metrics rendered from a :class:`~watchtower.engine.monitor.Snapshot` on scrape.

A custom collector instead of labelled Gauges: the daemon already holds the state, so mirroring
it into 20,000 locked ``.labels()`` children would cost ~30x more per update and ~12 MB of RSS
(measured: see ../shared/notes). Rendering 20k series takes 100-250 ms, so the web handler runs
:func:`render` in a thread on a snapshot copied on the loop.
"""

from __future__ import annotations

import gzip
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from watchtower import __version__
from watchtower.engine.monitor import Snapshot, TargetState
from watchtower.engine.paths import PathState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector:
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
        success = GaugeMetricFamily(
            "watchtower_probe_success",
            "1 if the last probe of the path succeeded",
            labels=["target", "path", "kind"],
        )
        duration = GaugeMetricFamily(
            "watchtower_probe_duration_seconds",
            "round trip / time to answer of the last probe",
            labels=["target", "path", "kind"],
        )
        path_up = GaugeMetricFamily(
            "watchtower_path_up",
            "1 up, 0 down after fail_after/recover_after (absent while unknown)",
            labels=["target", "path"],
        )
        for row in snap.paths:
            if row.ok is not None:
                success.add_metric([row.target, row.name, row.kind], 1.0 if row.ok else 0.0)
            if row.latency is not None:
                duration.add_metric([row.target, row.name, row.kind], row.latency)
            if row.state is not PathState.UNKNOWN:
                path_up.add_metric([row.target, row.name], 1.0 if row.state is PathState.UP else 0.0)
        yield success
        yield duration
        yield path_up

        target_state = GaugeMetricFamily(
            "watchtower_target_state",
            "1 for the target's current state (one-hot)",
            labels=["target", "role", "state"],
        )
        for name, role, state in snap.targets:
            for candidate in TargetState:
                target_state.add_metric([name, role, candidate.value], 1.0 if candidate is state else 0.0)
        yield target_state
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
        values = GaugeMetricFamily(
            "watchtower_probe_value",
            "numeric readings of the last probe (UPS charge, disk used %, ...)",
            labels=["target", "path", "name"],
        )
        for row in snap.paths:
            for name, value in row.values:
                values.add_metric([row.target, row.name, name], value)
        yield values
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
    body = generate_latest(collector)  # type: ignore[arg-type,unused-ignore]
    return gzip.compress(body, compresslevel=5) if compress else body
