"""Path state machine, target state rule, and the scheduler's cadence, phase and concurrency."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watchtower.config import IcmpPath, ResolvedPath, TcpPath
from watchtower.engine.correlate import TargetState, own_state
from watchtower.engine.monitor import path_view
from watchtower.engine.paths import PathState, PathStatus
from watchtower.engine.scheduler import Scheduler, stable_phase
from watchtower.probes import Failure, ProbeResult

OK = ProbeResult.success(0.001)
FAIL = ProbeResult.fail(Failure.TIMEOUT, "no echo reply")
BUG = ProbeResult.fail(Failure.INTERNAL, "probe crashed")


def settled_monitor(targets: dict[str, Any], **top: Any) -> Any:
    """A Monitor on a small site (``targets``, plus top-level keys such as ``vantage``) whose every
    path has answered twice: the steady state a sequence starts from."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor

    monitor = Monitor(parse_config({"site": "t", **top, "targets": targets}, Path(".")))
    for status in monitor.statuses.values():
        monitor.record(status, OK, 0.0)
        monitor.record(status, OK, 0.5)
    monitor.evaluate(0.5)
    return monitor


# A hypervisor with two addresses and an IPMI BMC (the BMC-reading sequences).
HOST_WITH_BMC: dict[str, Any] = {
    "pve1": {
        "role": "hypervisor",
        "bmc": {"ipmi": {"host": "127.0.0.1", "username": "u", "password": "p"}},
        "paths": [{"icmp": "10.0.0.1"}, {"icmp": "10.0.99.1"}],
    },
}

# A hypervisor on production and management, a VM on it.
HYPERVISOR_AND_VM: dict[str, Any] = {
    "hv": {
        "role": "hypervisor",
        "paths": [
            {"icmp": {"host": "10.0.0.1", "name": "prod"}},
            {"icmp": {"host": "10.0.99.1", "name": "mgmt"}},
        ],
    },
    "vm": {"role": "vm", "runs_on": "hv", "paths": [{"icmp": "10.0.0.21"}, {"tcp": "10.0.0.21:22"}]},
}
# A switch and a NAS behind it (sequences around the switch's outages).
SWITCH_AND_NAS: dict[str, Any] = {
    "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
    "h": {"role": "storage", "depends_on": ["sw"], "paths": [{"icmp": "10.0.0.5"}, {"tcp": "10.0.0.5:3260"}]},
}


def target_state(statuses: list[PathStatus], confirm: int) -> TargetState:
    return own_state([path_view(s) for s in statuses], confirm)


def rpath(name: str = "icmp 10.0.0.1", host: str = "10.0.0.1", fail_after: int = 2, recover_after: int = 2,
          kind: str = "icmp") -> ResolvedPath:  # fmt: skip
    spec = IcmpPath(host=host) if kind == "icmp" else TcpPath(host=host, port=22)
    return ResolvedPath("t", name, spec, 5.0, 1.0, 1.0, fail_after, recover_after)


def test_path_state_thresholds() -> None:
    s = PathStatus(rpath(fail_after=2, recover_after=3))
    assert s.state is PathState.UNKNOWN and s.pending
    assert not s.observe(OK, 1) and s.state is PathState.UNKNOWN
    assert not s.observe(OK, 2)
    assert s.observe(OK, 3) and s.state is PathState.UP and not s.pending
    assert not s.observe(FAIL, 4) and s.state is PathState.UP and s.pending  # one failure: retry cadence
    assert s.failing_since == 4
    assert s.observe(FAIL, 5) and s.state is PathState.DOWN and s.changed_at == 5
    assert not s.pending  # settled down: back to the normal interval
    s.observe(OK, 6)
    s.observe(FAIL, 7)  # a streak broken by a failure starts over
    s.observe(OK, 8)
    s.observe(OK, 9)
    assert s.state is PathState.DOWN
    assert s.observe(OK, 10) and s.state is PathState.UP and s.last_ok == 10


def test_evidence_of_a_down_path_is_its_failure_while_it_recovers() -> None:
    s = PathStatus(rpath(fail_after=2, recover_after=2))
    s.observe(FAIL, 1)
    s.observe(FAIL, 2)
    assert s.state is PathState.DOWN
    s.observe(ProbeResult.success(0.001, "answered in 1 ms"), 3)  # recovering, still down
    assert s.state is PathState.DOWN
    assert path_view(s).detail == "no echo reply"  # what the incident quotes: why it failed
    assert s.detail == "answered in 1 ms"  # what the status page shows: the last probe
    s.observe(OK, 4)
    assert s.state is PathState.UP and path_view(s).detail == s.detail


def test_internal_failure_is_unknown_never_down() -> None:
    s = PathStatus(rpath(fail_after=1))
    s.observe(OK, 1)
    s.observe(OK, 2)
    assert s.observe(BUG, 3) and s.state is PathState.UNKNOWN
    assert s.failures == 0


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_path_state_matches_last_streak(results: list[bool], fail_after: int, recover_after: int) -> None:
    """Property: the state is down iff the state machine saw fail_after failures in a row more
    recently than recover_after successes in a row (and vice versa)."""
    s = PathStatus(rpath(fail_after=fail_after, recover_after=recover_after))
    expected = PathState.UNKNOWN
    streak_ok = streak_fail = 0
    for i, ok in enumerate(results):
        s.observe(OK if ok else FAIL, float(i))
        streak_ok, streak_fail = (streak_ok + 1, 0) if ok else (0, streak_fail + 1)
        if streak_ok >= recover_after:
            expected = PathState.UP
        if streak_fail >= fail_after:
            expected = PathState.DOWN
    assert s.state is expected


