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
- **networks** (:func:`network_outages`): when every target on one network is dark there while
  some of them still answer on another, the network failed, not the hosts: one ``network``
  verdict named after the network and its device (``partition``), the hosts ``unreachable``.
  Networks come from ``networks:``; without it they are inferred from address prefixes (/24,
  /64) and the verdict says so.
- **alive elsewhere**: a down target whose own OS still answers on another network is not dead:
  its link to the silent network is (``link_down``, state ``degraded``), whatever the BMC says.
  A host that answers on any path its OS serves is never ``os_unresponsive``; a BMC that says the
  chassis is off while the OS answers contradicts itself, and gets no cause at all.
- every remaining down target is a **root**; the verdict's scope is the root's role
  (network, hypervisor, storage, vm, service) and its cause comes from the root's BMC.

Every cause comes with the evidence that makes it: the first evidence line of a ``partition`` or
``link_down`` verdict is the sentence an alert shows.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import statistics
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
    # Warnings, not outages (issue 16): raised and cleared by their source through
    # IncidentTracker.raise_warning/clear_warning, never by correlation; routed by notify.warnings.
    BACKUP = "backup"
    CERTIFICATE = "certificate"


WARNING_SCOPES = frozenset({Scope.BACKUP, Scope.CERTIFICATE})


class Cause(enum.StrEnum):
    POWER_OFF = "power_off"
    HARDWARE_FAULT = "hardware_fault"
    OS_UNRESPONSIVE = "os_unresponsive"
    BMC_UNREACHABLE = "bmc_unreachable"
    PARTITION = "partition"  # a network is dark while another still reaches its hosts
    LINK_DOWN = "link_down"  # one host is dark on a network, its OS answers on another


@dataclass(frozen=True, slots=True)
class PathView:
    """What correlation needs of one path."""

    name: str
    kind: str
    witness: str  # paths with the same witness (kind + address) count as one
    state: PathState
    detail: str = ""
    since: float | None = None  # first failure of the current failing streak
    network: str | None = None  # the configured network it crosses
    address: str = ""  # what it talks to: where a network is inferred from when none is configured
    by_bmc: bool = False  # answered by the target's BMC, not its own OS: no sign of the OS's life
    changed_at: float | None = None  # its last change of state
    last_ok: float | None = None  # its last success
    critical: bool = False  # `critical: true`: down alone takes the target down
    last_failure: float | None = None  # its last failed probe, whatever its state
    failures: int = 0  # failed probes in a row


# One host dark on a network waits this long after that network last moved (a path of another
# host on it failing, going down or coming back): a switch dying, or coming back, takes its
# hosts one probe at a time, and the first one confirmed is not a link of its own.
SETTLE = 10.0


@dataclass(frozen=True, slots=True)
class BmcFacts:
    """What the BMC said on its last read. ``None`` fields were not (yet) known."""

    reachable: bool
    power_on: bool | None = None
    critical_events: tuple[str, ...] = ()  # critical SEL entries since the last look, as text

    @property
    def proves_down(self) -> bool:
        """The BMC says the host is down on its own account: chassis off, or a critical SEL entry."""
        return self.reachable and (self.power_on is False or bool(self.critical_events))

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
    if any(p.critical and p.state is PathState.DOWN for p in paths):
        return TargetState.DOWN
    if down >= min(confirm_paths, len(witnesses)):
        failed = [p for p in paths if p.state is PathState.DOWN]
        onset = min((p.since for p in failed if p.since is not None), default=None)
        if (
            onset is not None
            and all(p.kind == "icmp" for p in failed)
            and any(
                p.state is PathState.UP
                and p.kind != "icmp"
                and not p.by_bmc
                and p.last_ok is not None
                and p.last_ok >= onset
                for p in paths
            )
        ):
            # Pings lost on every address while a service of its own answers since: something
            # drops ICMP (a firewall rule), the host is up. (A service still "up" from before, its
            # probe in flight, says nothing: a host whose power just went off.)
            return TargetState.DEGRADED
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


