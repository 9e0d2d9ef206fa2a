"""Which messages an incident is owed now: a pure function of (incident, policy, now, what fired).

Nothing here reads the clock or does I/O. Every message has a *step id* that is unique within
its incident; the outbox stores (incident, step id, channel) with a unique key, so a step that
is due again after a restart, a reload or a race is a no-op, never a second page.

Step ids:
- ``step{N}``: the N-th escalation step of the policy (``after`` or ``rto_fraction``);
- ``update:{K}``: the K-th ``update_every`` status message (only the latest one due is sent:
  after a long pause nobody needs three stale updates in a row);
- ``ack:{N}``: the N-th acknowledgement, announced to every channel notified so far;
- ``reopen:{N}``: the incident failed again (flap N) after its all-clear went out;
- ``resolve:{N}``: the all-clear of the N-th flap, once the recovery held
  ``notify.all_clear_after``: a target bouncing up and down gets one page and one all-clear.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from watchtower import people
from watchtower.config import Config, Notify
from watchtower.durations import coarse, exact
from watchtower.engine.correlate import WARNING_SCOPES, Scope
from watchtower.engine.incidents import ALL_CLEAR_WATCH, Incident, IncidentState
from watchtower.engine.maintenance import paging_start

# Kinds a recipient counts as "notified" by: they get updates, acks and the all-clear.
NOTIFYING_KINDS = ("page", "escalation")


@dataclass(frozen=True, slots=True)
class RtoClock:
    """The tightest recovery-time objective among the services an incident takes down."""

    service: str
    target: str
    rto: float
    started_at: float  # the outage's start: the first failed probe, else the confirmation

    @property
    def deadline(self) -> float:
        return self.started_at + self.rto

    def left(self, now: float) -> float:
        return self.deadline - now


def outage_start(incident: Incident) -> float:
    return incident.first_failure_at if incident.first_failure_at is not None else incident.opened_at


def rto_clock(incident: Incident, config: Config) -> RtoClock | None:
    best: RtoClock | None = None
    for name in (incident.root, *incident.affected):
        target = config.targets.get(name)
        if target is None or target.service is None or target.service.rto is None:
            continue
        if best is None or target.service.rto < best.rto:
            best = RtoClock(target.service.name, name, target.service.rto, outage_start(incident))
    return best


# A flapping incident's all-clear waits longer each time it failed again (60 s, 120 s, 240 s, ...),
# up to this: a host bouncing every minute gets one page and one all-clear, not one per bounce.
ALL_CLEAR_HOLD_MAX = ALL_CLEAR_WATCH


def all_clear_hold(incident: Incident, policy: Notify) -> float:
    """How long the recovery must hold before the all-clear goes out."""
    if not incident.flaps:
        return policy.all_clear_after
    return max(policy.all_clear_after, min(policy.all_clear_after * 2**incident.flaps, ALL_CLEAR_HOLD_MAX))


@dataclass(frozen=True, slots=True)
class DueStep:
    step: str
    kind: str  # page | escalation | update | ack | reopen | resolve
    channels: tuple[str, ...]  # channel names, in config order
    label: str  # for the message and the timeline: "tier2 (unacknowledged after 15m)"


def channels_for(policy: Notify, selectors: Iterable[str]) -> tuple[str, ...]:
    """Channel names a step addresses: by tag or by name, in config order."""
    wanted = set(selectors)
    return tuple(c.name for c in policy.channels if c.name in wanted or wanted.intersection(c.tags))


_span = exact


def owes_all_clear(
    incident: Incident, policy: Notify, fired: Collection[str], notified: Collection[str]
) -> bool:
    """A resolved incident still owes its all-clear: someone was paged and it has not gone out.
    The one statement of this rule: the alerting asks it too, to know what is finished."""
    return (
        incident.state is IncidentState.RESOLVED
        and incident.merged_into is None
        and policy.on_resolve
        and bool(notified)
        and f"resolve:{incident.flaps}" not in fired
    )


def due(
    incident: Incident,
    config: Config,
    now: float,
    fired: Collection[str],
    notified: Collection[str],
    others: Sequence[Incident] = (),
    muted: bool = False,
) -> list[DueStep]:
    """The steps owed to ``incident`` at ``now`` that have not fired yet.

    ``fired``: step ids already recorded for this incident; ``notified``: channels that got one
    of its page/escalation messages; ``others``: the other open incidents (a step's
    ``when.cause: [security]`` looks at them); ``muted``: the incident is in maintenance now (no
    pages, escalations or updates; the ``after`` delays count from the end of its maintenance).
    Returns steps in the order they should go out.
    """
    policy = config.notify
    out: list[DueStep] = []
    if incident.merged_into is not None:
        return out  # its story continues in the incident it was folded into
    if incident.scope in WARNING_SCOPES:
        from watchtower.engine.warning_steps import warning_due

        return warning_due(incident, config, now, fired)
    acked = incident.state is IncidentState.ACKNOWLEDGED or incident.acknowledged_at is not None
    newly_notified: list[str] = []
    start = paging_start(incident)

    if incident.is_open and not muted:
        clock = rto_clock(incident, config)
        fall_at: float | None = None  # a step that reached nobody: the next one fires then
        for n, step in enumerate(policy.escalation):
            step_id = f"step{n}"
            if not people.step_applies(step, incident, others):
                continue
            if step.after is not None:
                at: float | None = start + step.after
            else:
                assert step.rto_fraction is not None
                at = None if clock is None else clock.started_at + step.rto_fraction * clock.rto
            fell = fall_at is not None and (at is None or fall_at < at)
            if fell:
                at = fall_at
            reach = people.step_reach(config, step, at) if at is not None else None
            fall_at = at if reach is not None and reach.nobody else None
            if step_id in fired or (step.unless == "acknowledged" and acked):
                continue
            if at is None or reach is None or now < at:
                continue
            if fell:
                label = "nobody reachable at the previous step"
            elif step.after is not None:
                label = "first alert" if n == 0 else f"unacknowledged after {_span(step.after)}"
                if step.unless is None and n:
                    label = f"open for {_span(step.after)}"
            else:
                assert clock is not None and step.rto_fraction is not None
                label = (
                    f"{step.rto_fraction:.0%} of the {clock.service} RTO ({_span(clock.rto)}) used, "
                    f"{coarse(max(0.0, clock.left(now)))} left"
                )
            if reach.contacts:
                label += f" ({', '.join(reach.contacts)})"
            elif reach.nobody:
                label += f" (none of {', '.join(step.contacts)} available: next step at once)"
            channels = channels_for(policy, reach.selectors)
            kind = "page" if not (set(notified) | set(newly_notified)) else "escalation"
            out.append(DueStep(step_id, kind, channels, label))
            newly_notified.extend(channels)

    everyone = tuple(c.name for c in policy.channels if c.name in set(notified) | set(newly_notified))
    if not everyone:
        return out

    if incident.is_open and not muted and policy.update_every and incident.scope is not Scope.MONITOR:
        k = int((now - start) // policy.update_every)
        if k >= 1 and f"update:{k}" not in fired:
            label = f"status after {_span(now - incident.opened_at)}"
            out.append(DueStep(f"update:{k}", "update", everyone, label))

    acks = sum(1 for e in incident.timeline if e.kind == "ack")
    if acks and f"ack:{acks}" not in fired and incident.acknowledged_by is not None:
        out.append(DueStep(f"ack:{acks}", "ack", everyone, f"acknowledged by {incident.acknowledged_by}"))

    flaps = incident.flaps
    if incident.is_open and flaps and f"reopen:{flaps}" not in fired and f"resolve:{flaps - 1}" in fired:
        out.append(DueStep(f"reopen:{flaps}", "reopen", everyone, f"failed again (flap {flaps})"))

    if (
        owes_all_clear(incident, policy, fired, everyone)
        and incident.resolved_at is not None
        and now - max(incident.resolved_at, incident.quiet_since or 0.0) >= all_clear_hold(incident, policy)
    ):
        out.append(DueStep(f"resolve:{flaps}", "resolve", everyone, "all clear"))
    return out
