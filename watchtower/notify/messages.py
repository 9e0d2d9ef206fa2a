"""Alert texts: what an admin reads at 2 a.m. on a phone, in the order of the emergency playbook.

Pure: no I/O, no clock reads (``now`` is passed in). Three renderings of each message:

- ``title``: one line, ``[watchtower SITE] ...``, the mail subject / the Signal first line;
- ``body``: short lines: what, affected, since, evidence, RTO clock, first steps, how to ack;
- ``sms``: the essential in one 160-character GSM-7 segment (plain ASCII without the GSM
  extension characters, so every character is one septet), always with the incident id.

Secrets never get in: messages read only names, service fields, ``service_tag``,
``vendor_contact``, ``runbook``, ``description``, ``status_url``, evidence and the timeline.
A channel's URL is read by :func:`is_sms_channel` for its scheme only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from watchtower.config import Channel, Config, Target
from watchtower.durations import coarse
from watchtower.engine.correlate import WARNING_SCOPES, Cause, Scope
from watchtower.engine.escalation import outage_start, rto_clock
from watchtower.engine.incidents import Incident, IncidentState
from watchtower.engine.topology import Topology

SMS_MAX = 160
TITLE_MAX = 200
KINDS = ("page", "escalation", "update", "ack", "reopen", "resolve")

# apprise schemes of SMS gateways (and pagers with SMS-sized bodies): their `auto` format is sms.
SMS_SCHEMES = frozenset(
    {
        "46elks", "atalk", "bulksms", "bulkvs", "burstsms", "clickatell", "clicksend",
        "cm", "d7sms", "dapnet", "eight00com", "elks", "exotel", "freemobile", "httpsms", "infobip",
        "kavenegar", "kudosity", "mobilemessage", "mobilemsg", "msg91", "msgbird", "nexmo",
        "octopush", "plivo", "ringc", "seven", "serwersms", "sfr", "sinch", "smsc", "smseagle",
        "smseagles", "smsmanager", "smsmgr", "smstunnel", "sns", "telesign", "telnyx", "twilio",
        "voipms", "vonage",
    }
)  # fmt: skip

_AFFECTED_LIST_MAX = 8  # names listed in a body before "+N more"
_EVIDENCE_MAX = 10  # evidence lines in a body
_LINE_MAX = 240  # one evidence / description line
_TIMELINE_MAX = 6

_SCOPE_SHORT = {
    Scope.NETWORK: "NET",
    Scope.HYPERVISOR: "HV",
    Scope.STORAGE: "STOR",
    Scope.VM: "VM",
    Scope.SERVICE: "SVC",
    Scope.MONITOR: "MON",
}
_CAUSE_SHORT = {
    Cause.POWER_OFF: "power off",
    Cause.HARDWARE_FAULT: "hardware fault",
    Cause.OS_UNRESPONSIVE: "OS hung",
    Cause.BMC_UNREACHABLE: "BMC unreachable",
    Cause.PARTITION: "partition",
    Cause.LINK_DOWN: "link down",
}
_CAUSE_SMS = {
    Cause.POWER_OFF: "pwr off",
    Cause.HARDWARE_FAULT: "HW fault",
    Cause.OS_UNRESPONSIVE: "OS hung",
    Cause.BMC_UNREACHABLE: "BMC unreach",
    Cause.PARTITION: "partition",
    Cause.LINK_DOWN: "link down",
}
_CAUSE_LONG = {
    Cause.POWER_OFF: "BMC: chassis power is OFF",
    Cause.HARDWARE_FAULT: "BMC: hardware fault in the SEL",
    Cause.OS_UNRESPONSIVE: "BMC: chassis on, no hardware fault: OS hung or network stack dead",
    Cause.BMC_UNREACHABLE: "BMC not reachable either (power or management network?)",
    Cause.PARTITION: "the network failed, not its hosts: they answer on another network",
    Cause.LINK_DOWN: "its link to one network is down: its OS answers on another, it is not hung",
}


@dataclass(frozen=True, slots=True)
class Message:
    title: str  # one line, starts with "[watchtower SITE]"
    body: str  # long text for mail / Signal
    sms: str  # one 160-character GSM-7 segment: plain ASCII, len(sms) <= 160


# --------------------------------------------------------------------------- small helpers


_dur = coarse


def _hhmm(ts: float, now: float) -> str:
    """``HH:MM``, with the date in front when it is not today's (UTC)."""
    at, today = datetime.fromtimestamp(ts, UTC), datetime.fromtimestamp(now, UTC)
    return at.strftime("%H:%M") if at.date() == today.date() else at.strftime("%Y-%m-%d %H:%M")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _line(text: object, limit: int = _LINE_MAX) -> str:
    """One line of free text: control characters and newlines become spaces, capped."""
    out = " ".join(_CONTROL.sub(" ", str(text)).split())
    return out if len(out) <= limit else out[: limit - 3].rstrip() + "..."