# Cached: every correlation pass asks for every path's network, and a site without `networks:` at
# 10,000 paths would otherwise parse 10,000 addresses per pass.
@functools.lru_cache(maxsize=1 << 16)
def inferred_network(address: str) -> str | None:
    """The prefix an address is assumed to share with its network neighbours when no
    ``networks:`` are configured: /24 for IPv4, /64 for IPv6; None for a host name."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))


def network_key(topology: Topology, path: PathView) -> str | None:
    """The network a path crosses: configured, or inferred from its address when none is."""
    return path.network if topology.networks else inferred_network(path.address)


@dataclass(frozen=True, slots=True)
class NetworkOutage:
    """One network dark while other networks still reach some of its hosts."""

    network: str  # configured name, or the inferred prefix
    root: str  # the device named after it (first ``via``, or the inferred switch), else ``network``
    dark: tuple[str, ...]  # targets dark on it, in config order (root included when it is one)
    alive: Mapping[str, tuple[str, ...]]  # dark target -> networks its OS still answers on
    inferred: bool
    title: str  # "production network via core-sw1"
    since: float | None
    device_answers: bool = False  # its device answers on it, nothing behind it does: not forwarding

    def summary(self, label: Mapping[str, str]) -> str:
        """``production network via core-sw1: 9 hosts unreachable on it, all alive on mgmt``."""
        hosts = [t for t in self.dark if t != self.root]
        alive = [t for t in hosts if t in self.alive]
        where = sorted({label.get(n, n) for t in alive for n in self.alive[t]})
        text = f"{self.title}: {len(hosts)} host{'s' if len(hosts) != 1 else ''} unreachable on it, "
        if len(alive) == len(hosts):
            text += f"all alive on {'+'.join(where)}"
        else:
            shown = ", ".join(alive[:4]) + (f", +{len(alive) - 4}" if len(alive) > 4 else "")
            text += f"{len(alive)} alive on {'+'.join(where)} ({shown})"
        if self.inferred:
            text += " (inferred from addresses)"
        return text


def _paths_by_network(
    topology: Topology, paths: Mapping[str, Sequence[PathView]]
) -> dict[str, dict[str, list[PathView]]]:
    out: dict[str, dict[str, list[PathView]]] = {}
    for target in topology.nodes:  # config order: how the admin lists them
        for p in paths.get(target, ()):
            key = network_key(topology, p)
            if key is not None:
                out.setdefault(key, {}).setdefault(target, []).append(p)
    return out


def os_answering(paths: Sequence[PathView]) -> list[PathView]:
    """The target's paths its own OS answers on *since this outage began*: a slow path still "up"
    from before, its probe in flight, is no sign of life (a host whose chassis just went off)."""
    onset = min((p.since for p in paths if p.state is PathState.DOWN and p.since is not None), default=None)
    return [
        p
        for p in paths
        if p.state is PathState.UP
        and not p.by_bmc
        and (onset is None or p.last_ok is None or p.last_ok >= onset)
    ]


def _alive_on(topology: Topology, paths: Sequence[PathView], besides: set[str | None]) -> tuple[str, ...]:
    """Networks (other than ``besides``) on which the target's own OS answers."""
    nets = {network_key(topology, p) for p in os_answering(paths)}
    return tuple(sorted(n for n in nets - besides if n is not None))


def _dark(p: PathView) -> bool:
    """Down and still failing: a down path that answered again (coming back, ``since`` cleared) is
    no evidence that its network is dark now."""
    return p.state is PathState.DOWN and p.since is not None


def _answering_again(p: PathView) -> bool:
    """A down path whose last probe answered (it needs ``recover_after`` to be up again)."""
    return p.last_ok is not None and (p.last_failure is None or p.last_ok > p.last_failure)