def statuses(*states: PathState, hosts: list[str] | None = None) -> list[PathStatus]:
    out = []
    for i, state in enumerate(states):
        host = hosts[i] if hosts else f"10.0.0.{i + 1}"
        s = PathStatus(rpath(name=f"p{i}", host=host))
        s.state = state
        out.append(s)
    return out


U, D, X = PathState.UP, PathState.DOWN, PathState.UNKNOWN


@pytest.mark.parametrize(
    ("states", "confirm", "expected"),
    [
        ((U, U, U), 2, TargetState.UP),
        ((D, U, U), 2, TargetState.DEGRADED),
        ((D, D, U), 2, TargetState.DOWN),
        ((D, D, U), 3, TargetState.DEGRADED),
        ((D,), 2, TargetState.DOWN),  # fewer paths than confirm_paths: all of them
        ((D, U), 1, TargetState.DOWN),
        ((X, X), 2, TargetState.UNKNOWN),
        ((X, U), 2, TargetState.UP),
        ((D, X), 2, TargetState.UNKNOWN),  # down, nothing answering: not "partly back"
    ],
)
def test_target_state(states: tuple[PathState, ...], confirm: int, expected: TargetState) -> None:
    assert target_state(statuses(*states), confirm) is expected


def test_paths_of_one_kind_to_one_address_count_once() -> None:
    two_pings_same_host = statuses(D, D, U, hosts=["10.0.0.1", "10.0.0.1", "10.0.0.2"])
    two_pings_same_host[1] = PathStatus(rpath(name="again", host="10.0.0.1"))
    two_pings_same_host[1].state = D
    assert target_state(two_pings_same_host, 2) is TargetState.DEGRADED


def test_stable_phase_spreads_and_is_stable() -> None:
    phases = [stable_phase(("t", f"icmp 10.0.{i // 256}.{i % 256}")) for i in range(4000)]
    assert all(0 <= p < 1 for p in phases)
    assert stable_phase(("t", "x")) == stable_phase(("t", "x"))
    # evenly spread: each tenth of the interval gets 10 % +- 2.5 % of the first runs
    for decile in range(10):
        share = sum(1 for p in phases if decile / 10 <= p < (decile + 1) / 10) / len(phases)
        assert 0.075 < share < 0.125


async def test_scheduler_fixed_rate_and_retry_cadence() -> None:
    sched = Scheduler()
    runs: list[float] = []
    failing = {"on": False}

    async def run() -> None:
        runs.append(time.monotonic())

    sched.add("p", 0.2, lambda: 0.05 if failing["on"] else 0.2, run, first_in=0)
    task = asyncio.create_task(sched.run())
    try:
        deadline = time.monotonic() + 5
        while len(runs) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        gaps = [b - a for a, b in itertools.pairwise(runs)]
        assert all(0.17 < g < 0.3 for g in gaps), gaps
        failing["on"] = True
        n = len(runs)
        while len(runs) < n + 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        fast = [b - a for a, b in zip(runs[n:], runs[n + 1 :], strict=False)]
        assert fast and all(g < 0.12 for g in fast), fast
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sched.lag.total >= 10
    assert (sched.lag.quantile(0.99) or 0) < 0.1


async def test_scheduler_bounds_concurrency_and_run_now() -> None:
    sched = Scheduler(max_concurrency=3)
    active = peak = 0
    done = 0

    async def run() -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        done += 1

    for i in range(12):
        sched.add(i, 60.0, lambda: 60.0, run, first_in=0)
    sched.add("late", 60.0, lambda: 60.0, run, first_in=50)
    task = asyncio.create_task(sched.run())
    try:
        deadline = time.monotonic() + 5
        while done < 12 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert done == 12 and peak == 3
        assert sched.run_now("late")
        while done < 13 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert done == 13
        sched.remove(3)
        assert len(sched) == 12
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_scheduler_cancels_in_flight_on_stop() -> None:
    sched = Scheduler()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sched.add("hang", 1.0, lambda: 1.0, hang, first_in=0)
    task = asyncio.create_task(sched.run())
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert cancelled.is_set()