def _names(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", +{len(names) - limit} more" if len(names) > limit else "")


def _target(config: Config, name: str) -> Target | None:
    return config.targets.get(name)


def _service_of(config: Config, name: str) -> str | None:
    target = _target(config, name)
    return target.service.name if target is not None and target.service is not None else None


def _not_yet(incident: Incident, behind: Sequence[str]) -> list[str]:
    """What depends on the root but is not (yet) among the affected: expect it down too."""
    affected = set(incident.affected)
    return [name for name in behind if name not in affected]


def _sel_texts(evidence: Iterable[str]) -> list[str]:
    """The critical SEL entries from a BMC evidence line (``BMC: chassis on, SEL: x, SEL: y``)."""
    found: list[str] = []
    for line in evidence:
        if line.startswith("BMC:"):
            found += [m.strip() for m in re.findall(r"SEL: (.*?)(?=, SEL: |$)", line)]
    return [f for f in found if f]


def _cause(incident: Incident) -> Cause | None:
    try:
        return Cause(incident.cause) if incident.cause else None
    except ValueError:
        return None


def _explained(incident: Incident) -> tuple[str, str] | None:
    """(subject, finding) of a ``partition`` or ``link_down`` incident, from the sentence the
    correlation put first in its evidence: ``production network via core-sw1``, ``9 hosts
    unreachable on it, all alive on mgmt``."""
    if _cause(incident) not in (Cause.PARTITION, Cause.LINK_DOWN) or not incident.evidence:
        return None
    subject, _, finding = incident.evidence[0].partition(": ")
    return _line(subject, 80), _line(finding, 160)


def _cause_text(incident: Incident) -> str | None:
    cause = _cause(incident)
    if cause is None:
        if incident.scope == Scope.HYPERVISOR:
            contradiction = next(
                (e for e in incident.evidence if e.startswith(("contradictory", "not hung"))), None
            )
            return f"unknown: {_line(contradiction, 160)}" if contradiction else "unknown (no BMC reading)"
        return None
    text = _CAUSE_LONG[cause]
    explained = _explained(incident)
    if explained is not None:
        subject, finding = explained
        text = f"{subject}: {finding}: {text}" if cause is Cause.LINK_DOWN else f"{finding}: {text}"
    if cause is Cause.HARDWARE_FAULT:
        sel = _sel_texts(incident.evidence)
        if sel:
            text += ": " + "; ".join(_line(s, 120) for s in sel[:3])
    return text


def _still_down(incident: Incident) -> list[str]:
    return [a for a in incident.affected if a not in incident.back]


def security_suspected(incident: Incident, others: Sequence[Incident]) -> bool:
    """Several unrelated services (different roots) failing at once while their hosts answer."""
    roots = {
        i.root
        for i in (incident, *others)
        if i.scope in (Scope.SERVICE, Scope.VM) and i.merged_into is None and (i is incident or i.is_open)
    }
    return len(roots) >= 3


def hardware_suspected(incident: Incident) -> bool:
    return incident.scope == Scope.STORAGE or incident.cause in (Cause.HARDWARE_FAULT, Cause.POWER_OFF)


def _acked_by(incident: Incident, label: str) -> str | None:
    if incident.acknowledged_by:
        return incident.acknowledged_by
    if label.startswith("acknowledged by "):
        return label.removeprefix("acknowledged by ").strip() or None
    return None


# --------------------------------------------------------------------------- SMS fitting

_TRANSLIT = str.maketrans(
    {
        "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L",
        "đ": "d", "Đ": "D", "þ": "th", "Þ": "Th", "ı": "i", "–": "-", "—": "-", "‘": "'", "’": "'",
        "‚": ",", "“": '"', "”": '"', "„": '"', "…": "...", "•": "*", "€": "EUR", "°": "deg",
        # GSM-7 extension characters take two septets (and backtick none): swap them for plain ones
        "[": "(", "]": ")", "{": "(", "}": ")", "\\": "/", "^": "'", "~": "-", "|": "/", "`": "'",
    }
)  # fmt: skip