def network_outages(
    topology: Topology,
    paths: Mapping[str, Sequence[PathView]],
    own: Mapping[str, TargetState],
    bmc: Mapping[str, BmcFacts] | None = None,
    by_network: Mapping[str, Mapping[str, Sequence[PathView]]] | None = None,
) -> tuple[NetworkOutage, ...]:
    """Networks whose every target is dark on them (at least two) while at least two of those
    still answer on another network. A network with one target up on it is not down; a host
    whose BMC says its chassis is off is dark for its own reason, not the network's.
    ``by_network``, when given, is ``paths`` grouped as :func:`_paths_by_network` groups them
    (a caller that keeps the grouping between passes, see ``engine.views``)."""
    off = {t for t, f in (bmc or {}).items() if f.proves_down}
    outages: list[NetworkOutage] = []
    # Only a network with a path down on it can be dark: at 10,000 paths, looking at every
    # network's every path on each pass was most of a pass with one host down.
    candidates = {
        network_key(topology, p) for views in paths.values() for p in views if p.state is PathState.DOWN
    }
    if not candidates:
        return ()  # the healthy pass, most of them: nothing to group
    if by_network is None:
        by_network = _paths_by_network(topology, paths)
    for key, members in by_network.items():
        if key not in candidates:
            continue  # no member dark on it (dark is every path down), so no outage
        dark = [t for t, ps in members.items() if t not in off and all(_dark(p) for p in ps)]
        if len(dark) < 2:
            continue
        net = topology.networks.get(key)
        answering = [t for t, ps in members.items() if any(p.state is PathState.UP for p in ps)]
        # The device that carries it answering on it while everything else there is dark does not
        # make it alive: a switch back from an outage answers before its ports forward.
        device = (
            answering[0]
            if len(answering) == 1
            and topology.nodes[answering[0]].role == "network"
            and (
                answering[0] in net.via
                if net is not None
                else all(answering[0] in topology.upstream(d) for d in dark)
            )
            else None
        )
        if answering and device is None:
            continue
        alive = {t: nets for t in dark if (nets := _alive_on(topology, paths.get(t, ()), {key}))}
        if len(alive) < 2:
            # Nothing answers anywhere: the targets (or their switch) are down, not a network. One
            # answering elsewhere beside others dead everywhere (a host hung, another booting):
            # that one's link, judged on its own, and the others' own outages.
            continue
        # Its onset is when the hosts that prove it (alive elsewhere) went dark on it, as most of
        # them saw it: a host dark there for an hour for its own reasons (hung, or off and just
        # back on) did not start this outage.
        # When its own device is dark on it too, the device's onset is the network's.
        devices = [t for t in dark if topology.nodes[t].role == "network"]
        witnesses = devices or [t for t in dark if t in alive]
        onsets = [
            min(starts) for t in witnesses if (starts := [p.since for p in members[t] if p.since is not None])
        ]
        since = (min(onsets) if devices else statistics.median_high(onsets)) if onsets else None
        if net is not None:
            root = device or (net.via[0] if net.via else key)
            outages.append(
                NetworkOutage(key, root, tuple(dark), alive, False, net.title, since, device is not None)
            )
            continue
        # Inferred: name it after the network device every dark target depends on (the nearest
        # one), when that device is dark or down too.
        common = [
            t
            for t in topology.order
            if topology.nodes[t].role == "network"
            and (t in dark or t == device or own.get(t) is TargetState.DOWN)
            and all(t == d or t in topology.upstream(d) for d in dark)
        ]
        root = common[-1] if common else key
        title = f"network {key}" + (f" via {root}" if common else "")
        outages.append(NetworkOutage(key, root, tuple(dark), alive, True, title, since, device is not None))
    return tuple(outages)


def _settling(
    topology: Topology, paths: Mapping[str, Sequence[PathView]], host: str, nets: set[str | None], now: float
) -> bool:
    """Another host's path on ``nets`` failing but not yet down, or changed state within SETTLE."""
    for target, views in paths.items():
        if target == host:
            continue
        for p in views:
            if network_key(topology, p) not in nets:
                continue
            if p.state is not PathState.DOWN and p.since is not None and now - p.since < SETTLE:
                return True
            if p.changed_at is not None and now - p.changed_at < SETTLE:
                return True
    return False


def _parent_going_dark(
    topology: Topology,
    paths: Mapping[str, Sequence[PathView]],
    parents: Sequence[str],
    down: Sequence[PathView],
    now: float,
) -> bool:
    """A parent (not down itself) has a path down, failing since less than SETTLE, on every
    network ``down`` is on: a VM dark on production while its hypervisor's production ping has
    just gone down (its web UI's probe still in flight) may be that hypervisor's link, confirmed a
    probe later; a page for the VM first would name the wrong root. (A parent only failing, not
    yet down, is the monitor's hold.)"""
    nets = {network_key(topology, p) for p in down}
    if not nets or None in nets:
        return False
    for parent in parents:
        failing = {
            network_key(topology, p)
            for p in paths.get(parent, ())
            if p.state is PathState.DOWN and p.since is not None and now - p.since < SETTLE and not p.by_bmc
        }
        if nets <= failing:
            return True
    return False


