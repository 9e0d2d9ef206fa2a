"""The live picture of the site: every path's status, target states, vantage; fed by the scheduler.

Only the event loop mutates it. Readers in other threads (the metrics renderer) get a
:class:`Snapshot`, copied on the loop.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from watchtower.config import VANTAGE, Config, ResolvedPath
from watchtower.engine.paths import PathState, PathStatus
from watchtower.engine.runner import run_probe
from watchtower.engine.scheduler import Scheduler
from watchtower.probes import ProbeContext, get_probe

log = logging.getLogger("watchtower.monitor")


class TargetState(enum.StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"
    UNREACHABLE = "unreachable"
    UNKNOWN = "unknown"


def target_state(statuses: Iterable[PathStatus], confirm_paths: int) -> TargetState:
    """Down when ``confirm_paths`` independent paths are down (all of them, where it has fewer).

    Paths of one kind to one address count as one witness: two HTTP checks of one URL seeing
    the same dead listener are not independent confirmation. (Dependency-aware states such as
    ``unreachable`` come from the correlator.)
    """
    witnesses: dict[str, list[PathState]] = {}
    for status in statuses:
        witnesses.setdefault(f"{status.path.kind} {status.path.spec.address}", []).append(status.state)
    down = sum(1 for states in witnesses.values() if all(s is PathState.DOWN for s in states))
    up = sum(1 for states in witnesses.values() if any(s is PathState.UP for s in states))
    if not witnesses:
        return TargetState.UNKNOWN
    if down >= min(confirm_paths, len(witnesses)):
        return TargetState.DOWN
    if down:
        return TargetState.DEGRADED
    return TargetState.UP if up else TargetState.UNKNOWN


@dataclass(frozen=True, slots=True)
class PathRow:
    target: str
    name: str
    kind: str
    state: PathState
    ok: bool | None
    latency: float | None
    last_ok: float | None
    detail: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable copy of the state, safe to hand to another thread."""

    taken_at: float
    site: str
    paths: tuple[PathRow, ...]
    targets: tuple[tuple[str, str, TargetState], ...]  # name, role, state
    vantage_up: bool
    lag_buckets: tuple[tuple[str, int], ...]
    lag_sum: float
    lag_count: int
    reload_ok: bool = True
    reload_at: float = 0.0


_TIMINGS = {"interval", "retry_interval", "timeout", "fail_after", "recover_after"}


def _same_probe(a: ResolvedPath, b: ResolvedPath) -> bool:
    """Same target and same probe apart from its timings: its state is still meaningful."""
    return a.kind == b.kind and a.spec.model_dump(exclude=_TIMINGS) == b.spec.model_dump(exclude=_TIMINGS)