def sms_text(text: object) -> str:
    """Plain one-line ASCII that is one septet per character in GSM-7."""
    decomposed = unicodedata.normalize("NFKD", str(text).translate(_TRANSLIT))
    out = []
    for ch in decomposed:
        if unicodedata.combining(ch):
            continue
        code = ord(ch)
        if 32 <= code < 127:
            out.append(ch)
        elif code < 32 or 127 <= code < 160 or ch.isspace():
            out.append(" ")
        else:
            out.append("?")
    return " ".join("".join(out).translate(_TRANSLIT).split())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 2)].rstrip() + ".." if limit >= 4 else text[: max(0, limit)]


def _fit_sms(head: str, optional: Sequence[str], tail: str = "", *, sep: str = ", ") -> str:
    """``head`` (kept, shortened only as a last resort), then as many ``optional`` parts as fit,
    in priority order (the last one tried may be shortened), then ``tail``; <= 160 always."""
    head, tail = sms_text(head), sms_text(tail)
    tail_part = f". {tail}" if tail else ""
    head = _cut(head, SMS_MAX - len(tail_part))
    text = head
    for part in (sms_text(p) for p in optional):
        if not part:
            continue
        room = SMS_MAX - len(tail_part) - len(text) - len(sep)
        if len(part) <= room:
            text += sep + part
        elif room >= 12:
            text += sep + _cut(part, room)
    return (text + tail_part)[:SMS_MAX]


# --------------------------------------------------------------------------- incident messages


def _what(incident: Incident) -> str:
    """``hypervisor pve1``, the words an incident is named by (``production network via core-sw1``
    for a network that failed while its hosts answer on another)."""
    explained = _explained(incident)
    if explained is not None and _cause(incident) is Cause.PARTITION:
        return explained[0]
    return f"{incident.scope} {incident.root}"


def _down_title(incident: Incident, behind: Sequence[str], state: str = "DOWN") -> str:
    cause = _cause(incident)
    cause_text = f" ({_CAUSE_SHORT[cause]})" if cause else ""
    explained = _explained(incident)
    if explained is not None and cause is Cause.PARTITION:
        return f"{_what(incident)} {state}: {explained[1]}"
    if explained is not None and cause is Cause.LINK_DOWN:
        # not DOWN: it answers on another network
        state = "UNREACHABLE" if state == "DOWN" else state
        cause_text = f" ({explained[0]})"
    more = f", {len(incident.affected)} affected" if incident.affected else ""
    if _not_yet(incident, behind):
        more += f" ({len(behind)} depend on it)"
    return f"{_what(incident)} {state}{cause_text}{more}"


def _title(
    kind: str, incident: Incident, config: Config, now: float, label: str, behind: Sequence[str]
) -> str:
    n = f"#{incident.id}"
    site = config.site
    if incident.scope == Scope.MONITOR:
        if kind == "resolve":
            end = incident.resolved_at if incident.resolved_at is not None else now
            text = (
                f"{n} RESOLVED: watchtower at {site} sees again, blind from {_hhmm(incident.opened_at, now)} "
                f"to {_hhmm(end, now)} UTC ({_dur(end - incident.opened_at)})"
            )
        elif kind == "ack":
            text = f"{n} acknowledged by {_acked_by(incident, label) or '?'}: monitor {site} blind"
        elif kind == "update":
            text = f"{n} monitor {site} still blind after {_dur(now - incident.opened_at)}"
        else:
            text = f"{n} monitor {site} BLIND: own uplink down, target states unknown"
    elif kind == "page":
        text = f"{n} {_down_title(incident, behind)}"
    elif kind == "escalation":
        why = f" ({_line(label, 80)})" if label else ""
        text = f"{n} ESCALATION{why}: {_down_title(incident, behind)}"
    elif kind == "update":
        by = incident.acknowledged_by
        state = f"still down after {_dur(now - outage_start(incident))}"
        text = f"{n} {_down_title(incident, behind, state)}" + (f", acknowledged by {by}" if by else "")
    elif kind == "ack":
        text = (
            f"{n} acknowledged by {_acked_by(incident, label) or '?'}: escalation stopped ({_what(incident)})"
        )
    elif kind == "reopen":
        text = f"{n} FAILED AGAIN (flap {incident.flaps}): {_down_title(incident, behind)}"
    else:  # resolve
        end = incident.resolved_at if incident.resolved_at is not None else now
        back = _what(incident) if _cause(incident) is Cause.PARTITION else incident.root
        text = f"{n} RESOLVED: {back} back after {_dur(end - outage_start(incident))}"
        still = _still_down(incident)
        if still:
            text += f"; still down: {_names(still, 3)}"
    return _line(f"[watchtower {site}] {text}", TITLE_MAX)


