"""Maintenance mutes and windows with an injected clock: recorded, not paged; pages at the end."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from watchtower.config import Config, ConfigError, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import DueStep, due
from watchtower.engine.incidents import Incident, IncidentState
from watchtower.engine.maintenance import (
    MAX_MUTE,
    SITE,
    Mute,
    check_mute_end,
    maintenance_note,
    muted_targets,
    parse_every,
    window_span,
)
from watchtower.store import Store

MIN = 60.0
T0 = 1_800_000_000.0


def config(**extra: Any) -> Config:
    doc: dict[str, Any] = {
        "site": "acme",
        "targets": {
            "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.213.10.11"}]},
            "erp1": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": "10.213.10.23"}]},
        },
        "notify": {
            "channels": [
                {"name": "mail-oncall", "url": "mailto://127.0.0.1:1?to=a@lab.test", "tags": ["tier1"]},
                {"name": "mail-boss", "url": "mailto://127.0.0.1:1?to=b@lab.test", "tags": ["tier2"]},
            ],
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "15m", "notify": ["tier2"], "unless": "acknowledged"},
            ],
            "update_every": "30m",
        },
        **extra,
    }
    return parse_config(doc, Path("."))


class Pager:
    """What the alerting loop does each tick, with the clock passed in: mark, then ask the policy."""

    def __init__(self, cfg: Config, mutes: list[Mute], incident: Incident):
        self.cfg, self.mutes, self.incident = cfg, mutes, incident
        self.fired: set[str] = set()
        self.notified: set[str] = set()
        self.sent: list[tuple[float, DueStep]] = []

    def tick(self, now: float) -> list[DueStep]:
        muted = muted_targets(self.cfg.targets, self.mutes, self.cfg.maintenance_windows, now)
        quiet, mark = maintenance_note(self.incident, muted, now)
        if mark is not None:
            self.incident = self.incident.noted(now, *mark)
        steps = due(self.incident, self.cfg, now, self.fired, self.notified, muted=quiet)
        for s in steps:
            self.fired.add(s.step)
            if s.kind in ("page", "escalation"):
                self.notified.update(s.channels)
            self.sent.append((now, s))
        return steps

    def run(self, start: float, end: float, every: float = 10.0) -> None:
        t = start
        while t <= end:
            self.tick(t)
            t += every

    def kinds(self) -> list[str]:
        return [e.kind for e in self.incident.timeline]


def test_mute_ten_minutes_records_in_maintenance_and_pages_once_when_it_ends() -> None:
    cfg = config()
    mute = Mute(1, "erp1", T0, T0 + 10 * MIN, "kernel update", "alice", T0)
    pager = Pager(cfg, [mute], Incident(1, Scope.VM, "erp1", T0 + 2 * MIN))
    pager.run(T0 + 2 * MIN, T0 + 10 * MIN - 1)
    assert pager.sent == []
    assert pager.kinds() == ["maintenance"]
    assert "mute #1 by alice: kernel update" in pager.incident.timeline[0].text
    # still down when the mute ends: one page, at the end
    pager.run(T0 + 10 * MIN, T0 + 11 * MIN)
    assert [(s.step, s.kind) for _, s in pager.sent] == [("step0", "page")]
    assert pager.sent[0][0] == T0 + 10 * MIN
    assert pager.kinds() == ["maintenance", "maintenance_end"]
    assert "paging as a normal incident" in pager.incident.timeline[-1].text
    # the 15-minute escalation counts from the end of the mute, not from the opening
    pager.run(T0 + 11 * MIN, T0 + 25 * MIN - 1)
    assert len(pager.sent) == 1
    pager.run(T0 + 25 * MIN, T0 + 26 * MIN)
    assert [s.step for _, s in pager.sent] == ["step0", "step1"]


def test_recovery_inside_the_mute_sends_nothing_at_all() -> None:
    cfg = config()
    incident = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, affected=("erp1",))
    pager = Pager(cfg, [Mute(1, SITE, T0, T0 + 30 * MIN, "patch night", "bob", T0)], incident)
    pager.run(T0 + MIN, T0 + 5 * MIN)
    pager.incident = replace(pager.incident, state=IncidentState.RESOLVED, resolved_at=T0 + 5 * MIN)
    pager.run(T0 + 5 * MIN, T0 + 40 * MIN)
    assert pager.sent == []  # nobody was paged, so nobody is owed an all-clear


def test_muted_root_with_unmuted_dependent_still_pages() -> None:
    cfg = config()
    incident = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN)
    pager = Pager(cfg, [Mute(1, "pve1", T0, T0 + 60 * MIN, "BIOS update", "alice", T0)], incident)
    pager.run(T0 + MIN, T0 + 2 * MIN)
    assert pager.sent == []
    pager.incident = replace(pager.incident, affected=("erp1",))  # its VM goes down too, not muted
    pager.tick(T0 + 3 * MIN)
    assert [s.kind for _, s in pager.sent] == ["page"]
    assert "not in maintenance (erp1)" in pager.incident.timeline[-1].text


def test_recurring_window_mutes_at_its_time_and_pages_when_it_ends() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    cfg = config(maintenance=[{"targets": ["erp1"], "every": "Sun 02:00-04:00", "timezone": "Europe/Berlin"}])
    sunday_0230 = datetime(2026, 12, 6, 2, 30, tzinfo=berlin).timestamp()
    sunday_0400 = datetime(2026, 12, 6, 4, 0, tzinfo=berlin).timestamp()
    (window,) = cfg.maintenance_windows
    assert window_span(window, sunday_0230) == (
        datetime(2026, 12, 6, 2, 0, tzinfo=berlin).timestamp(),
        sunday_0400,
    )
    assert window_span(window, sunday_0400) is None
    assert window_span(window, sunday_0230 + 86400) is None  # Monday
    pager = Pager(cfg, [], Incident(1, Scope.VM, "erp1", sunday_0230))
    pager.run(sunday_0230, sunday_0400 - 1)
    assert pager.sent == []
    assert "window Sun 02:00-04:00 (Europe/Berlin)" in pager.incident.timeline[0].text
    pager.run(sunday_0400 - 1 + 10, sunday_0400 + 60)
    assert [s.kind for _, s in pager.sent] == ["page"]
    # an outage outside the window pages at once
    other = Pager(cfg, [], Incident(2, Scope.VM, "erp1", sunday_0230 + 86400))
    other.tick(sunday_0230 + 86400)
    assert [s.kind for _, s in other.sent] == ["page"]


def test_window_keeps_wall_clock_times_across_dst_and_crosses_midnight() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    cfg = config(maintenance=[{"every": "Sat 23:00-01:00", "timezone": "Europe/Berlin"}])
    (window,) = cfg.maintenance_windows
    # the night DST ends (2026-10-25 is a Sunday): Sat 23:00 CEST to Sun 01:00 CEST
    inside = datetime(2026, 10, 25, 0, 30, tzinfo=berlin).timestamp()
    span = window_span(window, inside)
    assert span is not None
    assert span[1] - span[0] == 2 * 3600
    assert window_span(window, datetime(2026, 10, 25, 1, 30, tzinfo=berlin).timestamp()) is None
    assert parse_every("Mon-Fri 22:00-02:00").days == frozenset(range(5))
    assert parse_every("Fri-Mon 01:00-02:00").days == frozenset({4, 5, 6, 0})
    assert parse_every("daily 03:00-03:30").length == 1800


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"every": "Sunday night"}, "maintenance[0].every: must look like"),
        ({"every": "Sun 25:00-04:00"}, "maintenance[0].every: '25:00' is not a time of day"),
        ({"every": "Sun 02:00-04:00", "timezone": "Mars/Base"}, "maintenance[0].timezone: unknown time zone"),
        ({"every": "Sun 02:00-04:00", "targets": ["erp2"]}, "maintenance[0].targets[0]: no target"),
    ],
)
def test_bad_windows_are_refused_naming_the_key(window: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config(maintenance=[window])
    assert any(p.startswith(expected) for p in exc.value.problems), exc.value.problems


def test_a_mute_needs_an_end_within_seven_days() -> None:
    check_mute_end(T0, T0 + MAX_MUTE)
    with pytest.raises(ValueError, match="at most 7d"):
        check_mute_end(T0, T0 + MAX_MUTE + 1)
    with pytest.raises(ValueError, match="future"):
        check_mute_end(T0, T0 - 1)


def test_mutes_survive_reopening_the_store_and_unmute_ends_them(tmp_path: Path) -> None:
    store = Store.in_dir(tmp_path)
    kept = store.add_mute("erp1", T0, T0 + 600, "kernel update", "alice", T0)
    ended = store.add_mute(SITE, T0, T0 + 600, "patch night", "bob", T0)
    assert store.end_mute(ended.id, "carol", T0 + 60) is not None
    assert store.end_mute(ended.id, "carol", T0 + 61) is None  # already over
    store.close()
    store = Store.in_dir(tmp_path)
    assert store.mutes(T0 + 120) == [kept]
    assert store.mutes(T0 + 600) == []
    store.close()
