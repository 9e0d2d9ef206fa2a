"""The live picture of the site: every path's status, target states, vantage; fed by the scheduler.

Only the event loop mutates it. Readers in other threads (the metrics renderer) get a
:class:`Snapshot`, copied on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from watchtower import clock
from watchtower.config import PASSIVE_KINDS, VANTAGE, Config, ResolvedPath, TrapPath
from watchtower.engine.correlate import (
    BmcFacts,
    Cause,
    Correlation,
    Scope,
    TargetState,
    correlate,
)
from watchtower.engine.incidents import HOLD_MAX, Change, Incident, IncidentTracker
from watchtower.engine.paths import PathState, PathStatus, sent_at
from watchtower.engine.runner import run_probe
from watchtower.engine.scheduler import BatchHook, BatchStart, DirectStart, Scheduler
from watchtower.engine.topology import Topology
from watchtower.engine.views import ViewCache
from watchtower.engine.views import path_view as path_view  # moved; tests and tools import it from here
from watchtower.probes import (
    BatchProbe,
    Failure,
    ProbeContext,
    ProbeResult,
    SelEntry,
    SensorReading,
    get_batch_probe,
    get_probe,
)
from watchtower.probes.traps import TrapEvent, is_link_down, is_link_up

log = logging.getLogger("watchtower.monitor")


CRITICAL_WINDOW = 3600.0  # a critical SEL entry explains an outage for this long after it is seen
# A switch answers before its ports forward (spanning tree learns for up to 15 s, plus its boot):
# what fails behind one that answers again since less than this waits before it is paged.
PORTS_SETTLE = 20.0


@dataclass(slots=True)
class BmcState:
    """What a target's management controller said lately (from a bmc: block or an ipmi/redfish path)."""

    reachable: bool = False
    power_on: bool | None = None
    health: str | None = None
    sensors: tuple[SensorReading, ...] = ()
    events: deque[tuple[float, SelEntry]] = field(default_factory=lambda: deque(maxlen=50))
    critical_total: int = 0
    last_at: float | None = None
    # When the last reading was asked for: a read that timed out just now was sent a timeout ago,
    # and says nothing about a host that failed after it was sent (e.g. while the monitor was cut).
    asked_at: float | None = None
    cleared_at: float = 0.0  # critical entries seen before this no longer explain anything

    def clear(self, now: float) -> None:
        """The host answered on every path again: what the SEL said about the last outage does not
        explain the next one (its cause is what is seen then)."""
        self.cleared_at = now

    def update(self, result: ProbeResult, now: float, asked_at: float) -> None:
        self.last_at, self.asked_at = now, asked_at
        reading = result.bmc
        if reading is None:
            # No answer at all is "unreachable"; an answer we could not use (auth, garbage) is not.
            self.reachable = result.failure not in (Failure.TIMEOUT, Failure.UNREACHABLE, Failure.REFUSED)
            if not self.reachable:
                self.power_on = None
            return
        self.reachable = True
        self.power_on, self.health = reading.power_on, reading.health
        if reading.sensors:
            self.sensors = reading.sensors
        for entry in reading.new_events:
            self.events.append((now, entry))
            if entry.severity == "critical":
                self.critical_total += 1

    def facts(self, now: float) -> BmcFacts:
        critical = tuple(
            e.text
            for at, e in self.events
            if e.severity == "critical" and now - at <= CRITICAL_WINDOW and at >= self.cleared_at
        )
        return BmcFacts(self.reachable, self.power_on, critical)


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
    values: tuple[tuple[str, float], ...] = ()


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
    incidents_open: tuple[tuple[str, int], ...] = ()  # scope, count
    bmc: tuple[tuple[str, BmcState], ...] = ()  # target, a copy of its BMC state
    channels: tuple[Any, ...] = ()  # notify.outbox.ChannelStats copies (the engine does not import notify)
    store_ok: bool = True


