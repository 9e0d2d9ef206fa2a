"""The post-mortem report: exact figures, timeline rows, RTO verdicts and pre-filled questions
for a recorded incident with injected timestamps; an open one; a monitor one; hostile names."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState, TimelineEvent
from watchtower.report import Figures, figures, render_report, restore_order, span
from watchtower.store import Attempt, Notification

T0 = datetime(2026, 11, 22, 2, 13, 53, tzinfo=UTC).timestamp()  # the first failed probe
OPENED = T0 + 14  # confirmed 02:14:07
ACKED = OPENED + 22 * 60 + 5  # 02:36:12
RESOLVED = T0 + 70 * 60  # 03:23:53
LATER = T0 + 86400  # when the post-mortem is written


def vm(name: str, addr: str, service: dict[str, Any] | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": addr}]}
    if service:
        t["service"] = service
    return t


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "site": "acme-hq",
        "targets": {
            "core-sw1": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
            "pve1": {"role": "hypervisor", "depends_on": ["core-sw1"], "paths": [{"icmp": "10.0.10.11"}]},
            "dc1": vm("dc1", "10.0.10.21", {"name": "Active Directory", "rto": "4h", "rpo": "1h",
                                            "restore_order": 1}),
            "erp1": vm("erp1", "10.0.10.22", {"name": "ERP", "rto": "4h", "rpo": "15m", "restore_order": 2}),
            "mail1": vm("mail1", "10.0.10.23", {"name": "Mail", "rto": "30m"}),
            "web1": vm("web1", "10.0.10.24"),
        },
    }  # fmt: skip
    data["targets"].update(extra)
    return parse_config(data, Path("."))


def note(at: float, kind: str, text: str) -> TimelineEvent:
    return TimelineEvent(at, kind, text)


def recorded() -> Incident:
    """pve1 lost power; dc1, erp1 and web1 came back with it, mail1 did not."""
    return Incident(
        12, Scope.HYPERVISOR, "pve1", OPENED, cause=Cause.POWER_OFF,
        affected=("dc1", "erp1", "mail1", "web1"), state=IncidentState.RESOLVED,
        acknowledged_at=ACKED, acknowledged_by="alice", resolved_at=RESOLVED, first_failure_at=T0,
        evidence=("icmp 10.0.10.11: no echo reply", "BMC: chassis power off"),
        back=("dc1", "web1", "erp1"),
        timeline=(
            note(T0, "first_failure", "first failed probe of pve1"),
            note(OPENED, "opened", "confirmed: hypervisor pve1 down (power_off), 4 affected"),
            note(ACKED, "ack", "acknowledged by alice"),
            note(T0 + 50 * 60, "back", "dc1 is back"),
            note(T0 + 55 * 60, "back", "web1 is back"),
            note(RESOLVED, "back", "erp1 is back"),
            note(RESOLVED, "resolved",
                 "pve1 is back after 1h09m; still down, now incidents of their own: mail1"),
        ),
    )  # fmt: skip


def sent(
    nid: int,
    step: str,
    kind: str,
    channel: str,
    created: float,
    at: float,
    tries: int = 1,
    incident: int = 12,
) -> Notification:
    return Notification(
        nid, incident, step, kind, channel, "t", "b", created, "sent", tries, created, at, at, None
    )


def gave_up(
    nid: int, step: str, kind: str, channel: str, created: float, tries: int, error: str
) -> Notification:
    last = created + 60 * tries
    return Notification(
        nid, 12, step, kind, channel, "t", "b", created, "failed", tries, last, last, None, error
    )


def recorded_notifications() -> list[Notification]:
    return [
        sent(1, "step0", "page", "signal-oncall", OPENED, OPENED + 2),
        sent(2, "step0", "page", "sms-oncall", OPENED, OPENED + 40, tries=3),  # failed twice, then sent
        sent(3, "ack:1", "ack", "signal-oncall", ACKED, ACKED + 1),
        gave_up(4, "resolve:0", "resolve", "sms-oncall", RESOLVED, tries=5, error="HTTP 503"),
        sent(5, "step0", "page", "elsewhere", 0.0, 1.0, incident=11),  # another incident's: ignored
    ]


def recorded_attempts() -> list[Attempt]:
    return [
        Attempt(1, OPENED + 2, True, None),
        Attempt(2, OPENED + 1, False, "HTTP 503"),
        Attempt(2, OPENED + 10, False, "connect timeout"),
        Attempt(2, OPENED + 40, True, None),
        Attempt(3, ACKED + 1, True, None),
        *[Attempt(4, RESOLVED + k * 60, False, "HTTP 503") for k in range(1, 6)],
    ]


BLIND = (T0 + 30 * 60, T0 + 32 * 60 + 10)  # 02:43:53 - 02:46:03, inside the incident


def report() -> str:
    blind = [BLIND, (T0 - 9000, T0 - 8000)]  # the second ended before the incident: not shown
    return render_report(recorded(), recorded_notifications(), recorded_attempts(), blind, config(), LATER)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_span() -> None:
    assert [span(s) for s in (0, 14, 60, 1325, 4200, 14400, 90061, -5)] == [
        "0s", "14s", "1m", "22m05s", "1h10m", "4h", "25h01m", "0s",
    ]  # fmt: skip


def test_figures() -> None:
    assert figures(recorded(), recorded_notifications()) == Figures(
        time_to_detect=14, time_to_notify=2, time_to_acknowledge=22 * 60 + 5, time_to_restore=70 * 60
    )
    bare = Incident(1, Scope.SERVICE, "web1", OPENED)
    assert figures(bare, []) == Figures(None, None, None, None)
    # an ack message is no page; a page that never got out does not count
    undelivered = [sent(3, "ack:1", "ack", "signal-oncall", ACKED, ACKED + 1)]
    assert figures(bare, undelivered).time_to_notify is None


def test_title_summary_and_figures() -> None:
    text = report()
    assert text.startswith("# Incident #12: hypervisor pve1 down (power_off)\n\n")
    assert "- **site:** acme-hq\n" in text
    assert "- **state:** resolved at 2026-11-22T03:23:53Z, 1h10m after the first failed probe\n" in text
    assert "- **acknowledged:** 2026-11-22T02:36:12Z by alice\n" in text
    assert "- BMC: chassis power off\n" in text
    assert section(text, "Figures").splitlines()[2:] == [
        "| figure | value | measured |",
        "|---|---|---|",
        "| time to detect | 14s | first failed probe 02:13:53 → confirmed 02:14:07 |",
        "| time to notify | 2s | confirmed → first page delivered 02:14:09 via signal-oncall |",
        "| time to acknowledge | 22m05s | confirmed → acknowledged 02:36:12 by alice |",
        "| time to restore | 1h10m | first failed probe → resolved 03:23:53 |",
    ]


def test_services_rto_and_rpo() -> None:
    services = section(report(), "Services")
    assert "| Active Directory | dc1 | 4h | 50m | yes |" in services
    assert "| ERP | erp1 | 4h | 1h10m | yes |" in services
    # mail1 was still down when pve1's incident ended: at least that long, and over its 30m
    mail = "| Mail | mail1 | 30m | at least 1h10m (still down when this incident ended) | no (over by 40m) |"
    assert mail in services
    assert "web1" not in services  # no service in the config
    assert (
        "- ERP (erp1): RPO 15m: the restore point must be from 2026-11-22T01:58:53Z or later "
        "(15m before the first failed probe); record the one actually used." in services
    )
    assert "- Mail (mail1): no RPO set; record the restore point used." in services


def test_timeline_rows() -> None:
    timeline = section(report(), "Timeline")
    assert "T+0 = 2026-11-22T02:13:53Z, the first failed probe." in timeline
    rows = [line for line in timeline.splitlines() if line.startswith("| ")]
    assert rows == [
        "| T+ | time (UTC) | event |",
        "| 0s | 02:13:53 | first failed probe of pve1 |",
        "| 14s | 02:14:07 | confirmed: hypervisor pve1 down (power_off), 4 affected |",
        "| 15s | 02:14:08 | page (step0) to sms-oncall: 2 attempts failed (last error: connect timeout) |",
        "| 16s | 02:14:09 | page (step0) to signal-oncall: sent |",
        "| 54s | 02:14:47 | page (step0) to sms-oncall: sent after 2 failed attempts |",
        "| 22m19s | 02:36:12 | acknowledged by alice |",
        "| 22m20s | 02:36:13 | ack (ack:1) to signal-oncall: sent |",
        "| 30m | 02:43:53 | watchtower blind: every vantage path down |",
        "| 32m10s | 02:46:03 | watchtower sees again (blind for 2m10s) |",
        "| 50m | 03:03:53 | dc1 is back |",
        "| 55m | 03:08:53 | web1 is back |",
        "| 1h10m | 03:23:53 | erp1 is back |",
        "| 1h10m | 03:23:53 | pve1 is back after 1h09m; still down, now incidents of their own: mail1 |",
        "| 1h15m | 03:28:53 | resolve (resolve:0) to sms-oncall: gave up after 5 failed attempts "
        "(last error: HTTP 503) |",
    ]
    assert "elsewhere" not in timeline


def test_timeline_without_attempt_rows_uses_the_outbox_counts() -> None:
    text = render_report(recorded(), recorded_notifications(), [], [], config(), LATER)
    assert "| 54s | 02:14:47 | page (step0) to sms-oncall: sent after 2 failed attempts |" in text


def test_blind_windows_overlapping_only() -> None:
    windows = section(report(), "Monitor blind windows")
    assert windows.splitlines()[2:] == [
        "| from (UTC) | to (UTC) | duration |",
        "|---|---|---|",
        "| 2026-11-22T02:43:53Z | 2026-11-22T02:46:03Z | 2m10s |",
    ]
    quiet = render_report(recorded(), [], [], [(T0 - 9000, T0 - 8000)], config(), LATER)
    assert "## Monitor blind windows\n\nnone: watchtower could see throughout the incident.\n" in quiet


def test_questions_are_prefilled() -> None:
    questions = section(report(), "Post-mortem questions").splitlines()[2:]
    assert questions[0] == (
        "1. **Did a person notice before the monitor?** watchtower confirmed the outage 14s after the first "
        "failed probe (02:14:07 UTC); compare with the first user report. watchtower was blind for 2m10s "
        "during the incident (see the blind windows)."
    )
    assert questions[1] == (
        "2. **Did on-call respond quickly?** the first page went out 2s after confirmation (02:14:09 UTC, "
        "via signal-oncall); on-call (alice) acknowledged after 22m05s (02:36:12 UTC). Delivery trouble: "
        "sms-oncall (step0) delivered late, sms-oncall (resolve:0) never delivered: check those channels."
    )
    assert questions[2].startswith(
        "3. **Was diagnosis tooling at hand?** watchtower said: hypervisor pve1, cause power_off; "
        "evidence: icmp 10.0.10.11: no echo reply; BMC: chassis power off."
    )
    assert questions[3] == (
        "4. **Was the restore path clear?** restore order: dc1 (Active Directory, order 1), "
        "erp1 (ERP, order 2), pve1 (hypervisor), mail1 (Mail), web1 (vm). They came back: dc1 03:03:53, "
        "web1 03:08:53, erp1 03:23:53, pve1 03:23:53 UTC. Was the order decided before the incident?"
    )
    assert questions[4] == (
        "5. **RTO met?** Active Directory: yes (down 50m of 4h); ERP: yes (down 1h10m of 4h); "
        "Mail: no (down at least 1h10m of 30m). If not, why not?"
    )
    assert report().endswith("## Action items\n\n| action | owner | deadline |\n|---|---|---|\n|  |  |  |\n")


def test_restore_order_puts_network_before_hypervisor_among_unordered() -> None:
    incident = Incident(1, Scope.NETWORK, "core-sw1", OPENED, affected=("web1", "pve1", "erp1"))
    assert restore_order(incident, config()) == ["erp1", "core-sw1", "pve1", "web1"]


def test_open_incident() -> None:
    incident = recorded()
    incident = replace(
        incident, state=IncidentState.OPEN, resolved_at=None, acknowledged_at=None, acknowledged_by=None,
        back=(), timeline=incident.timeline[:2],
    )  # fmt: skip
    now = T0 + 40 * 60  # 02:53:53
    text = render_report(incident, recorded_notifications()[:2], recorded_attempts()[:4],
                         [(T0 + 30 * 60, None)], config(), now)  # fmt: skip
    assert "- **state:** open for 40m so far (as of 2026-11-22T02:53:53Z)\n" in text
    assert "- **resolved:** not yet\n" in text
    assert "| time to acknowledge | not acknowledged | confirmed → acknowledged |" in text
    assert "| time to restore | not yet (40m so far) | first failed probe → resolved |" in text
    assert "| Active Directory | dc1 | 4h | still down (40m so far) | not yet (3h20m left) |" in text
    assert "| Mail | mail1 | 30m | still down (40m so far) | no (over by 10m, still down) |" in text
    assert "| 2026-11-22T02:43:53Z | still blind | 10m so far |" in text
    assert "| 30m | 02:43:53 | watchtower blind: every vantage path down |" in text
    assert "nobody acknowledged (it is still open)." in text
    assert (
        "5. **RTO met?** Active Directory: not yet (3h20m left); ERP: not yet (3h20m left); "
        "Mail: no (over by 10m, still down). If not, why not?" in text
    )
    assert "They came back" not in text


def test_open_incident_with_a_pending_page_and_no_first_failure() -> None:
    incident = Incident(4, Scope.SERVICE, "web1", OPENED).noted(
        OPENED, "opened", "confirmed: service web1 down"
    )
    pending = Notification(9, 4, "step0", "page", "sms-oncall", "t", "b", OPENED, "pending", 1,
                           OPENED + 30, OPENED + 1, None, "HTTP 502")  # fmt: skip
    text = render_report(
        incident, [pending], [Attempt(9, OPENED + 1, False, "HTTP 502")], [], config(), OPENED + 60
    )
    assert "T+0 = 2026-11-22T02:14:07Z, the confirmation." in text
    assert (
        "| time to detect | unknown | no failed probe recorded before the confirmation at 02:14:07 |" in text
    )
    assert "| time to notify | not sent yet (1 pending) | confirmed → first page delivered |" in text
    assert "| 1s | 02:14:08 | page (step0) to sms-oncall: 1 attempt failed (last error: HTTP 502) |" in text
    assert "| 0s | 02:14:07 | page (step0) to sms-oncall: pending, retrying |" in text
    assert "No target of this incident carries a `service` in the config" in text
    assert "5. **RTO met?** no target of this incident has a service RTO in the config." in text
    assert "watchtower confirmed the outage at 02:14:07 UTC; compare with the first user report." in text


def test_monitor_incident() -> None:
    blind = Incident(3, Scope.MONITOR, "acme-hq", T0, state=IncidentState.RESOLVED, resolved_at=T0 + 130,
                     evidence=("icmp 192.0.2.1: timeout",))  # fmt: skip
    blind = blind.noted(T0, "opened", "blind since 02:13:53Z: every vantage path is down")
    blind = blind.noted(T0 + 130, "resolved", "blind from 02:13:53Z to 02:16:03Z (2m10s)")
    text = render_report(blind, [], [], [(T0, T0 + 130)], config(), LATER)
    assert text.startswith("# Incident #3: monitor acme-hq is blind (its own uplink is down)\n")
    assert "- **state:** resolved at 2026-11-22T02:16:03Z: blind for 2m10s\n" in text
    assert "| time to detect | n/a |" in text
    assert "| time to restore | 2m10s | confirmed → resolved 02:16:03 |" in text
    assert "watchtower itself was blind: no target was measured in this window." in text
    assert "| 2026-11-22T02:13:53Z | 2026-11-22T02:16:03Z | 2m10s |" in text
    # its own window is not repeated as timeline rows
    assert "watchtower sees again" not in text
    assert "| 2m10s | 02:16:03 | blind from 02:13:53Z to 02:16:03Z (2m10s) |" in text
    assert (
        "1. **Did a person notice before the monitor?** watchtower itself was blind from 02:13:53 UTC "
        "to 02:16:03 UTC (2m10s)" in text
    )
    assert "no page was sent; nobody acknowledged." in text


def test_merged_incident_points_to_its_successor() -> None:
    incident = Incident(5, Scope.VM, "dc1", OPENED, state=IncidentState.RESOLVED, resolved_at=OPENED + 30,
                        merged_into=12, first_failure_at=T0)  # fmt: skip
    text = render_report(incident, [], [], [], config(), LATER)
    assert "merged into #12 at 2026-11-22T02:14:37Z (its story continues there)" in text
    assert "| Active Directory | dc1 | 4h | at least 44s (still down when this incident ended) |" in text
    assert "They came back" not in text


@pytest.mark.parametrize("who", ["<script>alert(1)</script>", "eve | x", "mallory\n# pwned"])
def test_hostile_names_stay_literal_and_tables_stay_intact(who: str) -> None:
    cfg = config(**{"svc-1": {"role": "service", "paths": [{"icmp": "10.0.0.9"}],
                              "service": {"name": f"Pay|roll <script>{who}", "rto": "1h"}}})  # fmt: skip
    incident = Incident(7, Scope.SERVICE, "svc-1", OPENED, first_failure_at=T0, acknowledged_by=who,
                        acknowledged_at=ACKED, state=IncidentState.ACKNOWLEDGED,
                        evidence=(f"http: {who}",))  # fmt: skip
    incident = incident.noted(T0, "first_failure", "first failed probe of svc-1")
    incident = incident.noted(ACKED, "ack", f"acknowledged by {who}")
    failed = Notification(1, 7, "step0", "page", "sms|x", "t", "b", OPENED, "failed", 1, OPENED, OPENED + 1,
                          None, f"bad | gateway\n{who}")  # fmt: skip
    text = render_report(incident, [failed], [], [], cfg, ACKED + 60)
    flat = " ".join(who.split())
    assert flat.replace("|", "\\|") in text  # literal, not HTML-escaped
    assert "&lt;" not in text
    for line in text.splitlines():
        assert not line.startswith("# pwned")
        if line.startswith("|"):
            # every row of every table keeps its column count: only escaped pipes inside cells
            cells = line.replace("\\|", "").count("|") - 1
            assert cells in (3, 5), line
    assert "| Pay\\|roll <script>" in text
    assert "page (step0) to sms\\|x: gave up after 1 failed attempt (last error: bad \\| gateway" in text
    assert f"on-call ({flat}) acknowledged after 22m05s" in text