# A target failing while something it needs loses packets too (a switch at 30 % loss, a NAS whose
# iSCSI stalls) is that loss showing, not an outage of its own: the upstream lost a probe this long
# before the target began failing, or since ...
LOSS_LOOKBACK = 10.0
# ... unless the target has not answered at all for this long: a loss lets some probes through,
# so a host dark on every path this long behind a lossy switch is dead behind it ...
LOSSY_DARK = 30.0
# ... and has lost this many probes in a row on the paths it is down on: through 60 % loss, 10
# lost in a row happen 0.6 % of the time; a service with one http path probed every 30 s loses
# 30 s of probes (one or two) a third of the time.
LOSSY_PROBES = 10


def lossy_upstream(
    topology: Topology,
    paths: Mapping[str, Sequence[PathView]],
    own: Mapping[str, TargetState],
    name: str,
    facts: BmcFacts | None,
    now: float,
) -> str | None:
    """What carries ``name`` (a parent, its storage, the device of a network it is failing on)
    that has been losing probes while ``name`` fails, when that loss may be all ``name`` shows;
    None when ``name`` is broken on its own account (its BMC proves it, or it has stayed dark
    where it fails for :data:`LOSSY_DARK`)."""
    if facts is not None and facts.proves_down:
        return None  # chassis off, a PSU entry: its own outage, whatever the switch does
    views = [p for p in paths.get(name, ()) if not p.by_bmc]
    onset = min((p.since for p in views if p.state is PathState.DOWN and p.since is not None), default=None)
    # when it last answered where it is failing now (a host alive on management but dead on
    # production behind a lossy switch is dark where it counts)
    answered = max(
        (p.last_ok for p in views if p.state is PathState.DOWN and p.last_ok is not None), default=None
    )
    if onset is None or answered is None:
        return None
    lost_in_a_row = sum(p.failures for p in views if p.state is PathState.DOWN)
    if now - answered >= LOSSY_DARK and lost_in_a_row >= LOSSY_PROBES:
        return None

    def lost(target: str) -> bool:
        return any(
            not p.by_bmc
            and p.last_failure is not None
            and p.last_failure >= onset - LOSS_LOOKBACK
            # failures that ended in a confirmed outage it is back from are that outage (what it
            # carried comes back with it, see incidents), not loss while it answers
            and not (p.state is PathState.UP and p.changed_at is not None and p.last_failure < p.changed_at)
            for p in paths.get(target, ())
        )

    # What carries it: its parents (and storage), and the devices of the networks it is down on
    # (a host on two networks has no single parent switch; each path has its network's).
    carriers: dict[str, Sequence[str]] = {up: topology.dependents(up) for up in topology.upstream(name)}
    for net in {p.network for p in views if p.state is PathState.DOWN and p.network is not None}:
        info = topology.networks.get(net)
        if info is not None:
            for device in info.via:
                carriers.setdefault(device, info.members)  # what is on that network
    for up, behind in carriers.items():
        if up == name:
            continue  # (a dead parent has claimed it already; a dead carrier of one of its networks
            # that did not is losing packets: its hosts answer on that network now and then)
        if lost(up):
            return up
        # A loss on the way shows on the neighbours too: two others behind it (still answering,
        # not down for their own reasons) losing probes while it fails.
        # (What runs on ``name`` itself fails with it: a dead hypervisor's VMs are no neighbours.)
        own_dependents = topology.dependents(name)
        neighbours = (
            t
            for t in behind
            if t not in (name, up) and t not in own_dependents and own.get(t) is not TargetState.DOWN
        )
        if sum(1 for t in neighbours if lost(t)) >= 2:
            return up
    return None


