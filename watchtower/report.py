"""The post-mortem of one incident as Markdown: the timeline the playbook's "Learn" phase walks.

Pure: everything comes in as arguments (the incident, its notifications and delivery attempts,
the monitor's blind windows, the config, the time of writing); nothing here reads the clock,
a file or the network. The CLI and the HTTP route gather the inputs and print or serve the text.

What it says, in the order a post-mortem meeting needs it:

- a summary (site, state, scope, root, cause, affected, when);
- the figures: time to detect (first failed probe -> confirmed), to notify (confirmed -> first
  page/escalation delivered), to acknowledge (confirmed -> ack), to restore (first failed probe
  -> resolved);
- per business service taken down: how long its target was down and whether the RTO held, and
  the RPO as a reminder to check the restore point;
- the timeline (T+0 = first failed probe) merging the incident's events with every message
  and its delivery (failed attempts, sent, pending);
- the windows in which watchtower itself was blind;
- the playbook's questions, pre-filled with what watchtower knows, and an empty action items table.

Names come from the config, the API (``acknowledged_by``) and channel errors: they are written
literally, but line breaks are flattened and table cells escape ``|`` so no name can break the
document's structure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from watchtower.checklist import checklist, provider_lines, staff_sentence
from watchtower.config import Config
from watchtower.durations import exact
from watchtower.engine.correlate import WARNING_SCOPES, Scope
from watchtower.engine.escalation import NOTIFYING_KINDS, outage_start
from watchtower.engine.incidents import Incident
from watchtower.store import Attempt, Notification

ROLE_ORDER = ("network", "hypervisor", "storage", "vm", "service")

# --------------------------------------------------------------------------- formatting


span = exact  # the name the report and its tests use


def _signed(seconds: float) -> str:
    return f"-{span(-seconds)}" if round(seconds) < 0 else span(seconds)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def iso(ts: float) -> str:
    """``2026-11-22T02:14:07Z`` (whole seconds)."""
    return _dt(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock(ts: float) -> str:
    """``02:14:07``."""
    return _dt(ts).strftime("%H:%M:%S")


_SPACE = re.compile(r"\s+")


def _inline(text: object) -> str:
    """One line: a name with a line break in it must not start a heading or a list item."""
    return _SPACE.sub(" ", str(text)).strip()


def _cell(text: object) -> str:
    """A table cell: one line, ``|`` escaped so the row keeps its columns."""
    return _inline(text).replace("|", "\\|")


_MARKUP = re.compile(r"([\\`*_\[\]<>#!])")


def _untrusted(text: str) -> str:
    """What a person typed (a note): Markdown and HTML in it shown as typed, never rendered."""
    return _MARKUP.sub(r"\\\1", text).replace("&", "&amp;")


def _row(*cells: object) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figures:
    """The four durations of the post-mortem, in seconds; None where it did not happen (yet)."""

    time_to_detect: float | None  # first failed probe -> confirmed (opened)
    time_to_notify: float | None  # confirmed -> first page/escalation delivered
    time_to_acknowledge: float | None  # confirmed -> acknowledged
    time_to_restore: float | None  # first failed probe (else confirmation) -> resolved


def _first_page(notifications: Sequence[Notification]) -> Notification | None:
    sent = [n for n in notifications if n.kind in NOTIFYING_KINDS and n.sent_at is not None]
    return min(sent, key=lambda n: (n.sent_at or 0.0, n.id), default=None)


def figures(incident: Incident, notifications: Sequence[Notification]) -> Figures:
    detect = None
    if incident.first_failure_at is not None:
        detect = max(0.0, incident.opened_at - incident.first_failure_at)
    page = _first_page([n for n in notifications if n.incident == incident.id])
    notify = None if page is None or page.sent_at is None else max(0.0, page.sent_at - incident.opened_at)
    ack = None
    if incident.acknowledged_at is not None:
        ack = max(0.0, incident.acknowledged_at - incident.opened_at)
    restore = None
    if incident.resolved_at is not None:
        restore = max(0.0, incident.resolved_at - outage_start(incident))
    return Figures(detect, notify, ack, restore)


# --------------------------------------------------------------------------- services


@dataclass(frozen=True)
class ServiceOutcome:
    """One business service the incident took down, and how its RTO fared."""

    target: str
    service: str
    rto: float | None
    rpo: float | None
    down_for: float  # until it came back, else until now / the incident's end
    status: str  # back | down (incident open) | left (incident ended while it was still down)

    def rto_verdict(self) -> str:
        """``yes``, ``no (over by 40m)``, ``not yet (3h25m left)``, ..."""
        if self.rto is None:
            return "no RTO set"
        over = self.down_for - self.rto
        if self.status == "back":
            return "yes" if over <= 0 else f"no (over by {span(over)})"
        if over > 0:
            still = ", still down" if self.status == "down" else ""
            return f"no (over by {span(over)}{still})"
        if self.status == "down":
            return f"not yet ({span(-over)} left)"
        return "unknown: still down when this incident ended, see the incident that took it over"

    def rto_summary(self) -> str:
        """For the RTO question: ``ERP: yes (down 1h10m of 4h)``."""
        verdict = self.rto_verdict()
        if self.rto is None or self.status == "down":
            return f"{self.service}: {verdict}"
        met = verdict.split(" (")[0].split(":")[0]
        least = "" if self.status == "back" else "at least "
        return f"{self.service}: {met} (down {least}{span(self.down_for)} of {span(self.rto)})"

    def down_text(self) -> str:
        if self.status == "back":
            return span(self.down_for)
        if self.status == "down":
            return f"still down ({span(self.down_for)} so far)"
        return f"at least {span(self.down_for)} (still down when this incident ended)"


def _back_times(incident: Incident) -> dict[str, float]:
    out: dict[str, float] = {}
    for event in incident.timeline:
        if event.kind == "back" and event.text.endswith(" is back"):
            out.setdefault(event.text.removesuffix(" is back"), event.at)
    return out


def _members(incident: Incident) -> list[str]:
    if incident.scope is Scope.MONITOR:
        return []
    return list(dict.fromkeys((incident.root, *incident.affected)))


def service_outcomes(incident: Incident, config: Config, now: float) -> list[ServiceOutcome]:
    start = outage_start(incident)
    back = _back_times(incident)
    root_back = incident.resolved_at if incident.merged_into is None else None
    out: list[ServiceOutcome] = []
    for name in _members(incident):
        target = config.targets.get(name)
        if target is None or target.service is None:
            continue
        svc = target.service
        end = root_back if name == incident.root else back.get(name)
        if end is not None:
            status, until = "back", end
        elif incident.resolved_at is None:
            status, until = "down", now
        else:
            status, until = "left", incident.resolved_at
        out.append(ServiceOutcome(name, svc.name, svc.rto, svc.rpo, max(0.0, until - start), status))
    return out


def restore_order(incident: Incident, config: Config) -> list[str]:
    """The incident's targets in the order they should come back: those with a service
    ``restore_order`` by it, then the others by role (network first), then as listed."""
    members = _members(incident)
    ordered: list[tuple[tuple[int, int, int], str]] = []
    for pos, name in enumerate(members):
        target = config.targets.get(name)
        order = target.service.restore_order if target and target.service else None
        if order is not None:
            key = (0, order, pos)
        else:
            role = target.role if target else "service"
            key = (1, ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), pos)
        ordered.append((key, name))
    return [name for _, name in sorted(ordered)]


def _describe_target(name: str, config: Config) -> str:
    target = config.targets.get(name)
    if target is None:
        return f"{name} (no longer in the config)"
    if target.service is not None:
        order = target.service.restore_order
        return f"{name} ({target.service.name}" + (f", order {order})" if order is not None else ")")
    return f"{name} ({target.role})"


# --------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class _Row:
    at: float
    group: int  # ties: the incident's own events first, then messages in outbox order
    seq: int
    text: str


def _label(n: Notification) -> str:
    return f"{n.kind} ({n.step}) to {n.channel}"


def _notification_rows(n: Notification, attempts: Sequence[Attempt], seq: int) -> list[_Row]:
    rows: list[_Row] = []
    mine = [a for a in attempts if a.notification == n.id]
    failed = [a for a in mine if not a.ok]
    if not mine and n.attempts:  # no attempt rows given: what the outbox row remembers
        count = n.attempts - (1 if n.state == "sent" else 0)
        if count > 0 and n.last_attempt_at is not None:
            failed = [Attempt(n.id, n.last_attempt_at, False, n.error)] * count
    last_error = next((a.error for a in reversed(failed) if a.error), None) or n.error
    why = f" (last error: {last_error})" if last_error else ""
    if n.state == "failed":
        at = max((a.at for a in failed), default=n.last_attempt_at or n.created_at)
        rows.append(
            _Row(at, 1, seq, f"{_label(n)}: gave up after {_plural(len(failed), 'failed attempt')}{why}")
        )
        return rows
    if failed:
        tries = _plural(len(failed), "attempt")
        rows.append(_Row(min(a.at for a in failed), 1, seq, f"{_label(n)}: {tries} failed{why}"))
    if n.state == "sent" and n.sent_at is not None:
        after = f" after {_plural(len(failed), 'failed attempt')}" if failed else ""
        rows.append(_Row(n.sent_at, 1, seq, f"{_label(n)}: sent{after}"))
    elif n.state == "pending":
        text = f"{_label(n)}: pending" + (", retrying" if failed else " (not attempted yet)")
        rows.append(_Row(n.created_at, 1, seq, text))
    return rows


def _timeline_rows(
    incident: Incident,
    notifications: Sequence[Notification],
    attempts: Sequence[Attempt],
    windows: Sequence[tuple[float, float | None]],
) -> list[_Row]:
    rows = [
        _Row(e.at, 0, i, _untrusted(e.text) if e.kind.startswith("note:") else e.text)
        for i, e in enumerate(incident.timeline)
    ]
    for i, n in enumerate(notifications):
        rows.extend(_notification_rows(n, attempts, i))
    if incident.scope is not Scope.MONITOR:  # a monitor incident's own timeline already says it
        start, end = outage_start(incident), incident.resolved_at
        for i, (a, b) in enumerate(windows):
            if a >= start and (end is None or a <= end):
                rows.append(_Row(a, 2, i, "watchtower blind: every vantage path down"))
            if b is not None and b >= start and (end is None or b <= end):
                rows.append(_Row(b, 2, i, f"watchtower sees again (blind for {span(b - a)})"))
    return sorted(rows, key=lambda r: (r.at, r.group, r.seq))


# --------------------------------------------------------------------------- the report


def _title(incident: Incident) -> str:
    if incident.scope is Scope.MONITOR or incident.scope in WARNING_SCOPES:
        return incident.headline()
    cause = f" ({incident.cause})" if incident.cause else ""
    return f"{incident.scope} {incident.root} down{cause}"


def _overlapping(
    windows: Sequence[tuple[float, float | None]], start: float, end: float
) -> list[tuple[float, float | None]]:
    return sorted((a, b) for a, b in windows if a <= end and (b is None or b >= start))


def render_report(
    incident: Incident,
    notifications: Sequence[Notification],
    attempts: Sequence[Attempt],
    blind_windows: Sequence[tuple[float, float | None]],
    config: Config,
    now: float,
) -> str:
    """The post-mortem of ``incident`` as Markdown, written at ``now`` (UTC throughout)."""
    notifications = [n for n in notifications if n.incident == incident.id]
    start = outage_start(incident)
    end = incident.resolved_at
    monitor = incident.scope is Scope.MONITOR
    fig = figures(incident, notifications)
    services = service_outcomes(incident, config, now)
    windows = _overlapping(blind_windows, start, end if end is not None else now)
    out: list[str] = [f"# Incident #{incident.id}: {_inline(_title(incident))}", ""]

    # ---- summary
    if incident.merged_into is not None:
        merged_at = iso(end or incident.opened_at)
        state = f"merged into #{incident.merged_into} at {merged_at} (its story continues there)"
    elif end is not None:
        state = f"resolved at {iso(end)}, {span(end - start)} after the first failed probe"
        if monitor:
            state = f"resolved at {iso(end)}: blind for {span(end - incident.opened_at)}"
    else:
        state = f"{incident.state} for {span(now - start)} so far (as of {iso(now)})"
    ack = "not acknowledged"
    if incident.acknowledged_at is not None:
        ack = f"{iso(incident.acknowledged_at)} by {incident.acknowledged_by or 'unknown'}"
    lines = [
        ("site", config.site),
        ("state", state),
        ("scope", f"{incident.scope}, root {incident.root}, cause {incident.cause or 'unknown'}"),
        ("affected", ", ".join(incident.affected) if incident.affected else "none besides the root"),
        (
            "first failed probe",
            iso(incident.first_failure_at) if incident.first_failure_at else "not recorded",
        ),
        ("confirmed", iso(incident.opened_at)),
        ("acknowledged", ack),
        ("resolved", iso(end) if end is not None else "not yet"),
    ]
    if incident.flaps:
        lines.append(("flaps", f"{incident.flaps} (it failed again after recovering)"))
    lines.append(("report written", iso(now)))
    out += [f"- **{k}:** {_inline(v)}" for k, v in lines]
    if incident.evidence:
        out += ["", "Evidence when last seen:", ""]
        out += [f"- {_inline(e)}" for e in incident.evidence]

    # ---- figures
    out += ["", "## Figures", "", "| figure | value | measured |", "|---|---|---|"]
    out += [_row(*r) for r in _figure_rows(incident, notifications, fig, now)]

    # ---- services
    out += ["", "## Services", ""]
    if monitor:
        out.append("watchtower itself was blind: no target was measured in this window.")
    elif not services:
        out.append("No target of this incident carries a `service` in the config: no RTO or RPO to check.")
    else:
        out += ["| service | target | RTO | down | RTO met |", "|---|---|---|---|---|"]
        out += [
            _row(
                s.service, s.target, span(s.rto) if s.rto is not None else "—", s.down_text(), s.rto_verdict()
            )
            for s in services
        ]
        out += ["", "Recovery points (RPO): verify what the restore actually brought back.", ""]
        points = [e.text for e in incident.timeline if e.kind == "restore_point"]
        for s in services:
            known = [p for p in points if p.startswith(f"{s.service}:")]
            if known:
                out += [f"- {_inline(p)}" for p in known]  # the backup watch's reading at T+0
            elif s.rpo is None:
                out.append(f"- {_inline(s.service)} ({s.target}): no RPO set; record the restore point used.")
            else:
                out.append(
                    f"- {_inline(s.service)} ({s.target}): RPO {span(s.rpo)}: the restore point must be "
                    f"from {iso(start - s.rpo)} or later ({span(s.rpo)} before the first failed probe); "
                    f"record the one actually used."
                )

    # ---- first hour
    if not monitor:
        others: list[Incident] = []
        out += ["", "## First hour", ""]
        out += [
            f"- {_untrusted(item.line())}" for item in checklist(incident, notifications, config, now, others)
        ]
        for line in provider_lines(incident, config):
            out.append(f"- {_untrusted(line)}")
        staff = staff_sentence(incident, config)
        if staff:
            out += ["", f"For the staff: {_untrusted(staff)}"]

    # ---- timeline
    zero = "first failed probe" if incident.first_failure_at is not None else "confirmation"
    out += ["", "## Timeline", "", f"T+0 = {iso(start)}, the {zero}.", ""]
    out += ["| T+ | time (UTC) | event |", "|---|---|---|"]
    day = _dt(start).date()
    for r in _timeline_rows(incident, notifications, attempts, windows):
        when = clock(r.at) if _dt(r.at).date() == day else _dt(r.at).strftime("%Y-%m-%d %H:%M:%S")
        out.append(_row(_signed(r.at - start), when, r.text))

    # ---- blind windows
    out += ["", "## Monitor blind windows", ""]
    if not windows:
        out.append("none: watchtower could see throughout the incident.")
    else:
        out += ["| from (UTC) | to (UTC) | duration |", "|---|---|---|"]
        for a, b in windows:
            if b is None:
                out.append(_row(iso(a), "still blind", f"{span(now - a)} so far"))
            else:
                out.append(_row(iso(a), iso(b), span(b - a)))

    # ---- questions
    out += ["", "## Post-mortem questions", ""]
    questions = _questions(incident, notifications, config, now, fig, services, windows)
    out += [f"{i}. **{q}** {_inline(a)}" for i, (q, a) in enumerate(questions, 1)]

    # ---- action items
    out += ["", "## Action items", "", "| action | owner | deadline |", "|---|---|---|", "|  |  |  |", ""]
    return "\n".join(out)


def _figure_rows(
    incident: Incident, notifications: Sequence[Notification], fig: Figures, now: float
) -> list[tuple[str, str, str]]:
    ff, op, end = incident.first_failure_at, incident.opened_at, incident.resolved_at
    start = outage_start(incident)
    first = "first failed probe" if ff is not None else "confirmed"
    if incident.scope is Scope.MONITOR:
        detect = ("n/a", "watchtower cannot see its own blindness: the heartbeat service is what detects it")
    elif fig.time_to_detect is not None and ff is not None:
        detect = (span(fig.time_to_detect), f"first failed probe {clock(ff)} → confirmed {clock(op)}")
    else:
        detect = ("unknown", f"no failed probe recorded before the confirmation at {clock(op)}")
    page = _first_page(notifications)
    if fig.time_to_notify is not None and page is not None and page.sent_at is not None:
        notify = (
            span(fig.time_to_notify),
            f"confirmed → first page delivered {clock(page.sent_at)} via {page.channel}",
        )
    else:
        pending = sum(1 for n in notifications if n.kind in NOTIFYING_KINDS and n.state == "pending")
        value = "none delivered" if end is not None else "not sent yet"
        notify = (value + (f" ({pending} pending)" if pending else ""), "confirmed → first page delivered")
    if fig.time_to_acknowledge is not None and incident.acknowledged_at is not None:
        by = incident.acknowledged_by or "unknown"
        ack = (
            span(fig.time_to_acknowledge),
            f"confirmed → acknowledged {clock(incident.acknowledged_at)} by {by}",
        )
    else:
        ack = ("not acknowledged", "confirmed → acknowledged")
    if fig.time_to_restore is not None and end is not None:
        restore = (span(fig.time_to_restore), f"{first} → resolved {clock(end)}")
    else:
        restore = (f"not yet ({span(now - start)} so far)", f"{first} → resolved")
    return [
        ("time to detect", *detect),
        ("time to notify", *notify),
        ("time to acknowledge", *ack),
        ("time to restore", *restore),
    ]


def _questions(
    incident: Incident,
    notifications: Sequence[Notification],
    config: Config,
    now: float,
    fig: Figures,
    services: Sequence[ServiceOutcome],
    windows: Sequence[tuple[float, float | None]],
) -> list[tuple[str, str]]:
    monitor = incident.scope is Scope.MONITOR
    start, end, op = outage_start(incident), incident.resolved_at, incident.opened_at
    qs: list[tuple[str, str]] = []

    # 1. detection
    if monitor:
        until = f"to {clock(end)} UTC ({span(end - op)})" if end is not None else "and still is"
        detect = (
            f"watchtower itself was blind from {clock(op)} UTC {until}: whatever failed in that window "
            f"it could not see. Did the heartbeat service page? Compare with the first user report."
        )
    elif fig.time_to_detect is not None:
        detect = (
            f"watchtower confirmed the outage {span(fig.time_to_detect)} after the first failed probe "
            f"({clock(op)} UTC); compare with the first user report."
        )
    else:
        detect = f"watchtower confirmed the outage at {clock(op)} UTC; compare with the first user report."
    blind = [(a, b) for a, b in windows if not monitor]
    if blind:
        total = sum((b if b is not None else now) - max(a, start) for a, b in blind)
        detect += f" watchtower was blind for {span(total)} during the incident (see the blind windows)."
    qs.append(("Did a person notice before the monitor?", detect))

    # 2. response
    page = _first_page(notifications)
    if page is not None and page.sent_at is not None:
        respond = (
            f"the first page went out {span(page.sent_at - op)} after confirmation "
            f"({clock(page.sent_at)} UTC, via {page.channel}); "
        )
    elif any(n.kind in NOTIFYING_KINDS for n in notifications):
        respond = "no page was delivered; "
    else:
        respond = "no page was sent; "
    if incident.acknowledged_at is not None:
        respond += (
            f"on-call ({_inline(incident.acknowledged_by or 'unknown')}) acknowledged after "
            f"{span(incident.acknowledged_at - op)} ({clock(incident.acknowledged_at)} UTC)."
        )
    else:
        respond += "nobody acknowledged" + (" (it is still open)." if end is None else ".")
    escalations = [n for n in notifications if n.kind == "escalation"]
    if escalations:
        steps = dict.fromkeys(n.step for n in escalations)
        parts = []
        for step in steps:
            chans = [n for n in escalations if n.step == step]
            when = min(n.created_at for n in chans)
            parts.append(f"{step} at {clock(when)} UTC to {', '.join(_inline(n.channel) for n in chans)}")
        respond += f" Escalated: {'; '.join(parts)}."
    troubled = [n for n in notifications if n.state == "failed" or (n.attempts > 1 and n.state == "sent")]
    troubled += [n for n in notifications if n.state == "pending" and n.attempts > 0]
    if troubled:
        bits = []
        for n in troubled:
            what = {"failed": "never delivered", "pending": "still retrying"}.get(n.state, "delivered late")
            bits.append(f"{_inline(n.channel)} ({n.step}) {what}")
        respond += f" Delivery trouble: {', '.join(bits)}: check those channels."
    qs.append(("Did on-call respond quickly?", respond))

    # 3. diagnosis
    if monitor:
        diag = (
            "watchtower's own uplink failed (every vantage path down); was the cause of that found quickly?"
        )
    else:
        cause = f"cause {incident.cause}" if incident.cause else "no cause from a BMC"
        diag = f"watchtower said: {incident.scope} {incident.root}, {cause}"
        if incident.evidence:
            diag += f"; evidence: {'; '.join(_inline(e) for e in incident.evidence)}"
        diag += ". Was that enough to decide the next step, and were the consoles and credentials at hand?"
    qs.append(("Was diagnosis tooling at hand?", diag))

    # 4. restore path
    if monitor:
        restore = "no target was down; the monitor's uplink came back " + (
            f"at {clock(end)} UTC." if end is not None else "not yet."
        )
    else:
        order = restore_order(incident, config)
        restore = f"restore order: {', '.join(_describe_target(n, config) for n in order)}."
        back = sorted((at, name) for name, at in _back_times(incident).items())
        if end is not None and incident.merged_into is None:
            back.append((end, incident.root))
        if back:
            restore += f" They came back: {', '.join(f'{n} {clock(at)}' for at, n in sorted(back))} UTC."
        restore += " Was the order decided before the incident?"
    qs.append(("Was the restore path clear?", restore))

    # 5. RTO
    with_rto = [s for s in services if s.rto is not None]
    if not with_rto:
        rto = "no target of this incident has a service RTO in the config."
    else:
        parts = [_inline(s.rto_summary()) for s in with_rto]
        rto = "; ".join(parts) + ". If not, why not?"
    qs.append(("RTO met?", rto))
    return qs
