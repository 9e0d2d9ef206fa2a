"""The playbook's first hour, ticked off: a pure function of an incident, its messages and notes.

Items and when they are due after the first failed probe (``playbook.first_hour`` renames or
re-times them): symptom logged (T+0), manual check (T+5), scope known (T+10), on-call reached
(delivered and acknowledged, T+15), hardware-vs-security decided (T+15), logs collected (T+20),
management told (T+30), vendor case opened (T+45), restore decided (T+60).

What ticks an item: the incident itself (first failure, confirmation), its notifications
(delivered to whom, acknowledged), and notes people add (``watchtower note ID --kind ...``),
which are timeline events of kind ``note:KIND``. Nothing here reads the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from watchtower.config import Config
from watchtower.durations import coarse
from watchtower.engine.escalation import NOTIFYING_KINDS, outage_start
from watchtower.engine.incidents import Incident, TimelineEvent
from watchtower.store import Notification

# key, label, minutes after the first failed probe
DEFAULT_ITEMS: tuple[tuple[str, str, int], ...] = (
    ("symptom", "symptom logged", 0),
    ("manual_check", "manual check (watchtower probe)", 5),
    ("scope", "scope known", 10),
    ("on_call", "on-call reached (delivered and acknowledged)", 15),
    ("decision", "hardware or security decided", 15),
    ("logs", "logs collected (SEL, storage, system)", 20),
    ("management", "management told", 30),
    ("vendor_case", "vendor case opened", 45),
    ("restore", "restore decided", 60),
)
NOTE_PREFIX = "note:"


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    label: str
    due_at: float
    state: str  # done | due | overdue | missed (the incident ended without it)
    done_at: float | None
    detail: str  # who/what ticked it, or what watchtower suggests

    def line(self) -> str:
        """One line for messages and the report: ``[x] 02:14 symptom logged: ...``."""
        if self.done_at is not None:
            head = f"[x] {_hhmm(self.done_at)} {self.label}"
        elif self.state == "overdue":
            head = f"[ ] OVERDUE since {_hhmm(self.due_at)} {self.label}"
        elif self.state == "missed":
            head = f"[ ] not done: {self.label}"
        else:
            head = f"[ ] due {_hhmm(self.due_at)} {self.label}"
        return head + (f": {self.detail}" if self.detail else "")


def _hhmm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M")


def notes(incident: Incident, kind: str | None = None) -> list[TimelineEvent]:
    return [
        e
        for e in incident.timeline
        if e.kind.startswith(NOTE_PREFIX) and (kind is None or e.kind == NOTE_PREFIX + kind)
    ]


def _first_note(incident: Incident, kind: str) -> tuple[float | None, str]:
    found = notes(incident, kind)
    return (found[0].at, found[0].text) if found else (None, "")


def _suggestion(incident: Incident, others: Sequence[Incident]) -> str:
    # The same rules the alerts use (import at call time: messages imports the escalation module).
    from watchtower.notify.messages import hardware_suspected, security_suspected

    if security_suspected(incident, others):
        return "suggested: security (several unrelated services failing at once); confirm with a note"
    if hardware_suspected(incident):
        why = f"BMC: {incident.cause}" if incident.cause else "storage"
        return f"suggested: hardware ({why}); confirm with a note"
    return "no hint from the BMC; decide and record it: watchtower note ID --kind decision"


def _management_channels(config: Config) -> set[str]:
    from watchtower.engine.escalation import channels_for

    names = {c.name for c in config.notify.channels if "management" in c.tags}
    for contact in config.contacts.values():
        if (contact.role or "").lower() == "management":
            names.update(channels_for(config.notify, contact.channels))
    return names


def checklist(
    incident: Incident,
    notifications: Sequence[Notification],
    config: Config,
    now: float,
    others: Sequence[Incident] = (),
) -> list[Item]:
    start = outage_start(incident)
    custom = config.playbook.first_hour
    sent = sorted(
        (n for n in notifications if n.kind in NOTIFYING_KINDS and n.sent_at is not None),
        key=lambda n: n.sent_at or 0.0,
    )
    done: dict[str, tuple[float | None, str]] = {}
    done["symptom"] = (start, "first failed probe")
    done["manual_check"] = _first_note(incident, "manual_check")
    done["scope"] = (
        incident.opened_at,
        f"{incident.scope} {incident.root}, {len(incident.affected)} affected",
    )
    if sent and incident.acknowledged_at is not None:
        reached = max(sent[0].sent_at or 0.0, incident.acknowledged_at)
        done["on_call"] = (
            reached,
            f"delivered via {sent[0].channel}, acknowledged by {incident.acknowledged_by}",
        )
    elif sent:
        done["on_call"] = (
            None,
            f"delivered via {sent[0].channel} at {_hhmm(sent[0].sent_at or 0.0)}, not acknowledged",
        )
    else:
        done["on_call"] = (None, "no alert delivered yet")
    at, text = _first_note(incident, "decision")
    done["decision"] = (at, text) if at is not None else (None, _suggestion(incident, others))
    done["logs"] = _first_note(incident, "logs")
    management = _management_channels(config)
    told = [n for n in sent if n.channel in management]
    at, text = _first_note(incident, "management")
    if told and (at is None or (told[0].sent_at or 0.0) < at):
        at, text = told[0].sent_at, f"alert delivered to {told[0].channel}"
    done["management"] = (at, text)
    done["vendor_case"] = _first_note(incident, "vendor_case")
    done["restore"] = _first_note(incident, "restore")

    items = []
    for key, label, minutes in DEFAULT_ITEMS:
        override = custom.get(key)
        if override is not None and override.label:
            label = override.label
        offset = override.at if override is not None and override.at is not None else minutes * 60.0
        due_at = start + offset
        at, detail = done.get(key, (None, ""))
        if at is not None:
            state = "done"
        elif not incident.is_open:
            state = "missed"
        else:
            state = "overdue" if now >= due_at else "due"
            if state == "overdue" and not detail:
                detail = f"{coarse(now - due_at)} late"
        items.append(Item(key, label, due_at, state, at, detail))
    return items


def provider_lines(incident: Incident, config: Config) -> list[str]:
    """ "provider acknowledged after 41 min (SLA 30 min)" from a ``provider`` note."""
    out = []
    for target_name in (incident.root,):
        target = config.targets.get(target_name)
        if target is None or target.provider is None or target.provider not in config.providers:
            continue
        provider = config.providers[target.provider]
        name = provider.name or target.provider
        at, _ = _first_note(incident, "provider")
        if at is None:
            out.append(f"{name}: no acknowledgement recorded (watchtower note ID --kind provider ...)")
            continue
        took = at - outage_start(incident)
        sla = provider.response_sla
        verdict = "" if sla is None else f" (SLA {coarse(sla)}{', missed' if took > sla else ''})"
        out.append(f"{name} acknowledged after {coarse(took)}{verdict}")
    return out


def staff_sentence(incident: Incident, config: Config) -> str | None:
    """What to tell the staff: "ERP unavailable since 02:14 UTC, expected back by 06:14 UTC at the
    latest (RTO)". None when no service with a business name is affected."""
    from watchtower.engine.escalation import rto_clock

    services = []
    for name in (incident.root, *incident.affected):
        target = config.targets.get(name)
        if target is not None and target.service is not None and target.service.name not in services:
            services.append(target.service.name)
    if not services:
        return None
    text = f"{', '.join(services)} unavailable since {_hhmm(outage_start(incident))} UTC"
    clock = rto_clock(incident, config)
    if clock is not None:
        which = "" if len(services) == 1 else f" of {clock.service}"
        text += f", expected back by {_hhmm(clock.deadline)} UTC at the latest (RTO{which})"
    return text
