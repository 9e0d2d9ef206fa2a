"""correlate(): the rules as tables, and properties over random topologies and failures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchtower.engine.correlate import (
    SETTLE,
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
from watchtower.engine.topology import NetworkInfo, Node, Topology

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


def test_a_host_whose_bmc_says_chassis_off_behind_a_dead_switch_is_its_own_outage() -> None:
    """The switch is down and pve1 lost power meanwhile (its BMC, out of band, says so): when the
    switch comes back pve1 will not; it is paged as its own outage, with its VMs."""
    everything = list(SITE.nodes)
    c = run(down=everything, bmc={"pve1": BmcFacts(True, power_on=False)})
    by_root = {v.root: v for v in c.verdicts}
    assert set(by_root) == {"sw", "pve1"}
    assert (by_root["pve1"].scope, by_root["pve1"].cause) == (Scope.HYPERVISOR, Cause.POWER_OFF)
    assert set(by_root["pve1"].affected) == {"dc1", "mail1"}
    assert "pve1" not in by_root["sw"].affected and "pve2" in by_root["sw"].affected
    # Chassis on (hung or just unreachable): nothing proves it is not the switch's.
    c = run(down=everything, bmc={"pve1": BmcFacts(True, power_on=True)})
    assert only(c.verdicts).root == "sw"


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


# --------------------------------------------------------------------------- networks and partitions

NETS = (NetworkInfo("prod", ("sw",), "production"), NetworkInfo("mgmt", (), "management"))
PNODES = [
    Node("sw", "network"),
    Node("pve1", "hypervisor", parents=("sw",), has_bmc=True),
    Node("pve2", "hypervisor", parents=("sw",), has_bmc=True),
    Node("nas", "storage", parents=("sw",)),
    Node("dc1", "vm", parents=("pve1",), storage=("nas",)),
    Node("erp1", "vm", parents=("pve2",), storage=("nas",)),
]
PSITE = Topology.build("acme", PNODES, NETS)
INFERRED = Topology.build("acme", PNODES)  # no networks: configured; the prefixes say the same
# Each target's paths: (name, kind, network, address); the last octet is the host's.
HOSTS = {"sw": 2, "pve1": 11, "pve2": 12, "nas": 5, "dc1": 21, "erp1": 23}
PATHS = {
    "sw": [("prod", "icmp", "prod"), ("mgmt", "icmp", "mgmt")],
    "pve1": [("prod", "icmp", "prod"), ("mgmt", "icmp", "mgmt"), ("http", "http", "prod")],
    "pve2": [("prod", "icmp", "prod"), ("mgmt", "icmp", "mgmt"), ("http", "http", "prod")],
    "nas": [("prod", "icmp", "prod"), ("mgmt", "icmp", "mgmt"), ("iscsi", "tcp", "prod")],
    "dc1": [("icmp", "icmp", "prod"), ("ldap", "tcp", "prod")],
    "erp1": [("icmp", "icmp", "prod"), ("http", "http", "prod")],
}
PREFIX = {"prod": "10.0.1", "mgmt": "10.0.2"}
ON = BmcFacts(True, power_on=True)


def pview(dark: dict[str, set[str]], configured: bool = True) -> dict[str, list[PathView]]:
    """Every path up but those of a target on a network listed for it in ``dark``."""
    out: dict[str, list[PathView]] = {}
    for target, specs in PATHS.items():
        out[target] = []
        for name, kind, net in specs:
            address = f"{PREFIX[net]}.{HOSTS[target]}"
            state = DOWN if net in dark.get(target, set()) else UP
            out[target].append(
                PathView(name, kind, f"{kind} {address}", state, "no answer" if state is DOWN else "",
                         since=5.0 if state is DOWN else None, network=net if configured else None,
                         address=address)
            )  # fmt: skip
    return out


def prc(dark: dict[str, set[str]], bmc: dict[str, BmcFacts] | None = None, configured: bool = True):
    topo = PSITE if configured else INFERRED
    return correlate(topo, pview(dark, configured), bmc or {}, [], now=10.0)


EVERYTHING_PROD = {t: {"prod"} for t in PATHS}


@pytest.mark.parametrize("configured", [True, False])
def test_production_dark_management_alive_is_one_network_verdict(configured: bool) -> None:
    c = prc(EVERYTHING_PROD, {"pve1": ON, "pve2": ON}, configured)
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.NETWORK, "sw", Cause.PARTITION)
    assert v.affected == ("pve1", "pve2", "nas", "dc1", "erp1")
    assert v.since == 5.0
    if configured:
        assert v.evidence[0] == (
            "production network via sw: 5 hosts unreachable on it, 3 alive on management (pve1, pve2, nas)"
        )
    else:
        assert v.evidence[0] == (
            "network 10.0.1.0/24 via sw: 5 hosts unreachable on it, 3 alive on 10.0.2.0/24 (pve1, pve2, "
            "nas) (inferred from addresses)"
        )
        assert "networks: {NAME: {cidr: [10.0.1.0/24], via: [sw]}}" in v.evidence[1]
    assert "pve1: no answer on prod, http; answers on " in " ".join(v.evidence)
    assert c.states["sw"] is TargetState.DEGRADED  # its management address answers
    assert {c.states[t] for t in v.affected} == {TargetState.UNREACHABLE}
    assert not any(x.cause is Cause.OS_UNRESPONSIVE for x in c.verdicts)


def test_switch_dead_on_every_network_is_its_own_cause_not_a_partition() -> None:
    dark = {**EVERYTHING_PROD, "sw": {"prod", "mgmt"}}
    v = only(prc(dark).verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.NETWORK, "sw", None)
    assert v.evidence[0].startswith("production network via sw: 5 hosts unreachable on it")


@pytest.mark.parametrize(
    ("configured", "link"), [(True, "production link down"), (False, "10.0.1.0/24 link down")]
)
def test_production_nic_of_one_hypervisor(configured: bool, link: str) -> None:
    c = prc({"pve1": {"prod"}, "dc1": {"prod"}}, {"pve1": ON}, configured)
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause, v.affected) == (Scope.HYPERVISOR, "pve1", Cause.LINK_DOWN, ("dc1",))
    assert v.evidence[0].startswith(f"{link}: pve1 silent on it (prod, http), its OS answers on ")
    assert "BMC: chassis on" in v.evidence
    assert c.states["pve1"] is TargetState.DEGRADED  # alive: not down
    assert c.states["dc1"] is TargetState.UNREACHABLE


def test_real_os_hang_stays_os_unresponsive() -> None:
    c = prc({"pve1": {"prod", "mgmt"}, "dc1": {"prod"}}, {"pve1": ON})
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause, v.affected) == (
        Scope.HYPERVISOR, "pve1", Cause.OS_UNRESPONSIVE, ("dc1",)
    )  # fmt: skip
    assert c.states["pve1"] is TargetState.DOWN


@pytest.mark.parametrize(
    ("facts", "cause", "note"),
    [
        (
            BmcFacts(True, power_on=False),
            None,
            "contradictory: BMC says chassis off, but mgmt answers: no cause",
        ),
        (BmcFacts(False), Cause.LINK_DOWN, None),  # the BMC being away says nothing against the link
        (None, Cause.LINK_DOWN, None),
        (BmcFacts(True, True, ("PS1 failure",)), Cause.LINK_DOWN, None),
    ],
)
def test_link_down_cause_against_the_bmc(
    facts: BmcFacts | None, cause: Cause | None, note: str | None
) -> None:
    v = only(prc({"pve1": {"prod"}, "dc1": {"prod"}}, {"pve1": facts} if facts else {}).verdicts)
    assert v.cause is cause
    assert (note in v.evidence) if note else not any(e.startswith("contradictory") for e in v.evidence)


def test_service_down_on_an_answering_host_is_never_os_unresponsive() -> None:
    # pve1 answers ping on prod and mgmt, its web UI and ssh do not: its services, not its link.
    view = pview({})
    view["pve1"][2] = PathView(
        "http", "http", "http 10.0.1.11", DOWN, "503", network="prod", address="10.0.1.11"
    )
    view["pve1"].append(
        PathView("ssh", "tcp", "tcp 10.0.1.11:22", DOWN, "refused", network="prod", address="10.0.1.11")
    )
    c = correlate(PSITE, view, {"pve1": ON}, [], 0.0)
    v = only(c.verdicts)  # two witnesses down on prod, its prod ping answers: not a link, not hung
    assert (v.root, v.cause) == ("pve1", None)
    assert "not hung: BMC says chassis on and prod, mgmt answers" in v.evidence


def test_partition_and_a_dead_hypervisor_at_once_are_two_verdicts() -> None:
    dark = {**EVERYTHING_PROD, "pve2": {"prod", "mgmt"}}
    c = prc(dark, {"pve2": BmcFacts(True, power_on=False)})
    got = {(v.scope, v.root, v.cause) for v in c.verdicts}
    assert got == {(Scope.NETWORK, "sw", Cause.PARTITION), (Scope.HYPERVISOR, "pve2", Cause.POWER_OFF)}


def test_management_network_down_alone_is_one_network_verdict() -> None:
    c = prc({t: {"mgmt"} for t in ("sw", "pve1", "pve2", "nas")})
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.NETWORK, "mgmt", Cause.PARTITION)
    assert v.evidence[0] == "management network: 4 hosts unreachable on it, all alive on production"
    assert c.states["pve1"] is TargetState.DEGRADED


def test_one_network_with_a_host_still_answering_is_not_down() -> None:
    dark = {t: {"prod"} for t in PATHS if t != "nas"}
    c = prc(dark)
    assert all(v.cause is not Cause.PARTITION for v in c.verdicts)


# Properties over random per-path failures and BMC readings on the partition site.
path_keys = [(t, i) for t, specs in PATHS.items() for i in range(len(specs))]
facts_st = st.one_of(
    st.none(),
    st.builds(BmcFacts, st.booleans(), st.sampled_from([None, True, False]), st.sampled_from([(), ("PSU",)])),
)


@settings(max_examples=400, deadline=None)
@given(
    st.sets(st.sampled_from(path_keys)),
    st.fixed_dictionaries({"pve1": facts_st, "pve2": facts_st}),
    st.booleans(),
)
def test_properties_of_path_level_correlation(
    down: set[tuple[str, int]], facts: dict[str, BmcFacts | None], configured: bool
) -> None:
    view = pview({}, configured)
    for t, i in down:
        view[t][i] = replace(view[t][i], state=DOWN)
    bmc = {k: f for k, f in facts.items() if f is not None}
    c = correlate(PSITE if configured else INFERRED, view, bmc, [], 1000.0)  # nothing settling
    own_down = {t for t, s in c.own.items() if s is TargetState.DOWN}
    members = [m for v in c.verdicts for m in (v.root, *v.affected)]
    assert len(members) == len(set(members))  # nobody in two verdicts
    assert own_down <= set(members)  # every down target is explained by one
    for v in c.verdicts:
        up_os = [p for p in view.get(v.root, []) if p.state is UP and not p.by_bmc]
        if up_os:  # answers on a path its OS serves: never hung, never off
            assert v.cause not in (Cause.OS_UNRESPONSIVE, Cause.POWER_OFF), v
        if v.cause is Cause.PARTITION:
            assert v.scope is Scope.NETWORK and " unreachable on it, " in v.evidence[0]
    for t in PATHS:
        nets_up = {p.network or p.address for p in view[t] if p.state is UP}
        nets_down = {p.network or p.address for p in view[t] if p.state is DOWN}
        if configured and nets_up - nets_down and t != "sw":
            assert c.states[t] is not TargetState.DOWN, (t, c)


def test_one_host_dark_on_a_moving_network_waits_for_it_to_settle() -> None:
    # pve1 is confirmed dark on prod first; pve2's prod ping has failed once (not down yet): this
    # may be the switch going, not pve1's link. Bounded: SETTLE after that first failure, it is.
    view = pview({"pve1": {"prod"}, "dc1": {"prod"}})
    view["pve2"][0] = replace(view["pve2"][0], since=100.0)  # failing, still up
    c = correlate(PSITE, view, {}, [], now=101.0)
    assert c.verdicts == ()
    assert c.states["pve1"] is TargetState.DEGRADED and c.states["dc1"] is TargetState.UNREACHABLE
    later = correlate(PSITE, view, {}, [], now=100.0 + SETTLE)
    assert [(v.root, v.cause) for v in later.verdicts] == [("pve1", Cause.LINK_DOWN)]
    # a neighbour's path that changed state recently counts the same (a network coming back)
    view["pve2"][0] = replace(view["pve2"][0], since=None, changed_at=100.0)
    assert correlate(PSITE, view, {}, [], now=105.0).verdicts == ()
    # the management network moving says nothing about the production link
    view["pve2"][0] = replace(view["pve2"][0], changed_at=None)
    view["pve2"][1] = replace(view["pve2"][1], changed_at=100.0)
    assert [v.root for v in correlate(PSITE, view, {}, [], now=105.0).verdicts] == ["pve1"]


def test_a_vm_waits_while_its_hypervisor_goes_dark_on_its_network() -> None:
    # dc1 confirmed dark on prod; pve1's prod ping went down 2 s ago, its web UI not yet: pve1 is
    # not down, but it may be its link. No page for dc1 before that is settled (bounded).
    view = pview({"pve1": {"prod"}, "dc1": {"prod"}})
    view["pve1"][2] = replace(view["pve1"][2], state=UP, since=None)  # http: still answering
    view["pve1"][0] = replace(view["pve1"][0], since=100.0)
    assert correlate(PSITE, view, {}, [], now=102.0).verdicts == ()
    late = correlate(PSITE, view, {}, [], now=100.0 + SETTLE)
    assert [(v.scope, v.root) for v in late.verdicts] == [(Scope.VM, "dc1")]
    # a parent failing on another network explains nothing
    view["pve1"][0] = replace(view["pve1"][0], state=UP, since=None)
    view["pve1"][1] = replace(view["pve1"][1], state=DOWN, since=100.0)
    assert [v.root for v in correlate(PSITE, view, {}, [], now=102.0).verdicts] == ["dc1"]


def test_vms_dark_behind_their_hypervisors_dead_production_link_are_its_incident() -> None:
    """A hypervisor whose production NIC died (management answers: degraded, not down) and the VMs
    behind it, dark on production only: one verdict, the hypervisor's link, the VMs affected, not a
    page per VM (found by the simulator: 10 VM pages for one NIC on the MSP topology)."""
    view = pview({"pve1": {"prod"}, "dc1": {"prod"}})
    # only a ping per network (no web UI path): one witness of two down, so pve1 is degraded
    view["pve1"] = [
        replace(p, since=100.0) if p.state is DOWN else p for p in view["pve1"] if p.kind != "http"
    ]
    view["dc1"] = [replace(p, since=100.0) for p in view["dc1"]]
    corr = correlate(PSITE, view, {}, [], now=100.0 + SETTLE + 1)
    assert corr.own["pve1"] is TargetState.DEGRADED
    assert [(v.root, v.cause) for v in corr.verdicts] == [("pve1", Cause.LINK_DOWN)]
    assert "dc1" in corr.verdicts[0].affected


def _lossy_site(now: float, nas_last_ok: float, switch_lost_at: float | None, bmc: BmcFacts | None = None,
                failures: int = 6):  # fmt: skip
    """nas down since t=100 (it last answered at ``nas_last_ok``, ``failures`` lost in a row on
    each path); the switch up, its last lost probe at ``switch_lost_at``."""
    view = {name: paths(UP, name=name) for name in SITE.nodes}
    view["nas"] = [
        replace(p, since=100.0, last_ok=nas_last_ok, last_failure=now, failures=failures)
        for p in paths(DOWN, name="nas")
    ]
    view["sw"] = [replace(p, last_ok=now, last_failure=switch_lost_at) for p in paths(UP, name="sw")]
    facts = {"nas": bmc} if bmc is not None else {}
    return correlate(SITE, view, facts, [PathView("gw", "icmp", "icmp gw", UP)], now=now)


def test_a_target_failing_while_its_switch_loses_packets_is_that_loss_not_its_own_outage() -> None:
    # The switch lost a probe while the NAS failed, and the NAS answered a moment ago: the loss
    # shows through the NAS, no page for it (the sequence: a switch at 60 % loss for 7 s).
    c = _lossy_site(now=105.0, nas_last_ok=103.0, switch_lost_at=104.0)
    assert c.verdicts == () and c.states["nas"] is TargetState.DOWN
    # a switch that lost nothing since the NAS began failing explains nothing
    assert only(_lossy_site(now=105.0, nas_last_ok=103.0, switch_lost_at=60.0).verdicts).root == "nas"
    # dark on every path for LOSSY_DARK behind a lossy switch: dead behind it
    assert only(_lossy_site(now=140.0, nas_last_ok=100.0, switch_lost_at=139.0).verdicts).root == "nas"
    # ... having lost enough probes in a row: two each (a path probed twice a minute) may be the
    # loss (msp200 seed 23 paged a service with one http path behind a switch at 60 % loss)
    assert _lossy_site(now=140.0, nas_last_ok=100.0, switch_lost_at=139.0, failures=2).verdicts == ()
    # the BMC proves its own outage: at once
    off = BmcFacts(reachable=True, power_on=False)
    v = only(_lossy_site(now=105.0, nas_last_ok=103.0, switch_lost_at=104.0, bmc=off).verdicts)
    assert (v.root, v.cause) == ("nas", None)  # no has_bmc on the demo NAS node: no cause read


def test_the_last_failures_of_a_switch_back_from_an_outage_are_no_loss() -> None:
    """The switch was down (an incident) and is back since t=95; the NAS hung at t=100. The
    switch's failures up to 94 were its outage, over now, not loss the NAS shows (demo seed 2150:
    a hypervisor hung 7 s after its switch came back waited 30 s and was never paged)."""
    view = {name: paths(UP, name=name) for name in SITE.nodes}
    view["nas"] = [replace(p, since=100.0, last_ok=99.0, last_failure=103.0) for p in paths(DOWN, name="nas")]
    gw = [PathView("gw", "icmp", "icmp gw", UP)]
    back = [replace(p, last_ok=103.0, last_failure=94.0, changed_at=95.0) for p in paths(UP, name="sw")]
    view["sw"] = back
    assert only(correlate(SITE, view, {}, gw, now=104.0).verdicts).root == "nas"
    # a failure after it came back is loss again
    view["sw"] = [replace(back[0], last_failure=101.0), back[1]]
    assert correlate(SITE, view, {}, gw, now=104.0).verdicts == ()


def test_a_switch_silent_while_what_it_carries_answers_through_it_forwards() -> None:
    """The switch stopped answering pings at t=100 (its management plane drops ICMP); everything
    behind it answers steadily since: it forwards, no "network down" page (demo seed 2865). The
    same silence with nothing behind it heard from since is an outage."""
    gw = [PathView("gw", "icmp", "icmp gw", UP)]
    view = {name: [replace(p, last_ok=104.0) for p in paths(UP, name=name)] for name in SITE.nodes}
    view["sw"] = [replace(p, since=100.0, last_failure=104.0) for p in paths(DOWN, name="sw")]
    c = correlate(SITE, view, {}, gw, now=105.0)
    assert c.verdicts == () and c.states["sw"] is TargetState.DEGRADED
    # nothing behind it answered since it fell silent: not known to forward
    stale = {name: [replace(p, last_ok=99.0) for p in views] for name, views in view.items() if name != "sw"}
    assert only(correlate(SITE, {**view, **stale}, {}, gw, now=105.0).verdicts).root == "sw"
    # what it carries losing probes since: a lossy switch, not one that forwards
    lossy = {
        name: [replace(p, last_failure=103.0) for p in views] for name, views in view.items() if name != "sw"
    }
    assert only(correlate(SITE, {**view, **lossy}, {}, gw, now=105.0).verdicts).root == "sw"


def test_a_switch_that_answers_while_nothing_behind_it_does_is_not_forwarding() -> None:
    """The monitor was blind while the switch went down; seen again, the switch answers on
    production but nothing behind it does, two hosts alive on management: one network verdict
    named after the switch (not forwarding, no cause), not the NAS dark behind it (demo seed 3778)."""
    view = pview({t: {"prod"} for t in ("pve1", "pve2", "nas", "dc1", "erp1")})
    c = correlate(PSITE, view, {}, [PathView("gw", "icmp", "icmp gw", UP)], now=100.0)
    v = only(c.verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.NETWORK, "sw", None)
    assert any("not forwarding" in e for e in v.evidence) and "nas" in v.affected
    # the same inferred from the addresses (no `networks:`)
    view = pview({t: {"prod"} for t in ("pve1", "pve2", "nas", "dc1", "erp1")}, configured=False)
    v = only(correlate(INFERRED, view, {}, [PathView("gw", "icmp", "icmp gw", UP)], now=100.0).verdicts)
    assert (v.scope, v.root, v.cause) == (Scope.NETWORK, "sw", None)
    # one host behind it answering on production: the switch forwards, no network verdict
    view = pview({t: {"prod"} for t in ("pve1", "nas", "dc1", "erp1")})
    c = correlate(PSITE, view, {}, [PathView("gw", "icmp", "icmp gw", UP)], now=100.0)
    assert all(v.scope is not Scope.NETWORK for v in c.verdicts)


def test_vms_dark_behind_a_hypervisor_whose_switch_is_down_are_the_switchs() -> None:
    """pve1 is dark on production (alive on management) and its VM with it, while the switch that
    carries pve1 is down itself: pve1's link is not what failed (msp200 seeds 50, 120, 162, 212,
    456, 464 paged "hypervisor link_down" as the switch came back)."""
    # pve1 needs all three witnesses down to be down: dark on production only, it is degraded
    site = Topology.build("acme", [replace(n, confirm_paths=3) if n.name == "pve1" else n for n in PNODES])
    gw = [PathView("gw", "icmp", "icmp gw", UP)]
    view = pview({"sw": {"prod", "mgmt"}, "pve1": {"prod"}, "dc1": {"prod"}}, configured=False)
    c = correlate(site, view, {}, gw, now=100.0)
    assert c.own["pve1"] is TargetState.DEGRADED
    assert [v.root for v in c.verdicts] == ["sw"] and "dc1" in c.verdicts[0].affected
    # the switch up: pve1's production link it is
    view = pview({"pve1": {"prod"}, "dc1": {"prod"}}, configured=False)
    assert [v.root for v in correlate(site, view, {}, gw, now=100.0).verdicts] == ["pve1"]


def test_a_target_answering_again_on_every_path_it_was_down_on_gets_no_verdict() -> None:
    # Down on both paths, both answered on their last probe (recover_after not met yet): it is
    # coming back; a page now would arrive after it answers (a 30 % loss let it through again).
    view = {name: paths(UP, name=name) for name in SITE.nodes}
    back = [replace(p, last_ok=12.0, last_failure=11.0) for p in paths(DOWN, name="nas")]
    view["nas"] = back
    gw = [PathView("gw", "icmp", "icmp gw", UP)]
    c = correlate(SITE, view, {}, gw, now=12.5)
    assert c.verdicts == () and c.states["nas"] is TargetState.DOWN
    view["nas"] = [back[0], replace(back[1], last_failure=12.2)]  # one of them failed again
    assert only(correlate(SITE, view, {}, gw, now=12.5).verdicts).root == "nas"


def test_one_host_alive_elsewhere_beside_others_dead_everywhere_is_no_network_outage() -> None:
    # The sequence (simulator, demo seed 93): pve2 hung (dark everywhere), pve1 just powered back
    # on, its web UI up, its mgmt NIC not yet: the management network looks all dark with one
    # host alive elsewhere. That is not the network: pve2 is its own outage, pve1's mgmt link is
    # its own (a link_down verdict once the network stops moving).
    view = pview({"pve1": {"mgmt"}, "pve2": {"prod", "mgmt"}})
    for only_prod in ("sw", "nas"):  # only the hypervisors on the management network
        view[only_prod] = [p for p in view[only_prod] if p.network != "mgmt"]
    c = correlate(PSITE, view, {"pve2": ON}, [], now=10.0)
    assert all(v.scope is not Scope.NETWORK for v in c.verdicts), c.verdicts
    assert {(v.root, v.cause) for v in c.verdicts} >= {("pve2", Cause.OS_UNRESPONSIVE)}


def test_a_network_outage_begins_when_the_hosts_that_prove_it_went_dark() -> None:
    # nas hung at t=1 (dark everywhere), the production network died at t=5: the network's
    # outage began at 5. Dated from the hung host, it would swallow the NAS's own older incident
    # (simulator, demo seed 136: the VM's incident merged into the switch's, no all-clear for it).
    view = pview({**EVERYTHING_PROD, "nas": {"prod", "mgmt"}})
    view["nas"] = [replace(p, since=1.0) for p in view["nas"]]
    v = next(v for v in correlate(PSITE, view, {}, [], now=10.0).verdicts if v.scope is Scope.NETWORK)
    assert (v.root, v.since) == ("sw", 5.0)


def test_loss_on_the_device_of_a_network_explains_a_host_on_two_networks() -> None:
    # A host on production and management has no single parent switch; its production path's
    # network is carried by sw, which is losing probes: the NAS's failures there are that loss
    # (simulator, partition seed 144: the NAS paged while the core switch ran at 60 % loss).
    topo = Topology.build(
        "acme", [Node("sw", "network"), Node("nas", "storage"), Node("pve1", "hypervisor")], NETS
    )
    view = {t: ps for t, ps in pview({"nas": {"prod"}}).items() if t in topo.nodes}
    view["nas"] = [replace(p, last_ok=9.0, last_failure=10.0) if p.state is DOWN else p for p in view["nas"]]
    view["nas"].append(replace(view["nas"][0], name="iscsi", kind="tcp", witness="tcp nas"))
    lossy = [replace(p, last_failure=9.5) for p in view["sw"]]
    assert correlate(topo, {**view, "sw": lossy}, {}, [], now=10.0).verdicts == ()
    assert only(correlate(topo, view, {}, [], now=10.0).verdicts).root == "nas"


def test_a_network_outage_is_dated_as_most_of_its_witnesses_saw_it() -> None:
    # nas off since t=1, back on (management answers) while production died at 5: the NAS is a
    # witness of the production outage, but its darkness there began with its own outage
    # (simulator, partition seed 151: the NAS's incident was folded into the switch's).
    view = pview(EVERYTHING_PROD)
    view["nas"] = [replace(p, since=1.0) if p.state is DOWN else p for p in view["nas"]]
    v = next(v for v in correlate(PSITE, view, {}, [], now=10.0).verdicts if v.scope is Scope.NETWORK)
    assert (v.root, v.since) == ("sw", 5.0)


def test_a_host_dark_on_the_network_of_a_dead_switch_is_the_switchs_even_as_it_answers_once() -> None:
    # (simulator, partition seed 250) the switch hung: production dark, a network outage. Its
    # first answer (recover_after not met: it is still down) ends that outage; the hypervisors,
    # on two networks and so without a parent switch, must not become link_down pages of their own.
    topo = Topology.build(
        "acme", [Node("sw", "network"), Node("pve1", "hypervisor"), Node("pve2", "hypervisor")], NETS
    )
    dark = {"sw": {"prod", "mgmt"}, "pve1": {"prod"}, "pve2": {"prod"}}
    view = {t: ps for t, ps in pview(dark).items() if t in topo.nodes}
    # the switch answered once (both paths), and so did pve1 on production: pve2 is the last
    # one dark there, one host is no network outage
    view["sw"] = [replace(p, since=None) for p in view["sw"]]
    view["pve1"] = [replace(p, since=None) if p.network == "prod" else p for p in view["pve1"]]
    c = correlate(topo, view, {}, [], now=10.0)
    assert [v.root for v in c.verdicts] == ["sw"] and "pve2" in c.verdicts[0].affected
    assert c.states["pve2"] is TargetState.UNREACHABLE


def test_pings_lost_everywhere_while_a_service_answers_is_a_firewall_not_an_outage() -> None:
    # (simulator, partition seed 202) the NAS drops ICMP on production and management (two
    # witnesses down), its iSCSI port answers: up, degraded; no page.
    view = pview({"nas": {"prod", "mgmt"}})
    view["nas"] = [replace(p, state=UP, last_ok=9.0) if p.kind == "tcp" else p for p in view["nas"]]
    c = correlate(PSITE, view, {}, [], now=10.0)
    assert c.verdicts == () and c.states["nas"] is TargetState.DEGRADED
    # a service "up" only from before the pings failed (its probe in flight) says nothing
    stale = [replace(p, last_ok=4.0) if p.kind == "tcp" else p for p in view["nas"]]
    assert only(correlate(PSITE, {**view, "nas": stale}, {}, [], now=10.0).verdicts).root == "nas"
    # a critical ping still takes it down
    view["nas"][0] = replace(view["nas"][0], critical=True)
    assert only(correlate(PSITE, view, {}, [], now=10.0).verdicts).root == "nas"


def test_a_host_losing_probes_on_every_network_has_no_link_down() -> None:
    # (simulator, partition seed 560) the NAS at 60 % loss: production happened to fail twice
    # in a row while management answered its last probe. Management lost one a moment before:
    # a host losing packets everywhere, no link of its own proven.
    view = pview({"nas": {"prod"}})
    lossy = [replace(p, last_failure=3.0) if p.network == "mgmt" else p for p in view["nas"]]
    v = only(correlate(PSITE, {**view, "nas": lossy}, {}, [], now=10.0).verdicts)
    assert (v.root, v.cause) == ("nas", None) and v.evidence[0].startswith("losing probes on every network")
    # steady on management since long before: its production link
    steady = [replace(p, last_failure=-60.0) if p.network == "mgmt" else p for p in view["nas"]]
    c = correlate(PSITE, {**view, "nas": steady}, {}, [], now=30.0)
    assert [(v.root, v.cause) for v in c.verdicts] == [("nas", Cause.LINK_DOWN)]


def test_a_dead_hypervisors_own_vms_failing_are_no_sign_of_a_lossy_switch() -> None:
    # pve1 died at 100: its VMs lose probes too (not yet down). They fail because of pve1, so they
    # are no neighbours showing a loss on the switch: the page goes out now, not after LOSSY_DARK
    # (bench_detect: 3.5 s to the page became 7.6 s).
    view = {name: paths(UP, name=name) for name in SITE.nodes}
    view["pve1"] = [
        replace(p, since=100.0, last_ok=99.0, last_failure=102.0) for p in paths(DOWN, name="pve1")
    ]
    for vm in ("dc1", "mail1"):
        view[vm] = [replace(p, last_failure=101.5) for p in paths(UP, name=vm)]
    v = only(correlate(SITE, view, {}, [PathView("gw", "icmp", "icmp gw", UP)], now=102.5).verdicts)
    assert v.root == "pve1"