_TIMINGS = {"interval", "retry_interval", "timeout", "fail_after", "recover_after"}


def _same_probe(a: ResolvedPath, b: ResolvedPath) -> bool:
    """Same target and same probe apart from its timings: its state is still meaningful."""
    return a.kind == b.kind and a.spec.model_dump(exclude=_TIMINGS) == b.spec.model_dump(exclude=_TIMINGS)


class Monitor:
    """Owns the path statuses and the scheduler that feeds them."""

    def __init__(
        self,
        config: Config,
        *,
        shared: ProbeContext | None = None,
        probe: Callable[[ResolvedPath, ProbeContext, dict[str, Any]], Awaitable[ProbeResult]] = run_probe,
    ):
        self.config = config
        self._probe = probe  # the simulator hands in its ground truth instead of the network
        self.scheduler = Scheduler(config.max_concurrent_probes)
        self.shared = shared or ProbeContext(timeout=0)
        self.statuses: dict[tuple[str, str], PathStatus] = {}
        self.started_at = clock.now()
        self.reloaded_ok, self.reloaded_at = True, self.started_at
        self.tracker = IncidentTracker()
        self.bmc: dict[str, BmcState] = {}
        self._last_failure: dict[str, float] = {}  # target -> its last failed probe (BMC paths aside)
        # ... and when that probe was sent: a probe that timed out just now was sent a timeout ago
        self._last_failure_sent: dict[str, float] = {}
        # target -> when it was last seen down for a moment: its BMC saying "chassis off", or dark
        # on every path at once (a hypervisor hung for 4 s reboots its VMs, too short to confirm)
        self._blipped: dict[str, float] = {}
        # path key -> when it first settled UP, never having been up or down before (the daemon's
        # first look): that is not a device answering again, whose ports may not forward yet
        self._first_up: dict[tuple[str, str], float | None] = {}
        self.topology = Topology.from_config(config)
        self._views = ViewCache()  # what correlation reads of the paths, kept between passes
        self._dirty = asyncio.Event()
        self._batch_starts: dict[tuple[BatchProbe, float], BatchStart] = {}
        # Set when incidents changed (opened, grew, acknowledged, resolved): the alerting looks then.
        self.incidents_changed = asyncio.Event()
        self._apply(config)
        self.correlation = self._correlate(self.started_at)

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
        for path in (*config.vantage_paths, *config.paths, *config.bmc_paths):
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
            if path.kind in PASSIVE_KINDS:
                status.detail = status.detail or "no trap received yet"
                self.scheduler.remove(path.key)
                continue
            if get_probe(path.kind) is None:
                status.detail = f"no prober for kind {path.kind!r} in this version; path stays unknown"
                log.warning("no prober target=%s path=%r kind=%s", path.target, path.name, path.kind)
                self.scheduler.remove(path.key)
                continue
            self.scheduler.add(
                path.key,
                path.interval,
                self._cadence(status),
                self._runner(status),
                batch=self._batch_hook(status),
                direct=self._direct(status),
            )
        for key in old:
            self.scheduler.remove(key)
            counts["removed"] += 1
        # Paths by target: a storm of first failures asks "the other paths of this target" once per
        # path, which must not be a scan of every path of the site.
        self._by_target: dict[str, list[PathStatus]] = {}
        for status in self.statuses.values():
            self._by_target.setdefault(status.path.target, []).append(status)
        self.config = config
        self.topology = Topology.from_config(config)
        self._dirty.set()
        return counts

    def reload(self, config: Config) -> dict[str, int]:
        """Apply a new config (already validated) to the running monitor."""
        counts = self._apply(config)
        self.reloaded_ok, self.reloaded_at = True, clock.now()
        return counts

    def reload_failed(self) -> None:
        self.reloaded_ok, self.reloaded_at = False, clock.now()

    @staticmethod
    def _cadence(status: PathStatus) -> Callable[[], float]:
        def cadence() -> float:
            return status.path.retry_interval if status.pending else status.path.interval

        return cadence

    def _runner(self, status: PathStatus) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            # Confirming a failure of an up path: probes may look harder (icmp sends 3 echoes), so
            # packet loss does not pass for an outage while a dead host still fails as fast.
            status.memory["confirming"] = status.state is PathState.UP and status.failures > 0
            result = await self._probe(status.path, self.shared, status.memory)
            self.record(status, result, clock.now())

        return run

    def _direct(self, status: PathStatus) -> DirectStart | None:
        """For an injected probe that answers by callback (the simulator's ``begin``): a run
        without a task, the same steps as :meth:`_runner` in the same order."""
        begin = getattr(self._probe, "begin", None)
        if begin is None:
            return None

        def start(done: Callable[[], None]) -> None:
            status.memory["confirming"] = status.state is PathState.UP and status.failures > 0

            def deliver(result: ProbeResult) -> None:
                try:
                    if not self.scheduler.stopped:  # stopped meanwhile: a cancelled run records nothing
                        self.record(status, result, clock.now())
                except Exception:  # as the scheduler guards a task's run
                    log.exception("job failed key=%s", status.path.key)
                finally:
                    done()

            begin(status.path, self.shared, status.memory, deliver)

        return start

    def _batch_hook(self, status: PathStatus) -> BatchHook | None:
        """For a kind with a batch extension: this run's ticket into the slot's batch, or None
        when it must run alone (see probes.BatchProbe)."""
        batch = get_batch_probe(status.path.kind)
        if batch is None or self._probe is not run_probe:
            return None  # no batch extension, or a stand-in for the network (the simulator) probes alone

        def take() -> tuple[BatchStart, Any] | None:
            status.memory["confirming"] = status.state is PathState.UP and status.failures > 0
            item = batch.item(status.path.spec, status.memory)
            if item is None:
                return None
            return self._batch_start(batch, status.path.timeout), (status, item)

        return take

    def _batch_start(self, batch: BatchProbe, timeout: float) -> BatchStart:
        """One start function per (kind, timeout), so the scheduler groups co-due runs by it."""
        key = (batch, timeout)
        start = self._batch_starts.get(key)
        if start is not None:
            return start

        def start_batch(entries: list[tuple[PathStatus, Any]], done: Callable[[], None]) -> None:
            def recorded(results: list[ProbeResult]) -> None:
                try:
                    now = clock.now()
                    for (status, _), result in zip(entries, results, strict=True):
                        self.record(status, result, now)
                finally:
                    done()

            try:
                batch.start(self.shared, [item for _, item in entries], timeout, recorded)
            except Exception as exc:  # a bug in watchtower, not a failure of the targets
                log.exception("batch probe crashed size=%d", len(entries))
                recorded(
                    [ProbeResult.fail(Failure.INTERNAL, f"probe crashed: {exc.__class__.__name__}: {exc}")]
                    * len(entries)
                )

        self._batch_starts[key] = start_batch
        return start_batch

    def record(self, status: PathStatus, result: ProbeResult, now: float) -> bool:
        """Fold one probe result into the picture. True when a correlation pass is needed."""
        if (
            not result.ok
            and status.reset_at is not None
            and sent_at(result, status.path, now) < status.reset_at
        ):
            return False  # sent before its evidence was dropped (a switch back meanwhile): stale
        was_down = status.state is PathState.DOWN
        first_look = status.path.key not in self._first_up
        changed = status.observe(result, now)
        if first_look and status.state in (PathState.UP, PathState.DOWN):
            self._first_up[status.path.key] = status.changed_at if status.state is PathState.UP else None
        if changed:
            p = status.path
            log.info(
                "path state target=%s path=%r state=%s detail=%r",
                p.target,
                p.name,
                status.state,
                result.detail,
            )
        if status.path.is_bmc or result.bmc is not None:
            bmc = self.bmc.setdefault(status.path.target, BmcState())
            before = bmc.facts(now)
            bmc.update(result, now, sent_at(result, status.path, now))
            if bmc.reachable and bmc.power_on is False:
                self._blipped[status.path.target] = now
            if bmc.facts(now) != before:
                changed = True  # a new BMC fact (power off, a PSU failure) may change the cause
        if not result.ok and not status.path.is_bmc and result.failure is not Failure.INTERNAL:
            self._last_failure[status.path.target] = now
            self._last_failure_sent[status.path.target] = sent_at(result, status.path, now)
            if self._dark_at_once(status.path.target):
                self._blipped[status.path.target] = now
        if not result.ok and status.failures == 1 and not was_down:
            self._second_witness(status)
        if changed:
            self._dirty.set()
        return changed

    # ------------------------------------------------------------------ traps
    def on_trap(self, event: TrapEvent) -> None:
        """A trap arrived (called on the loop by the receiver). linkDown/linkUp of a listed
        interface sets the trap path's state at once (a trap is the device's own word, no streak
        needed); configured trap OIDs go to the log and the open incident's timeline, and may hold
        the path down until a clearing trap or their hold time."""
        now = clock.now()
        matched = False
        for status in list(self.statuses.values()):
            spec = status.path.spec
            if not isinstance(spec, TrapPath) or spec.source != event.source:
                continue
            matched = True
            for down_or_up, check in ((True, is_link_down), (False, is_link_up)):
                is_it, if_index = check(event)
                if is_it and self._interface_listed(spec, event, if_index):
                    what = f"{'linkDown' if down_or_up else 'linkUp'} ifIndex {if_index}"
                    self._set_passive(status, not down_or_up, what, now)
            for rule in spec.events:
                label = rule.text or rule.oid
                if event.trap_oid == rule.oid:
                    self._trap_timeline(status.path.target, f"trap from {event.source}: {label}", now)
                    if rule.down:
                        self._set_passive(status, False, label, now)
                        self._hold(status, rule.hold, label)
                elif rule.clear_oid is not None and event.trap_oid == rule.clear_oid:
                    self._trap_timeline(status.path.target, f"trap from {event.source}: {label} cleared", now)
                    self._set_passive(status, True, f"{label} cleared", now)
        if not matched:
            log.info("trap from an unknown source source=%s oid=%s", event.source, event.trap_oid)

    @staticmethod
    def _interface_listed(spec: TrapPath, event: TrapEvent, if_index: int | None) -> bool:
        if not spec.interfaces:
            return True  # no list: every interface of the device counts
        descr = event.value(f"1.3.6.1.2.1.2.2.1.2.{if_index}") if if_index is not None else None
        return any(i == if_index or (descr is not None and str(i) == descr) for i in spec.interfaces)

    def _set_passive(self, status: PathStatus, up: bool, what: str, now: float) -> None:
        state = PathState.UP if up else PathState.DOWN
        status.detail = what
        status.last_at = now
        if up:
            status.last_ok, status.failing_since = now, None
            handle = status.memory.pop("hold", None)
            if handle is not None:
                handle.cancel()
        elif status.state is not PathState.DOWN:
            status.failing_since = now
        if status.state is not state:
            status.state, status.changed_at = state, now
            p = status.path
            log.info("path state target=%s path=%r state=%s detail=%r", p.target, p.name, state, what)
            self._dirty.set()
            if not up:
                self._second_witness(status)

    def _hold(self, status: PathStatus, hold: float, label: str) -> None:
        previous = status.memory.pop("hold", None)
        if previous is not None:
            previous.cancel()
        status.memory["hold"] = asyncio.get_running_loop().call_later(
            hold, lambda: self._set_passive(status, True, f"{label}: no news for {hold:g}s", clock.now())
        )

    def _trap_timeline(self, target: str, text: str, now: float) -> None:
        log.info("trap event target=%s: %s", target, text)
        for incident in self.tracker.open_incidents():
            if target == incident.root or target in incident.affected:
                self.tracker.annotate(incident.id, "trap", text, now)

    def _second_witness(self, status: PathStatus) -> None:
        """A path's first failure: probe the target's other paths, and the vantage, now. The
        second witness (or the proof that watchtower itself is cut off) then arrives within a
        retry interval instead of a full one."""
        target = status.path.target
        upstream = self.topology.upstream(target)
        node = self.topology.nodes.get(target)
        # A switch: what it carries, too. Dead, they fail with it; alive, they answer through it
        # and it only stopped answering pings itself (correlate.forwarding).
        carried = self.topology.behind(target) if node is not None and node.role == "network" else ()
        for other in (
            *self.target_paths(target),
            *self.target_paths(VANTAGE),
            # What it depends on, too: if its hypervisor, switch or NAS is the one that died, that
            # must be confirmed first, so the page names the root and not the first VM noticed.
            *(p for up in upstream for p in self.target_paths(up)),
            *(p for c in carried for p in self.target_paths(c) if not p.path.is_bmc),
        ):
            if other is status:
                continue
            # The target's own BMC even when it is down already: the page waits for a reading asked
            # since this outage began (_awaiting_bmc), and one that answered "chassis off" a second
            # ago, pulled forward by a VM of this host failing first, was asked before it.
            if other.state is not PathState.DOWN or (other.path.is_bmc and other.path.target == target):
                self.scheduler.run_now(other.path.key)

    # ------------------------------------------------------------------ correlation
    def _correlate(self, now: float) -> Correlation:
        # Views and own states are rebuilt only for targets whose paths moved (engine/views.py):
        # at 10,000 paths rebuilding all of them was most of a 40 ms pass.
        views = self._views
        views.refresh(self.topology, self._by_target)
        facts = {name: bmc.facts(now) for name, bmc in self.bmc.items() if bmc.last_at is not None}
        return correlate(
            self.topology,
            views.views,
            facts,
            views.views.get(VANTAGE, []),
            now,
            own=views.own,
            by_network=views.by_network,
        )

    def _suspect(self, target: str, corr: Correlation, now: float) -> bool:
        """``target`` may be failing right now but is not confirmed down: a path is failing and not
        yet confirmed, or one went down a moment ago while the others are still being probed (a
        slow http path needs its timeout before its first failure even counts)."""
        if corr.own.get(target) is TargetState.DOWN:
            return False
        window = self._confirm_time(target)
        return any(
            not s.path.is_bmc
            and (
                (s.state is not PathState.DOWN and s.failures > 0)
                or (s.state is PathState.DOWN and s.changed_at is not None and now - s.changed_at < window)
            )
            for s in self.target_paths(target)
        )

    def _awaiting_bmc(self, target: str, since: float | None, cause: Cause | None = None) -> float | None:
        """How long ``target``'s verdict may wait for its BMC, when the BMC has not answered (or
        failed to) since the outage began: a reading from before says "chassis on" about a host
        that has just lost power, and the page would call it hung."""
        if since is None:
            return None
        bmc_paths = [s for s in self.target_paths(target) if s.path.is_bmc]
        if not bmc_paths:
            return None
        bmc = self.bmc.get(target)
        # (A quarter second's slack: a probe's latency and the monitor's clock are measured apart.)
        if bmc is None or bmc.asked_at is None or bmc.asked_at < since - 0.25:
            return max(s.path.timeout for s in bmc_paths) + 2.0
        last_failure = self._last_failure_sent.get(target)
        if cause is Cause.OS_UNRESPONSIVE and last_failure is not None and bmc.asked_at > last_failure:
            # "Chassis on", asked after the host's last failed probe: the host may be back already
            # (it was off, and the BMC was unreachable until it was powered on again). "Hung" is
            # only true if it still fails after that reading: wait for its next probe.
            return self._confirm_time(target)
        return None

    def _dark_at_once(self, target: str) -> bool:
        """Hypervisor or storage ``target`` was dark on every witness path (two at least) at one
        moment: each path's last failed probe was sent before any of them answered again."""
        node = self.topology.nodes.get(target)
        if node is None or node.role not in ("hypervisor", "storage"):
            return False
        witnesses = [s for s in self.target_paths(target) if not s.path.is_bmc]
        if len(witnesses) < 2 or any(s.last_failure_sent is None for s in witnesses):
            return False
        dark_from = max(s.last_failure_sent for s in witnesses if s.last_failure_sent is not None)
        # each path failed from its last failed probe until it answered again (if it has since)
        answered_again = min(
            (
                s.last_ok
                for s in witnesses
                if s.last_ok is not None
                and s.last_failure_sent is not None
                and s.last_ok > s.last_failure_sent
            ),
            default=math.inf,
        )
        return dark_from < answered_again

    def _just_forwarding(self, device: str, now: float) -> bool:
        """Network device ``device`` answers again since a moment (back from an outage, or seen
        again after the monitor's own): its ports may not forward yet, and what fails behind it
        waits for them (PORTS_SETTLE) before it is paged as an outage of its own."""
        node = self.topology.nodes.get(device)
        if node is None or node.role != "network":
            return False
        back = max(
            (
                s.changed_at
                for s in self.target_paths(device)
                if not s.path.is_bmc
                and s.state is PathState.UP
                and s.changed_at is not None
                and self._first_up.get(s.path.key) != s.changed_at  # the daemon's first look: not "back"
            ),
            default=None,
        )
        if back is None or now - back >= PORTS_SETTLE:
            return False
        # Two behind it answering on every path since it came back: its ports forward.
        answering = 0
        for target in self.topology.behind(device):
            paths = [s for s in self.target_paths(target) if not s.path.is_bmc]
            if paths and all(
                s.state is PathState.UP and s.last_ok is not None and s.last_ok > back for s in paths
            ):
                answering += 1
                if answering >= 2:
                    return False
        return True

    def _awaiting_carried(self, device: str, since: float | None) -> float | None:
        """How long a network device's verdict may wait for what it carries to be probed since it
        fell silent (two targets, or all if fewer): answering, it only stopped answering pings."""
        node = self.topology.nodes.get(device)
        if since is None or node is None or node.role != "network":
            return None
        behind = self.topology.behind(device)
        probed = 0
        for target in behind:
            if any(s.last_at is not None and s.last_at > since for s in self.target_paths(target)):
                probed += 1
                if probed >= 2:
                    return None
        if probed >= len(behind):
            return None
        return self._confirm_time(device)

    def _confirm_time(self, target: str) -> float:
        """How long ``target``'s slowest path takes to confirm a failure (an http path with a 3 s
        timeout needs ~8 s): a dependent's verdict waits that long for it, so the page names the
        hypervisor and not the VM noticed first."""
        return max(
            (
                s.path.fail_after * (s.path.retry_interval + s.path.timeout) + 2.0
                for s in self.target_paths(target)
                if not s.path.is_bmc
            ),
            default=HOLD_MAX,
        )

    def _vantage_suspect(self) -> bool:
        """A vantage path is failing but not yet confirmed: the monitor may be the one cut off."""
        return any(s.state is PathState.UP and s.failures > 0 for s in self.target_paths(VANTAGE))

    def _fresh_look(self, now: float) -> None:
        """Vantage is back: forget what the target paths saw while blind and probe them all now."""
        for status in self.statuses.values():
            if status.path.target != VANTAGE:
                status.state, status.successes, status.failures = PathState.UNKNOWN, 0, 0
                status.reset_at = now
                # what failed while blind says nothing about the target (nor about any loss)
                status.failing_since = status.last_failure = status.last_failure_sent = None
                self.scheduler.run_now(status.path.key)
        self._last_failure.clear()
        self._last_failure_sent.clear()

    def _settle_dependents(self, previous: Correlation, corr: Correlation, now: float) -> bool:
        """Something came back: what depends on it showed its failure while it was down, so that
        evidence is stale (a VM behind a host that was off, a host behind a switch). Forget it and
        probe those targets now; they get a verdict of their own only once they fail afresh as
        ``fail_after`` demands. Without this, the moment between a switch answering and its
        dependents' next probes pages every one of them as an outage of its own."""
        degraded = TargetState.DEGRADED
        back = [
            name
            for name, state in corr.own.items()
            if (previous.own.get(name) is TargetState.DOWN and state in (TargetState.UP, degraded))
            # a hypervisor whose production link is back (it was only degraded, its VMs dark
            # behind that link): their failures are as stale
            or (
                previous.own.get(name) is degraded
                and state is TargetState.UP
                and any(previous.own.get(d) is TargetState.DOWN for d in self.topology.behind(name))
            )
        ]
        for name, bmc in self.bmc.items():
            if corr.own.get(name) is TargetState.UP and previous.own.get(name) is not TargetState.UP:
                bmc.clear(now)
        settled = False
        for name in back:
            for dependent in self.topology.behind(name):
                for status in self.target_paths(dependent):
                    if status.path.is_bmc or status.state is PathState.UP:
                        continue
                    if status.state is PathState.DOWN or status.failures:
                        status.state, status.successes, status.failures = PathState.UNKNOWN, 0, 0
                        status.reset_at = now
                        settled = True
                    self.scheduler.run_now(status.path.key)
        return settled

    def evaluate(self, now: float) -> list[Change]:
        """One correlation pass: target states, then incident changes. Returns the changes."""
        vantage_paths = self.target_paths(VANTAGE)
        vantage_up = not vantage_paths or any(s.state is not PathState.DOWN for s in vantage_paths)
        if vantage_up and not self.correlation.vantage_up:
            self._fresh_look(now)
        previous = self.correlation
        self.correlation = corr = self._correlate(now)
        if self._settle_dependents(previous, corr, now):
            self.correlation = corr = self._correlate(now)
        for name, state in corr.states.items():
            was = previous.states.get(name, TargetState.UNKNOWN)
            if state is not was:
                down = ", ".join(s.path.name for s in self.target_paths(name) if s.state is PathState.DOWN)
                log.info(
                    "target state target=%s state=%s was=%s paths_down=%r", name, state, was, down or "none"
                )
        suspects = {
            up: self._confirm_time(up)
            for verdict in corr.verdicts
            if verdict.scope is not Scope.MONITOR
            for up in self.topology.upstream(verdict.root)
            if self._suspect(up, corr, now)
        }
        for verdict in corr.verdicts:
            if verdict.scope is Scope.MONITOR:
                continue
            for up in self.topology.upstream(verdict.root):
                if up not in suspects and self._just_forwarding(up, now):
                    suspects[up] = PORTS_SETTLE
        for verdict in corr.verdicts:
            wait = self._awaiting_bmc(verdict.root, verdict.since, verdict.cause)
            if wait is None:
                wait = self._awaiting_carried(verdict.root, verdict.since)
            if wait is not None:
                suspects[verdict.root] = wait
        changes = self.tracker.step(
            corr,
            now,
            self.topology,
            suspects=suspects,
            vantage_settling=self._vantage_suspect(),
            failing=self._last_failure,
            blipped=self._blipped,
        )
        if self.tracker.waiting:
            self._dirty.set()  # look again once the dependencies (or the vantage) have settled
        if changes:
            self.incidents_changed.set()
        for change in changes:
            incident = self.tracker.incidents[change.incident]
            log.info(
                "incident id=%d change=%s scope=%s root=%s cause=%s: %s",
                incident.id, change.kind, incident.scope, incident.root, incident.cause or "-", change.text,
            )  # fmt: skip
        return changes

    async def _correlation_loop(self) -> None:
        while True:
            # Also look every few seconds without news: a recovery grace or a hold may run out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), 5.0)
            # Coalesce a burst of path changes (a switch dying flips hundreds at once) into one pass.
            await asyncio.sleep(0.05)
            self._dirty.clear()
            self.evaluate(clock.now())
            if self._vantage_suspect():
                self._dirty.set()  # look again once the vantage has settled
                await asyncio.sleep(0.25)

    def acknowledge(self, incident_id: int, by: str) -> Incident:
        incident, changes = self.tracker.acknowledge(incident_id, by, clock.now())
        if changes:
            self.incidents_changed.set()
        for change in changes:
            log.info("incident id=%d change=%s: %s", incident.id, change.kind, change.text)
        return incident

    def note(self, incident_id: int, kind: str, text: str, by: str) -> Incident:
        changes = self.tracker.note(incident_id, kind, text, by, clock.now())
        self.incidents_changed.set()
        for change in changes:
            log.info("incident id=%d change=%s kind=%s by=%s", incident_id, change.kind, kind, by)
        return self.tracker.incidents[incident_id]

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.scheduler.run(), name="scheduler")
            tg.create_task(self._correlation_loop(), name="correlation")

    # ------------------------------------------------------------------ reading
    def target_paths(self, target: str) -> list[PathStatus]:
        return self._by_target.get(target, [])

    def target_states(self) -> dict[str, TargetState]:
        """As of the last correlation pass (at most ~50 ms behind the paths)."""
        return {name: self.correlation.states.get(name, TargetState.UNKNOWN) for name in self.config.targets}

    @property
    def vantage_up(self) -> bool:
        """Up while any vantage path is not down (no vantage configured: assumed up)."""
        return self.correlation.vantage_up

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
                s.last.values if s.last is not None else (),
            )
            for s in self.statuses.values()
        )
        lag = self.scheduler.lag
        # Channels, store health and open incidents come from the read model (web/app.py fills
        # them in): the engine's snapshot is the paths and targets.
        return Snapshot(
            taken_at=clock.now(),
            site=self.config.site,
            paths=rows,
            targets=tuple((n, t.role, states[n]) for n, t in self.config.targets.items()),
            vantage_up=self.vantage_up,
            lag_buckets=tuple(lag.cumulative()),
            lag_sum=lag.sum,
            lag_count=lag.total,
            reload_ok=self.reloaded_ok,
            reload_at=self.reloaded_at,
            bmc=tuple((name, replace(state, events=deque(state.events))) for name, state in self.bmc.items()),
        )


async def open_shared(
    stack: AsyncExitStack, config: Config, shared: ProbeContext | None = None
) -> ProbeContext:
    """The long-lived probe resources (one ICMP socket, one HTTP session) ``config`` needs,
    added to ``shared`` when given (a reload that brings the first icmp or http path)."""
    from watchtower.probes.http import new_session
    from watchtower.probes.icmp import Pinger

    kinds = {p.kind for p in (*config.paths, *config.vantage_paths, *config.bmc_paths)}
    shared = shared or ProbeContext(timeout=0)
    if "snmp" in kinds and not shared.extra.get("snmp_cleanup"):
        from watchtower.probes.snmp import close_engines

        # pysnmp engines run timers of their own: close them with the daemon (or the CLI probe)
        stack.callback(close_engines)
        shared.extra["snmp_cleanup"] = True
    if "icmp" in kinds and shared.pinger is None:
        shared.pinger = await stack.enter_async_context(Pinger())
    if "http" in kinds and shared.http_session is None:
        shared.http_session = await stack.enter_async_context(new_session())
    return shared