def forwarding(topology: Topology, paths: Mapping[str, Sequence[PathView]], name: str) -> bool:
    """Network device ``name`` is silent on its own paths, but what it carries answers steadily
    through it since it fell silent (two targets at least, every path through it up, none lost
    since): it forwards; its own address (ICMP to its management plane) is what is off."""
    onset = min(
        (p.since for p in paths.get(name, ()) if p.state is PathState.DOWN and p.since is not None),
        default=None,
    )
    behind = topology.behind(name)
    if onset is None or not behind:
        return False
    carried = {n for n, net in topology.networks.items() if name in net.via}
    steady = 0
    for target in behind:
        through = [
            p for p in paths.get(target, ()) if not p.by_bmc and (p.network is None or p.network in carried)
        ]
        if (
            through
            and all(
                p.state is PathState.UP and (p.last_failure is None or p.last_failure < onset - LOSS_LOOKBACK)
                for p in through
            )
            and any(p.last_ok is not None and p.last_ok > onset for p in through)
        ):
            steady += 1
            if steady >= 2:
                return True
    return steady >= len(behind)


def _labels(topology: Topology) -> dict[str, str]:
    return {name: net.label or name for name, net in topology.networks.items()}


def correlate(
    topology: Topology,
    paths: Mapping[str, Sequence[PathView]],
    bmc: Mapping[str, BmcFacts],
    vantage: Sequence[PathView],
    now: float,
    own: Mapping[str, TargetState] | None = None,
    by_network: Mapping[str, Mapping[str, Sequence[PathView]]] | None = None,
) -> Correlation:
    """The site's target states and one verdict per independent outage. ``now`` bounds how long
    a host dark on a moving network waits (:data:`SETTLE`). ``own``, when given, is every
    node's :func:`own_state` of ``paths`` already (a caller that keeps them between passes, see
    ``engine.views``); it is copied, never kept. ``by_network`` likewise (:func:`network_outages`)."""
    if own is None:
        nodes = topology.nodes
        own = {name: own_state(paths.get(name, ()), node.confirm_paths) for name, node in nodes.items()}
    else:
        own = {name: own.get(name, TargetState.UNKNOWN) for name in topology.nodes}
    vantage_up = not vantage or any(p.state is not PathState.DOWN for p in vantage)
    if not vantage_up:
        blind = tuple(f"vantage {p.name}: {p.detail}" for p in vantage)
        return Correlation(
            states=dict.fromkeys(topology.nodes, TargetState.UNKNOWN),
            verdicts=(Verdict(Scope.MONITOR, topology.site, evidence=blind),),
            vantage_up=False,
            own=own,
        )

    labels = _labels(topology)
    for name in topology.network_devices():
        if own[name] is TargetState.DOWN and forwarding(topology, paths, name):
            own[name] = TargetState.DEGRADED  # it forwards: not an outage of what it carries
    states: dict[str, TargetState] = dict(own)
    # Network outages first: what they explain is no target's own failure.
    outages: dict[str, NetworkOutage] = {}
    for outage in network_outages(topology, paths, own, bmc, by_network):
        outages.setdefault(outage.root, outage)  # two prefixes behind one switch: one verdict
    dark_on: dict[str | None, str] = {o.network: o.root for o in outages.values()}
    explained: dict[str, str] = {}  # target -> outage root
    for name in topology.order:
        if own[name] is not TargetState.DOWN or name in outages:
            continue
        down = {network_key(topology, p) for p in paths.get(name, ()) if p.state is PathState.DOWN}
        if down and down <= dark_on.keys():
            explained[name] = next(root for key, root in dark_on.items() if key in down)
            states[name] = TargetState.UNREACHABLE

    failed = {
        name
        for name, state in own.items()
        if state is TargetState.DOWN and name not in explained and name not in outages
    }
    root_of: dict[str, str] = dict(explained)
    carried_by: dict[str, str] = {}  # target -> the dead device of the networks it is dark on

    def find_root(name: str, trail: frozenset[str] = frozenset()) -> str:
        if name in root_of:
            return root_of[name]
        node = topology.nodes[name]
        root = name
        facts = bmc.get(name)
        if facts is not None and facts.reachable and facts.power_on is False:
            # Its BMC says the chassis is off: whatever its switch does, it will not come back
            # with it (a PSU that failed while the switch was down is its own outage).
            root_of[name] = name
            return name
        # Parents first (network path), then storage; cycles are config errors, the trail is a
        # belt-and-braces guard so a bad topology can never hang the daemon.
        for parent in (*node.parents, *node.storage):
            if parent in explained:
                root = explained[parent]
                break
            if parent in outages and own[parent] is TargetState.DOWN:
                root = parent  # the network's device is dead, not only dark on one network
                break
            if parent in failed and parent not in trail:
                root = find_root(parent, trail | {name})
                break
            if (
                parent in node.parents
                and own.get(parent) is TargetState.DEGRADED
                and _dark_behind(parent, name)
            ):
                # its hypervisor's link to that network is down: one incident, its link's; unless
                # what carries that hypervisor is down itself (its switch coming back: its link
                # is not what failed)
                above = next(
                    (
                        g
                        for g in topology.nodes[parent].parents
                        if g in explained or g in outages or g in failed
                    ),
                    None,
                )
                if above is None or above in trail:
                    root = parent
                elif above in explained:
                    root = explained[above]
                elif above in outages:
                    root = above
                else:
                    root = find_root(above, trail | {name})
                break
        if root == name:
            carrier = _dead_carrier(name)
            if carrier is not None and carrier not in trail:
                root = find_root(carrier, trail | {name})
                carried_by[name] = carrier
        root_of[name] = root
        return root

    def _dead_carrier(name: str) -> str | None:
        """The dead device of every configured network ``name`` is dark on (a host on production
        and management has no single parent switch; its production side is its switch's): while
        that switch is down, its production silence is the switch's, even once the switch's
        network outage (which wanted it dark, and the switch answered once) is gone."""
        nets = {p.network for p in paths.get(name, ()) if p.state is PathState.DOWN and not p.by_bmc}
        if not nets or None in nets:
            return None
        devices = []
        for net in nets:
            info = topology.networks.get(net)  # type: ignore[arg-type]
            dead = [d for d in (info.via if info else ()) if d in failed and d != name]
            if not dead:
                return None
            devices.append(dead[0])
        return devices[0]

    def _dark_behind(parent: str, name: str) -> bool:
        """``name`` is dark only on networks on which ``parent`` (alive elsewhere) is dark too: a
        VM behind its hypervisor's dead production NIC."""
        nets = {
            network_key(topology, p)
            for p in paths.get(name, ())
            if p.state is PathState.DOWN and not p.by_bmc
        }
        if not nets or None in nets:
            return False
        own_paths = [p for p in paths.get(parent, ()) if not p.by_bmc]
        # dark on a network: every one of its paths there still failing (its web UI answering on
        # production means its production link is not what failed)
        dark = {
            net
            for net in {network_key(topology, p) for p in own_paths}
            if all(_dark(p) for p in own_paths if network_key(topology, p) == net)
        }
        return nets <= dark

    affected: dict[str, list[str]] = {root: [] for root in outages}
    for name in topology.order:
        if name in explained:
            affected[explained[name]].append(name)
            continue
        if name not in failed:
            # Dark on a failed network but answering enough elsewhere not to be down: listed
            # with that network's outage (it is unreachable there), and no verdict of its own.
            dark_in = next((o.root for o in outages.values() if name in o.dark and name != o.root), None)
            if dark_in is not None and name not in outages:
                affected[dark_in].append(name)
            continue
        root = find_root(name)
        if root == name:
            affected.setdefault(name, [])
            continue
        affected.setdefault(root, []).append(name)
        if name in carried_by or any(
            p in failed or p in explained or p in outages for p in topology.nodes[name].parents
        ):
            states[name] = TargetState.UNREACHABLE

    verdicts = []
    for outage in outages.values():
        node = topology.nodes.get(outage.root)
        facts = bmc.get(outage.root)
        if node is not None and own.get(outage.root) is TargetState.DOWN:
            cause = bmc_cause(facts) if node.has_bmc else None  # the device itself is dead
        elif outage.device_answers:
            cause = None  # it answers, it forwards nothing: booting its ports, or a fault of its own
        else:
            cause = Cause.PARTITION
        evidence = [outage.summary(labels)]
        if outage.device_answers:
            evidence.append(f"{outage.root} answers on it, nothing behind it does: not forwarding")
        if outage.inferred:
            evidence.append(
                f"inferred: no `networks:` configured; to name it, add networks: {{NAME: {{cidr: "
                f"[{outage.network}]{', via: [' + outage.root + ']' if node is not None else ''}}}}}"
            )
        listed = sorted(outage.dark, key=lambda t: (t != outage.root, t not in outage.alive))
        for t in listed[:8]:
            silent = [p.name for p in paths.get(t, ()) if network_key(topology, p) == outage.network]
            alive = outage.alive.get(t)
            evidence.append(
                f"{t}: no answer on {', '.join(silent)}"
                + (f"; answers on {'+'.join(labels.get(n, n) for n in alive)}" if alive else "")
            )
        if facts is not None:
            evidence.append(facts.summary())
        ordered = [t for t in topology.order if t in affected[outage.root]]
        verdicts.append(
            Verdict(Scope.NETWORK, outage.root, cause, tuple(ordered), tuple(evidence), outage.since)
        )
    for root in topology.order:
        if root not in affected or root in outages:
            continue
        node = topology.nodes[root]
        facts = bmc.get(root)
        root_paths = paths.get(root, ())
        down_paths = [p for p in root_paths if p.state is PathState.DOWN]
        if _parent_going_dark(topology, paths, node.parents, down_paths, now):
            continue  # its hypervisor or switch is going dark on the same network: wait for it
        if down_paths and all(_answering_again(p) for p in down_paths):
            continue  # every path it was down on answers again: coming back, not news to page
        if lossy_upstream(topology, paths, own, root, facts, now) is not None:
            continue  # what it needs is losing packets too: that loss, not an outage of its own (yet)
        evidence = [f"{p.name}: {p.detail}" for p in down_paths]
        cause = bmc_cause(facts) if node.has_bmc else None
        os_up = os_answering(root_paths)
        if os_up:
            down_nets = {network_key(topology, p) for p in down_paths}
            alive = _alive_on(topology, root_paths, down_nets)
            answering = ", ".join(p.name for p in os_up)
            # Dark on a whole network, alive on another: a service down on an address that still
            # pings is the service's failure, not the link's.
            dark_there = not any(network_key(topology, p) in down_nets for p in os_up)
            onset = min((p.since for p in down_paths if p.since is not None), default=None)
            # A link is down when the other side answers steadily: losing probes there too around
            # the time this began, the host is losing packets everywhere, no link of its own proven.
            steady = onset is None or all(
                p.last_failure is None or p.last_failure < onset - LOSS_LOOKBACK for p in os_up
            )
            if alive and dark_there and None not in down_nets:
                # Dark on a whole network, its OS answering on another: degraded, and no verdict
                # while that network is moving (maybe its outage, not this host's link).
                states[root] = TargetState.DEGRADED
                if _settling(topology, paths, root, down_nets, now):
                    continue
            if alive and dark_there and None not in down_nets and not steady:
                evidence.insert(0, f"losing probes on every network ({answering} answers only now and then)")
            elif alive and dark_there and None not in down_nets:
                # Steady on the other side: the link to this one is what failed.
                dark_nets = "+".join(sorted(labels.get(n, n) for n in down_nets if n is not None))
                evidence.insert(
                    0,
                    f"{dark_nets} link down: {root} silent on it ({', '.join(p.name for p in down_paths)}), "
                    f"its OS answers on {'+'.join(labels.get(n, n) for n in alive)} ({answering})",
                )
                cause = Cause.LINK_DOWN
            if facts is not None and facts.reachable and facts.power_on is False:
                evidence.append(f"contradictory: BMC says chassis off, but {answering} answers: no cause")
                cause = None
            elif cause is Cause.OS_UNRESPONSIVE:
                evidence.append(f"not hung: BMC says chassis on and {answering} answers")
                cause = None
        if facts is not None:
            evidence.append(facts.summary())
        verdicts.append(
            Verdict(
                scope=Scope(node.role),
                root=root,
                cause=cause,
                affected=tuple(affected[root]),
                evidence=tuple(evidence),
                since=min((p.since for p in down_paths if p.since is not None), default=None),
            )
        )
    return Correlation(states=states, verdicts=tuple(verdicts), vantage_up=True, own=own)
