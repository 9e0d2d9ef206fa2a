"""/metrics: the hand-written per-path families are byte for byte what prometheus_client would
write for them, and the cache renders once for scrapes that come close together."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from watchtower.engine.correlate import TargetState
from watchtower.engine.monitor import PathRow, Snapshot
from watchtower.engine.paths import PathState
from watchtower.web import metrics

AWKWARD = ["plain", 'quo"te', "back\\slash", "new\nline", "{braces}", "ünï", ""]


def snapshot(n: int = 0) -> Snapshot:
    rows = []
    for i, name in enumerate(AWKWARD * 3):
        rows.append(
            PathRow(
                target=f"t{i % 4}{name}",
                name=f"icmp {name} {i}",
                kind="icmp" if i % 2 else "tcp",
                state=(PathState.UP, PathState.DOWN, PathState.UNKNOWN)[i % 3],
                ok=(True, False, None)[i % 3],
                latency=(0.000123 * (i + 1), None, 1234567.5, 0.0, 1e-9, 3.0)[i % 6],
                last_ok=None,
                detail="",
                values=((f"charge{name}", 97.5), ("big", 1.5e17)) if i % 5 == 0 else (),
            )
        )
    for i in range(n):
        rows.append(
            PathRow("bulk", f"icmp 10.0.{i // 250}.{i % 250}", "icmp", PathState.UP, True, 0.0004, None, "")
        )
    targets = tuple(
        (f"t{i}{name}", f"role{name}", list(TargetState)[i % 4]) for i, name in enumerate(AWKWARD)
    )
    return Snapshot(0.0, "s", tuple(rows), targets, True, (("0.1", 1), ("+Inf", 2)), 0.2, 2)


class Reference:
    """The per-path families through prometheus_client, as metrics.py rendered them before."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def collect(self) -> list[Metric]:
        success = GaugeMetricFamily("watchtower_probe_success", "1 if the last probe of the path succeeded",
                                    labels=["target", "path", "kind"])  # fmt: skip
        duration = GaugeMetricFamily("watchtower_probe_duration_seconds",
                                     "round trip / time to answer of the last probe",
                                     labels=["target", "path", "kind"])  # fmt: skip
        path_up = GaugeMetricFamily("watchtower_path_up",
                                    "1 up, 0 down after fail_after/recover_after (absent while unknown)",
                                    labels=["target", "path"])  # fmt: skip
        values = GaugeMetricFamily("watchtower_probe_value",
                                   "numeric readings of the last probe (UPS charge, disk used %, ...)",
                                   labels=["target", "path", "name"])  # fmt: skip
        for row in self.snap.paths:
            if row.ok is not None:
                success.add_metric([row.target, row.name, row.kind], 1.0 if row.ok else 0.0)
            if row.latency is not None:
                duration.add_metric([row.target, row.name, row.kind], row.latency)
            if row.state is not PathState.UNKNOWN:
                path_up.add_metric([row.target, row.name], 1.0 if row.state is PathState.UP else 0.0)
            for name, value in row.values:
                values.add_metric([row.target, row.name, name], value)
        states = GaugeMetricFamily("watchtower_target_state", "1 for the target's current state (one-hot)",
                                   labels=["target", "role", "state"])  # fmt: skip
        for name, role, state in self.snap.targets:
            for candidate in TargetState:
                states.add_metric([name, role, candidate.value], 1.0 if candidate is state else 0.0)
        return [success, duration, path_up, states, values]


def test_hand_written_families_match_prometheus_client_byte_for_byte() -> None:
    snap = snapshot()
    assert metrics.render_paths(snap).encode() == generate_latest(Reference(snap))
    body = metrics.render(snap).decode()
    assert 'watchtower_path_up{path="icmp quo\\"te 1",target="t1quo\\"te"} 0.0\n' in body
    newline = 'kind="icmp",path="icmp new\\nline 3",target="t3new\\nline"'
    assert f"watchtower_probe_duration_seconds{{{newline}}}" in body
    assert "1.5e+17" in body and "1.2345675e+06" in body
    assert body.count("# TYPE watchtower_probe_success gauge") == 1
    assert "watchtower_scheduler_lag_seconds_bucket" in body  # the site-wide families follow


async def test_cache_renders_once_for_scrapes_close_together() -> None:
    cache = metrics.MetricsCache()
    cache.CACHE_FROM = 0.0  # keep even a fast render (this machine may render 20k paths quickly)
    taken = 0

    def snap() -> metrics.RenderArgs:
        nonlocal taken
        taken += 1
        return snapshot(n=20000), None, (), None

    bodies = await asyncio.gather(*(cache.body(snap, False) for _ in range(5)))
    assert taken == 1 and cache.renders == 1 and len(set(bodies)) == 1
    assert await cache.body(snap, False) is bodies[0]  # still fresh: served from the cache
    zipped = await cache.body(snap, True)  # another encoding is another body
    assert cache.renders == 2 and zipped[:2] == b"\x1f\x8b"
    cache._bodies.clear()  # as if it aged out
    await cache.body(snap, False)
    assert cache.renders == 3 and taken == 3


async def test_a_cheap_render_is_not_kept() -> None:
    """A small site's metrics follow every change: nothing is served from the cache."""
    cache = metrics.MetricsCache()
    taken = 0

    def snap() -> metrics.RenderArgs:
        nonlocal taken
        taken += 1
        return snapshot(), None, (), None

    await cache.body(snap, False)
    await cache.body(snap, False)
    assert taken == 2 and cache.renders == 2
