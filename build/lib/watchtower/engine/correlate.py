"""Pure correlation: path states + topology + BMC facts + vantage -> target states and verdicts.

No I/O, no clock: everything it needs comes in as arguments, so it is tested with tables and
with hypothesis over random topologies.

The rules, in the order an admin reasons:

- **own state** of a target from its paths: down when ``confirm_paths`` independent witnesses are
  down (all of them where it has fewer); paths of one kind to one address are one witness.
- **monitor**: when every vantage path is down, watchtower is blind. No target verdict at all
  (their states are ``unknown``), one ``monitor`` verdict rooted at the site.
- **unreachable**: a down target with a down parent (``runs_on``, ``depends_on``, transitively)
  cannot be judged on its own: it is ``unreachable`` and belongs to its top-most down
  ancestor's verdict (a VM behind a dead hypervisor behind a dead switch: the switch's).
- **storage**: a down target whose storage target is down belongs to the storage verdict (it is
  ``down``, not ``unreachable``: its disks, not its network, failed).
- every remaining down target is a **root**; the verdict's scope is the root's role
  (network, hypervisor, storage, vm, service) and its cause comes from the root's BMC.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from watchtower.engine.paths import PathState
from watchtower.engine.topology import Topology


class TargetState(enum.StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"


class Scope(enum.StrEnum):
    NETWORK = "network"
    HYPERVISOR = "hypervisor"
    STORAGE = "storage"
    VM = "vm"
    SERVICE = "service"
    MONITOR = "monitor"


class Cause(enum.StrEnum):
    POWER_OFF = "power_off"
    HARDWARE_FAULT = "hardware_fault"
    OS_UNRESPONSIVE = "os_unresponsive"
    BMC_UNREACHABLE = "bmc_unreachable"


@dataclass(frozen=True, slots=True)
class PathView:
    """What correlation needs of one path."""

    name: str
    kind: str
    witness: str  # paths with the same witness (kind + address) count as one
    state: PathState
    detail: str = ""
    since: float | None = None  # first failure of the current failing streak
    critical: bool = False  # `critical: true`: down alone takes the target down


@dataclass(frozen=True, slots=True)
class BmcFacts:
    """What the BMC said on its last read. ``None`` fields were not (yet) known."""

    reachable: bool
    power_on: bool | None = None
    critical_events: tuple[str, ...] = ()  # critical SEL entries since the last look, as text

    def summary(self) -> str:
        if not self.reachable:
            return "BMC: unreachable"
        parts = []
        if self.power_on is not None:
            parts.append("chassis on" if self.power_on else "chassis off")
        parts += [f"SEL: {e}" for e in self.critical_events[:3]]
        return "BMC: " + (", ".join(parts) or "no facts")


@dataclass(frozen=True, slots=True)
class Verdict:
    scope: Scope
    root: str
    cause: Cause | None = None
    affected: tuple[str, ...] = ()  # what the root takes down with it (root not included)
    evidence: tuple[str, ...] = ()
    since: float | None = None  # the root's first failed probe of this outage


@dataclass(frozen=True, slots=True)
class Correlation:
    states: Mapping[str, TargetState]
    verdicts: tuple[Verdict, ...]
    vantage_up: bool
    own: Mapping[str, TargetState] = field(default_factory=dict)  # before dependency rules


def own_state(paths: Sequence[PathView], confirm_paths: int) -> TargetState:
    """A target's state from its own paths only."""
    witnesses: dict[str, list[PathState]] = {}
    for p in paths:
        witnesses.setdefault(p.witness, []).append(p.state)
    if not witnesses:
        return TargetState.UNKNOWN
    down = sum(1 for states in witnesses.values() if all(s is PathState.DOWN for s in states))
    up = sum(1 for states in witnesses.values() if any(s is PathState.UP for s in states))
    if down >= min(confirm_paths, len(witnesses)) or any(
        p.critical and p.state is PathState.DOWN for p in paths
    ):
        return TargetState.DOWN
    if down and up:
        return TargetState.DEGRADED
    # Down on some paths with nothing answering (the rest not settled yet, e.g. re-probed after
    # what it depends on came back) is not "partly back": it is not known yet.
    return TargetState.UP if up else TargetState.UNKNOWN


def bmc_cause(facts: BmcFacts | None) -> Cause | None:
    """Why a host is down, in the BMC's words. A critical SEL entry outranks power state: a PSU
    failure that cut the power is a hardware fault (call the vendor), not someone's button."""
    if facts is None:
        return None
    if not facts.reachable:
        return Cause.BMC_UNREACHABLE
    if facts.critical_events:
        return Cause.HARDWARE_FAULT
    if facts.power_on is False:
        return Cause.POWER_OFF
    if facts.power_on is True:
        return Cause.OS_UNRESPONSIVE
    return None


def correlate(
    topology: Topology,
    paths: Mapping[str, Sequence[PathView]],
    bmc: Mapping[str, BmcFacts],
    vantage: Sequence[PathView],
    now: float,
) -> Correlation:
    """The site's target states and one verdict per independent outage. ``now`` is accepted so
    that time-dependent rules stay inside this pure function; none needs it yet."""
    del now
    own = {name: own_state(paths.get(name, ()), node.confirm_paths) for name, node in topology.nodes.items()}
    vantage_up = not vantage or any(p.state is not PathState.DOWN for p in vantage)
    if not vantage_up:
        blind = tuple(f"vantage {p.name}: {p.detail}" for p in vantage)
        return Correlation(
            states=dict.fromkeys(topology.nodes, TargetState.UNKNOWN),
            verdicts=(Verdict(Scope.MONITOR, topology.site, evidence=blind),),
            vantage_up=False,
            own=own,
        )

    failed = {name for name, state in own.items() if state is TargetState.DOWN}
    states: dict[str, TargetState] = dict(own)
    root_of: dict[str, str] = {}

    def find_root(name: str, trail: frozenset[str] = frozenset()) -> str:
        if name in root_of:
            return root_of[name]
        node = topology.nodes[name]
        root = name
        # Parents first (network path), then storage; cycles are config errors, the trail is a
        # belt-and-braces guard so a bad topology can never hang the daemon.
        for parent in (*node.parents, *node.storage):
            if parent in failed and parent not in trail:
                root = find_root(parent, trail | {name})
                break
        root_of[name] = root
        return root

    affected: dict[str, list[str]] = {}
    for name in topology.order:
        if name not in failed:
            continue
        root = find_root(name)
        if root == name:
            affected.setdefault(name, [])
            continue
        affected.setdefault(root, []).append(name)
        if any(p in failed for p in topology.nodes[name].parents):
            states[name] = TargetState.UNREACHABLE

    verdicts = []
    for root in topology.order:
        if root not in affected:
            continue
        node = topology.nodes[root]
        facts = bmc.get(root)
        down_paths = [p for p in paths.get(root, ()) if p.state is PathState.DOWN]
        evidence = [f"{p.name}: {p.detail}" for p in down_paths]
        if facts is not None:
            evidence.append(facts.summary())
        verdicts.append(
            Verdict(
                scope=Scope(node.role),
                root=root,
                cause=bmc_cause(facts) if node.has_bmc else None,
                affected=tuple(affected[root]),
                evidence=tuple(evidence),
                since=min((p.since for p in down_paths if p.since is not None), default=None),
            )
        )
    return Correlation(states=states, verdicts=tuple(verdicts), vantage_up=True, own=own)
