"""The dependency graph from the config: what each target needs to be reachable and to work.

``parents`` are the network path (``runs_on`` first, then ``depends_on``): when one is down, the
target cannot be judged and is ``unreachable``. ``storage`` is where its disks live: when that is
down, the target's failure belongs to the storage incident. Unknown names and cycles are
rejected by the config loader, so a Topology is always a DAG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
class Topology:
    site: str
    nodes: Mapping[str, Node]
    order: tuple[str, ...]  # dependencies before dependents, then config order

    @classmethod
    def build(cls, site: str, nodes: list[Node]) -> Topology:
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
        return cls(site, by_name, tuple(order))

    def upstream(self, name: str) -> tuple[str, ...]:
        """Everything ``name`` needs, transitively (parents and storage), nearest first."""
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
        nodes = [
            Node(
                name=name,
                role=t.role,
                parents=tuple(dict.fromkeys([*([t.runs_on] if t.runs_on else []), *t.depends_on])),
                storage=tuple(t.storage),
                confirm_paths=cfg.confirm_paths(name),
                has_bmc=t.bmc is not None or any(p.kind in ("ipmi", "redfish") for p in t.paths),
            )
            for name, t in cfg.targets.items()
        ]
        return cls.build(cfg.site, nodes)