def test_monitor_reload_keeps_unchanged_paths() -> None:
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor

    base = {
        "site": "s",
        "targets": {
            "a": {"role": "service", "paths": [{"tcp": "127.0.0.1:1"}, {"tcp": "127.0.0.1:2"}]},
            "b": {"role": "service", "paths": [{"tcp": "127.0.0.1:3"}]},
        },
    }
    monitor = Monitor(parse_config(base, Path(".")))
    kept = monitor.statuses[("a", "tcp 127.0.0.1:1")]
    kept.observe(OK, 1)
    kept.observe(OK, 2)
    retimed = monitor.statuses[("a", "tcp 127.0.0.1:2")]
    retimed.observe(FAIL, 1)
    new = {
        "site": "s",
        "targets": {
            "a": {"role": "service", "paths": [
                {"tcp": "127.0.0.1:1"}, {"tcp": {"host": "127.0.0.1", "port": 2, "interval": "2s"}}]},
            "c": {"role": "service", "paths": [{"tcp": "127.0.0.1:4"}]},
        },
    }  # fmt: skip
    counts = monitor.reload(parse_config(new, Path(".")))
    assert counts == {"added": 1, "removed": 1, "changed": 1, "kept": 1}
    assert monitor.statuses[("a", "tcp 127.0.0.1:1")] is kept and kept.state is PathState.UP
    assert monitor.statuses[("a", "tcp 127.0.0.1:2")] is retimed and retimed.failures == 1
    assert retimed.path.interval == 2.0
    assert set(monitor.target_states()) == {"a", "c"}
    assert len(monitor.scheduler) == 3


def test_bmc_facts_give_the_hypervisor_incident_its_cause() -> None:
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.probes import BmcReading, SelEntry

    cfg = parse_config(
        {
            "site": "s",
            "targets": {
                "pve1": {
                    "role": "hypervisor",
                    "bmc": {"ipmi": {"host": "127.0.0.1", "username": "u", "password": "p"}},
                    "paths": [{"icmp": "10.0.0.1"}, {"icmp": "10.0.99.1"}],
                },
                "vm1": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": "10.0.0.21"}]},
            },
        },
        Path("."),
    )
    monitor = Monitor(cfg)
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    assert bmc.path.is_bmc and bmc.path.timeout == 5.0
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            for t in (1.0, 2.0):
                monitor.record(status, FAIL, t)
    # the BMC has not answered since the outage began: the page waits for its word (bounded)
    assert monitor.evaluate(3.0) == [] and monitor.tracker.waiting
    changes = monitor.evaluate(3.0 + 10.0)  # ... and goes out without a cause when it stays silent
    (incident,) = monitor.tracker.open_incidents()
    assert (
        [c.kind for c in changes] == ["opened"] and incident.cause is None and incident.affected == ("vm1",)
    )

    # the BMC answers: chassis off -> power_off; then a PSU failure in the SEL -> hardware_fault
    off = ProbeResult.fail(Failure.CONTENT, "chassis power is off", bmc=BmcReading(power_on=False))
    assert monitor.record(bmc, off, 14.0)
    monitor.evaluate(14.0)
    incident = monitor.tracker.incidents[incident.id]  # a frozen value: the tracker holds the new one
    assert incident.cause == "power_off"
    psu = SelEntry("0x0042", "Power Supply PS1: Failure detected", "critical")
    monitor.record(
        bmc, ProbeResult.fail(Failure.CONTENT, "off", bmc=BmcReading(False, new_events=(psu,))), 15.0
    )
    changes = monitor.evaluate(15.0)
    incident = monitor.tracker.incidents[incident.id]
    assert incident.cause == "hardware_fault" and [c.kind for c in changes] == ["cause"]
    assert "BMC: chassis off, SEL: Power Supply PS1: Failure detected" in incident.evidence
    assert monitor.bmc["pve1"].critical_total == 1
    # the BMC is not a witness: its failure alone never makes the target down
    assert monitor.correlation.own["pve1"] == "down"
    unreachable = ProbeResult.fail(Failure.TIMEOUT, "no answer")
    monitor.record(bmc, unreachable, 16.0)
    assert monitor.bmc["pve1"].facts(16.0).reachable is False