def _rto_lines(incident: Incident, config: Config, kind: str, now: float) -> tuple[str | None, str | None]:
    """(body line, sms part) for the RTO clock, or (None, None) when no service with an RTO is hit."""
    clock = rto_clock(incident, config) if incident.scope != Scope.MONITOR else None
    if clock is None:
        return None, None
    name = _line(clock.service, 60)
    rto = f"RTO clock: {name} ({clock.target}) {_dur(clock.rto)}"
    if kind == "resolve" and clock.target not in _still_down(incident):
        end = incident.resolved_at if incident.resolved_at is not None else now
        over = (end - clock.started_at) - clock.rto
        if over > 0:
            return f"{rto}: RTO MISSED by {_dur(over)}", f"RTO {name} missed by {_dur(over)}"
        return f"{rto}: met, with {_dur(-over)} to spare", f"RTO {name} met"
    left = clock.left(now)
    if left < 0:
        return f"{rto}, RTO EXCEEDED by {_dur(-left)}", f"RTO {name} EXCEEDED {_dur(-left)}"
    return f"{rto}, {_dur(left)} left", f"RTO {name} {_dur(left)} left"


def _steps(incident: Incident, config: Config, kind: str, others: Sequence[Incident]) -> list[str]:
    """First steps for the scope, following the playbook."""
    root = _target(config, incident.root)
    steps: list[str] = []
    if kind == "resolve":
        if incident.scope == Scope.MONITOR:
            steps.append("Nothing was judged while blind: check the status page for what is down now")
        else:
            steps.append(
                "Smoke-test each system (log in, a few typical actions) before people are let back on"
            )
            steps.append("Keep the restore log: what came back from where, when")
            steps.append(f"Post-mortem within the week: watchtower report {incident.id}")
        return steps

    if incident.scope == Scope.MONITOR:
        return [
            "Check the monitoring box's own uplink (gateway, cable, ISP); targets may be fine",
            "Alerts may not get out while it is blind: confirm over a second path (VPN, phone)",
        ]
    steps.append("No repair attempts before diagnosis")
    if security_suspected(incident, others):
        steps.append(
            "Several unrelated services failing at once: consider a security incident (ransomware?): "
            "isolate, do not restore from backups yet"
        )
    scope, name = incident.scope, incident.root
    if scope == Scope.HYPERVISOR:
        steps.append(f"Check the BMC / remote console of {name} before touching it")
        steps.append("Do not hard-power-off if avoidable (write caches)")
        if incident.cause == Cause.POWER_OFF:
            steps.append("Chassis is off: check PSU, PDU and UPS, and whether someone switched it off")
        elif incident.cause == Cause.OS_UNRESPONSIVE:
            steps.append("OS hung? Capture the console screen (panic, hung task) before any reset")
        elif incident.cause == Cause.BMC_UNREACHABLE:
            steps.append("Check power to the rack and the management network")
    if incident.cause == Cause.LINK_DOWN:
        steps.append(
            f"{name} is alive (its OS answers on another network): do not reset it; check that NIC, "
            "its cable and switch port, and the network's VLAN"
        )
    if scope == Scope.NETWORK and incident.cause == Cause.PARTITION:
        steps.append("The hosts are alive (they answer on another network): do not reset or power-cycle them")
    if scope == Scope.NETWORK:
        steps.append(f"Check the switch/uplink {name}: power, link LEDs, which ports are down")
        if incident.affected:
            steps.append("What is behind it is unreachable, not necessarily down: fix the path first")
    elif scope == Scope.STORAGE and incident.cause != Cause.LINK_DOWN:
        steps.append("RAID: read first, swap no disk before the order is clear")
        if incident.affected:
            steps.append(f"VMs on it ({len(incident.affected)}) may have I/O errors or read-only disks")
    elif scope == Scope.VM:
        host = root.runs_on if root is not None else None
        where = f"on its host {host}" if host else "on its host"
        steps.append(f"Check the VM {name} {where}: running, hung, disk full? Use the console")
    elif scope == Scope.SERVICE:
        steps.append(f"Check the service on {name}: process, logs, disk space; use the console")
    vendor = []
    if root is not None and root.service_tag:
        vendor.append(f"service tag {_line(root.service_tag, 60)}")
    if root is not None and root.vendor_contact:
        vendor.append(f"vendor contact {_line(root.vendor_contact, 120)}")
    if hardware_suspected(incident):
        case = (
            "open a vendor case: " + ", ".join(vendor)
            if vendor
            else f"open a vendor case (no service_tag set for {name})"
        )
        steps.append(f"Collect SEL and storage logs (SMART, RAID) before any swap; {case}")
    elif scope in (Scope.HYPERVISOR, Scope.STORAGE):
        # The number is needed at 3 a.m. whatever the cause turns out to be.
        steps.append(
            "Vendor: " + (", ".join(vendor) if vendor else f"no service_tag or vendor_contact set for {name}")
        )
    provider = config.providers.get(root.provider) if root is not None and root.provider else None
    if provider is not None and root is not None and root.provider is not None:
        fields = (("phone", provider.phone), ("contract", provider.contract), ("circuit", provider.circuit))
        parts = [f"{k} {_line(v, 80)}" for k, v in fields if v]
        if provider.response_sla is not None:
            parts.append(f"response SLA {coarse(provider.response_sla)}")
        who = _line(provider.name or root.provider, 60)
        steps.append(
            f"Call {who}" + (f": {', '.join(parts)}" if parts else "") + "; record their answer as a note"
        )
    return steps


