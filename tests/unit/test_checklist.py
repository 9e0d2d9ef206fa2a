"""The first-hour checklist with injected timestamps: each item ticked or due at the right minute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watchtower.checklist import checklist, provider_lines, staff_sentence
from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentTracker
from watchtower.report import render_report
from watchtower.store import Notification
from watchtower.web.app import incident_document
from watchtower.web.page import page_incident, render_status_page

MIN = 60.0
T0 = 1_796_000_000.0  # the first failed probe
EVIL = "<script>alert(1)</script> | **bold** [x](javascript:alert(2))"


def config(**over: Any) -> Config:
    doc: dict[str, Any] = {
        "site": "acme",
        "targets": {
            "pve1": {
                "role": "hypervisor",
                "paths": [{"icmp": "10.213.10.11"}],
                "service_tag": "ST-123",
                "vendor_contact": "+49 800 123",
            },
            "erp1": {
                "role": "vm",
                "runs_on": "pve1",
                "paths": [{"icmp": "10.213.10.23"}],
                "service": {"name": "ERP", "rto": "4h"},
            },
            "uplink": {"role": "network", "paths": [{"icmp": "10.213.10.1"}], "provider": "isp"},
        },
        "providers": {
            "isp": {"name": "FiberCo", "phone": "+49 30 999", "circuit": "C-42", "response_sla": "30m"}
        },
        "contacts": {"carol": {"role": "management", "channels": ["mail-carol"]}},
        "notify": {
            "channels": [
                {"name": "sms-bob", "url": "smseagle://t@127.0.0.1:1/+15550004"},
                {"name": "mail-carol", "url": "mailto://127.0.0.1:1?to=carol@lab.test"},
            ],
            "escalation": [{"after": "0s", "notify": ["sms-bob"]}, {"after": "30m", "contacts": ["carol"]}],
        },
    }
    doc.update(over)
    return parse_config(doc, Path("/tmp"))


def sent(n: int, channel: str, at: float, kind: str = "page") -> Notification:
    return Notification(n, 1, f"step{n}", kind, channel, "t", "b", at, "sent", 1, at, at, at, None)


def states(items: Any) -> dict[str, str]:
    return {i.key: i.state for i in items}


def test_items_tick_or_fall_due_at_their_minute() -> None:
    cfg = config()
    tracker = IncidentTracker()
    incident = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, cause=Cause.HARDWARE_FAULT,
                        affected=("erp1",), first_failure_at=T0)  # fmt: skip
    tracker.incidents[1] = incident
    notes = [sent(0, "sms-bob", T0 + 1.5 * MIN)]
    at4 = checklist(incident, notes, cfg, T0 + 4 * MIN)
    assert states(at4) == {
        "symptom": "done", "manual_check": "due", "scope": "done", "on_call": "due", "decision": "due",
        "logs": "due", "management": "due", "vendor_case": "due", "restore": "due",
    }  # fmt: skip
    by_key = {i.key: i for i in at4}
    assert by_key["symptom"].done_at == T0 and by_key["scope"].done_at == T0 + MIN
    assert by_key["manual_check"].due_at == T0 + 5 * MIN
    assert "not acknowledged" in by_key["on_call"].detail
    assert by_key["decision"].detail.startswith("suggested: hardware (BMC: hardware_fault)")
    # the minute the manual check is due it is overdue, not a second earlier
    assert states(checklist(incident, notes, cfg, T0 + 5 * MIN - 1))["manual_check"] == "due"
    assert states(checklist(incident, notes, cfg, T0 + 5 * MIN))["manual_check"] == "overdue"
    # people tick the manual items; on-call is reached when delivered AND acknowledged
    tracker.note(1, "manual_check", "watchtower probe pve1: 0 of 2 paths up", "alice", T0 + 6 * MIN)
    tracker.acknowledge(1, "bob", T0 + 8 * MIN)
    tracker.note(1, "decision", "hardware: PSU failure in the SEL", "bob", T0 + 12 * MIN)
    incident = tracker.incidents[1]  # frozen: the tracker holds the noted value
    at16 = {i.key: i for i in checklist(incident, notes, cfg, T0 + 16 * MIN)}
    assert at16["manual_check"].done_at == T0 + 6 * MIN
    assert at16["on_call"].done_at == T0 + 8 * MIN and "acknowledged by bob" in at16["on_call"].detail
    assert at16["decision"].done_at == T0 + 12 * MIN and "PSU" in at16["decision"].detail
    assert at16["logs"].state == "due"
    assert states(checklist(incident, notes, cfg, T0 + 20 * MIN))["logs"] == "overdue"
    # management told = a management contact's (or management-tagged) channel got the alert
    assert states(checklist(incident, notes, cfg, T0 + 30 * MIN))["management"] == "overdue"
    notes.append(sent(1, "mail-carol", T0 + 31 * MIN, "escalation"))
    told = {i.key: i for i in checklist(incident, notes, cfg, T0 + 32 * MIN)}["management"]
    assert told.done_at == T0 + 31 * MIN and "mail-carol" in told.detail
    tracker.note(1, "vendor_case", "case 4711 opened, ST-123", "bob", T0 + 40 * MIN)
    tracker.note(1, "restore", "restore erp1 from last night's backup on pve2", "alice", T0 + 70 * MIN)
    incident = tracker.incidents[1]
    at70 = {i.key: i for i in checklist(incident, notes, cfg, T0 + 70 * MIN)}
    assert at70["vendor_case"].state == "done" and at70["restore"].done_at == T0 + 70 * MIN
    assert at70["restore"].line().startswith("[x] ")
    assert at70["logs"].line().startswith("[ ] OVERDUE since ")


def test_security_suggestion_and_playbook_overrides() -> None:
    cfg = config(playbook={"first_hour": {"manual_check": {"label": "console check", "at": "2m"}}})
    svc = [Incident(k, Scope.SERVICE, r, T0, first_failure_at=T0) for k, r in ((1, "a"), (2, "b"), (3, "c"))]
    items = {i.key: i for i in checklist(svc[0], [], cfg, T0 + 3 * MIN, svc[1:])}
    assert items["decision"].detail.startswith("suggested: security")
    assert items["manual_check"].label == "console check" and items["manual_check"].state == "overdue"
    assert items["manual_check"].due_at == T0 + 2 * MIN


def test_provider_sla_and_staff_sentence() -> None:
    cfg = config()
    net = Incident(2, Scope.NETWORK, "uplink", T0 + MIN, first_failure_at=T0)
    assert provider_lines(net, cfg) == [
        "FiberCo: no acknowledgement recorded (watchtower note ID --kind provider ...)"
    ]
    net = net.noted(T0 + 41 * MIN, "note:provider", "provider by alice: FiberCo ticket 99 acknowledged")
    assert provider_lines(net, cfg) == ["FiberCo acknowledged after 41m (SLA 30m, missed)"]
    hv = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, affected=("erp1",), first_failure_at=T0)
    when = "%H:%M"
    from datetime import UTC, datetime

    start = datetime.fromtimestamp(T0, UTC).strftime(when)
    end = datetime.fromtimestamp(T0 + 4 * 3600, UTC).strftime(when)
    assert staff_sentence(hv, cfg) == (
        f"ERP unavailable since {start} UTC, expected back by {end} UTC at the latest (RTO)"
    )
    assert staff_sentence(net, cfg) is None


def test_hostile_note_is_escaped_in_report_and_page() -> None:
    cfg = config()
    tracker = IncidentTracker()
    incident = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, first_failure_at=T0)
    tracker.incidents[1] = incident
    (change,) = tracker.note(1, "user_report", EVIL, "mallory <b>", T0 + 3 * MIN)
    assert change.kind == "note"
    incident = tracker.incidents[1]
    report = render_report(incident, [], [], [], cfg, T0 + 10 * MIN)
    assert "## First hour" in report
    assert "<script>" not in report and "\\<script\\>" in report
    assert "\\[x\\](javascript:" in report and " [x](javascript:" not in report  # no link
    row = next(line for line in report.splitlines() if "user report by" in line)
    assert row.count(" | ") == 2  # the note's "|" did not add a column
    doc: dict[str, Any] = {"site": "acme", "generated_at": None, "vantage": "up", "targets": {}}
    shown = page_incident(incident_document(incident), incident, cfg)
    shown["notes"] = [{"at": "2026-01-01T00:03:00Z", "text": incident.timeline[0].text}]
    shown["checklist"] = [
        {
            "state": "overdue",
            "due_at": "2026-01-01T00:05:00Z",
            "done_at": None,
            "label": "manual check",
            "detail": EVIL,
        }
    ]
    shown["staff"] = EVIL
    html = render_status_page(doc, [shown], now=T0)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<b>" not in html.split("<main>")[1]
    assert 'action="/incidents/1/notes"' in html and "overdue since 00:05" in html


def test_hypervisor_pages_carry_the_vendor_and_network_pages_the_provider() -> None:
    from watchtower.notify.messages import incident_message

    cfg = config()
    hung = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, cause=Cause.OS_UNRESPONSIVE, first_failure_at=T0)
    body = incident_message("page", hung, cfg, T0 + MIN).body
    assert "Vendor: service tag ST-123, vendor contact +49 800 123" in body  # not only when hardware
    broken = Incident(1, Scope.HYPERVISOR, "pve1", T0 + MIN, cause=Cause.HARDWARE_FAULT, first_failure_at=T0)
    body = incident_message("page", broken, cfg, T0 + MIN).body
    assert "open a vendor case: service tag ST-123, vendor contact +49 800 123" in body
    net = Incident(2, Scope.NETWORK, "uplink", T0 + MIN, first_failure_at=T0)
    body = incident_message("page", net, cfg, T0 + MIN).body
    assert "Call FiberCo: phone +49 30 999, circuit C-42, response SLA 30m" in body