def test_a_vm_confirmed_before_its_hypervisor_waits_so_the_incident_names_the_hypervisor() -> None:
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.correlate import LOSSY_DARK
    from watchtower.engine.monitor import HOLD_MAX, Monitor

    cfg = parse_config(
        {
            "site": "s",
            "targets": {
                "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.0.0.1"}, {"icmp": "10.0.99.1"}]},
                "vm1": {
                    "role": "vm",
                    "runs_on": "pve1",
                    "paths": [{"icmp": "10.0.0.21"}, {"tcp": "10.0.0.21:22"}],
                },
            },
        },
        Path("."),
    )
    monitor = Monitor(cfg)
    vm_paths = [s for s in monitor.statuses.values() if s.path.target == "vm1"]
    hv_paths = [s for s in monitor.statuses.values() if s.path.target == "pve1"]
    for status in monitor.statuses.values():
        monitor.record(status, OK, 0.0)
        monitor.record(status, OK, 0.5)
    monitor.evaluate(0.5)
    # The VM's paths happen to come due first: confirmed down while the hypervisor's paths have
    # failed once (suspect, not yet confirmed). That may be the hypervisor's outage: hold.
    for status in vm_paths:
        monitor.record(status, FAIL, 1.0)
        monitor.record(status, FAIL, 2.0)
    for status in hv_paths:
        monitor.record(status, FAIL, 2.1)
    assert monitor.evaluate(2.2) == [] and monitor.tracker.open_incidents() == []
    for status in hv_paths:
        monitor.record(status, FAIL, 3.1)
    changes = monitor.evaluate(3.2)
    (incident,) = monitor.tracker.open_incidents()
    assert [c.kind for c in changes] == ["opened"]
    assert (incident.scope, incident.root, incident.affected) == ("hypervisor", "pve1", ("vm1",))

    # Everything comes back, the incident ends; hours later the same race: the VM waits again (the
    # first hold's start must not count against the second).
    t = 4.0
    while monitor.tracker.open_incidents() and t < 4000:
        for status in monitor.statuses.values():
            monitor.record(status, OK, t)
        monitor.evaluate(t)
        t += 5.0
    assert not monitor.tracker.open_incidents()
    for status in vm_paths:
        monitor.record(status, FAIL, 10_000.0)
        monitor.record(status, FAIL, 10_001.0)
    for status in hv_paths:
        monitor.record(status, FAIL, 10_001.1)
    assert monitor.evaluate(10_001.2) == [] and not monitor.tracker.open_incidents()
    for status in hv_paths:
        monitor.record(status, FAIL, 10_002.1)
    monitor.evaluate(10_002.2)
    (incident,) = monitor.tracker.open_incidents()
    assert (incident.scope, incident.root) == ("hypervisor", "pve1")

    # A dependency that stays suspect (flapping) holds nobody for longer than HOLD_MAX; one that
    # lost a probe while the VM failed may be losing packets (the VM's failures that loss): the VM
    # waits until it has been dark for LOSSY_DARK.
    monitor2 = Monitor(cfg)
    for status in monitor2.statuses.values():
        monitor2.record(status, OK, 0.0)
        monitor2.record(status, OK, 0.5)
    for status in [s for s in monitor2.statuses.values() if s.path.target == "vm1"]:
        monitor2.record(status, FAIL, 1.0)
        monitor2.record(status, FAIL, 2.0)
    monitor2.record(next(s for s in monitor2.statuses.values() if s.path.target == "pve1"), FAIL, 2.0)
    assert monitor2.evaluate(2.0) == []
    assert monitor2.evaluate(2.0 + HOLD_MAX) == []
    for t in range(3, int(LOSSY_DARK) + 1, 3):  # the VM keeps failing (LOSSY_PROBES in a row)
        for status in [s for s in monitor2.statuses.values() if s.path.target == "vm1"]:
            monitor2.record(status, FAIL, float(t))
    monitor2.evaluate(0.5 + LOSSY_DARK)  # dark that long: its own; the suspect holds it HOLD_MAX
    monitor2.evaluate(0.5 + LOSSY_DARK + HOLD_MAX)
    (incident,) = monitor2.tracker.open_incidents()
    assert (incident.scope, incident.root) == ("vm", "vm1")


def test_the_page_waits_for_a_fresh_bmc_reading() -> None:
    """A BMC reading from before the outage says 'chassis on' about a host that has just lost power:
    the verdict waits until the BMC has answered since the first failure, then carries its cause."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.probes import BmcReading

    monitor = Monitor(parse_config({"site": "t", "targets": HOST_WITH_BMC}, Path(".")))
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    on = ProbeResult(True, 0.1, None, "chassis on", BmcReading(power_on=True))
    monitor.record(bmc, on, 0.5)  # the last reading before the outage
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            for t in (1.0, 2.0):
                monitor.record(status, FAIL, t)
    assert monitor.evaluate(3.0) == []  # not "os_unresponsive" from the stale reading
    monitor.record(bmc, ProbeResult(True, 0.1, None, "chassis off", BmcReading(power_on=False)), 3.2)
    changes = monitor.evaluate(3.3)
    (incident,) = monitor.tracker.open_incidents()
    assert [c.kind for c in changes] == ["opened"] and incident.cause == "power_off"


def test_a_bmc_read_sent_before_the_outage_is_not_fresh() -> None:
    """The monitor comes back from being cut off; a BMC read sent while it was blind times out just
    after the host's first failure. That timeout is from before the outage: the page waits for the
    next read (chassis on: hung), not 'bmc_unreachable'."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.probes import BmcReading, Failure

    monitor = Monitor(parse_config({"site": "t", "targets": HOST_WITH_BMC}, Path(".")))
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    monitor.record(bmc, ProbeResult(True, 0.1, None, "chassis on", BmcReading(power_on=True)), 0.5)
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            for t in (10.0, 11.0):
                monitor.record(status, FAIL, t)
    # Sent half a second before the first failure at 10.0, timed out after the second: it says
    # nothing about this outage.
    timed_out = 9.5 + bmc.path.timeout
    assert timed_out > 11.0
    monitor.record(bmc, ProbeResult.fail(Failure.TIMEOUT, "no answer"), timed_out)
    assert monitor.evaluate(timed_out + 0.1) == [] and not monitor.tracker.open_incidents()
    monitor.record(bmc, ProbeResult(True, 0.4, None, "chassis on", BmcReading(power_on=True)), timed_out + 1)
    host = next(s for s in monitor.statuses.values() if not s.path.is_bmc)
    monitor.record(host, FAIL, timed_out + 1.1 + host.path.timeout)  # still failing after the reading
    monitor.evaluate(timed_out + 1.2 + host.path.timeout)
    (incident,) = monitor.tracker.open_incidents()
    assert incident.cause == "os_unresponsive"

    # A read sent after the first failure that times out is the BMC's own word: unreachable.
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            monitor.record(status, OK, 20.0)
            monitor.record(status, OK, 21.0)
    t = 22.0
    while monitor.tracker.open_incidents() and t < 2000:
        monitor.evaluate(t)
        t += 5.0
    assert not monitor.tracker.open_incidents()
    for status in monitor.statuses.values():
        if not status.path.is_bmc:
            for t2 in (3000.0, 3001.0):
                monitor.record(status, FAIL, t2)
    monitor.record(bmc, ProbeResult.fail(Failure.TIMEOUT, "no answer"), 3000.0 + bmc.path.timeout)
    monitor.evaluate(3001.1 + bmc.path.timeout)
    (incident,) = monitor.tracker.open_incidents()
    assert incident.cause == "bmc_unreachable"


