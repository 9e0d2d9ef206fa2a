"""The correlation pass with cached views (engine/views.py) equals one built from scratch, along
random sequences of probe results, direct state resets and passing time."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from watchtower.config import VANTAGE, parse_config
from watchtower.engine.correlate import Correlation, PathView, correlate
from watchtower.engine.monitor import Monitor
from watchtower.engine.paths import PathState
from watchtower.engine.views import path_view
from watchtower.probes import BmcReading, Failure, ProbeResult

SITE: dict[str, Any] = {
    "site": "s",
    "vantage": [{"icmp": "10.0.9.1"}],
    "networks": {
        "prod": {"cidr": ["10.0.0.0/24"], "via": ["sw1"]},
        "mgmt": {"cidr": ["10.0.1.0/24"]},
    },
    "targets": {
        "sw1": {"role": "network", "paths": [{"icmp": "10.0.1.2"}, {"tcp": "10.0.1.2:22"}]},
        "nas": {
            "role": "storage",
            "depends_on": ["sw1"],
            "paths": [{"icmp": "10.0.0.3"}, {"icmp": "10.0.1.3"}],
        },
        "pve1": {
            "role": "hypervisor",
            "depends_on": ["sw1"],
            "bmc": {"ipmi": {"host": "10.0.1.100", "username": "m", "password": "p"}},
            "paths": [{"icmp": "10.0.0.11"}, {"icmp": "10.0.1.11"}, {"tcp": "10.0.0.11:8006"}],
        },
        "pve2": {
            "role": "hypervisor",
            "depends_on": ["sw1"],
            "paths": [{"icmp": "10.0.0.12"}, {"icmp": "10.0.1.12"}],
        },
        **{
            f"vm{i}": {
                "role": "vm",
                "runs_on": "pve1" if i < 3 else "pve2",
                "storage": ["nas"],
                "paths": [{"icmp": f"10.0.0.{30 + i}"}, {"tcp": f"10.0.0.{30 + i}:22"}],
            }
            for i in range(5)
        },
    },
}


def from_scratch(monitor: Monitor, now: float) -> Correlation:
    """The pass as it was before the cache: every view and own state built anew."""
    by_target: dict[str, list[PathView]] = {}
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            by_target.setdefault(status.path.target, []).append(path_view(status))
    facts = {name: bmc.facts(now) for name, bmc in monitor.bmc.items() if bmc.last_at is not None}
    return correlate(monitor.topology, by_target, facts, by_target.get(VANTAGE, []), now)


def result(rng: random.Random, ok: bool, bmc: bool) -> ProbeResult:
    reading = BmcReading(power_on=rng.random() < 0.5) if bmc and rng.random() < 0.8 else None
    if ok:
        return ProbeResult(True, 0.001, None, f"rtt {rng.random():.2f} ms", bmc=reading)
    return ProbeResult(False, None, Failure.TIMEOUT, f"no reply {rng.randrange(3)}", bmc=reading)


@pytest.mark.parametrize("seed", range(16))
def test_cached_pass_equals_a_pass_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    # Half the seeds with fail_after 3: failing streaks that last without a change of state, in
    # which only a path's last failure moves (what the lossy-upstream rule reads).
    # and half without `networks:` (networks inferred from the addresses' prefixes)
    site = {k: v for k, v in SITE.items() if k != "networks" or seed % 4 < 2}
    monitor = Monitor(parse_config({**site, "defaults": {"fail_after": 2 + seed % 2}}, Path(".")))
    statuses = list(monitor.statuses.values())
    names = sorted({s.path.target for s in statuses})
    loss: dict[str, float] = {}  # target -> share of its probes failing in this stretch
    now = 0.0
    outages, reloads, prod_dark = 0, 0, False
    for step in range(400):
        now += rng.choice((0.05, 0.5, 1.0, 3.0, 11.0))
        if rng.random() < 0.08:  # an outage, or a loss, begins or ends somewhere
            target = rng.choice(names)
            loss[target] = 0.0 if loss.get(target) else rng.choice((0.3, 0.9))
        if rng.random() < 0.03:  # the production network goes dark, or comes back
            prod_dark = not prod_dark
        for status in rng.sample(statuses, k=rng.randrange(1, len(statuses))):
            ok = rng.random() >= loss.get(status.path.target, 0.0)
            ok = ok and not (prod_dark and status.path.host.startswith("10.0.0."))
            monitor.record(status, result(rng, ok, status.path.is_bmc), now)
        if step == 200 or rng.random() < 0.01:  # a reload: a target more or less, a changed confirmation rule
            changed = {**site, "defaults": {"fail_after": 2 + seed % 2, "confirm_paths": rng.choice((1, 2))}}
            if rng.random() < 0.5:
                changed["targets"] = {k: v for k, v in SITE["targets"].items() if k != "vm4"}
            monitor.reload(parse_config(changed, Path(".")))
            statuses = list(monitor.statuses.values())
            reloads += 1
        if rng.random() < 0.05:  # what _settle_dependents and _fresh_look do, behind record's back
            status = rng.choice(statuses)
            status.state, status.successes, status.failures = PathState.UNKNOWN, 0, 0
        if rng.random() < 0.3:
            monitor.evaluate(now)  # also mutates (settling dependents) and feeds the tracker
        got = monitor._correlate(now)
        want = from_scratch(monitor, now)
        assert got == want, f"seed {seed} step {step} at {now}"
        outages += any(v.scope == "network" for v in got.verdicts)
    assert outages, "the sequence never grouped a network outage: it tests too little"
    assert reloads  # and the cache started over on a new config at least once


def test_a_healthy_pass_rebuilds_nothing_and_a_failing_target_is_rebuilt_until_it_recovers() -> None:
    monitor = Monitor(parse_config(SITE, Path(".")))
    ok = ProbeResult(True, 0.001, None, "rtt 0.40 ms")
    for status in monitor.statuses.values():
        monitor.record(status, ok, 1.0)
        monitor.record(status, ok, 2.0)
    monitor.evaluate(2.0)
    for status in monitor.statuses.values():
        monitor.record(status, ok, 7.0)  # last_ok and detail move; nothing correlation reads does
    monitor.evaluate(7.0)
    assert monitor._views.rebuilt == 0
    (vm_ping, vm_ssh) = monitor.target_paths("vm0")
    fail = ProbeResult.fail(Failure.TIMEOUT, "no echo reply")
    monitor.record(vm_ping, fail, 8.0)
    monitor.evaluate(8.0)
    assert monitor._views.rebuilt == 1  # its failing streak began
    monitor.record(vm_ping, fail, 9.0)
    monitor.evaluate(9.0)
    monitor.evaluate(9.5)
    # Down on one path: rebuilt on every pass, so a fresh success on the other is seen at once
    # (whether the OS answers since the outage began depends on last_ok)
    assert monitor._views.rebuilt == 1
    assert monitor._views.views["vm0"][0].state is PathState.DOWN
    monitor.record(vm_ssh, ok, 10.0)
    monitor.evaluate(10.0)
    assert monitor._views.views["vm0"][1].last_ok == 10.0
    assert monitor._correlate(10.0) == from_scratch(monitor, 10.0)
    for t in (11.0, 12.0):
        monitor.record(vm_ping, ok, t)
    monitor.evaluate(12.0)
    monitor.evaluate(17.0)
    assert monitor._views.rebuilt == 0


def test_a_failing_streak_that_goes_on_is_seen_by_the_lossy_upstream_rule() -> None:
    """A switch path failing again without changing state (fail_after 3) moves only its last
    failure: the NAS behind it, going down now, is that loss, not an outage of its own."""
    monitor = Monitor(parse_config({**SITE, "defaults": {"fail_after": 3}}, Path(".")))
    ok = ProbeResult(True, 0.001, None, "rtt 0.40 ms")
    fail = ProbeResult.fail(Failure.TIMEOUT, "no echo reply")
    for t in (1.0, 2.0, 3.0):
        for status in monitor.statuses.values():
            monitor.record(status, ok, t)
    monitor.evaluate(3.0)
    switch_ping = monitor.target_paths("sw1")[0]
    monitor.record(switch_ping, fail, 4.0)
    monitor.evaluate(4.0)
    monitor.record(switch_ping, fail, 20.0)  # the same streak, still up: only last_failure moved
    monitor.evaluate(20.0)
    for t in (25.0, 26.0, 27.0):
        for status in monitor.target_paths("nas"):
            monitor.record(status, fail, t)
    corr = monitor._correlate(27.0)
    assert corr == from_scratch(monitor, 27.0)
    assert corr.own["nas"].value == "down" and not [v for v in corr.verdicts if v.root == "nas"]
