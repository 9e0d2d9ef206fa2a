"""The dependency graph from the config: what each target needs to be reachable and to work.

``parents`` are the network path (``runs_on`` first, then ``depends_on``): when one is down, the
target cannot be judged and is ``unreachable``. ``storage`` is where its disks live: when that is
down, the target's failure belongs to the storage incident. Unknown names and cycles are
rejected by the config loader, so a Topology is always a DAG.

``networks`` (from ``networks:``) say which devices carry which network. A path depends on the
devices of the network it crosses; a target whose paths all cross one network depends on that
network's ``via`` devices, as if it named them in ``depends_on`` (a via device only on the ones
before it in the chain). Correlation uses them to name a network incident after its device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from watchtower.config import Config


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    role: str
    parents: tuple[str, ...] = ()
    storage: tuple[str, ...] = ()
    confirm_paths: int = 2
    has_bmc: bool = False


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """One configured network: what correlation needs of it."""

    name: str
    via: tuple[str, ...] = ()
    label: str | None = None
    members: tuple[str, ...] = ()  # targets with a path on it (their OS's, not their BMC's)

    @property
    def title(self) -> str:
        """How a message names it: ``production network via core-sw1``."""
        named = f"{self.label} network" if self.label else f"network {self.name}"
        return named + (f" via {', '.join(self.via)}" if self.via else "")


@dataclass(frozen=True, slots=True)
class Topology:
    site: str
    nodes: Mapping[str, Node]
    order: tuple[str, ...]  # dependencies before dependents, then config order
    networks: Mapping[str, NetworkInfo] = field(default_factory=dict)  # empty: inferred from addresses
    # Answers of upstream()/dependents(), kept: every correlation pass asks them many times and
    # the topology never changes (a reload builds a new one).
    _upstream: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _dependents: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _behind: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _devices: list[tuple[str, ...]] = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, site: str, nodes: list[Node], networks: Sequence[NetworkInfo] = ()) -> Topology:
        by_name = {n.name: n for n in nodes}
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, trail: frozenset[str]) -> None:
            if name in seen or name in trail or name not in by_name:
                return
            node = by_name[name]
            for dep in (*node.parents, *node.storage):
                visit(dep, trail | {name})
            seen.add(name)
            order.append(name)

        for node in nodes:
            visit(node.name, frozenset())
        return cls(site, by_name, tuple(order), {n.name: n for n in networks})

    def network_devices(self) -> tuple[str, ...]:
        """The targets of role ``network`` (switches, routers), in config order."""
        if not self._devices:
            self._devices.append(tuple(n for n, node in self.nodes.items() if node.role == "network"))
        return self._devices[0]

    def upstream(self, name: str) -> tuple[str, ...]:
        """Everything ``name`` needs, transitively (parents and storage), nearest first."""
        known = self._upstream.get(name)
        if known is None:
            known = self._upstream[name] = self._find_upstream(name)
        return known

    def _find_upstream(self, name: str) -> tuple[str, ...]:
        out: list[str] = []
        todo = [name]
        while todo:
            node = self.nodes.get(todo.pop(0))
            for dep in (*node.parents, *node.storage) if node else ():
                if dep not in out and dep != name:
                    out.append(dep)
                    todo.append(dep)
        return tuple(out)

    def dependents(self, name: str) -> tuple[str, ...]:
        """Everything that needs ``name`` (the reverse of :meth:`upstream`), transitively, in
        config order: what a dead switch, hypervisor or NAS takes down with it."""
        known = self._dependents.get(name)
        if known is None:
            known = self._dependents[name] = self._find_dependents(name)
        return known

    def behind(self, name: str) -> tuple[str, ...]:
        """What ``name``'s coming back brings back: its :meth:`dependents`, and the targets on the
        networks it carries (``via``) with what depends on them. A host on production and
        management has no single parent switch, but its production paths come back with it."""
        known = self._behind.get(name)
        if known is None:
            found = set(self.dependents(name))
            for net in self.networks.values():
                if name in net.via:
                    for member in net.members:
                        if member != name:
                            found.add(member)
                            found.update(self.dependents(member))
            found.discard(name)
            known = self._behind[name] = tuple(n for n in self.nodes if n in found)
        return known

    def _find_dependents(self, name: str) -> tuple[str, ...]:
        needed_by: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for dep in (*node.parents, *node.storage):
                needed_by.setdefault(dep, []).append(node.name)
        found: set[str] = set()
        todo = [name]
        while todo:
            for dependent in needed_by.get(todo.pop(), ()):
                if dependent not in found and dependent != name:
                    found.add(dependent)
                    todo.append(dependent)
        return tuple(n for n in self.nodes if n in found)

    @classmethod
    def from_config(cls, cfg: Config) -> Topology:
        on: dict[str, set[str | None]] = {}
        for p in cfg.paths:
            if not p.by_bmc:
                on.setdefault(p.target, set()).add(p.network)
        networks = [
            NetworkInfo(
                name, tuple(net.via), net.label, tuple(t for t in cfg.targets if name in on.get(t, ()))
            )
            for name, net in cfg.networks.items()
        ]
        nodes = []
        for name, t in cfg.targets.items():
            carriers: list[str] = []
            (only, *more) = on.get(name) or {None}
            if only is not None and not more:
                via = cfg.networks[only].via
                carriers = via[: via.index(name)] if name in via else list(via)
            nodes.append(
                Node(
                    name=name,
                    role=t.role,
                    parents=tuple(
                        dict.fromkeys([*([t.runs_on] if t.runs_on else []), *t.depends_on, *carriers])
                    ),
                    storage=tuple(t.storage),
                    confirm_paths=cfg.confirm_paths(name),
                    has_bmc=t.bmc is not None or any(p.kind in ("ipmi", "redfish") for p in t.paths),
                )
            )
        return cls.build(cfg.site, nodes, networks)