def _hypervisor_with_a_vm() -> Any:
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor

    cfg = parse_config(
        {
            "site": "t",
            "defaults": {"interval": "5s", "retry_interval": "1s", "timeout": "1s", "fail_after": 2},
            "targets": {
                "pve1": {
                    "role": "hypervisor",
                    "bmc": {"ipmi": {"host": "127.0.0.1", "username": "u", "password": "p"}},
                    "paths": [{"icmp": "10.0.0.1"}, {"icmp": "10.0.99.1"}],
                },
                "vm1": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": "10.0.0.21"}]},
            },
        },
        Path("."),
    )
    return Monitor(cfg)


def test_the_hosts_first_failure_asks_its_bmc_again_even_when_it_said_off_already() -> None:
    """The demo's pve1 powered off (bench_detect): its VM's probe fails first and pulls the host's
    paths and BMC forward; the BMC says "chassis off" twice (its path is down) before the host's
    own first failure arrives, so that reading was asked before the host's outage began. The
    host's first failure asks the BMC again, and the page goes out at the pass that confirms the
    host, not a BMC interval later (6.7-7.1 s instead of ~3.5 s in 3 of 10 bench runs)."""
    from watchtower.engine.paths import PathState
    from watchtower.probes import BmcReading

    monitor = _hypervisor_with_a_vm()
    asked: list[Any] = []

    def run_now(key: Any) -> bool:
        asked.append(key)
        return True

    monitor.scheduler.run_now = run_now
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    host = [s for s in monitor.target_paths("pve1") if not s.path.is_bmc]
    (vm,) = monitor.target_paths("vm1")
    on = ProbeResult(True, 0.05, None, "chassis on", BmcReading(power_on=True))
    off = ProbeResult(False, 0.05, Failure.CONTENT, "chassis power is off", BmcReading(power_on=False))
    for t in (0.0, 0.5):
        monitor.record(bmc, on, t)
        for status in (*host, vm):
            monitor.record(status, OK, t)
    assert monitor.evaluate(0.6) == []

    def answer_bmc(now: float) -> bool:
        """The scheduler's part: a BMC read asked now answers 50 ms later."""
        if bmc.path.key not in asked:
            return False
        asked.clear()
        monitor.record(bmc, off, now + 0.05)
        return True

    monitor.record(vm, FAIL, 1.0)  # the VM's probe, sent at 0.0, fails first
    assert answer_bmc(1.0)  # pulled forward with the host's paths
    monitor.record(vm, FAIL, 1.5)
    monitor.record(bmc, off, 1.55)  # a second read (another pull): the BMC path is down
    assert bmc.state is PathState.DOWN
    asked.clear()
    for status in host:
        monitor.record(status, FAIL, 2.0)  # the host's own first failure: its outage begins here
    assert answer_bmc(2.0), "the host's first failure did not ask its BMC for a fresh reading"
    assert monitor.evaluate(2.1) == []  # not confirmed yet
    for status in host:
        monitor.record(status, FAIL, 3.0)
    monitor.record(vm, FAIL, 3.0)
    changes = monitor.evaluate(3.05)
    (incident,) = monitor.tracker.open_incidents()
    assert [c.kind for c in changes] == ["opened"]
    assert (incident.root, incident.cause) == ("pve1", "power_off")


def test_a_hold_for_the_roots_own_bmc_alone_has_no_hold_max_floor() -> None:
    """Waiting for the host's own BMC lasts as long as that read may take (its timeout + 2 s), not
    HOLD_MAX: HOLD_MAX is for a dependency that may be the root instead."""
    from watchtower.engine.incidents import HOLD_MAX
    from watchtower.probes import BmcReading

    monitor = _hypervisor_with_a_vm()
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    host = [s for s in monitor.target_paths("pve1") if not s.path.is_bmc]
    monitor.record(bmc, ProbeResult(True, 0.05, None, "chassis on", BmcReading(power_on=True)), 0.5)
    for t in (1.0, 2.0):
        for status in host:
            monitor.record(status, FAIL, t)
    bound = bmc.path.timeout + 2.0
    assert bound < HOLD_MAX
    assert monitor.evaluate(2.1) == []  # the hold starts: no reading asked since 1.0
    assert monitor.evaluate(2.1 + bound - 0.1) == []
    changes = monitor.evaluate(2.1 + bound)  # the read never came back: page with what is known
    assert [c.kind for c in changes] == ["opened"]