def incident_message(
    kind: str,
    incident: Incident,
    config: Config,
    now: float,
    *,
    label: str = "",
    others: Sequence[Incident] = (),
    checklist: Sequence[str] = (),
    restore: Sequence[str] = (),
) -> Message:
    """The alert for one incident. ``kind``: page, escalation, update, ack, reopen, resolve;
    ``label`` says why (escalation) or who (ack); ``others``: the site's other open incidents;
    ``checklist``: the first-hour lines a status update carries."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; one of {', '.join(KINDS)}")
    if incident.scope in WARNING_SCOPES:
        return warning_incident_message(kind, incident, config, now)
    # What needs the root: the first page goes out before all of it is confirmed down, so the texts
    # say how big the outage is from the topology too.
    behind = (
        ()
        if kind == "resolve" or incident.scope == Scope.MONITOR
        else Topology.from_config(config).dependents(incident.root)
    )
    title = _title(kind, incident, config, now, label, behind)
    body = _body(kind, incident, config, now, label, others, behind)
    if kind == "update" and checklist:
        body += "\nFirst hour:\n" + "\n".join(_line(c, 300) for c in checklist)
    if restore and kind in ("page", "escalation", "update"):
        # what a restore of each hit service loses now: the newest restore point against its RPO
        body += "\n\nRestore points:\n" + "\n".join(f"- {_line(r, 300)}" for r in restore)
    sms = _sms(kind, incident, config, now, label, others, behind)
    return Message(title, body, sms)


def _body(
    kind: str,
    incident: Incident,
    config: Config,
    now: float,
    label: str,
    others: Sequence[Incident],
    behind: Sequence[str],
) -> str:
    lines: list[str] = []
    add = lines.append
    site, scope = _line(config.site, 80), incident.scope
    start = outage_start(incident)
    end = incident.resolved_at if incident.resolved_at is not None else now
    by = _acked_by(incident, label) if kind == "ack" else incident.acknowledged_by
    by = _line(by, 60) if by else None

    # 1. what
    if kind == "escalation" and label:
        add(f"Escalated: {_line(label)}")
    if kind == "reopen":
        add(
            f"FAILED AGAIN after the all-clear (flap {incident.flaps}): "
            "do not trust the next all-clear too soon"
        )
    if scope == Scope.MONITOR:
        if kind == "resolve":
            add(
                f"What: watchtower at {site} sees again: blind from {_hhmm(incident.opened_at, now)} "
                f"to {_hhmm(end, now)} UTC ({_dur(end - incident.opened_at)})"
            )
        else:
            add(
                f"What: watchtower at {site} is cut off (its own uplink is down): "
                "target states are unknown, not down"
            )
    else:
        state = {
            "page": "is DOWN",
            "escalation": "is DOWN",
            "reopen": "is DOWN again",
            "update": f"is still down after {_dur(now - start)}",
            "ack": "is still down",
            "resolve": "is back",
        }[kind]
        add(f"What: {_what(incident)} {state}")
        cause = _cause_text(incident)
        if cause:
            add(f"Cause: {cause}")
    if kind == "ack" or (kind == "update" and by):
        when = f" at {_hhmm(incident.acknowledged_at, now)} UTC" if incident.acknowledged_at else ""
        add(f"Acknowledged by {by or '?'}{when}" + (": escalation stopped" if kind == "ack" else ""))

    # 2. affected
    if incident.affected:
        if kind == "resolve":
            still = _still_down(incident)
            back = [a for a in incident.affected if a in incident.back]
            if back:
                add(f"Back ({len(back)}): {_names(back, _AFFECTED_LIST_MAX)}")
            if still:
                add(
                    f"Still down ({len(still)}), now incidents of their own: "
                    f"{_names(still, _AFFECTED_LIST_MAX)}"
                )
        else:
            add(f"{len(incident.affected)} affected: {_names(incident.affected, _AFFECTED_LIST_MAX)}")
    not_yet = _not_yet(incident, behind)
    if not_yet:
        add(f"Depend on it, not confirmed down yet ({len(not_yet)}): {_names(not_yet, _AFFECTED_LIST_MAX)}")
    if incident.affected:
        services = list(
            dict.fromkeys(
                s for s in (_service_of(config, a) for a in (incident.root, *incident.affected)) if s
            )
        )
        if services and kind != "resolve":
            add(f"Services: {_line(_names(services, _AFFECTED_LIST_MAX))}")

    # 3. since
    if scope == Scope.MONITOR:
        if kind != "resolve":
            add(f"Since: {_hhmm(incident.opened_at, now)} UTC ({_dur(now - incident.opened_at)})")
    elif kind == "resolve":
        add(f"Down: {_hhmm(start, now)} to {_hhmm(end, now)} UTC ({_dur(end - start)})")
    else:
        first = (
            f"{_hhmm(start, now)} UTC (first failed probe), confirmed {_hhmm(incident.opened_at, now)} UTC"
        )
        if incident.first_failure_at is None:
            first = f"{_hhmm(incident.opened_at, now)} UTC (confirmed)"
        add(f"Since: {first}; down {_dur(now - start)}")

    # 4. evidence
    if incident.evidence and kind != "resolve":
        add("Evidence:")
        for item in incident.evidence[:_EVIDENCE_MAX]:
            add(f"- {_line(item)}")
        if len(incident.evidence) > _EVIDENCE_MAX:
            add(f"- +{len(incident.evidence) - _EVIDENCE_MAX} more")

    # 5. RTO clock
    rto, _ = _rto_lines(incident, config, kind, now)
    if rto:
        add(rto)

    # 6. first steps
    steps = _steps(incident, config, kind, others)
    if steps:
        add("Next steps:" if kind == "resolve" else "First steps:")
        lines.extend(f"- {s}" for s in steps)
    root = _target(config, incident.root) if scope != Scope.MONITOR else None
    if root is not None and root.description:
        add(f"About {incident.root}: {_line(root.description)}")
    if root is not None and root.runbook:
        add(f"Runbook: {_line(root.runbook, 500)}")

    if kind in ("update", "reopen", "resolve") and incident.timeline:
        add("Timeline:")
        for event in incident.timeline[-_TIMELINE_MAX:]:
            add(f"- {_hhmm(event.at, now)} {_line(event.text, 160)}")

    # 7. id and ack
    open_unacked = incident.state == IncidentState.OPEN and kind in ("page", "escalation", "update", "reopen")
    if open_unacked:
        add(f"Incident #{incident.id}. Acknowledge: watchtower ack {incident.id} --by NAME")
    else:
        add(f"Incident #{incident.id}")
    if config.notify.status_url:
        add(f"Status/ack: {_line(config.notify.status_url, 300)}")
    return "\n".join(lines)


def _sms(
    kind: str,
    incident: Incident,
    config: Config,
    now: float,
    label: str,
    others: Sequence[Incident],
    behind: Sequence[str],
) -> str:
    site = _cut(sms_text(config.site), 16)
    n = f"#{incident.id}"
    scope = _SCOPE_SHORT.get(incident.scope, str(incident.scope).upper())
    root = _cut(sms_text(incident.root), 28)
    found = _cause(incident)
    cause = _CAUSE_SMS[found] if found else ""
    ack = f"ack: watchtower ack {incident.id}"
    _, rto = _rto_lines(incident, config, kind, now)
    optional: list[str] = []

    if incident.scope == Scope.MONITOR:
        if kind == "resolve":
            end = incident.resolved_at if incident.resolved_at is not None else now
            window = f"{_hhmm(incident.opened_at, end)}-{_hhmm(end, end)}Z"
            return _fit_sms(
                f"WT {site} {n} OK MON sees again, blind {window} ({_dur(end - incident.opened_at)})", []
            )
        head = f"WT {site} {n} MON BLIND: own uplink down, targets unknown not down"
        return _fit_sms(head, [], ack if kind != "ack" and incident.state == IncidentState.OPEN else "")

    down = " ".join(p for p in (scope, root, "DOWN", cause) if p)
    explained = _explained(incident)
    if explained is not None and found is Cause.PARTITION:
        scope, root, cause = "", explained[0], ""
        down = f"{explained[0]} DOWN: {explained[1]}"
    elif explained is not None and found is Cause.LINK_DOWN:
        cause = explained[0]
        down = " ".join((scope, root, "UNREACH", cause))
    not_yet = _not_yet(incident, behind)
    if incident.affected or not_yet:
        of = f" of {len(behind)} behind" if not_yet else ""
        optional.append(f"{len(incident.affected)} aff{of}")
    if rto and kind != "resolve":
        optional.append(rto)
    if kind in ("page", "escalation", "reopen", "update") and security_suspected(incident, others):
        optional.append("SECURITY? isolate, no restore yet")
    tail = ack if incident.state == IncidentState.OPEN else ""
    if kind == "page":
        head = f"WT {site} {n} {down}"
    elif kind == "escalation":
        head = f"WT {site} {n} ESC {down}"
        if label:
            optional.insert(0, label)
    elif kind == "reopen":
        head = f"WT {site} {n} FAILED AGAIN flap {incident.flaps} {down}"
    elif kind == "update":
        since = _dur(now - outage_start(incident))
        head = " ".join(p for p in (f"WT {site} {n} STILL DOWN {since}", scope, root, cause) if p)
        if incident.acknowledged_by:
            optional.insert(0, f"acked {incident.acknowledged_by}")
    elif kind == "ack":
        by = _acked_by(incident, label) or "?"
        head = f"WT {site} {n} ACK by {_cut(sms_text(by), 20)}: {scope} {root}, escalation stopped"
        optional = []
        tail = ""
    else:  # resolve
        end = incident.resolved_at if incident.resolved_at is not None else now
        head = f"WT {site} {n} OK {scope} {root} back after {_dur(end - outage_start(incident))}"
        still = _still_down(incident)
        optional = [f"still down: {_names(still, 4)}"] if still else []
        if rto:
            optional.append(rto)
        tail = ""
    if kind not in ("ack", "resolve") and incident.evidence and found is not Cause.PARTITION:
        optional.append(incident.evidence[0])
    return _fit_sms(head, optional, tail)


# --------------------------------------------------------------------------- warnings and tests


def warning_message(text: str, config: Config, now: float) -> Message:
    """watchtower's own warnings, e.g. ``channel sms-oncall failing for 6m: connection refused``."""
    site = _line(config.site, 80)
    body = "\n".join(
        [
            f"Warning: {_line(text, 1000)}",
            "This is about watchtower itself, not about a monitored target.",
            f"At {_hhmm(now, now)} UTC.",
        ]
        + ([f"Status: {_line(config.notify.status_url, 300)}"] if config.notify.status_url else [])
    )
    title = _line(f"[watchtower {site}] WARNING: {text}", TITLE_MAX)
    sms = _fit_sms(f"WT {_cut(sms_text(config.site), 16)} WARN", [text], sep=": ")
    return Message(title, body, sms)


