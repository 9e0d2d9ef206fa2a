"""correlate(): the rules as tables, and properties over random topologies and failures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchtower.engine.correlate import (
    BmcFacts,
    Cause,
    PathView,
    Scope,
    TargetState,
    Verdict,
    correlate,
    own_state,
)
from watchtower.engine.paths import PathState
from watchtower.engine.topology import Node, Topology

UP, DOWN, UNK = PathState.UP, PathState.DOWN, PathState.UNKNOWN

# The demo site: switch, two hypervisors, NAS, VMs on the hypervisors with disks on the NAS,
# an ERP that logs in through the DC.
SITE = Topology.build(
    "acme",
    [
        Node("sw", "network"),
        Node("pve1", "hypervisor", parents=("sw",), has_bmc=True),
        Node("pve2", "hypervisor", parents=("sw",), has_bmc=True),
        Node("nas", "storage", parents=("sw",)),
        Node("dc1", "vm", parents=("pve1",), storage=("nas",)),
        Node("mail1", "vm", parents=("pve1",), storage=("nas",)),
        Node("erp1", "vm", parents=("pve2", "dc1"), storage=("nas",)),
        Node("files1", "vm", parents=("pve2",), storage=("nas",)),
        Node("web", "service", parents=("erp1",)),
    ],
)


def paths(state: PathState, n: int = 2, name: str = "t") -> list[PathView]:
    return [PathView(f"p{i}", "icmp", f"icmp {name}-{i}", state, "no echo reply") for i in range(n)]


def run(down: Iterable[str] = (), bmc: dict[str, BmcFacts] | None = None, vantage: PathState = UP,
        degraded: Iterable[str] = ()):  # fmt: skip
    view = {}
    for name in SITE.nodes:
        if name in down:
            view[name] = paths(DOWN, name=name)
        elif name in degraded:
            view[name] = [*paths(DOWN, 1, name=name), PathView("ok", "tcp", f"tcp {name}", UP)]
        else:
            view[name] = paths(UP, name=name)
    return correlate(SITE, view, bmc or {}, [PathView("gw", "icmp", "icmp gw", vantage, "timeout")], now=0.0)


def only(verdicts: tuple[Verdict, ...]) -> Verdict:
    assert len(verdicts) == 1, verdicts
    return verdicts[0]


def test_all_up() -> None:
    c = run()
    assert c.verdicts == () and set(c.states.values()) == {TargetState.UP}


def test_network_takes_everything_behind_it() -> None:
    everything = list(SITE.nodes)
    c = run(down=everything)
    v = only(c.verdicts)
    assert (v.scope, v.root) == (Scope.NETWORK, "sw")
    assert set(v.affected) == set(everything) - {"sw"}
    assert c.states["sw"] is TargetState.DOWN
    assert all(c.states[n] is TargetState.UNREACHABLE for n in everything if n != "sw")


def test_hypervisor_with_its_vms_is_one_verdict() -> None:
    c = run(down=["pve1", "dc1", "mail1"], bmc={"pve1": BmcFacts(True, power_on=False)})
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.HYPERVISOR, "pve1", Cause.POWER_OFF)
    assert set(v.affected) == {"dc1", "mail1"}
    assert "BMC: chassis off" in v.evidence and "p0: no echo reply" in v.evidence
    assert c.states["dc1"] is TargetState.UNREACHABLE


@pytest.mark.parametrize(
    ("facts", "cause"),
    [
        (None, None),
        (BmcFacts(False), Cause.BMC_UNREACHABLE),
        (BmcFacts(True, power_on=False), Cause.POWER_OFF),
        (BmcFacts(True, power_on=True), Cause.OS_UNRESPONSIVE),
        (BmcFacts(True, power_on=True, critical_events=("PSU 1 failure",)), Cause.HARDWARE_FAULT),
        (BmcFacts(True, power_on=False, critical_events=("PSU 1 AC lost",)), Cause.HARDWARE_FAULT),
        (BmcFacts(True), None),
    ],
)
def test_hypervisor_cause_from_bmc(facts: BmcFacts | None, cause: Cause | None) -> None:
    c = run(down=["pve2"], bmc={"pve2": facts} if facts else {})
    assert only(c.verdicts).cause is cause


def test_dependent_of_a_dependent_goes_to_the_top_most_root() -> None:
    # pve1 down takes dc1; erp1 logs in through dc1 and is down too: all in pve1's incident
    c = run(down=["pve1", "dc1", "mail1", "erp1", "web"])
    v = only(c.verdicts)
    assert v.root == "pve1" and set(v.affected) == {"dc1", "mail1", "erp1", "web"}


def test_storage_takes_the_vms_whose_disks_fail() -> None:
    c = run(down=["nas", "dc1", "files1"])
    v = only(c.verdicts)
    assert (v.scope, v.root) == (Scope.STORAGE, "nas")
    assert set(v.affected) == {"dc1", "files1"}
    # disks failed, not the network: they are down, not unreachable
    assert c.states["dc1"] is TargetState.DOWN and c.states["files1"] is TargetState.DOWN


def test_storage_down_alone_affects_nobody_still_up() -> None:
    v = only(run(down=["nas"]).verdicts)
    assert (v.scope, v.root, v.affected) == (Scope.STORAGE, "nas", ())


def test_single_vm_and_service() -> None:
    v = only(run(down=["files1"]).verdicts)
    assert (v.scope, v.root, v.affected, v.cause) == (Scope.VM, "files1", (), None)
    v = only(run(down=["web"]).verdicts)
    assert (v.scope, v.root) == (Scope.SERVICE, "web")


def test_two_independent_outages_are_two_verdicts() -> None:
    c = run(down=["mail1", "pve2", "erp1", "files1", "web"])
    roots = {v.root: v for v in c.verdicts}
    assert set(roots) == {"mail1", "pve2"}
    assert set(roots["pve2"].affected) == {"erp1", "files1", "web"}


def test_child_of_a_recovered_dependency_is_its_own_root() -> None:
    # pve1 is back, dc1 stays down: dc1 is now an incident of its own, never dropped
    v = only(run(down=["dc1"]).verdicts)
    assert (v.scope, v.root) == (Scope.VM, "dc1")


def test_degraded_is_no_verdict() -> None:
    c = run(degraded=["pve1"])
    assert c.verdicts == () and c.states["pve1"] is TargetState.DEGRADED


def test_vantage_down_is_monitor_only() -> None:
    c = run(down=list(SITE.nodes), vantage=DOWN)
    v = only(c.verdicts)
    assert (v.scope, v.root) == (Scope.MONITOR, "acme")
    assert set(c.states.values()) == {TargetState.UNKNOWN}
    assert not c.vantage_up


@pytest.mark.parametrize(
    ("states", "confirm", "expected"),
    [
        ((UP, UP, UP), 2, TargetState.UP),
        ((DOWN, UP, UP), 2, TargetState.DEGRADED),
        ((DOWN, DOWN, UP), 2, TargetState.DOWN),
        ((DOWN, DOWN, UP), 3, TargetState.DEGRADED),
        ((DOWN,), 2, TargetState.DOWN),
        ((UNK, UNK), 2, TargetState.UNKNOWN),
        ((DOWN, UNK), 2, TargetState.UNKNOWN),  # down, nothing answering: not "partly back"
    ],
)
def test_own_state(states: tuple[PathState, ...], confirm: int, expected: TargetState) -> None:
    view = [PathView(f"p{i}", "icmp", f"w{i}", s) for i, s in enumerate(states)]
    assert own_state(view, confirm) is expected


def test_same_witness_counts_once() -> None:
    view = [
        PathView("a", "http", "http x", DOWN),
        PathView("b", "http", "http x", DOWN),
        PathView("c", "icmp", "i", UP),
    ]
    assert own_state(view, 2) is TargetState.DEGRADED


# --------------------------------------------------------------------------- properties

ROLES = ["network", "hypervisor", "storage", "vm", "service"]


@st.composite
def sites(draw: st.DrawFn) -> tuple[Topology, set[str], bool]:
    n = draw(st.integers(1, 14))
    nodes: list[Node] = []
    for i in range(n):
        role = draw(st.sampled_from(ROLES))
        earlier = [f"t{j}" for j in range(i)]
        hypervisors = [e for e, r in zip(earlier, [x.role for x in nodes], strict=True) if r == "hypervisor"]
        storages = [e for e, r in zip(earlier, [x.role for x in nodes], strict=True) if r == "storage"]
        runs_on = draw(st.sampled_from([None, *hypervisors])) if role == "vm" and hypervisors else None
        depends = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if earlier else []
        storage = draw(st.lists(st.sampled_from(storages), max_size=1)) if storages and role == "vm" else []
        parents = tuple(dict.fromkeys([*([runs_on] if runs_on else []), *depends]))
        nodes.append(
            Node(f"t{i}", role, parents=parents, storage=tuple(storage), has_bmc=role == "hypervisor")
        )
    down = draw(st.sets(st.sampled_from([x.name for x in nodes])))
    vantage_up = draw(st.booleans())
    return Topology.build("site", nodes), down, vantage_up


def correlate_site(topo: Topology, down: set[str], vantage_up: bool):
    view = {n: paths(DOWN if n in down else UP, name=n) for n in topo.nodes}
    vantage = [PathView("gw", "icmp", "gw", UP if vantage_up else DOWN)]
    return correlate(topo, view, {}, vantage, 0.0)


@settings(max_examples=200, deadline=None)
@given(sites())
def test_dependents_are_the_reverse_of_upstream(site: tuple[Topology, set[str], bool]) -> None:
    topo = site[0]
    for name in topo.nodes:
        expected = [other for other in topo.nodes if name in topo.upstream(other)]
        assert list(topo.dependents(name)) == expected  # same members, config order


@settings(max_examples=400, deadline=None)
@given(sites())
def test_every_failed_target_is_in_exactly_one_verdict(site: tuple[Topology, set[str], bool]) -> None:
    topo, down, vantage_up = site
    c = correlate_site(topo, down, vantage_up)
    if not vantage_up:
        assert [v.scope for v in c.verdicts] == [Scope.MONITOR]
        return
    members = [m for v in c.verdicts for m in (v.root, *v.affected)]
    failed = [n for n, s in c.states.items() if s in (TargetState.DOWN, TargetState.UNREACHABLE)]
    assert sorted(members) == sorted(failed)  # each exactly once


@settings(max_examples=400, deadline=None)
@given(sites())
def test_no_root_has_a_down_ancestor_that_explains_it(site: tuple[Topology, set[str], bool]) -> None:
    topo, down, _ = site
    c = correlate_site(topo, down, True)
    for v in c.verdicts:
        node = topo.nodes[v.root]
        assert not any(p in down for p in (*node.parents, *node.storage)), (v, node)
        assert v.scope.value == node.role


@settings(max_examples=200, deadline=None)
@given(sites())
def test_a_single_vm_failure_never_yields_a_hypervisor_verdict(site: tuple[Topology, set[str], bool]) -> None:
    topo, _, _ = site
    for name, node in topo.nodes.items():
        if node.role == "vm":
            c = correlate_site(topo, {name}, True)
            assert [(v.scope, v.root) for v in c.verdicts] == [(Scope.VM, name)]


def test_a_critical_path_down_takes_the_target_down_alone() -> None:
    up = PathView("tcp 10.0.0.5:443", "tcp", "tcp 10.0.0.5:443", PathState.UP)
    icmp = PathView("icmp 10.0.0.5", "icmp", "icmp 10.0.0.5", PathState.UP)
    login = PathView("http https://erp1/login", "http", "http erp1", PathState.DOWN)
    assert own_state([up, icmp, login], 2) is TargetState.DEGRADED
    critical = PathView("http https://erp1/login", "http", "http erp1", PathState.DOWN, critical=True)
    assert own_state([up, icmp, critical], 2) is TargetState.DOWN
    assert own_state([up, icmp, replace(critical, state=PathState.UP)], 2) is TargetState.UP
