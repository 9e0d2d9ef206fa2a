"""Incident lifecycle: verdicts over time -> incidents that open, grow, merge, flap and resolve.

The clock is passed in; nothing here reads it or does I/O. Each call to :meth:`step` returns
the :class:`Change` list it caused, which is what the log, the store and the alerting consume.

Decisions an admin would expect:
- **one incident per outage**: a verdict whose root already has an open incident updates it;
- **merge, not a second page**: VMs confirmed down before their hypervisor open a ``vm``
  incident; when the hypervisor is confirmed, the oldest such incident is *re-rooted* (same id,
  scope and root change, a timeline entry says why) and the others are folded into it;
- **flap damping**: a root that fails again within ``flap_window`` of its incident resolving
  reopens that incident and counts the flap (``reopened`` is not a new page);
- **never silently dropped**: when a root recovers while what it took down stays down, the
  incident resolves and says so, and those targets become roots of their own incidents;
- **blind is not down**: while the vantage is down, target incidents neither open nor resolve;
  one ``monitor`` incident records the blind window; while a vantage path is failing but not yet
  confirmed, nothing changes (it may be the monitor's own uplink);
- **the root first**: a verdict whose dependency is failing but not yet confirmed waits (bounded by
  that dependency's confirmation time), so the page names the switch, not the VM noticed first;
- **recovery as careful as failure**: while an incident's root is back, what depends on it is
  coming back with it for ``RECOVERY_GRACE`` (a VM booting, a host behind a switch whose ports do
  not forward yet) and gets no incident of its own; a reopened incident's cause is what is seen
  now, never the last outage's.

**One owner.** :class:`IncidentTracker` is the only writer of incidents. An :class:`Incident` is a
frozen value: every change makes a new one and replaces it in the tracker's table, so what the
alerting, the store's thread, the web and the metrics hold is a consistent picture that nobody
changes under them. Timeline notes from elsewhere (a trap, a message decided, a person's note)
go through :meth:`IncidentTracker.note`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from watchtower.durations import exact
from watchtower.engine.correlate import WARNING_SCOPES, Cause, Correlation, Scope, TargetState, Verdict
from watchtower.engine.topology import Topology

FLAP_WINDOW = 600.0  # seconds after resolution during which a recurrence reopens the incident
# After the root is back, what it took down gets this long to come back (VMs boot, services start)
# within the same incident: a VM still booting is part of the restore, not a new outage to page for.
RECOVERY_GRACE = 300.0
# An affected target that answers on some of its paths but not all (``degraded``: the VM pings, its
# service is still starting) is not back yet; the all-clear waits for it this long. Shorter than
# RECOVERY_GRACE because a target can be degraded for reasons of its own that predate the outage.
PARTIAL_GRACE = 120.0
# Causes the BMC proves on its own (the chassis is off, a critical SEL entry): such a host is its own
# outage even while what it depends on is coming back.
OWN_CAUSES = (Cause.POWER_OFF, Cause.HARDWARE_FAULT)
# An incident whose root began failing at most this long before a verdict's first failed probe is
# of the same onset (VMs confirmed a moment before their hypervisor's next probe: an interval of
# 5 s plus the confirming retries): it is folded into the verdict's incident. Longer before, it is
# an outage of its own (a NAS off for a minute, a VM hung 20 s before the switch starts losing
# packets), and stays open with its own all-clear.
REROOT_WINDOW = 15.0
# ... and it was opened at most this long before the verdict's root first failed: a VM confirmed
# in three quick retries before its switch's next probe (an interval of 5 s) is that switch's.
REROOT_LEAD = 6.0
# A dependent's verdict waits at least this long for a suspect dependency to be confirmed or cleared
# (fail_after x retry_interval + timeout with the defaults is ~3 s; a flapping one must not hold forever).
HOLD_MAX = 10.0
# How long after resolving an incident a new failure of its root still delays its all-clear (the
# longest all-clear hold, that of a flapping incident).
ALL_CLEAR_WATCH = 300.0
# A resolved incident still claims what boots behind its root this long (shorter than the default
# all-clear hold, so its all-clear has not gone out yet): one VM slower than the rest is the restore.
RESTORE_TAIL = 45.0
# What answers again behind a root that is back is done with that restore once it has answered
# this long (a probe round after the one that brought it back): a VM up for a moment as its storage
# returns may still reboot onto it; a host up for 7 s after its switch and then hung is an outage.
RESTORE_SETTLE = 5.0


class IncidentState(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    at: float
    kind: (
        str  # first_failure, opened, confirmed, affected, cause, scope, merged, reopened, ack, resolved, ...
    )
    text: str


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    scope: Scope
    root: str
    opened_at: float
    cause: Cause | None = None
    affected: tuple[str, ...] = ()
    state: IncidentState = IncidentState.OPEN
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    first_failure_at: float | None = None
    evidence: tuple[str, ...] = ()
    flaps: int = 0
    merged_into: int | None = None
    back: tuple[str, ...] = ()  # affected targets seen up again
    root_back_at: float | None = None  # the root is up again, affected targets still coming back
    # Resolved: the last time its root or what it affected showed a failure (not yet confirmed):
    # the all-clear counts its hold from here, so it does not go out while the host is failing again.
    quiet_since: float | None = None
    timeline: tuple[TimelineEvent, ...] = ()

    @property
    def is_open(self) -> bool:
        return self.state is not IncidentState.RESOLVED

    def noted(self, at: float, kind: str, text: str) -> Incident:
        """This incident with one more timeline event."""
        return replace(self, timeline=(*self.timeline, TimelineEvent(at, kind, text)))

    def headline(self) -> str:
        if self.scope is Scope.MONITOR:
            return f"monitor {self.root} is blind (its own uplink is down)"
        if self.scope in WARNING_SCOPES:
            return f"{self.scope} warning: {self.evidence[0] if self.evidence else self.root}"
        cause = f" ({self.cause})" if self.cause else ""
        more = f", {len(self.affected)} affected" if self.affected else ""
        return f"{self.scope} {self.root} down{cause}{more}"


@dataclass(frozen=True, slots=True)
class Change:
    incident: int
    kind: str  # opened, reopened, affected, cause, rerooted, merged, resolved, acknowledged, note
    text: str


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


_span = exact


class IncidentTracker:
    """The incidents of the site and every rule that changes them; the only writer."""

    def __init__(self, flap_window: float = FLAP_WINDOW, next_id: int = 1):
        self.flap_window = flap_window
        self.incidents: dict[int, Incident] = {}
        self._next_id = next_id
        self._holding: dict[str, float] = {}  # verdict root -> since when it is held back
        # incident id -> what behind its root answered again while it was coming back
        self._seen_up: dict[int, dict[str, float]] = {}  # ... and since when (continuously)
        self._was_up: dict[int, set[str]] = {}  # ... at all, in this restore
        self._failing: Mapping[str, float] = {}  # target -> its last failed probe (``step``)
        self.waiting = False  # the last step held something back: step again soon
        # Each target's last pass in state ``down`` (its own paths), and its up stretches: what runs
        # behind a host that was down for a moment, too short for an incident, is rebooting.
        self._last_down: dict[str, float] = {}
        self._up_since: dict[str, float] = {}
        self._last_up: dict[str, tuple[float, float]] = {}  # target -> its last finished up stretch
        # target -> when it was last seen down for a moment (see ``step``'s ``blipped``)
        self._blipped: Mapping[str, float] = {}
        # incident id -> what its all-clear left as outages of their own (the grace ran out)
        self._released: dict[int, set[str]] = {}

    def load(self, incidents: Iterable[Incident], next_id: int) -> None:
        """Start from the store's open (and recently resolved) incidents: same ids after a restart."""
        for incident in incidents:
            self.incidents[incident.id] = incident
        self._next_id = max(self._next_id, next_id)

    def forget(self, incident_ids: Iterable[int]) -> None:
        """Finished incidents leave memory (the store keeps them)."""
        for incident_id in incident_ids:
            self.incidents.pop(incident_id, None)
            self._seen_up.pop(incident_id, None)
            self._was_up.pop(incident_id, None)
            self._released.pop(incident_id, None)

    # ------------------------------------------------------------------ reading
    def open_incidents(self) -> list[Incident]:
        return [i for i in self.incidents.values() if i.is_open]

    def get(self, incident_id: int) -> Incident | None:
        return self.incidents.get(incident_id)

    # ------------------------------------------------------------------ changes
    def _put(self, incident: Incident) -> Incident:
        self.incidents[incident.id] = incident
        return incident

    def _new(self, scope: Scope, root: str, now: float) -> Incident:
        incident = self._put(Incident(self._next_id, scope, root, now))
        self._next_id += 1
        return incident

    def acknowledge(self, incident_id: int, by: str, now: float) -> tuple[Incident, list[Change]]:
        """Raises KeyError for an unknown id. Acknowledging twice keeps the first ack."""
        incident = self.incidents[incident_id]
        if incident.state is not IncidentState.OPEN:
            return incident, []
        text = f"acknowledged by {by}"
        incident = self._put(
            replace(
                incident, state=IncidentState.ACKNOWLEDGED, acknowledged_at=now, acknowledged_by=by
            ).noted(now, "ack", text)
        )
        return incident, [Change(incident.id, "acknowledged", text)]

    def raise_warning(
        self, scope: Scope, root: str, text: str, evidence: Iterable[str], now: float
    ) -> list[Change]:
        """Open, or update, the one open warning incident of (``scope``, ``root``): a stale backup,
        an expiring certificate. Its source decides when it holds; correlation never touches it."""
        assert scope in WARNING_SCOPES, scope
        evidence = tuple(evidence)
        incident = next((i for i in self.open_incidents() if i.scope is scope and i.root == root), None)
        if incident is None:
            incident = self._new(scope, root, now)
            self._put(replace(incident, evidence=evidence).noted(now, "opened", text))
            return [Change(incident.id, "opened", text)]
        if incident.evidence != evidence:
            self._put(replace(incident, evidence=evidence).noted(now, "warning", text))
            return [Change(incident.id, "updated", text)]
        return []

    def clear_warning(self, scope: Scope, root: str, text: str, now: float) -> list[Change]:
        """Resolve the open warning incident of (``scope``, ``root``), if there is one."""
        changes = []
        for incident in self.open_incidents():
            if incident.scope is scope and incident.root == root:
                resolved = replace(incident, state=IncidentState.RESOLVED, resolved_at=now)
                self._put(resolved.noted(now, "resolved", text))
                changes.append(Change(incident.id, "resolved", text))
        return changes

    def annotate(self, incident_id: int, kind: str, text: str, now: float) -> Incident:
        """A timeline entry from outside the lifecycle (a trap, a message decided). KeyError for an
        unknown id."""
        return self._put(self.incidents[incident_id].noted(now, kind, text))

    def _held(
        self, corr: Correlation, now: float, topology: Topology | None, suspects: Mapping[str, float]
    ) -> set[str]:
        """Roots of verdicts to hold back for now: something they depend on is failing but not yet
        confirmed (``suspects``: target -> how long its confirmation may take), so this may be its
        outage (one incident named after it), not theirs; or the root itself is in ``suspects``
        (its BMC has not answered since the outage began: the page waits for the BMC's word on
        why). Bounded: a dependency that stays suspect longer than its confirmation time
        (flapping) no longer holds anyone."""
        held: set[str] = set()
        # A hold belongs to one verdict while it lasts: a root whose verdict is gone (merged into
        # its hypervisor's, or recovered) starts afresh next time. A stale start would make the
        # next outage's hold look expired, and the page would name the VM again.
        for stale in self._holding.keys() - {v.root for v in corr.verdicts}:
            del self._holding[stale]
        if topology is None:
            return held
        for verdict in corr.verdicts:
            if verdict.scope is Scope.MONITOR:
                continue
            bounds = [suspects[u] for u in topology.upstream(verdict.root) if u in suspects]
            if bounds:
                bounds.append(HOLD_MAX)
            if verdict.root in suspects:
                # Its own wait (its BMC's reading; for a switch, what it carries), no dependency:
                # as long as that may take, no floor.
                bounds.append(suspects[verdict.root])
            if not bounds:
                self._holding.pop(verdict.root, None)
                continue
            since = self._holding.setdefault(verdict.root, now)
            if now - since < max(bounds):
                held.add(verdict.root)
        return held

    def note(self, incident_id: int, kind: str, text: str, by: str, now: float) -> list[Change]:
        """A person's note (decision, vendor case, ...) on the timeline as event ``note:KIND``.
        Raises KeyError for an unknown id."""
        line = f"{kind.replace('_', ' ')} by {by}: {text}"
        incident = self.annotate(incident_id, f"note:{kind}", line, now)
        return [Change(incident.id, "note", line)]

    def _watch_states(self, corr: Correlation, now: float) -> None:
        for name, state in corr.own.items():
            if state is TargetState.DOWN:
                self._last_down[name] = now
        for name, state in corr.states.items():
            if state is TargetState.UP:
                self._up_since.setdefault(name, now)
            elif name in self._up_since:
                self._last_up[name] = (self._up_since.pop(name), now)

    def _after_bounce(
        self, target: str, corr: Correlation, now: float, topology: Topology | None
    ) -> str | None:
        """What ``target`` needs that was down less than ``RECOVERY_GRACE`` ago and answers again,
        when ``target`` has not been up for ``RESTORE_SETTLE`` since: a hypervisor that lost power
        for 4 s (too short to confirm and page) reboots its VMs, and they are that blip coming
        back, not outages of their own, for the grace."""
        if topology is None:
            return None
        for up in topology.upstream(target):
            if topology.nodes[up].role == "network":
                continue  # a switch back from a blip reboots nothing behind it
            down_at = max(self._last_down.get(up, -math.inf), self._blipped.get(up, -math.inf))
            if now - down_at >= RECOVERY_GRACE or corr.own.get(up) is TargetState.DOWN:
                continue
            stretch = self._last_up.get(target)
            if stretch is not None and stretch[1] - max(stretch[0], down_at) >= RESTORE_SETTLE:
                continue  # up (back, or never gone) for long after that: failing now is its own
            return up
        return None

    def _coming_back(
        self, corr: Correlation, roots: set[str], now: float, topology: Topology | None
    ) -> dict[str, int]:
        """Targets whose failure belongs to an incident that is coming back: its root answers again
        and what depends on it (what it took down, and what is booting behind it) has
        ``RECOVERY_GRACE`` to follow. A VM booting after its host, a host behind a switch that
        answers before its ports forward: part of the restore, not a new outage to page for."""
        out: dict[str, int] = {}
        for incident in self.incidents.values():
            if (
                incident.scope is Scope.MONITOR
                or incident.scope in WARNING_SCOPES
                or incident.root in roots
                or incident.merged_into is not None
            ):
                continue
            if not incident.is_open and (
                incident.resolved_at is None or now - incident.resolved_at > RESTORE_TAIL
            ):
                continue  # resolved a moment ago: a VM booting behind what just came back still belongs to it
            if corr.states.get(incident.root) not in (TargetState.UP, TargetState.DEGRADED):
                continue
            if incident.root_back_at is not None and now - incident.root_back_at >= RECOVERY_GRACE:
                continue
            behind = topology.behind(incident.root) if topology is not None else ()
            # Up for RESTORE_SETTLE while the root is back: done with this restore, failing again
            # is its own. (Up while the root was still down, before it failed once more, does not
            # count: it comes back with this restore; ``back`` is the log of the restores. Nor does
            # up for a moment as the root returns: a VM answers, then reboots onto its storage.)
            seen_up = self._seen_up.setdefault(incident.id, {})
            was_up = self._was_up.setdefault(incident.id, set())
            released = self._released.get(incident.id, ())
            # A switch coming back reboots nothing. Once two behind it have answered steadily
            # for RESTORE_SETTLE (its ports forward), what answered once and fails after is an
            # outage of its own (a hypervisor hung 3 s after its switch came back), not a port
            # still coming up; so is what still fails a probe round after that (hung as the
            # ports came back, it never answered).
            steady = sorted(
                since
                for t, since in seen_up.items()
                if now - since >= RESTORE_SETTLE and self._failing.get(t, -math.inf) < since
            )
            forwards_from = steady[1] if incident.scope is Scope.NETWORK and len(steady) >= 2 else None
            for target in (*incident.affected, *behind):
                if target in released:
                    continue  # the grace ran out for it: an outage of its own now, not this restore
                up_since = seen_up.get(target)
                if up_since is not None and now - up_since >= RESTORE_SETTLE:
                    continue  # done with this restore
                if forwards_from is not None and (
                    target in was_up or self._failing.get(target, -math.inf) >= forwards_from + RESTORE_SETTLE
                ):
                    continue  # behind a switch that forwards, failing now: its own
                if corr.states.get(target) is TargetState.UP:
                    seen_up.setdefault(target, now)
                    was_up.add(target)
                else:
                    seen_up.pop(target, None)
                    out.setdefault(target, incident.id)
                    out.setdefault(target, incident.id)
        return out

    def step(
        self,
        corr: Correlation,
        now: float,
        topology: Topology | None = None,
        *,
        suspects: Mapping[str, float] | None = None,
        vantage_settling: bool = False,
        failing: Mapping[str, float] | None = None,
        blipped: Mapping[str, float] | None = None,
    ) -> list[Change]:
        """Fold one correlation into the incidents. ``suspects``: targets failing but not yet
        confirmed, with their confirmation time (their dependents' verdicts wait for them);
        ``vantage_settling``: a vantage path is failing unconfirmed (nothing changes until it
        settles: opening a network incident for the monitor's own uplink is the false alarm to
        avoid); ``failing``: each target's last failed probe, confirmed or not (a resolved incident's
        all-clear waits while its root or what it affected fails again: a host at 60 % loss
        fails a probe now and then between the passes); ``blipped``: when each host was last seen
        down for a moment (its BMC said its chassis was off, or it was dark on every path at once):
        a blip too short to confirm still reboots what runs on it."""
        self.waiting = False
        self._blipped = blipped or {}
        self._failing = failing or {}
        changes: list[Change] = []
        if failing:
            for incident in list(self.incidents.values()):
                if (
                    incident.is_open
                    or incident.resolved_at is None
                    or now - incident.resolved_at > ALL_CLEAR_WATCH
                ):
                    continue
                last = max((failing.get(t, 0.0) for t in (incident.root, *incident.affected)), default=0.0)
                if last > max(incident.resolved_at, incident.quiet_since or 0.0):
                    self._put(replace(incident, quiet_since=last))
        if corr.vantage_up and vantage_settling:
            self.waiting = True
            return changes
        blind = next((i for i in self.open_incidents() if i.scope is Scope.MONITOR), None)
        if not corr.vantage_up:
            if blind is None:
                verdict = next(v for v in corr.verdicts if v.scope is Scope.MONITOR)
                text = f"blind since {_clock(now)}: every vantage path is down"
                incident = self._new(Scope.MONITOR, verdict.root, now)
                self._put(replace(incident, evidence=verdict.evidence).noted(now, "opened", text))
                changes.append(Change(incident.id, "opened", text))
            return changes  # what is seen while blind is not evidence: target incidents stay as they are
        if blind is not None:
            text = f"blind from {_clock(blind.opened_at)} to {_clock(now)} ({_span(now - blind.opened_at)})"
            self._put(
                replace(blind, state=IncidentState.RESOLVED, resolved_at=now).noted(now, "resolved", text)
            )
            changes.append(Change(blind.id, "resolved", text))

        self._watch_states(corr, now)
        held = self._held(corr, now, topology, suspects or {})
        if held:
            self.waiting = True  # look again once the dependencies have settled
        verdicts = [v for v in corr.verdicts if v.scope is not Scope.MONITOR and v.root not in held]
        claimed: set[int] = set()
        roots = {v.root for v in verdicts}
        for incident_id in list(self._seen_up):
            restoring = self.incidents.get(incident_id)
            if restoring is not None and corr.own.get(restoring.root) is TargetState.DOWN:
                # Its root went down again, if only for a moment (too short for a verdict): what
                # runs on it reboots, a new way up for all of it.
                del self._seen_up[incident_id]
                self._was_up.pop(incident_id, None)
        recovering = self._coming_back(corr, roots, now, topology)
        # an outage of its own stays its own
        own_roots = {i.root for i in self.open_incidents() if i.scope not in WARNING_SCOPES}
        for verdict in verdicts:
            owner_id = recovering.get(verdict.root)
            if owner_id is not None and verdict.cause not in OWN_CAUSES and verdict.root not in own_roots:
                claimed.add(owner_id)
                owner = self.incidents[owner_id]
                if not owner.is_open:
                    # Resolved a moment ago (its all-clear not yet out): the restore is not over.
                    state = IncidentState.ACKNOWLEDGED if owner.acknowledged_at else IncidentState.OPEN
                    text = f"{verdict.root} still coming back after {owner.root}: the restore is not over"
                    owner = self._put(
                        replace(owner, state=state, resolved_at=None, root_back_at=now).noted(
                            now, "root_back", text
                        )
                    )
                    changes.append(Change(owner_id, "recovering", text))
                if verdict.root in owner.back:
                    # back once, down again in this restore: the all-clear waits for it again
                    owner = self._put(replace(owner, back=tuple(b for b in owner.back if b != verdict.root)))
                if verdict.root not in owner.affected:
                    text = f"affected: +{verdict.root} (still coming back after {owner.root})"
                    self._put(
                        replace(owner, affected=(*owner.affected, verdict.root)).noted(now, "affected", text)
                    )
                    changes.append(Change(owner_id, "affected", text))
                continue
            if (
                verdict.cause not in OWN_CAUSES
                and verdict.root not in own_roots
                and self._after_bounce(verdict.root, corr, now, topology) is not None
            ):
                continue  # still coming back after what it runs on was down for a moment
            incident = self._apply(verdict, now, changes)
            claimed.add(incident.id)
            self._note_back(incident.id, corr, now)
        for incident in self.open_incidents():
            if incident.scope is Scope.MONITOR or incident.scope in WARNING_SCOPES:
                continue
            root_state = corr.states.get(incident.root)
            if root_state not in (TargetState.UP, TargetState.DEGRADED, None):
                continue  # down, unknown or unreachable: cannot tell yet, keep it open
            if incident.id in claimed and incident.root in roots:
                continue
            incident = self._note_back(incident.id, corr, now)
            still, partial = self._still_down(incident, corr), self._partly_back(incident, corr)
            if (still or partial) and incident.root_back_at is None:
                text = f"{incident.root} is back; waiting for {', '.join(still + partial)} to come back"
                self._put(replace(incident, root_back_at=now).noted(now, "root_back", text))
                changes.append(Change(incident.id, "recovering", text))
                continue
            waited = now - (incident.root_back_at or now)
            if (not still and (not partial or waited >= PARTIAL_GRACE)) or waited >= RECOVERY_GRACE:
                self._resolve(incident.id, corr, now, changes)
        return changes

    @staticmethod
    def _still_down(incident: Incident, corr: Correlation) -> list[str]:
        return [
            a
            for a in incident.affected
            if a not in incident.back
            and corr.states.get(a) in (TargetState.DOWN, TargetState.UNREACHABLE, TargetState.UNKNOWN)
        ]

    @staticmethod
    def _partly_back(incident: Incident, corr: Correlation) -> list[str]:
        degraded = TargetState.DEGRADED
        return [a for a in incident.affected if a not in incident.back and corr.states.get(a) is degraded]

    def _apply(self, verdict: Verdict, now: float, changes: list[Change]) -> Incident:
        open_target = [
            i for i in self.open_incidents() if i.scope is not Scope.MONITOR and i.scope not in WARNING_SCOPES
        ]
        incident = next((i for i in open_target if i.root == verdict.root), None)
        # Earlier incidents whose root this verdict now explains (VMs confirmed before their host):
        # only those of the same onset. An older one (a VM dead on its own for an hour, already
        # paged and acknowledged, when its switch dies) is an outage of its own that stays open;
        # re-rooting it would swallow the switch's page.
        onset = (verdict.since if verdict.since is not None else now) - REROOT_WINDOW
        absorbed = sorted(
            (
                i
                for i in open_target
                if i.root in verdict.affected
                and i is not incident
                and (i.first_failure_at if i.first_failure_at is not None else i.opened_at) >= onset
                # ... and opened around it too: a NAS that hung minutes into its switch's outage
                # (its management side alive till then) was an outage of its own
                and i.opened_at <= onset + 2 * REROOT_WINDOW + HOLD_MAX
                # ... and not confirmed well before this root failed at all: a hypervisor paged
                # 12 s before its switch missed a probe hung on its own (what a switch takes
                # down fails within one probe round of the switch's first failure)
                and (verdict.since is None or i.opened_at >= verdict.since - REROOT_LEAD)
                and i.flaps == 0
                and i.cause not in OWN_CAUSES  # the BMC proves it is its own outage
            ),
            key=lambda i: i.opened_at,
        )
        if incident is not None and incident.flaps:
            # Reopened: what was opened before it failed again (a VM that was paged, down on its
            # own, a moment before its host failed once more) stays its own outage.
            reopened = max(
                (e.at for e in incident.timeline if e.kind == "reopened"), default=incident.opened_at
            )
            absorbed = [i for i in absorbed if i.opened_at >= reopened]
        if incident is None and absorbed and self._recent(verdict.root, now) is not None:
            # The root has a recent incident to reopen: re-scoping one of these into it would make
            # two incidents of one root (two all-clears), and folding a paged one in would leave
            # its page without an all-clear. Each stays its own; the reopened one says the rest.
            absorbed = []
        if incident is None and absorbed:
            incident = absorbed.pop(0)
            text = (
                f"re-scoped {incident.scope} {incident.root} -> {verdict.scope} {verdict.root}: "
                f"{incident.root} is down because {verdict.root} is"
            )
            incident = self._put(
                replace(incident, scope=verdict.scope, root=verdict.root).noted(now, "scope", text)
            )
            changes.append(Change(incident.id, "rerooted", text))
        if incident is None:
            recent = self._recent(verdict.root, now)
            if recent is not None:
                text = f"{verdict.root} failed again: reopened (flap {recent.flaps + 1})"
                if verdict.cause is not None:
                    text += f", cause: {verdict.cause}"
                # What it is now is what is seen now: the last outage's cause, evidence and list
                # of what came back do not carry over.
                incident = self._put(
                    replace(
                        recent,
                        state=IncidentState.OPEN,
                        resolved_at=None,
                        acknowledged_at=None,
                        acknowledged_by=None,
                        flaps=recent.flaps + 1,
                        scope=verdict.scope,
                        cause=verdict.cause,
                        back=(),
                    ).noted(now, "reopened", text)
                )
                changes.append(Change(incident.id, "reopened", text))
        if incident is None:
            incident = replace(
                self._new(verdict.scope, verdict.root, now),
                cause=verdict.cause,
                affected=verdict.affected,
                evidence=verdict.evidence,
            )
            if verdict.since is not None:
                incident = replace(incident, first_failure_at=verdict.since).noted(
                    verdict.since, "first_failure", f"first failed probe of {verdict.root}"
                )
            text = f"confirmed: {incident.headline()}"
            incident = self._put(incident.noted(now, "opened", text))
            changes.append(Change(incident.id, "opened", text))
        for other in absorbed:
            self._put(
                replace(other, state=IncidentState.RESOLVED, resolved_at=now, merged_into=incident.id).noted(
                    now, "merged", f"merged into #{incident.id} ({verdict.scope} {verdict.root})"
                )
            )
            text = f"#{other.id} ({other.root}) merged in"
            incident = incident.noted(now, "merged", text)
            changes.append(Change(incident.id, "merged", text))
        back = tuple(b for b in incident.back if b not in verdict.affected)  # down again with it
        joined = tuple(a for a in verdict.affected if a not in incident.affected)
        incident = replace(incident, back=back)
        if joined:
            incident = replace(incident, affected=(*incident.affected, *joined))
            text = f"affected: +{', '.join(joined)} ({len(incident.affected)} in all)"
            incident = incident.noted(now, "affected", text)
            changes.append(Change(incident.id, "affected", text))
        if verdict.cause is Cause.OS_UNRESPONSIVE and incident.cause in (
            Cause.POWER_OFF,
            Cause.HARDWARE_FAULT,
            Cause.BMC_UNREACHABLE,
        ):
            # Chassis back on while the host is still down: it is booting, not hung (or, after a
            # BMC that did not answer, it may have been either: what it was is not known). Keep the
            # cause that explains the outage, and say what changed.
            text = (
                "BMC answers again: chassis on, host not answering yet (booting, or hung)"
                if incident.cause is Cause.BMC_UNREACHABLE
                else "BMC: chassis power back on, host not answering yet (booting?)"
            )
            if not incident.timeline or incident.timeline[-1].kind != "power":
                incident = incident.noted(now, "power", text)
        elif verdict.cause is not None and verdict.cause != incident.cause:
            text = f"cause: {verdict.cause}" + (f" (was {incident.cause})" if incident.cause else "")
            incident = replace(incident, cause=verdict.cause).noted(now, "cause", text)
            changes.append(Change(incident.id, "cause", text))
        if incident.root_back_at is not None:
            incident = replace(incident, root_back_at=None).noted(
                now, "root_failed", f"{verdict.root} failed again before everything came back"
            )
        self._seen_up.pop(incident.id, None)  # its root is failing (again): a new way down, a new way up
        self._was_up.pop(incident.id, None)
        self._released.pop(incident.id, None)
        return self._put(replace(incident, evidence=verdict.evidence))

    def _recent(self, root: str, now: float) -> Incident | None:
        candidates = [
            i
            for i in self.incidents.values()
            if i.root == root
            and i.scope not in WARNING_SCOPES
            and i.state is IncidentState.RESOLVED
            and i.merged_into is None
            and i.resolved_at is not None
            and now - i.resolved_at <= self.flap_window
        ]
        return max(candidates, key=lambda i: i.resolved_at or 0.0, default=None)

    def _note_back(self, incident_id: int, corr: Correlation, now: float) -> Incident:
        """Each affected target's return, for the restore log and the post-mortem."""
        incident = self.incidents[incident_id]
        for target in incident.affected:
            if target not in incident.back and corr.states.get(target) is TargetState.UP:
                incident = replace(incident, back=(*incident.back, target)).noted(
                    now, "back", f"{target} is back"
                )
        return self._put(incident)

    def _resolve(self, incident_id: int, corr: Correlation, now: float, changes: list[Change]) -> None:
        incident = self._note_back(incident_id, corr, now)
        still = self._still_down(incident, corr)
        text = f"{incident.root} is back after {_span(now - incident.opened_at)}"
        if incident.back and any(e.kind == "root_back" for e in incident.timeline):
            text = f"{incident.root} and what it took down are back after {_span(now - incident.opened_at)}"
        if still:
            text += f"; still down, now incidents of their own: {', '.join(still)}"
            self._released.setdefault(incident.id, set()).update(still)
        partial = self._partly_back(incident, corr)
        if partial:
            text += f"; answering but not on every path yet: {', '.join(partial)}"
        self._put(
            replace(incident, state=IncidentState.RESOLVED, resolved_at=now, root_back_at=None).noted(
                now, "resolved", text
            )
        )
        changes.append(Change(incident.id, "resolved", text))