def warning_incident_message(kind: str, incident: Incident, config: Config, now: float) -> Message:
    """A ``backup`` or ``certificate`` warning: what is wrong and since when, no outage words."""
    site = _line(config.site, 80)
    what = _line(incident.evidence[0] if incident.evidence else incident.root, 300)
    n = f"#{incident.id}"
    if kind == "resolve":
        last = incident.timeline[-1].text if incident.timeline else "cleared"
        title = f"[watchtower {site}] {n} CLEARED {incident.scope} {incident.root}: {_line(last, 200)}"
        body = [f"Cleared: {_line(last, 1000)}", f"Was: {what}"]
        sms = _fit_sms(f"WT {_cut(sms_text(config.site), 16)} {n} OK {incident.scope}", [_line(last, 200)])
    else:
        title = f"[watchtower {site}] {n} WARNING {incident.scope}: {what}"
        body = [f"Warning ({incident.scope}): {what}", *(f"- {_line(e, 300)}" for e in incident.evidence[1:])]
        body.append("Not an outage: nothing is down. Sent within notify.warnings.hours only.")
        sms = _fit_sms(f"WT {_cut(sms_text(config.site), 16)} {n} WARN {incident.scope}", [what], sep=": ")
    body.append(f"Since {_hhmm(incident.opened_at, now)} UTC.")
    if config.notify.status_url:
        body.append(f"Status: {_line(config.notify.status_url, 300)}")
    return Message(_line(title, TITLE_MAX), "\n".join(body), sms)


