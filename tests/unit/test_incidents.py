"""IncidentTracker: open, grow, merge, cause changes, flaps, blind windows, resolution."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from watchtower.engine.correlate import BmcFacts, PathView, TargetState, correlate
from watchtower.engine.incidents import (
    PARTIAL_GRACE,
    RECOVERY_GRACE,
    RESTORE_SETTLE,
    IncidentState,
    IncidentTracker,
)
from watchtower.engine.paths import PathState
from watchtower.engine.topology import Node, Topology

SITE = Topology.build(
    "acme",
    [
        Node("sw", "network"),
        Node("pve1", "hypervisor", parents=("sw",), has_bmc=True),
        Node("nas", "storage", parents=("sw",)),
        Node("dc1", "vm", parents=("pve1",), storage=("nas",)),
        Node("mail1", "vm", parents=("pve1",), storage=("nas",)),
    ],
)


def corr(down: Iterable[str] = (), vantage: bool = True, bmc: dict[str, BmcFacts] | None = None,
         unknown: Iterable[str] = (), since: float = 0.0, half: Iterable[str] = ()):  # fmt: skip
    """``half``: targets with one path down and one up (degraded)."""

    def view(name: str) -> list[PathView]:
        state = PathState.DOWN if name in down else (PathState.UNKNOWN if name in unknown else PathState.UP)
        states = [PathState.DOWN, PathState.UP] if name in half else [state, state]
        return [PathView(f"p{i}", "icmp", f"{name}{i}", states[i], "no echo reply", since) for i in range(2)]

    vantage_paths = [PathView("gw", "icmp", "gw", PathState.UP if vantage else PathState.DOWN)]
    return correlate(SITE, {n: view(n) for n in SITE.nodes}, bmc or {}, vantage_paths, 0.0)


def test_open_grow_cause_resolve() -> None:
    t = IncidentTracker()
    changes = t.step(corr(down=["pve1"], since=95.0), 100.0)
    assert [c.kind for c in changes] == ["opened"]
    (inc,) = t.open_incidents()
    assert (inc.scope, inc.root, inc.affected, inc.first_failure_at) == ("hypervisor", "pve1", (), 95.0)
    assert [e.kind for e in inc.timeline] == ["first_failure", "opened"]

    changes = t.step(corr(down=["pve1", "dc1", "mail1"], bmc={"pve1": BmcFacts(True, power_on=False)}), 102.0)
    assert {c.kind for c in changes} == {"affected", "cause"}
    inc = t.incidents[inc.id]  # a frozen value: the tracker holds the new one
    assert inc.affected == ("dc1", "mail1") and inc.cause == "power_off"
    assert "BMC: chassis off" in inc.evidence
    assert t.step(corr(down=["pve1", "dc1", "mail1"]), 103.0) == []  # nothing new: nothing to say

    changes = t.step(corr(), 200.0)
    inc = t.incidents[inc.id]
    assert [c.kind for c in changes] == ["resolved"] and inc.state is IncidentState.RESOLVED
    assert inc.resolved_at == 200.0 and "pve1 is back after 1m40s" in changes[0].text


def test_vm_first_then_hypervisor_merges_into_one() -> None:
    t = IncidentTracker()
    t.step(corr(down=["dc1"]), 10.0)
    t.step(corr(down=["dc1", "mail1"]), 11.0)
    assert sorted(i.root for i in t.open_incidents()) == ["dc1", "mail1"]
    first = min(t.open_incidents(), key=lambda i: i.id)
    changes = t.step(corr(down=["pve1", "dc1", "mail1"]), 12.0)
    (inc,) = t.open_incidents()
    assert inc.id == first.id  # re-rooted, not a new incident: no second page
    assert (inc.scope, inc.root) == ("hypervisor", "pve1")
    assert sorted(inc.affected) == ["dc1", "mail1"]
    assert "opened" not in {c.kind for c in changes}
    assert {c.kind for c in changes} >= {"rerooted", "merged"}
    folded = next(i for i in t.incidents.values() if i.id != inc.id)
    assert folded.state is IncidentState.RESOLVED and folded.merged_into == inc.id


def test_an_incident_confirmed_before_the_new_root_failed_at_all_stays_its_own() -> None:
    """pve1 hung and was paged at 101; the switch began failing at 113 (pve1 now unreachable
    behind it). pve1 was confirmed long before the switch missed a probe: it stays its own
    incident (demo seed 2150), while one confirmed a moment before the switch's first failure (a
    VM's quick retries) is the switch's."""
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"], since=100.0), 101.0)
    (hung,) = t.open_incidents()
    changes = t.step(corr(down=list(SITE.nodes), since=113.0), 114.0)
    assert {(i.root, i.id) for i in t.open_incidents()} == {("pve1", hung.id), ("sw", hung.id + 1)}
    assert "rerooted" not in {c.kind for c in changes}

    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"], since=100.0), 101.0)
    t.step(corr(down=list(SITE.nodes), since=105.0), 106.0)
    (inc,) = t.open_incidents()
    assert (inc.id, inc.root) == (hung.id, "sw")


def test_what_runs_on_a_host_whose_bmc_said_chassis_off_a_moment_ago_is_rebooting() -> None:
    """pve1 lost power for 5 s: too short to be down on every path, but its BMC said "chassis
    off". Its VM failing now is rebooting after that blip, not an outage of its own, for the
    grace (demo seed 1678 paged the VM); one up for a while after it is its own."""
    t = IncidentTracker()
    for now in (0.0, 10.0, 20.0):
        t.step(corr(), now, SITE, blipped={})
    lost = {"pve1": 25.0}
    assert t.step(corr(down=["dc1"]), 27.0, SITE, blipped=lost) == []
    assert t.step(corr(down=["dc1"]), 27.0 + RECOVERY_GRACE - 5, SITE, blipped=lost) == []
    changes = t.step(corr(down=["dc1"]), 25.0 + RECOVERY_GRACE, SITE, blipped=lost)
    assert [c.kind for c in changes] == ["opened"]  # not back within the grace: its own outage

    t = IncidentTracker()
    for now in (0.0, 10.0, 20.0):
        t.step(corr(), now, SITE)
    changes = t.step(corr(down=["dc1"]), 27.0, SITE)  # no BMC word: its own at once
    assert [c.kind for c in changes] == ["opened"]
    t = IncidentTracker()
    for now in (0.0, 10.0, 20.0, 30.0, 40.0):
        t.step(corr(), now, SITE, blipped=lost)
    changes = t.step(corr(down=["dc1"]), 41.0, SITE, blipped=lost)  # up 15 s after the blip
    assert [c.kind for c in changes] == ["opened"]


def test_a_host_failing_after_its_switch_blipped_is_its_own_outage() -> None:
    """The switch was down for a moment, too short for an incident (its verdict held); pve1
    answered after it, then hung. A switch's blip reboots nothing behind it (a hypervisor's
    does): pve1 is an outage of its own at once (demo seeds 3753, 3803, 3953)."""
    t = IncidentTracker()
    t.step(corr(), 0.0, SITE)
    t.step(corr(down=list(SITE.nodes)), 10.0, SITE, suspects={"sw": 5.0})  # held: no incident
    assert not t.open_incidents()
    t.step(corr(), 12.0, SITE)  # back, and pve1 with it
    t.step(corr(down=["pve1", "dc1", "mail1"]), 14.0, SITE)
    assert [i.root for i in t.open_incidents()] == ["pve1"]


def test_once_a_switch_forwards_again_a_host_that_answered_and_fails_is_its_own() -> None:
    """The switch's incident is coming back: h1 answered, then hung 2 s later (it was up too
    briefly to be done with the restore). Once h2 and h3 have answered steadily behind the switch
    for RESTORE_SETTLE, its ports forward: h1 is an outage of its own (demo seed 3805). While
    nothing behind it answers steadily (ports still coming up), h1 stays with the restore."""
    site = Topology.build(
        "acme", [Node("sw", "network"), *(Node(h, "hypervisor", parents=("sw",)) for h in ("h1", "h2", "h3"))]
    )
    gw = [PathView("gw", "icmp", "gw", PathState.UP)]

    def step(t: IncidentTracker, down: set[str], now: float, failing: dict[str, float]) -> None:
        views = {
            n: [PathView("p", "icmp", n, PathState.DOWN if n in down else PathState.UP, "x", 0.0)]
            for n in site.nodes
        }
        t.step(correlate(site, views, {}, gw, now), now, site, failing=failing)

    for h2_steady in (True, False):
        t = IncidentTracker()
        step(t, set(), 0.0, {})
        step(t, set(site.nodes), 10.0, {})
        assert [i.root for i in t.open_incidents()] == ["sw"]
        step(t, set(), 20.0, {})  # back, all of it
        step(t, {"h1"}, 22.0, {"h1": 22.0})  # h1 hung
        # h2 and h3 answer on (or keep failing a probe now and then: ports not all up yet)
        failing = {"h1": 28.0} if h2_steady else {"h1": 28.0, "h2": 27.0, "h3": 27.5}
        step(t, {"h1"}, 28.0, failing)
        roots = sorted(i.root for i in t.open_incidents())
        assert roots == (["h1", "sw"] if h2_steady else ["sw"])


def test_a_vm_paged_before_its_host_failed_again_stays_its_own() -> None:
    """pve1 was down and is back (its incident resolved, in the flap window); dc1 dies on its own
    and is paged; a moment later pve1 fails again. pve1's incident reopens; dc1's is neither
    re-scoped into a second pve1 incident (two all-clears for pve1: demo seeds 3476, 3935) nor
    folded into the reopened one (its page would never get an all-clear)."""
    t = IncidentTracker()
    t.step(corr(), 0.0, SITE)
    t.step(corr(down=["pve1", "dc1", "mail1"], since=9.0), 10.0, SITE)
    (host,) = t.open_incidents()
    for now in (20.0, 40.0, 60.0):
        t.step(corr(), now, SITE)
    assert not t.open_incidents()
    t.step(corr(down=["dc1"], since=69.0), 70.0, SITE)
    vm = next(i for i in t.open_incidents() if i.root == "dc1")
    for now in (72.0, 73.0, 80.0):
        t.step(corr(down=["pve1", "dc1", "mail1"], since=71.0), now, SITE)
    assert {(i.id, i.root) for i in t.open_incidents()} == {(host.id, "pve1"), (vm.id, "dc1")}
    assert t.incidents[vm.id].merged_into is None and t.incidents[host.id].flaps == 1


def test_flap_reopens_the_same_incident() -> None:
    t = IncidentTracker(flap_window=600)
    t.step(corr(down=["dc1"]), 0.0)
    t.step(corr(), 30.0)
    changes = t.step(corr(down=["dc1"]), 60.0)
    assert [c.kind for c in changes] == ["reopened"]
    assert len(t.incidents) == 1 and t.incidents[1].flaps == 1
    t.step(corr(), 90.0)
    changes = t.step(corr(down=["dc1"]), 90.0 + 601)
    assert [c.kind for c in changes] == ["opened"] and len(t.incidents) == 2


def test_recovered_root_waits_for_its_children_then_leaves_stragglers_as_their_own_incidents() -> None:
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0)
    changes = t.step(corr(down=["dc1"]), 50.0)  # pve1 back, mail1 back, dc1 still booting
    assert [c.kind for c in changes] == ["recovering"]
    assert "pve1 is back; waiting for dc1" in changes[0].text
    (inc,) = t.open_incidents()
    assert inc.root == "pve1" and inc.root_back_at == 50.0 and inc.back == ("mail1",)
    assert t.step(corr(down=["dc1"]), 60.0) == []  # dc1's own verdict belongs to the recovering incident

    changes = t.step(corr(down=["dc1"]), 50.0 + RECOVERY_GRACE)  # dc1 never came back
    resolved = next(c for c in changes if c.kind == "resolved")
    assert "still down, now incidents of their own: dc1" in resolved.text
    t.step(corr(down=["dc1"]), 50.0 + RECOVERY_GRACE + 1)
    (own,) = t.open_incidents()
    assert (own.scope, own.root) == ("vm", "dc1")
    assert "mail1 is back" in [e.text for e in t.incidents[1].timeline]


def test_children_back_within_the_grace_resolve_the_one_incident() -> None:
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0)
    t.step(corr(down=["dc1", "mail1"]), 50.0)
    changes = t.step(corr(), 120.0)
    assert [c.kind for c in changes] == ["resolved"] and len(t.incidents) == 1
    assert "pve1 and what it took down are back after 2m" in changes[0].text
    assert t.incidents[1].back == ("dc1", "mail1")


def test_a_child_answering_on_some_paths_is_not_back_yet() -> None:
    """The all-clear must not go out while a VM pings but its service is still starting."""
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0)
    assert corr(half=["dc1"]).states["dc1"] is TargetState.DEGRADED
    changes = t.step(corr(half=["dc1"]), 50.0)  # pve1 and mail1 back, dc1 half way
    assert [c.kind for c in changes] == ["recovering"] and "waiting for dc1" in changes[0].text
    assert t.step(corr(half=["dc1"]), 60.0) == []
    changes = t.step(corr(), 62.0)
    assert [c.kind for c in changes] == ["resolved"] and t.incidents[1].back == ("mail1", "dc1")


def test_a_child_degraded_for_long_does_not_hold_the_all_clear_for_the_full_grace() -> None:
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0)
    t.step(corr(half=["dc1"]), 50.0)
    assert t.step(corr(half=["dc1"]), 50.0 + PARTIAL_GRACE - 1) == []
    changes = t.step(corr(half=["dc1"]), 50.0 + PARTIAL_GRACE)
    (resolved,) = changes
    assert resolved.kind == "resolved" and "answering but not on every path yet: dc1" in resolved.text
    assert "still down" not in resolved.text and t.open_incidents() == []


def test_root_failing_again_while_children_recover_keeps_the_incident() -> None:
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0)
    t.step(corr(down=["dc1", "mail1"]), 50.0)
    assert t.step(corr(down=["pve1", "dc1", "mail1"]), 70.0) == []
    (inc,) = t.open_incidents()
    assert inc.root_back_at is None and inc.timeline[-1].kind == "root_failed"


def test_blind_window_is_one_monitor_incident_and_freezes_targets() -> None:
    t = IncidentTracker()
    t.step(corr(down=["dc1"]), 0.0)
    changes = t.step(corr(down=["sw", "pve1", "nas", "dc1", "mail1"], vantage=False), 10.0)
    assert [c.kind for c in changes] == ["opened"]
    assert sorted(i.scope for i in t.open_incidents()) == ["monitor", "vm"]
    assert t.step(corr(vantage=False), 20.0) == []  # still blind: nothing resolves, nothing opens
    changes = t.step(corr(unknown=list(SITE.nodes)), 70.0)  # back, probes not settled yet
    assert (
        [c.kind for c in changes] == ["resolved"]
        and "blind from" in changes[0].text
        and "(1m)" in changes[0].text
    )
    assert [i.root for i in t.open_incidents()] == ["dc1"]  # unknown: kept, not resolved
    t.step(corr(), 75.0)
    assert t.open_incidents() == []


def test_acknowledge() -> None:
    t = IncidentTracker()
    t.step(corr(down=["mail1"]), 0.0)
    inc, changes = t.acknowledge(1, "alice", 5.0)
    assert inc.state is IncidentState.ACKNOWLEDGED and inc.acknowledged_by == "alice"
    assert [c.kind for c in changes] == ["acknowledged"]
    assert t.acknowledge(1, "bob", 6.0)[1] == [] and t.incidents[1].acknowledged_by == "alice"
    assert t.open_incidents() == [inc]
    assert corr(down=["mail1"]).states["mail1"] is TargetState.DOWN


def test_power_back_on_while_booting_keeps_the_cause() -> None:
    t = IncidentTracker()
    t.step(corr(down=["pve1"], bmc={"pve1": BmcFacts(True, power_on=False)}), 0.0)
    changes = t.step(corr(down=["pve1"], bmc={"pve1": BmcFacts(True, power_on=True)}), 30.0)
    (inc,) = t.open_incidents()
    assert inc.cause == "power_off" and changes == []
    assert inc.timeline[-1].text.startswith("BMC: chassis power back on")
    # a hang without a power cycle is os_unresponsive from the start
    t2 = IncidentTracker()
    t2.step(corr(down=["pve1"], bmc={"pve1": BmcFacts(True, power_on=True)}), 0.0)
    assert t2.open_incidents()[0].cause == "os_unresponsive"
    # BMC unreachable, then back saying "chassis on" while the host is still down (simulator, demo
    # seed 188: power cut and restored while the BMC was away): booting or hung, not known.
    t3 = IncidentTracker()
    t3.step(corr(down=["pve1"], bmc={"pve1": BmcFacts(False)}), 0.0)
    assert t3.step(corr(down=["pve1"], bmc={"pve1": BmcFacts(True, power_on=True)}), 5.0) == []
    (inc,) = t3.open_incidents()
    assert inc.cause == "bmc_unreachable" and "booting, or hung" in inc.timeline[-1].text


def test_a_target_back_before_its_root_failed_again_comes_back_with_the_new_restore() -> None:
    # The sequence (simulator, partition seed 41): the NAS hangs again and again; dc1 came back
    # after one of its restores, then the NAS hung once more and dc1 boots behind it again. That
    # is still the NAS's restore, not an outage of dc1's own to page for.
    t = IncidentTracker()
    t.step(corr(down=["nas", "dc1", "mail1"], since=5.0), 10.0, SITE)
    (inc,) = t.open_incidents()
    t.step(corr(down=["dc1", "mail1"]), 20.0, SITE)  # the NAS answers, the VMs still boot
    t.step(corr(down=["mail1"]), 30.0, SITE)  # dc1 is back
    assert "dc1" in t.incidents[inc.id].back
    t.step(corr(down=["nas", "mail1"], since=35.0), 40.0, SITE)  # the NAS hangs again
    # and answers again; dc1 failed behind it, its evidence is stale (re-probed: unknown)
    t.step(corr(down=["mail1"], unknown=["dc1"]), 50.0, SITE)
    changes = t.step(corr(down=["dc1", "mail1"], since=52.0), 55.0, SITE)  # dc1 boots behind it
    assert [i.id for i in t.open_incidents()] == [inc.id]
    assert "opened" not in {c.kind for c in changes}


def test_a_target_up_for_a_moment_as_its_root_returns_still_comes_back_with_it() -> None:
    # (simulator, partition seed 152) dc1 answers in the pass the NAS returns, then reboots onto
    # its storage: part of the NAS's restore. Up for RESTORE_SETTLE, it is done with it: failing
    # again later is its own outage.
    t = IncidentTracker()
    t.step(corr(down=["nas", "mail1"], since=5.0), 10.0, SITE)
    (inc,) = t.open_incidents()
    t.step(corr(down=["mail1"]), 20.0, SITE)  # the NAS is back, dc1 answers
    changes = t.step(corr(down=["dc1", "mail1"], since=21.0), 22.0, SITE)  # dc1 reboots
    assert [i.id for i in t.open_incidents()] == [inc.id] and "opened" not in {c.kind for c in changes}
    t.step(corr(down=["mail1"]), 40.0, SITE)  # dc1 back
    t.step(corr(down=["mail1"]), 40.0 + RESTORE_SETTLE, SITE)
    changes = t.step(corr(down=["dc1", "mail1"], since=55.0), 56.0, SITE)  # dc1 fails on its own
    assert [c.kind for c in changes] == ["opened"]
    assert {i.root for i in t.open_incidents()} == {"nas", "dc1"}


def test_an_outage_begun_well_before_its_upstreams_is_not_folded_into_it() -> None:
    # (simulator, demo seed 386) dc1 hung and was paged; 20 s later its switch went down (60 %
    # loss): two outages, two incidents. Folded into the switch's, dc1 was paged once more when
    # the switch came back and dc1 was still hung.
    t = IncidentTracker()
    t.step(corr(down=["dc1"], since=0.0), 5.0, SITE)
    (vm,) = t.open_incidents()
    t.step(corr(down=["sw", "pve1", "nas", "dc1", "mail1"], since=20.0), 25.0, SITE)
    assert {i.root for i in t.open_incidents()} == {"dc1", "sw"}
    assert t.incidents[vm.id].merged_into is None
    # within the window, the same onset: one incident
    t2 = IncidentTracker()
    t2.step(corr(down=["dc1"], since=0.0), 2.0, SITE)
    t2.step(corr(down=["sw", "pve1", "nas", "dc1", "mail1"], since=4.0), 6.0, SITE)
    assert [i.root for i in t2.open_incidents()] == ["sw"]


def test_a_failure_between_passes_still_delays_the_all_clear() -> None:
    # (simulator, partition seed 5) a VM at 60 % loss fails a probe now and then; the pass that
    # follows may find every path answering again. Its last failed probe is what counts.
    t = IncidentTracker()
    t.step(corr(down=["dc1"]), 10.0, SITE)
    (inc,) = t.open_incidents()
    t.step(corr(), 20.0, SITE)
    assert t.incidents[inc.id].state is IncidentState.RESOLVED
    t.step(corr(), 40.0, SITE, failing={"dc1": 33.0, "mail1": 39.0})  # dc1 lost one at 33 s
    assert t.incidents[inc.id].quiet_since == 33.0
    t.step(corr(), 45.0, SITE, failing={"dc1": 33.0})  # nothing new: unchanged
    assert t.incidents[inc.id].quiet_since == 33.0


def test_a_root_down_for_a_moment_starts_a_new_restore_of_what_runs_on_it() -> None:
    # (simulator, demo seed 410) pve1 back, its VMs back for long; then pve1 hangs for 4 s, too
    # short for a verdict of its own (held for its BMC), and its VMs reboot: part of pve1's
    # outage, not two VM pages.
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 10.0, SITE)
    (inc,) = t.open_incidents()
    t.step(corr(down=["dc1", "mail1"]), 20.0, SITE)  # pve1 back
    t.step(corr(), 25.0, SITE)
    t.step(corr(), 25.0 + RESTORE_SETTLE, SITE)  # VMs back for long: done with that restore
    t.step(corr(down=["pve1", "dc1", "mail1"], since=36.0), 37.0, SITE, suspects={"pve1": 5.0})
    changes = t.step(corr(down=["dc1", "mail1"], since=38.0), 40.0, SITE)  # VMs reboot
    assert "opened" not in {c.kind for c in changes}
    assert [i.id for i in t.open_incidents()] == [inc.id]


def test_what_runs_on_a_host_down_for_a_moment_is_that_blip_coming_back() -> None:
    # (simulator, demo seed 479) pve1 lost power for 4 s: down for one pass, too short for a
    # verdict (held for its BMC), no incident. Its VMs reboot for a minute: no page for them.
    # Up for long after that, a VM failing is its own outage again.
    t = IncidentTracker()
    t.step(corr(), 0.0, SITE)
    t.step(corr(down=["pve1", "dc1", "mail1"], since=9.0), 10.0, SITE, suspects={"pve1": 5.0})
    assert t.step(corr(down=["dc1", "mail1"], since=11.0), 12.0, SITE) == []
    assert t.step(corr(down=["dc1", "mail1"], since=11.0), 60.0, SITE) == []
    t.step(corr(), 70.0, SITE)  # back
    t.step(corr(), 70.0 + RESTORE_SETTLE, SITE)
    changes = t.step(corr(down=["dc1"], since=85.0), 86.0, SITE)
    assert [c.kind for c in changes] == ["opened"]
    # ... and one that does not come back within RECOVERY_GRACE is paged then
    t2 = IncidentTracker()
    t2.step(corr(down=["pve1", "dc1"], since=9.0), 10.0, SITE, suspects={"pve1": 5.0})
    assert t2.step(corr(down=["dc1"], since=11.0), 12.0, SITE) == []
    changes = t2.step(corr(down=["dc1"], since=11.0), 10.0 + RECOVERY_GRACE, SITE)
    assert [c.kind for c in changes] == ["opened"]


def test_an_incident_opened_minutes_into_its_upstreams_outage_is_not_folded_into_it() -> None:
    # (simulator, partition seed 237) the switch died at 10 s (production dark); the NAS kept
    # answering on management until it hung at 300 s: its own incident, paged. Its production
    # path has been failing since 10 s, but that does not make it the switch's outage.
    from watchtower.engine.correlate import Correlation, Scope, Verdict

    def c(verdicts: tuple[Verdict, ...]) -> Correlation:
        return Correlation(
            states=dict.fromkeys(SITE.nodes, TargetState.DOWN), verdicts=verdicts, vantage_up=True
        )

    t = IncidentTracker()
    sw = Verdict(Scope.NETWORK, "sw", affected=("pve1", "dc1", "mail1"), since=10.0)
    t.step(c((sw,)), 15.0, SITE)
    t.step(c((sw, Verdict(Scope.STORAGE, "nas", since=10.0))), 300.0, SITE)
    assert {i.root for i in t.open_incidents()} == {"sw", "nas"}
    t.step(c((replace(sw, affected=("pve1", "nas", "dc1", "mail1")),)), 330.0, SITE)  # nas back on mgmt
    nas = next(i for i in t.incidents.values() if i.root == "nas")
    assert nas.merged_into is None and nas.is_open


def test_a_straggler_released_by_the_grace_is_not_claimed_back_by_the_restore_tail() -> None:
    # (simulator, demo seed 115) files lost all packets during its switch's outage; the switch's
    # grace ran out and its all-clear said "still down, now an incident of its own": the next pass
    # must open that incident, not reclaim the VM into the switch's restore (never paged).
    t = IncidentTracker()
    t.step(corr(down=["pve1", "dc1", "mail1"]), 0.0, SITE)
    t.step(corr(down=["dc1"]), 50.0, SITE)
    # (its own verdict held back this pass, e.g. for a dependency's confirmation)
    changes = t.step(corr(down=["dc1"]), 50.0 + RECOVERY_GRACE, SITE, suspects={"dc1": 5.0})
    assert [c.kind for c in changes] == ["resolved"] and "now incidents of their own: dc1" in changes[0].text
    changes = t.step(corr(down=["dc1"]), 55.0 + RECOVERY_GRACE, SITE)
    assert [c.kind for c in changes] == ["opened"]
    assert [i.root for i in t.open_incidents()] == ["dc1"]