class Monitor:
    """Owns the path statuses and the scheduler that feeds them."""

    def __init__(self, config: Config, *, shared: ProbeContext | None = None):
        self.config = config
        self.scheduler = Scheduler(config.max_concurrent_probes)
        self.shared = shared or ProbeContext(timeout=0)
        self.statuses: dict[tuple[str, str], PathStatus] = {}
        self.started_at = time.time()
        self.reloaded_ok, self.reloaded_at = True, self.started_at
        self._target_states: dict[str, TargetState] = {}
        self._apply(config)

    # ------------------------------------------------------------------ wiring
    def _apply(self, config: Config) -> dict[str, int]:
        """Make the running set of paths match ``config``.

        A path whose spec (what it talks to and how) is unchanged keeps its state, its streak
        counts and its phase, even if its timings changed; a changed spec starts over as unknown;
        a removed path stops. Returns counts for the reload log line.
        """
        old = self.statuses
        self.statuses = {}
        counts = {"added": 0, "removed": 0, "changed": 0, "kept": 0}
        for path in (*config.vantage_paths, *config.paths):
            status = old.pop(path.key, None)
            if status is not None and status.path == path:
                self.statuses[path.key] = status
                counts["kept"] += 1
                continue
            if status is not None and _same_probe(status.path, path):
                status.path = path  # timings changed: the cadence closure reads status.path
                counts["changed"] += 1
            else:
                counts["added" if status is None else "changed"] += 1
                status = PathStatus(path)
            self.statuses[path.key] = status
            if get_probe(path.kind) is None:
                status.detail = f"no prober for kind {path.kind!r} in this version; path stays unknown"
                log.warning("no prober target=%s path=%r kind=%s", path.target, path.name, path.kind)
                self.scheduler.remove(path.key)
                continue
            self.scheduler.add(path.key, path.interval, self._cadence(status), self._runner(status))
        for key in old:
            self.scheduler.remove(key)
            counts["removed"] += 1
        self.config = config
        return counts

    def reload(self, config: Config) -> dict[str, int]:
        """Apply a new config (already validated) to the running monitor."""
        counts = self._apply(config)
        self.reloaded_ok, self.reloaded_at = True, time.time()
        return counts

    def reload_failed(self) -> None:
        self.reloaded_ok, self.reloaded_at = False, time.time()

    @staticmethod
    def _cadence(status: PathStatus) -> Callable[[], float]:
        def cadence() -> float:
            return status.path.retry_interval if status.pending else status.path.interval

        return cadence

    def _runner(self, status: PathStatus) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            result = await run_probe(status.path, self.shared)
            if status.observe(result, time.time()):
                p = status.path
                log.info(
                    "path state target=%s path=%r state=%s detail=%r",
                    p.target,
                    p.name,
                    status.state,
                    result.detail,
                )
                self._target_changed(p.target)

        return run

    def _target_changed(self, target: str) -> None:
        """Log a target's state when a path change moves it (one line an admin can grep)."""
        if target not in self.config.targets:
            return
        paths = self.target_paths(target)
        state = target_state(paths, self.config.confirm_paths(target))
        old = self._target_states.get(target, TargetState.UNKNOWN)
        if state is not old:
            self._target_states[target] = state
            down = ", ".join(s.path.name for s in paths if s.state is PathState.DOWN) or "none"
            log.info("target state target=%s state=%s was=%s paths_down=%r", target, state, old, down)

    async def run(self) -> None:
        await self.scheduler.run()

    # ------------------------------------------------------------------ reading
    def target_paths(self, target: str) -> list[PathStatus]:
        return [s for s in self.statuses.values() if s.path.target == target]

    def target_states(self) -> dict[str, TargetState]:
        by_target: dict[str, list[PathStatus]] = {}
        for status in self.statuses.values():
            by_target.setdefault(status.path.target, []).append(status)
        return {
            name: target_state(by_target.get(name, []), self.config.confirm_paths(name))
            for name in self.config.targets
        }

    @property
    def vantage_up(self) -> bool:
        """Up while any vantage path is not down (no vantage configured: assumed up)."""
        paths = [s for s in self.statuses.values() if s.path.target == VANTAGE]
        return not paths or any(s.state is not PathState.DOWN for s in paths)

    def snapshot(self) -> Snapshot:
        states = self.target_states()
        rows = tuple(
            PathRow(
                s.path.target,
                s.path.name,
                s.path.kind,
                s.state,
                None if s.last is None else s.last.ok,
                None if s.last is None else s.last.latency,
                s.last_ok,
                s.detail,
            )
            for s in self.statuses.values()
        )
        lag = self.scheduler.lag
        return Snapshot(
            taken_at=time.time(),
            site=self.config.site,
            paths=rows,
            targets=tuple((n, t.role, states[n]) for n, t in self.config.targets.items()),
            vantage_up=self.vantage_up,
            lag_buckets=tuple(lag.cumulative()),
            lag_sum=lag.sum,
            lag_count=lag.total,
            reload_ok=self.reloaded_ok,
            reload_at=self.reloaded_at,
        )


async def open_shared(
    stack: AsyncExitStack, config: Config, shared: ProbeContext | None = None
) -> ProbeContext:
    """The long-lived probe resources (one ICMP socket, one HTTP session) ``config`` needs,
    added to ``shared`` when given (a reload that brings the first icmp or http path)."""
    from watchtower.probes.http import new_session
    from watchtower.probes.icmp import Pinger

    kinds = {p.kind for p in (*config.paths, *config.vantage_paths)}
    shared = shared or ProbeContext(timeout=0)
    if "icmp" in kinds and shared.pinger is None:
        shared.pinger = await stack.enter_async_context(Pinger())
    if "http" in kinds and shared.http_session is None:
        shared.http_session = await stack.enter_async_context(new_session())
    return shared