def one_line(text: object, limit: int = _LINE_MAX) -> str:
    """Text from outside (a config, a gateway's error) as one line of at most ``limit``."""
    return _line(text, limit)


def drill_message(
    config: Config, contact: str, drill: int, url: str, token: str, *, sms: bool
) -> tuple[str, str]:
    """(title, body) of a contact's DRILL message; ``url`` and ``token`` are what the drill puts
    in (placeholders: the link is filled in at delivery, never stored)."""
    person = config.contacts[contact]
    who = _line(person.name or contact, 80)
    site = _line(config.site, 80)
    if sms:
        return "", _fit_sms(
            f"DRILL {sms_text(config.site)[:16]}: alert-chain test, nothing is down.", [], f" Confirm: {url}"
        )
    role = f" ({_line(person.role, 60)})" if person.role else ""
    body = "\n".join(
        [
            "DRILL - this is a test of the alert chain. Nothing is down; no incident is open.",
            f"It checks that an alert reaches {who}{role} on this channel.",
            f"Please confirm you got it (the link works once): {url}",
            "(open it and press the button, or: curl -X POST that link)",
            f"or on the watchtower box: watchtower drill confirm {drill} {token}",
        ]
    )
    return f"[watchtower {site}] DRILL: alert-chain test for {who} (nothing is down)", body


