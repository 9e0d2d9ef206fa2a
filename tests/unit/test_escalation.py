"""The escalation policy, driven by the clock: which steps are due when, and never twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import (
    ALL_CLEAR_HOLD_MAX,
    DueStep,
    all_clear_hold,
    channels_for,
    due,
    rto_clock,
)
from watchtower.engine.incidents import Incident, IncidentState

MIN = 60.0
T0 = 1_800_000_000.0  # opened (confirmed) at
FAIL = T0 - 12.0  # first failed probe


def config(**notify: object) -> Config:
    doc = {
        "site": "acme",
        "targets": {
            "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.213.10.11"}]},
            "erp1": {
                "role": "vm",
                "runs_on": "pve1",
                "paths": [{"icmp": "10.213.10.23"}],
                "service": {"name": "ERP", "rto": "4h"},
            },
            "files1": {
                "role": "vm",
                "runs_on": "pve1",
                "paths": [{"icmp": "10.213.10.24"}],
                "service": {"name": "Files", "rto": "24h"},
            },
        },
        "notify": {
            "channels": [
                {
                    "name": "signal-oncall",
                    "url": "signal://127.0.0.1:1/+15550001/+15550002",
                    "tags": ["tier1"],
                },
                {
                    "name": "sms-oncall",
                    "url": "smseagle://t@127.0.0.1:1/+15550004",
                    "tags": ["tier1", "tier2"],
                },
                {"name": "mail-provider", "url": "mailto://127.0.0.1:1?to=a@lab.test", "tags": ["tier2"]},
                {"name": "mail-md", "url": "mailto://127.0.0.1:1?to=md@lab.test", "tags": ["tier4"]},
            ],
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "15m", "notify": ["tier2"], "unless": "acknowledged"},
                {"rto_fraction": 0.75, "notify": ["tier4"]},
            ],
            "update_every": "30m",
            "all_clear_after": "0s",
            **notify,
        },
    }
    return parse_config(doc, Path("."))


def incident(affected: tuple[str, ...] = ("erp1", "files1")) -> Incident:
    return (
        Incident(7, Scope.HYPERVISOR, "pve1", T0, affected=affected, first_failure_at=FAIL)
        .noted(FAIL, "first_failure", "first failed probe of pve1")
        .noted(T0, "opened", "confirmed")
    )


class Driver:
    """Plays the outbox: asks what is due at each time, records it as fired and notified."""

    def __init__(self, cfg: Config, inc: Incident):
        self.cfg, self.inc = cfg, inc
        self.fired: set[str] = set()
        self.notified: set[str] = set()
        self.log: list[tuple[float, DueStep]] = []

    def at(self, t: float) -> list[DueStep]:
        steps = due(self.inc, self.cfg, t, self.fired, self.notified)
        for s in steps:
            assert s.step not in self.fired, f"{s.step} fired twice"
            self.fired.add(s.step)
            if s.kind in ("page", "escalation"):
                self.notified.update(s.channels)
            self.log.append((t, s))
        return steps

    def run(self, start: float, end: float, every: float = 1.0) -> None:
        t = start
        while t <= end:
            self.at(t)
            t += every

    def times(self, step: str) -> list[float]:
        return [t for t, s in self.log if s.step == step]

    def log_times(self, kind: str) -> list[float]:
        return [t for t, s in self.log if s.kind == kind]


def test_first_alert_at_once_to_tier1() -> None:
    d = Driver(config(), incident())
    (step,) = d.at(T0)
    assert (step.step, step.kind, step.channels) == ("step0", "page", ("signal-oncall", "sms-oncall"))
    assert d.at(T0 + 1) == []  # nothing fires twice


def test_tier2_at_15_minutes_unless_acknowledged() -> None:
    d = Driver(config(), incident())
    d.run(T0, T0 + 20 * MIN, every=10.0)
    assert d.times("step1") == [T0 + 15 * MIN]
    (step,) = [s for _, s in d.log if s.step == "step1"]
    assert step.kind == "escalation" and step.channels == ("sms-oncall", "mail-provider")
    assert "unacknowledged after 15m" in step.label


def test_ack_before_15_minutes_stops_tier2_but_not_the_rto_step() -> None:
    d = Driver(config(), incident())
    d.run(T0, T0 + 10 * MIN, every=10.0)
    d.inc = replace(
        d.inc, state=IncidentState.ACKNOWLEDGED, acknowledged_at=T0 + 10 * MIN, acknowledged_by="alice"
    ).noted(T0 + 10 * MIN, "ack", "acknowledged by alice")
    d.run(T0 + 10 * MIN + 1, T0 + 4 * 3600, every=30.0)
    assert d.times("step1") == []
    # the ack is announced once to everyone notified so far
    (ack,) = [s for _, s in d.log if s.kind == "ack"]
    assert ack.step == "ack:1" and ack.channels == ("signal-oncall", "sms-oncall")
    # management at 75 % of the smallest RTO (ERP 4h) counted from the first failed probe: acked or not
    (t,) = d.times("step2")
    assert FAIL + 3 * 3600 <= t < FAIL + 3 * 3600 + 30
    (rto,) = [s for _, s in d.log if s.step == "step2"]
    assert rto.channels == ("mail-md",) and "75% of the ERP RTO (4h) used, 59m left" in rto.label


def test_rto_step_never_fires_without_a_service() -> None:
    d = Driver(config(), incident(affected=()))
    d.run(T0, T0 + 48 * 3600, every=600.0)
    assert d.times("step2") == []
    assert rto_clock(d.inc, d.cfg) is None


def test_rto_clock_takes_the_smallest_rto() -> None:
    clock = rto_clock(incident(), config())
    assert clock is not None
    assert (clock.service, clock.target, clock.rto, clock.started_at) == ("ERP", "erp1", 4 * 3600, FAIL)
    assert clock.left(FAIL + 3600) == 3 * 3600


def test_updates_every_30_minutes_to_everyone_notified() -> None:
    d = Driver(config(), incident())
    d.run(T0, T0 + 2 * 3600, every=5.0)
    assert [t - T0 for t in d.log_times("update")] == [30 * MIN, 60 * MIN, 90 * MIN, 120 * MIN]
    first = next(s for _, s in d.log if s.kind == "update")
    assert first.channels == ("signal-oncall", "sms-oncall", "mail-provider")  # tier2 joined at 15 min


def test_after_a_long_pause_only_the_latest_update_goes_out() -> None:
    d = Driver(config(), incident())
    d.at(T0)
    steps = d.at(T0 + 95 * MIN)  # e.g. watchtower was down for 95 minutes
    assert [s.step for s in steps] == ["step1", "update:3"]


def test_all_clear_once_to_everyone_notified() -> None:
    d = Driver(config(), incident())
    d.run(T0, T0 + 20 * MIN, every=60.0)
    d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=T0 + 20 * MIN + 30)
    steps = d.at(T0 + 20 * MIN + 30)
    assert [(s.step, s.kind) for s in steps] == [("resolve:0", "resolve")]
    assert steps[0].channels == ("signal-oncall", "sms-oncall", "mail-provider")
    d.run(T0 + 21 * MIN, T0 + 5 * 3600, every=60.0)  # resolved: no update, no RTO step, no second all-clear
    assert [s.step for _, s in d.log][-1] == "resolve:0"


def test_no_all_clear_when_switched_off_or_nobody_was_told() -> None:
    d = Driver(config(on_resolve=False), incident())
    d.at(T0)
    d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=T0 + 60)
    assert d.at(T0 + 60) == []
    inc2 = replace(incident(), state=IncidentState.RESOLVED, resolved_at=T0 + 1)
    assert due(inc2, config(escalation=[]), T0 + 1, set(), set()) == []


def test_flapping_root_gets_one_page_and_one_all_clear_once_stable() -> None:
    d = Driver(config(all_clear_after="60s"), incident())
    d.at(T0)
    t = T0
    for flap in range(1, 6):  # down 20 s / up 20 s
        t += 20
        d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=t)
        d.run(t, t + 19)
        t += 20
        d.inc = replace(d.inc, state=IncidentState.OPEN, resolved_at=None, flaps=flap)
        d.at(t)
    assert [s.kind for _, s in d.log] == ["page"]  # no all-clear went out, so no "failed again"
    t += 20
    d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=t)
    # five flaps: the recovery must hold longer before it is believed (60 s doubled per flap, at
    # most ALL_CLEAR_HOLD_MAX)
    assert d.at(t + 299) == []
    (clear,) = d.at(t + 300)
    assert clear.step == "resolve:5" and clear.kind == "resolve"


def test_all_clear_hold_grows_with_flaps() -> None:
    policy = config(all_clear_after="60s").notify
    inc = incident()
    holds = []
    for flaps in range(5):
        inc = replace(inc, flaps=flaps)
        holds.append(all_clear_hold(inc, policy))
    assert holds == [60.0, 120.0, 240.0, ALL_CLEAR_HOLD_MAX, ALL_CLEAR_HOLD_MAX]


def test_a_failure_after_the_all_clear_is_announced_once() -> None:
    d = Driver(config(), incident())
    d.at(T0)
    d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=T0 + 100)
    assert [s.kind for s in d.at(T0 + 100)] == ["resolve"]
    d.inc = replace(d.inc, state=IncidentState.OPEN, resolved_at=None, flaps=1)
    assert [s.step for s in d.at(T0 + 200)] == ["reopen:1"]
    assert d.at(T0 + 201) == []


def test_merged_incident_owes_nothing() -> None:
    inc = replace(incident(), merged_into=3, state=IncidentState.RESOLVED, resolved_at=T0)
    assert due(inc, config(), T0 + 3600, set(), {"signal-oncall"}) == []


def test_channels_by_tag_or_name_in_config_order() -> None:
    policy = config().notify
    assert channels_for(policy, ["tier2", "mail-md"]) == ("sms-oncall", "mail-provider", "mail-md")
    assert channels_for(policy, ["nobody"]) == ()


@settings(max_examples=60, deadline=None)
@given(
    ack_at=st.one_of(st.none(), st.floats(0, 6 * 3600)),
    resolve_at=st.one_of(st.none(), st.floats(0, 6 * 3600)),
    every=st.sampled_from([1.0, 7.0, 60.0, 301.0]),
)
def test_nothing_fires_twice_and_nothing_after_the_all_clear(
    ack_at: float | None, resolve_at: float | None, every: float
) -> None:
    d = Driver(config(), incident())
    t = T0
    while t <= T0 + 6 * 3600:
        if ack_at is not None and d.inc.acknowledged_at is None and t >= T0 + ack_at and d.inc.is_open:
            d.inc = replace(
                d.inc, state=IncidentState.ACKNOWLEDGED, acknowledged_at=t, acknowledged_by="bob"
            ).noted(t, "ack", "acknowledged by bob")
        if resolve_at is not None and d.inc.is_open and t >= T0 + resolve_at:
            d.inc = replace(d.inc, state=IncidentState.RESOLVED, resolved_at=t)
        d.at(t)  # Driver asserts no step id comes twice
        t += every * 13  # coarse, to keep the example count fast
    steps = [s for _, s in d.log]
    inc = d.inc
    if inc.resolved_at is not None:
        after = [s for t_, s in d.log if t_ > inc.resolved_at]
        assert all(s.kind == "resolve" for s in after)
    if inc.acknowledged_at is not None and inc.acknowledged_at < T0 + 15 * MIN:
        assert "step1" not in {s.step for s in steps}