def test_vms_dark_behind_a_production_link_that_is_back_are_probed_afresh() -> None:
    """A hypervisor's production NIC was down for 6 s (the hypervisor only degraded: its
    management side answered), its VMs dark behind it. The link is back: their failures are from
    before, so they are probed afresh and not paged (msp200 seed 30 paged six VMs that answered)."""
    monitor = settled_monitor(HYPERVISOR_AND_VM)
    prod = monitor.statuses[("hv", "prod")]
    vm = [s for s in monitor.statuses.values() if s.path.target == "vm"]
    for t in (1.0, 2.0, 3.0):
        monitor.record(prod, FAIL, t)
        for status in vm:
            monitor.record(status, FAIL, t + 0.1)
    monitor.evaluate(3.2)
    assert monitor.correlation.own["hv"] is TargetState.DEGRADED
    assert monitor.correlation.own["vm"] is TargetState.DOWN
    for t in range(4, 4 + prod.path.recover_after):
        monitor.record(prod, OK, float(t))
    monitor.evaluate(10.0)
    assert all(s.state is PathState.UNKNOWN for s in vm)  # stale: to be probed again
    assert not any(i.root == "vm" for i in monitor.tracker.incidents.values())


def test_a_silent_switch_waits_for_what_it_carries_to_be_heard_from() -> None:
    """The switch stops answering pings. Whether it is dead or only silent (its management plane
    drops ICMP) is told by what it carries, probed at its first failure: the page waits for their
    answers. They answer: it forwards, no page. They fail: the switch is paged."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor

    cfg = parse_config(
        {
            "site": "t",
            "targets": {
                "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
                "a": {"role": "service", "depends_on": ["sw"], "paths": [{"icmp": "10.0.0.21"}]},
                "b": {"role": "service", "depends_on": ["sw"], "paths": [{"icmp": "10.0.0.22"}]},
            },
        },
        Path("."),
    )
    for carried_answer in (OK, FAIL):
        monitor = Monitor(cfg)
        sw = monitor.statuses[("sw", "icmp 10.0.0.2")]
        others = [s for s in monitor.statuses.values() if s.path.target != "sw"]
        for status in monitor.statuses.values():
            monitor.record(status, OK, 0.0)
            monitor.record(status, OK, 0.5)
        monitor.evaluate(0.5)
        t = 10.0
        for _ in range(sw.path.fail_after):
            monitor.record(sw, FAIL, t)
            t += 1.0
        assert monitor.evaluate(t) == []  # nothing it carries heard from since: wait
        for _ in range(max(s.path.fail_after for s in others)):
            for status in others:
                monitor.record(status, carried_answer, t)
            t += 1.0
        monitor.evaluate(t)
        roots = [i.root for i in monitor.tracker.open_incidents()]
        if carried_answer is OK:
            assert roots == [] and monitor.correlation.states["sw"] is TargetState.DEGRADED
        else:
            assert roots == ["sw"]


def test_what_fails_behind_a_switch_that_answers_again_since_a_moment_waits_for_its_ports() -> None:
    """The switch answers again since a moment (seen again after the monitor's own outage, say):
    its ports may not forward yet. A host dark behind it waits PORTS_SETTLE before it is paged
    as an outage of its own (demo seed 3778 paged the NAS behind a switch 6 s after it answered)."""
    from watchtower.engine.monitor import PORTS_SETTLE

    monitor = settled_monitor(SWITCH_AND_NAS)
    sw = monitor.statuses[("sw", "icmp 10.0.0.2")]
    host = [s for s in monitor.statuses.values() if s.path.target == "h"]
    sw.changed_at = 100.0  # it came (back) up at 100
    t = 101.0
    for _ in range(max(s.path.fail_after for s in host)):
        for status in host:
            monitor.record(status, FAIL, t)
        monitor.record(sw, OK, t)
        t += 1.0
    assert monitor.evaluate(t) == []
    assert monitor.evaluate(100.0 + PORTS_SETTLE - 1) == []
    monitor.evaluate(100.0 + PORTS_SETTLE + 1)
    assert [i.root for i in monitor.tracker.open_incidents()] == ["h"]


def test_what_failed_while_the_monitor_was_blind_is_forgotten_when_it_sees_again() -> None:
    """The monitor was cut off: every probe failed, the vantage's too. Seen again, those failures
    say nothing about the targets: no path keeps a last failure from the blind window (a switch
    silent since, with everything behind it answering, looked lossy and was paged as down: demo
    seed 3251)."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor

    cfg = parse_config(
        {
            "site": "t",
            "vantage": [{"icmp": "10.0.250.1"}],
            "targets": {
                "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
                "a": {"role": "service", "depends_on": ["sw"], "paths": [{"icmp": "10.0.0.21"}]},
                "b": {"role": "service", "depends_on": ["sw"], "paths": [{"icmp": "10.0.0.22"}]},
            },
        },
        Path("."),
    )
    monitor = Monitor(cfg)
    for status in monitor.statuses.values():
        monitor.record(status, OK, 0.0)
        monitor.record(status, OK, 0.5)
    monitor.evaluate(0.5)
    for t in (10.0, 11.0, 12.0):
        for status in monitor.statuses.values():
            monitor.record(status, FAIL, t)
    monitor.evaluate(12.5)
    assert not monitor.correlation.vantage_up
    for status in monitor.statuses.values():
        if status.path.target == "@vantage":
            for t in (20.0, 21.0):
                monitor.record(status, OK, t)
    monitor.evaluate(21.5)
    assert all(s.last_failure is None for s in monitor.statuses.values() if s.path.target != "@vantage")
    # the switch stays silent, what it carries answers: it forwards (no network page)
    for t in (22.0, 23.0, 24.0, 25.0):
        for status in monitor.statuses.values():
            monitor.record(status, FAIL if status.path.target == "sw" else OK, t)
        monitor.evaluate(t + 0.1)
    assert not [i for i in monitor.tracker.open_incidents() if i.root == "sw"]


def test_a_vm_dark_after_its_host_was_dark_on_every_path_for_a_moment_is_rebooting() -> None:
    """The hypervisor hung for 4 s: one probe lost on each of its paths, then it answered again,
    too short to confirm. Its VM reboots for a minute: that blip coming back, not an outage of its
    own (demo seeds 3421, 3457 paged the VM after 30 s); a host that lost one path's probe only
    was not dark, and the VM dark behind it is its own outage once dark that long."""
    from watchtower.engine.correlate import LOSSY_DARK

    for dark_everywhere in (True, False):
        monitor = settled_monitor(HYPERVISOR_AND_VM)
        hv = [s for s in monitor.statuses.values() if s.path.target == "hv"]
        vm = [s for s in monitor.statuses.values() if s.path.target == "vm"]
        for status in hv if dark_everywhere else hv[:1]:
            monitor.record(status, FAIL, 11.0)
        for status in hv:
            monitor.record(status, OK, 11.5)
        t = 12.0
        while t < 13.0 + LOSSY_DARK + 20:
            for status in vm:
                monitor.record(status, FAIL, t)
            for status in hv:
                monitor.record(status, OK, t)
            monitor.evaluate(t + 0.1)
            t += 2.0
        roots = [i.root for i in monitor.tracker.open_incidents()]
        assert roots == ([] if dark_everywhere else ["vm"])


def test_a_failure_sent_before_a_path_was_settled_is_stale() -> None:
    """The switch is back: what depends on it is probed afresh. A probe of the NAS sent while the
    switch was still down times out after that: it is from before and does not count toward the
    NAS's fresh streak (demo seed 439 paged the NAS behind a switch that had just come back)."""
    monitor = settled_monitor(SWITCH_AND_NAS)
    sw = monitor.statuses[("sw", "icmp 10.0.0.2")]
    nas = [s for s in monitor.statuses.values() if s.path.target == "h"]
    for t in (10.0, 11.0, 12.0):
        for status in monitor.statuses.values():
            monitor.record(status, FAIL, t)
        monitor.evaluate(t + 0.1)
    for t in (20.0, 21.0):
        monitor.record(sw, OK, t)
    monitor.evaluate(21.1)  # the switch is back: the NAS's paths settled, probed afresh
    assert all(s.state is PathState.UNKNOWN and s.failures == 0 for s in nas)
    stale = 21.1 + nas[0].path.timeout - 0.5  # sent half a second before the settle
    monitor.record(nas[0], FAIL, stale)
    assert nas[0].failures == 0
    monitor.record(nas[0], FAIL, 21.2 + nas[0].path.timeout)  # sent after it: counts
    assert nas[0].failures == 1


def test_chassis_on_read_after_the_last_failure_waits_for_the_next_probe() -> None:
    """The host was off with its BMC unreachable; both were powered on again. The BMC's first
    answer ("chassis on") was asked after the host's last failed probe was sent: "hung" is only
    true if the host still fails after that reading (demo seed 109 paged a host back up as hung)."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.probes import BmcReading

    monitor = Monitor(parse_config({"site": "t", "targets": HOST_WITH_BMC}, Path(".")))
    bmc = monitor.statuses[("pve1", "bmc ipmi 127.0.0.1")]
    host = [s for s in monitor.statuses.values() if not s.path.is_bmc]
    for status in host:
        for t in (10.0, 11.0):
            monitor.record(status, FAIL, t)
    on = ProbeResult(True, 0.4, None, "chassis on", BmcReading(power_on=True))
    monitor.record(bmc, on, 13.0)  # asked at 12.6, after the last failed probe was sent
    assert monitor.evaluate(13.1) == [] and not monitor.tracker.open_incidents()
    # Sent after the reading and still failing: hung.
    again = 12.6 + host[0].path.timeout + 0.1
    monitor.record(host[0], FAIL, again)
    monitor.evaluate(again + 0.1)
    (incident,) = monitor.tracker.open_incidents()
    assert incident.cause == "os_unresponsive"


async def test_monitor_runs_co_due_icmp_and_tcp_paths_in_batches() -> None:
    """The scheduler hands co-due icmp/tcp runs to their batch extension; the results land in the
    same path states as one-by-one runs would, a dead port goes down, and the cadence goes on."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.probes import ProbeContext
    from watchtower.probes.icmp import Pinger

    servers = [await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0) for _ in range(10)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    port = ports[0]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    dead = closed.getsockname()[1]
    pinger = Pinger()
    try:
        await pinger.open()
        icmp_paths = [{"icmp": f"127.0.1.{i}"} for i in range(1, 21)]
    except OSError:
        icmp_paths = []
    fast = {"interval": "1s", "retry_interval": "0.2s", "timeout": "0.5s"}
    cfg = parse_config(
        {
            "site": "s",
            "defaults": fast,
            "targets": {
                "up": {
                    "role": "service",
                    "paths": [*icmp_paths, {"tcp": f"127.0.0.1:{port}"}],
                },
                "many": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{p}"} for p in ports]},
                "dead": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{dead}"}]},
            },
        },
        Path("."),
    )
    shared = ProbeContext(timeout=0, pinger=pinger if icmp_paths else None)
    # the same first phase for every path: all co-due, so they must go out as batches
    monitor = Monitor(cfg, shared=shared)
    for job in monitor.scheduler._jobs.values():
        job.first_in = 0.05
    task = asyncio.create_task(monitor.run())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = {k: s.state for k, s in monitor.statuses.items()}
            if all(
                st is (PathState.DOWN if k[0] == "dead" else PathState.UP) for k, st in states.items()
            ) and monitor.scheduler.runs > 3 * len(states):
                break
            await asyncio.sleep(0.05)
        assert all(s.state is PathState.UP for k, s in monitor.statuses.items() if k[0] != "dead"), states
        dead_status = monitor.statuses[("dead", f"tcp 127.0.0.1:{dead}")]
        assert dead_status.state is PathState.DOWN and dead_status.detail == "connection refused"
        sched = monitor.scheduler
        assert sched.batched > 0.5 * sched.runs, (sched.batched, sched.runs)
        assert sched.in_flight <= len(monitor.statuses)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pinger.close()
        closed.close()
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_scheduler_batch_hook_that_raises_runs_the_job_alone() -> None:
    """A bug in one job's batch hook costs that job its batch, not its run, and not the other
    co-due jobs' runs."""
    sched = Scheduler()
    alone: list[str] = []
    batched: list[list[str]] = []

    def start(items: list[str], done: Callable[[], None]) -> None:
        batched.append(items)
        done()

    def broken() -> tuple[Any, str] | None:
        raise RuntimeError("bug")

    async def run_alone() -> None:
        alone.append("broken")

    async def never() -> None:
        raise AssertionError("a batched job must not run alone")

    sched.add("broken", 60.0, lambda: 60.0, run_alone, first_in=0, batch=broken)

    def hook(i: int) -> Callable[[], tuple[Any, str]]:
        return lambda: (start, f"item{i}")

    for i in range(3):
        sched.add(i, 60.0, lambda: 60.0, never, first_in=0, batch=hook(i))
    task = asyncio.create_task(sched.run())
    try:
        deadline = time.monotonic() + 5
        while (not alone or not batched) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert alone == ["broken"]
        assert sorted(x for b in batched for x in b) == ["item0", "item1", "item2"]
        assert sched.runs == 4 and sched.batched == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_switch_first_seen_up_at_start_is_not_answering_again() -> None:
    """PORTS_SETTLE holds what fails behind a switch that answers *again* (back from an outage, or
    seen again after the monitor's own). The daemon's first look at a switch is neither: a host
    behind it that dies 10 s after the start is paged when confirmed (bench_detect starts a fresh
    daemon per run: every page waited for the 20 s)."""
    from pathlib import Path

    from watchtower.config import parse_config
    from watchtower.engine.monitor import PORTS_SETTLE, Monitor

    cfg = parse_config(
        {
            "site": "t",
            "targets": {
                "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
                "pve1": {"role": "hypervisor", "depends_on": ["sw"],
                         "paths": [{"icmp": "10.0.0.11"}, {"icmp": "10.0.99.11"}]},
            },
        },
        Path("."),
    )  # fmt: skip
    monitor = Monitor(cfg)
    (sw,) = monitor.target_paths("sw")
    host = monitor.target_paths("pve1")
    for t in (0.0, 1.0):
        for status in monitor.statuses.values():
            monitor.record(status, OK, t)
    assert monitor.evaluate(1.1) == []
    for t in (10.0, 11.0):
        for status in host:
            monitor.record(status, FAIL, t)
        monitor.record(sw, OK, t)
    assert sw.changed_at is not None and 11.1 - sw.changed_at < PORTS_SETTLE  # read as "again" before
    changes = monitor.evaluate(11.1)
    assert [c.kind for c in changes] == ["opened"]
    # Back from an outage, it is answering again: a host failing behind it waits for its ports.
    for t in (20.0, 21.0):
        for status in host:
            monitor.record(status, OK, t)
        monitor.record(sw, FAIL, t)
    monitor.evaluate(21.1)
    for t in (22.0, 23.0):
        monitor.record(sw, OK, t)
    monitor.evaluate(23.1)
    for t in (30.0, 31.0):
        for status in host:
            monitor.record(status, FAIL, t)
    monitor.evaluate(31.1)
    assert monitor._just_forwarding("sw", 31.1)