def test_message(config: Config, channel: str, now: float) -> Message:
    """A clearly marked test through ``channel``: no action needed."""
    site, name = _line(config.site, 80), _line(channel, 80)
    at = _hhmm(now, now)
    title = _line(f"[watchtower {site}] TEST via {name}: no action needed", TITLE_MAX)
    body = "\n".join(
        [
            f"TEST message from watchtower at {site} through channel {name}, sent {at} UTC.",
            "No action needed: it only checks that alerts reach you.",
            "A real alert says what is down, since when, the RTO clock and the first steps.",
        ]
    )
    sms = _fit_sms(f"WT {_cut(sms_text(config.site), 16)} TEST, no action needed", [f"via {channel} {at}Z"])
    return Message(title, body, sms)


test_message.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def is_sms_channel(channel: Channel) -> bool:
    """Whether ``channel`` gets the SMS rendering: ``format: sms``, or ``auto`` with an SMS gateway's
    apprise scheme. Only the scheme of the URL is looked at."""
    if channel.format != "auto":
        return channel.format == "sms"
    secret = channel.secret("url")
    if secret is None:
        return False
    scheme, sep, _ = secret.get_secret_value().strip().partition("://")
    return bool(sep) and scheme.lower() in SMS_SCHEMES


__all__: list[str] = [
    "SMS_SCHEMES",
    "Message",
    "incident_message",
    "is_sms_channel",
    "sms_text",
    "test_message",
    "warning_message",
]
