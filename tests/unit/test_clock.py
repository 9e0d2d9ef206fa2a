"""Wall-clock jumps (NTP steps, ``date -s``) move neither ``watchtower.clock.now()`` nor escalation:
timers run on the monotonic clock; stored times stay UTC epoch seconds from the start's wall clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sinks import HttpSink, signal_url
from support import wait_for

from watchtower import clock
from watchtower.config import parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import due
from watchtower.engine.incidents import Incident, IncidentTracker
from watchtower.notify.outbox import Alerting
from watchtower.store import AsyncStore


def _config(tmp: Path, url: str = "json://127.0.0.1:9/", after: str = "15m") -> object:
    return parse_config(
        {
            "site": "clock",
            "state_dir": str(tmp / "state"),
            "targets": {"erp1": {"role": "service", "paths": [{"tcp": "127.0.0.1:9"}]}},
            "notify": {
                "channels": [{"name": "signal", "url": url, "tags": ["tier1"]}],
                "escalation": [
                    {"after": "0s", "notify": ["tier1"]},
                    {"after": after, "notify": ["tier1"], "unless": "acknowledged"},
                ],
            },
        },
        tmp,
    )


@pytest.mark.parametrize("jump", [3600.0, -3600.0, 86400.0 * 365, -30.0])
def test_now_ignores_wall_jumps_and_offset_reports_them(monkeypatch: pytest.MonkeyPatch, jump: float) -> None:
    real_time, real_mono = time.time, time.monotonic
    before = clock.now()
    monkeypatch.setattr(time, "time", lambda: real_time() + jump)
    after = clock.now()
    assert 0 <= after - before < 0.5  # advanced by the monotonic clock only
    assert abs(clock.offset() - jump) < 0.5
    mono = real_mono()
    monkeypatch.setattr(time, "monotonic", lambda: mono + 10.0)
    assert abs(clock.now() - (after + 10.0)) < 0.5  # 10 s of monotonic time are 10 s of "now"


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_escalation_is_neither_early_nor_late_across_a_jump(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jump: float
) -> None:
    cfg = _config(tmp_path)
    incident = Incident(1, Scope.SERVICE, "erp1", clock.now())
    real_time, real_mono = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real_time() + jump)  # the admin sets the clock
    steps = [s.step for s in due(incident, cfg, clock.now(), set(), set())]  # type: ignore[arg-type]
    assert steps == ["step0"]  # forward: the 15 min step is not due; backward: step0 still is
    start = real_mono()
    monkeypatch.setattr(time, "monotonic", lambda: start + 14 * 60)
    assert [s.step for s in due(incident, cfg, clock.now(), {"step0"}, {"signal"})] == []  # type: ignore[arg-type]
    monkeypatch.setattr(time, "monotonic", lambda: start + 15 * 60 + 1)
    assert [s.step for s in due(incident, cfg, clock.now(), {"step0"}, {"signal"})] == ["step1"]  # type: ignore[arg-type]


async def test_alerting_escalates_on_time_while_the_wall_clock_jumps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real alerting loop (its ``clock_now`` is ``clock.now``): a 2 s step fires after 2 s of
    monotonic time although the wall clock jumps an hour forward and then a day back meanwhile."""
    gateway = HttpSink().start()
    cfg = _config(tmp_path, signal_url(gateway.port), after="2s")
    store = await AsyncStore.open(cfg.state_dir)  # type: ignore[attr-defined]
    tracker = IncidentTracker()
    alerting = Alerting(cfg, store, tracker)  # type: ignore[arg-type]
    runner = asyncio.create_task(alerting.run())
    real_time = time.time
    try:
        opened_mono = time.monotonic()
        opened_at = alerting.now()
        incident = Incident(1, Scope.SERVICE, "erp1", opened_at).noted(opened_at, "opened", "erp1 down")
        tracker.load([incident], 2)
        alerting.changed.set()
        await gateway.wait_requests(1, timeout=10)
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

        async def jumped_back() -> bool:
            if time.monotonic() - opened_mono > 1.0:
                monkeypatch.setattr(time, "time", lambda: real_time() - 86400)
                return True
            return "step1" in alerting.fired.get(1, set())

        await wait_for(jumped_back, 5, "a second of monotonic time")
        assert "step1" not in alerting.fired.get(1, set()), "escalated early"

        async def escalated() -> bool:
            return "step1" in alerting.fired.get(1, set())

        await wait_for(escalated, 6, "the 2 s escalation")
        took = time.monotonic() - opened_mono
        assert 2.0 <= took < 2.0 + 2.5, took  # within the alerting tick (1 s) and some slack
        await gateway.wait_requests(2, timeout=10)
        rows = await store.call(store.store.notifications, 1)
        assert abs(rows[-1].created_at - (incident.opened_at + took)) < 1.5  # stored on the same clock
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        alerting.close()
        await store.close()
        gateway.stop()
