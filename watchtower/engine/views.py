"""What a correlation pass reads of the paths, kept between passes and rebuilt per target only when
the target's paths moved.

At 10,000 paths a pass that builds a :class:`PathView` for every path and the own state of every
target costs ~40 ms of the loop's CPU (``bench/render_parts.py``), every 5 s and on every change,
while a healthy site changes nothing that correlation reads. A view is rebuilt when what
correlation reads of it can differ from the cached one:

- its path (a reload), state, failing streak start, last change of state or last failed probe
  differ (a failure is rare on a healthy site, so a lossy path costs a rebuild of one target); or
- its target has a path down: only then does correlation read a path's ``last_ok`` (is the OS
  answering *since the outage began*, :func:`correlate.os_answering`) and its ``detail`` (the
  evidence of a down path), which change with every probe. Such targets are rebuilt on every pass,
  so nothing a pass reads is older than the pass.

Nothing here reads a clock: what depends on ``now`` (settling windows, BMC ages) is computed by
:func:`correlate.correlate` from the views and ``now`` on every pass, never cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from watchtower.engine.correlate import PathView, TargetState, network_key, own_state
from watchtower.engine.paths import PathState, PathStatus
from watchtower.engine.topology import Topology


def path_view(status: PathStatus) -> PathView:
    p = status.path
    return PathView(
        p.name,
        p.kind,
        f"{p.kind} {p.spec.address}",
        status.state,
        status.evidence,
        status.failing_since,
        network=p.network,
        address=p.host,
        by_bmc=p.by_bmc,
        changed_at=status.changed_at,
        last_ok=status.last_ok,
        critical=p.spec.critical,
        last_failure=status.last_failure,
        failures=status.failures,
    )


DOWN = PathState.DOWN
_Key = list[object]  # per witness path: path, state, failing_since, changed_at, last_failure, failures


class ViewCache:
    """Per target: its witness paths' views (BMC paths explain an outage, they witness none) and
    its own state; and the views grouped by network. :meth:`refresh` brings them up to date with
    the statuses; the mappings are then what one correlation pass reads."""

    def __init__(self) -> None:
        self._topology: Topology | None = None
        self._by_target: Mapping[str, Sequence[PathStatus]] | None = None
        self._witnesses: dict[str, list[PathStatus]] = {}
        self._keys: dict[str, _Key] = {}
        self._down: set[str] = set()  # targets with a path down at the last refresh: rebuilt every time
        self._carried: set[str] = set()  # what network devices with a path down carry: likewise
        self.views: dict[str, list[PathView]] = {}
        self.own: dict[str, TargetState] = {}
        # the views grouped by network then target, in config order (correlate.network_outages);
        # which network a path crosses changes only with a reload
        self.by_network: dict[str, dict[str, list[PathView]]] = {}
        self._networks: dict[str, list[str | None]] = {}  # target -> each witness path's network
        self.rebuilt = 0  # targets rebuilt by the last refresh (for tests and benchmarks)

    def _reset(self, topology: Topology, by_target: Mapping[str, Sequence[PathStatus]]) -> None:
        self._topology, self._by_target = topology, by_target
        self._witnesses = {}
        for target, statuses in by_target.items():
            witnesses = [s for s in statuses if not s.path.is_bmc]
            if witnesses:
                self._witnesses[target] = witnesses
        self._keys, self._down = {}, set()
        self._carried = set()
        self.views = {}
        self.own = dict.fromkeys(topology.nodes, TargetState.UNKNOWN)
        self.by_network, self._networks = {}, {}

    def refresh(self, topology: Topology, by_target: Mapping[str, Sequence[PathStatus]]) -> None:
        """Bring the views up to date. ``by_target`` is the monitor's paths by target; a new one
        (or a new topology) means a reload: everything is rebuilt."""
        fresh = topology is not self._topology or by_target is not self._by_target
        if fresh:
            self._reset(topology, by_target)
        nodes = topology.nodes
        keys, down_before = self._keys, self._down
        down: set[str] = set()
        done: set[str] = set()  # rebuilt this time
        for target, statuses in self._witnesses.items():
            key: list[object] = []
            is_down = False
            for s in statuses:  # one loop per target: this runs for every path on every pass
                state = s.state
                key += (s.path, state, s.failing_since, s.changed_at, s.last_failure, s.failures)
                is_down = is_down or state is DOWN
            if target in down_before or keys.get(target) != key:
                keys[target] = key
                self._rebuild(target, statuses, fresh)
                done.add(target)
            if is_down:
                down.add(target)
        # What a network device with a path down carries: its last answers (which no key holds,
        # they move with every probe) say whether the device still forwards (correlate.forwarding).
        carried = {
            b
            for t in down
            if (node := nodes.get(t)) is not None and node.role == "network"
            for b in topology.behind(t)
        }
        for target in carried - done:
            witnesses = self._witnesses.get(target)
            if witnesses is not None:
                self._rebuild(target, witnesses, fresh)
                done.add(target)
        self._carried = carried
        self._down, self.rebuilt = down, len(done)
        if fresh:
            self._group(topology)

    def _rebuild(self, target: str, statuses: Sequence[PathStatus], fresh: bool) -> None:
        views = [path_view(s) for s in statuses]
        self.views[target] = views
        node = self._topology.nodes.get(target) if self._topology is not None else None
        if node is not None:
            self.own[target] = own_state(views, node.confirm_paths)
            if not fresh:
                self._regroup(target, views)

    def _group(self, topology: Topology) -> None:
        """Group every view by network, as correlate._paths_by_network does (the same order)."""
        by_network: dict[str, dict[str, list[PathView]]] = {}
        for target in topology.nodes:  # config order
            views = self.views.get(target, [])
            self._networks[target] = nets = [network_key(topology, p) for p in views]
            for p, key in zip(views, nets, strict=True):
                if key is not None:
                    by_network.setdefault(key, {}).setdefault(target, []).append(p)
        self.by_network = by_network

    def _regroup(self, target: str, views: list[PathView]) -> None:
        """``target``'s views were rebuilt: put the new ones in its places (same networks, same
        order, so the grouping stays what a grouping from scratch would be)."""
        nets = self._networks[target]
        for key in dict.fromkeys(nets):
            if key is not None:
                self.by_network[key][target] = [p for p, k in zip(views, nets, strict=True) if k == key]
