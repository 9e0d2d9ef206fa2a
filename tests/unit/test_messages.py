"""Alert texts: key lines per kind and scope, RTO figures, playbook hints, SMS limits, no secrets."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchtower.config import Channel, Config, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState
from watchtower.notify.messages import (
    Message,
    incident_message,
    is_sms_channel,
    sms_text,
    warning_message,
)
from watchtower.notify.messages import test_message as make_test_message

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
BMC_PASSWORD = "bmc-pw-Sup3rSecret"
SMS_TOKEN = "smseagle-token-Sup3rSecret"
GSM_EXTENSION = set("[]{}\\^~|`")

VMS = ["dc1", "erp1", "mail1", *(f"vm{i:02d}" for i in range(4, 11))]  # 10 VMs on pve1

BASE: dict[str, Any] = {
    "site": "acme-hq",
    "vantage": [{"icmp": "192.0.2.1"}],
    "targets": {
        "core-sw1": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
        "pve1": {
            "role": "hypervisor",
            "depends_on": ["core-sw1"],
            "bmc": {"ipmi": {"host": "10.0.99.111", "username": "monitor", "password": BMC_PASSWORD}},
            "service_tag": "CZJ1234ABC",
            "vendor_contact": "HPE support +49 7031 450 7000",
            "description": "main host, rack 2",
            "runbook": "https://wiki.acme.example/it/pve1",
            "paths": [{"icmp": "10.0.10.11"}, {"icmp": "10.0.99.11"}],
        },
        "pve2": {"role": "hypervisor", "depends_on": ["core-sw1"], "paths": [{"icmp": "10.0.10.12"}]},
        "nas1": {
            "role": "storage",
            "depends_on": ["core-sw1"],
            "service_tag": "2030ABC123",
            "paths": [{"icmp": "10.0.20.5"}],
        },
        "dc1": {
            "role": "vm",
            "runs_on": "pve1",
            "storage": ["nas1"],
            "service": {"name": "Active Directory", "rto": "8h"},
            "paths": [{"icmp": "10.0.10.21"}],
        },
        "erp1": {
            "role": "vm",
            "runs_on": "pve1",
            "service": {"name": "ERP", "rto": "4h"},
            "paths": [{"icmp": "10.0.10.22"}],
        },
        "mail1": {
            "role": "vm",
            "runs_on": "pve1",
            "service": {"name": "Mail"},
            "paths": [{"icmp": "10.0.10.23"}],
        },
        **{
            f"vm{i:02d}": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": f"10.0.10.{30 + i}"}]}
            for i in range(4, 11)
        },
        "web1": {"role": "service", "depends_on": ["pve2"], "paths": [{"tcp": "10.0.10.40:443"}]},
        "crm1": {"role": "service", "depends_on": ["pve2"], "paths": [{"tcp": "10.0.10.41:443"}]},
        "wiki1": {"role": "service", "depends_on": ["pve2"], "paths": [{"tcp": "10.0.10.42:443"}]},
    },
    "notify": {
        "channels": [
            {"name": "mail-oncall", "url": "mailto://user:mailpw@mail.acme.example", "tags": ["tier1"]},
            {"name": "sms-oncall", "url": f"smseagle://{SMS_TOKEN}@10.0.0.9/+4915100000", "tags": ["tier1"]},
        ],
        "escalation": [{"after": "0s", "notify": ["tier1"]}],
        "status_url": "https://wt.acme.example/",
    },
}


def make_config(**changes: Any) -> Config:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return parse_config(data, Path("."))


CFG = make_config()


def hv_incident(cause: Cause | None = Cause.POWER_OFF, **kw: Any) -> Incident:
    inc = Incident(
        12,
        Scope.HYPERVISOR,
        "pve1",
        opened_at=T0 + 60,
        cause=cause,
        affected=tuple(VMS),
        first_failure_at=T0,
        evidence=("icmp 10.0.10.11: no echo reply", "icmp 10.0.99.11: no echo reply", "BMC: chassis off"),
    )
    inc = inc.noted(T0, "first_failure", "first failed probe of pve1")
    inc = inc.noted(T0 + 60, "opened", "confirmed: hypervisor pve1 down")
    return replace(inc, **kw)


def lines(msg: Message) -> list[str]:
    return msg.body.splitlines()


def check_sms(sms: str) -> None:
    assert len(sms) <= 160
    assert all(32 <= ord(c) < 127 for c in sms), sms
    assert not GSM_EXTENSION & set(sms)


# --------------------------------------------------------------------------- page, hypervisor


def test_page_hypervisor_power_off() -> None:
    msg = incident_message("page", hv_incident(), CFG, T0 + 48 * 60)
    assert msg.title == "[watchtower acme-hq] #12 hypervisor pve1 DOWN (power off), 10 affected"
    body = lines(msg)
    assert body[:3] == [
        "What: hypervisor pve1 is DOWN",
        "Cause: BMC: chassis power is OFF",
        "10 affected: dc1, erp1, mail1, vm04, vm05, vm06, vm07, vm08, +2 more",
    ]
    assert "Services: Active Directory, ERP, Mail" in body
    assert "Since: 22:13 UTC (first failed probe), confirmed 22:14 UTC; down 48m" in body
    assert body[body.index("Evidence:") + 1 : body.index("Evidence:") + 4] == [
        "- icmp 10.0.10.11: no echo reply",
        "- icmp 10.0.99.11: no echo reply",
        "- BMC: chassis off",
    ]
    assert "RTO clock: ERP (erp1) 4h, 3h12m left" in body  # the tightest RTO, from the first failure
    steps = body[body.index("First steps:") + 1 :]
    assert steps[0] == "- No repair attempts before diagnosis"
    assert "- Check the BMC / remote console of pve1 before touching it" in steps
    assert "- Do not hard-power-off if avoidable (write caches)" in steps
    assert (
        "- Collect SEL and storage logs (SMART, RAID) before any swap; open a vendor case: "
        "service tag CZJ1234ABC, vendor contact HPE support +49 7031 450 7000"
    ) in steps
    assert "About pve1: main host, rack 2" in body
    assert "Runbook: https://wiki.acme.example/it/pve1" in body
    assert body[-2:] == [
        "Incident #12. Acknowledge: watchtower ack 12 --by NAME",
        "Status/ack: https://wt.acme.example/",
    ]
    # the order of the playbook: what, affected, since, evidence, RTO, steps, id
    order = ["What:", "10 affected", "Since:", "Evidence:", "RTO clock:", "First steps:", "Incident #12"]
    positions = [next(i for i, line in enumerate(body) if line.startswith(p)) for p in order]
    assert positions == sorted(positions)
    assert msg.sms == (
        "WT acme-hq #12 HV pve1 DOWN pwr off, 10 aff, RTO ERP 3h12m left, "
        "icmp 10.0.10.11: no echo reply. ack: watchtower ack 12"
    )
    check_sms(msg.sms)


def test_rto_exceeded() -> None:
    msg = incident_message("page", hv_incident(), CFG, T0 + 4 * 3600 + 20 * 60)
    assert "RTO clock: ERP (erp1) 4h, RTO EXCEEDED by 20m" in lines(msg)
    assert "RTO ERP EXCEEDED 20m" in msg.sms


def test_no_rto_line_without_a_service_rto() -> None:
    inc = hv_incident(affected=("mail1", "vm04"))
    assert not any(line.startswith("RTO") for line in lines(incident_message("page", inc, CFG, T0)))


def test_hardware_fault_quotes_the_sel() -> None:
    inc = hv_incident(
        Cause.HARDWARE_FAULT,
        evidence=["icmp 10.0.10.11: no echo reply", "BMC: chassis on, SEL: PSU 1 failure, SEL: Memory ECC"],
    )
    body = lines(incident_message("page", inc, CFG, T0 + 120))
    assert "Cause: BMC: hardware fault in the SEL: PSU 1 failure; Memory ECC" in body
    assert any(line.startswith("- Collect SEL and storage logs") for line in body)


def test_os_unresponsive_and_bmc_unreachable_no_vendor_case() -> None:
    body = lines(incident_message("page", hv_incident(Cause.OS_UNRESPONSIVE), CFG, T0 + 120))
    assert "Cause: BMC: chassis on, no hardware fault: OS hung or network stack dead" in body
    assert not any("vendor case" in line for line in body)
    body = lines(incident_message("page", hv_incident(Cause.BMC_UNREACHABLE), CFG, T0 + 120))
    assert "Cause: BMC not reachable either (power or management network?)" in body
    assert "- Check power to the rack and the management network" in body


def test_hardware_hint_without_service_tag() -> None:
    inc = Incident(5, Scope.HYPERVISOR, "pve2", T0, cause=Cause.POWER_OFF)
    body = lines(incident_message("page", inc, CFG, T0 + 60))
    assert (
        "- Collect SEL and storage logs (SMART, RAID) before any swap; "
        "open a vendor case (no service_tag set for pve2)"
    ) in body
    assert "Since: 22:13 UTC (confirmed); down 1m" in body  # no first failure known: the confirmation


# --------------------------------------------------------------------------- other scopes


def test_network_scope() -> None:
    inc = Incident(3, Scope.NETWORK, "core-sw1", T0, affected=("pve1", "pve2", "nas1"))
    msg = incident_message("page", inc, CFG, T0 + 300)
    body = lines(msg)
    # The first page often goes out before everything behind the switch is confirmed: the count of
    # what depends on it says how big this is, and the body names what to expect down too.
    assert msg.title == "[watchtower acme-hq] #3 network core-sw1 DOWN, 3 affected (16 depend on it)"
    assert "3 affected: pve1, pve2, nas1" in body
    assert (
        "Depend on it, not confirmed down yet (13): dc1, erp1, mail1, vm04, vm05, vm06, vm07, vm08, +5 more"
        in body
    )
    assert " 3 aff of 16 behind" in msg.sms
    behind = [t for t in CFG.targets if t != "core-sw1"]
    everything = Incident(3, Scope.NETWORK, "core-sw1", T0, affected=tuple(behind))
    full = incident_message("page", everything, CFG, T0 + 300)
    assert full.title == "[watchtower acme-hq] #3 network core-sw1 DOWN, 16 affected"
    assert not any(line.startswith("Depend on it") for line in lines(full))
    assert "- Check the switch/uplink core-sw1: power, link LEDs, which ports are down" in body
    assert "- What is behind it is unreachable, not necessarily down: fix the path first" in body
    assert not any(line.startswith("Cause:") for line in body)
    assert not any("vendor case" in line for line in body)


def test_storage_scope_raid_and_vendor_case() -> None:
    inc = Incident(4, Scope.STORAGE, "nas1", T0, affected=("dc1",))
    body = lines(incident_message("page", inc, CFG, T0 + 60))
    assert "- RAID: read first, swap no disk before the order is clear" in body
    assert "- VMs on it (1) may have I/O errors or read-only disks" in body
    assert (
        "- Collect SEL and storage logs (SMART, RAID) before any swap; "
        "open a vendor case: service tag 2030ABC123"
    ) in body
    assert "RTO clock: Active Directory (dc1) 8h, 7h59m left" in body


def test_vm_and_service_scopes() -> None:
    vm = incident_message("page", Incident(6, Scope.VM, "erp1", T0), CFG, T0 + 60)
    assert vm.title == "[watchtower acme-hq] #6 vm erp1 DOWN"
    assert "- Check the VM erp1 on its host pve1: running, hung, disk full? Use the console" in lines(vm)
    assert "RTO clock: ERP (erp1) 4h, 3h59m left" in lines(vm)
    svc = incident_message("page", Incident(7, Scope.SERVICE, "web1", T0), CFG, T0 + 60)
    assert "- Check the service on web1: process, logs, disk space; use the console" in lines(svc)
    assert not any("vendor case" in line or "security" in line for line in lines(svc))


def test_security_hint_with_three_unrelated_services_not_two() -> None:
    hint = (
        "- Several unrelated services failing at once: consider a security incident (ransomware?): "
        "isolate, do not restore from backups yet"
    )
    web = Incident(7, Scope.SERVICE, "web1", T0)
    crm = Incident(8, Scope.SERVICE, "crm1", T0 + 5)
    wiki = Incident(9, Scope.VM, "wiki1", T0 + 9)
    three = incident_message("page", web, CFG, T0 + 60, others=[web, crm, wiki])
    assert hint in lines(three)
    assert lines(three).index(hint) == lines(three).index("- No repair attempts before diagnosis") + 1
    assert "SECURITY? isolate, no restore yet" in three.sms
    check_sms(three.sms)
    assert hint not in lines(incident_message("page", web, CFG, T0 + 60, others=[crm]))
    # the same root twice, a resolved one and a hypervisor incident do not count
    gone = Incident(10, Scope.SERVICE, "wiki1", T0, state=IncidentState.RESOLVED, resolved_at=T0 + 1)
    again = Incident(11, Scope.SERVICE, "crm1", T0)
    hv = hv_incident()
    assert hint not in lines(incident_message("page", web, CFG, T0 + 60, others=[crm, again, gone, hv]))


def test_monitor_blind_and_window() -> None:
    inc = Incident(3, Scope.MONITOR, "acme-hq", T0, evidence=("vantage icmp 192.0.2.1: timeout",))
    page = incident_message("page", inc, CFG, T0 + 60)
    assert (
        page.title == "[watchtower acme-hq] #3 monitor acme-hq BLIND: own uplink down, target states unknown"
    )
    body = lines(page)
    assert body[0] == (
        "What: watchtower at acme-hq is cut off (its own uplink is down): target states are unknown, not down"
    )
    assert "- Check the monitoring box's own uplink (gateway, cable, ISP); targets may be fine" in body
    assert "No repair attempts before diagnosis" not in page.body
    check_sms(page.sms)
    inc = replace(inc, state=IncidentState.RESOLVED, resolved_at=T0 + 7 * 60 + 30)
    done = incident_message("resolve", inc, CFG, T0 + 500)
    assert done.title == (
        "[watchtower acme-hq] #3 RESOLVED: watchtower at acme-hq sees again, "
        "blind from 22:13 to 22:20 UTC (7m)"
    )
    assert lines(done)[0] == "What: watchtower at acme-hq sees again: blind from 22:13 to 22:20 UTC (7m)"
    assert done.sms == "WT acme-hq #3 OK MON sees again, blind 22:13-22:20Z (7m)"


# --------------------------------------------------------------------------- kinds


def test_escalation_says_why() -> None:
    label = "75% of the ERP RTO (4h) used, 1h left"
    msg = incident_message("escalation", hv_incident(), CFG, T0 + 3 * 3600, label=label)
    assert msg.title == (
        "[watchtower acme-hq] #12 ESCALATION (75% of the ERP RTO (4h) used, 1h left): "
        "hypervisor pve1 DOWN (power off), 10 affected"
    )
    assert lines(msg)[0] == f"Escalated: {label}"
    assert msg.sms.startswith(
        "WT acme-hq #12 ESC HV pve1 DOWN pwr off, 75% of the ERP RTO (4h) used, 1h left"
    )
    assert msg.sms.endswith(". ack: watchtower ack 12")
    check_sms(msg.sms)


def test_update_unacknowledged_and_acknowledged() -> None:
    inc = hv_incident()
    msg = incident_message("update", inc, CFG, T0 + 45 * 60, label="status after 44m")
    assert msg.title == (
        "[watchtower acme-hq] #12 hypervisor pve1 still down after 45m (power off), 10 affected"
    )
    assert lines(msg)[0] == "What: hypervisor pve1 is still down after 45m"
    assert "Incident #12. Acknowledge: watchtower ack 12 --by NAME" in lines(msg)
    assert "Timeline:" in lines(msg) and "- 22:13 first failed probe of pve1" in lines(msg)
    inc = replace(inc, state=IncidentState.ACKNOWLEDGED, acknowledged_by="alice", acknowledged_at=T0 + 600)
    msg = incident_message("update", inc, CFG, T0 + 45 * 60)
    assert msg.title == (
        "[watchtower acme-hq] #12 hypervisor pve1 still down after 45m (power off), 10 affected, "
        "acknowledged by alice"
    )
    assert "Acknowledged by alice at 22:23 UTC" in lines(msg)
    assert "Incident #12" in lines(msg) and "watchtower ack 12" not in msg.body
    assert "acked alice" in msg.sms and "ack: watchtower ack" not in msg.sms


def test_ack() -> None:
    inc = hv_incident(state=IncidentState.ACKNOWLEDGED, acknowledged_by="alice", acknowledged_at=T0 + 600)
    msg = incident_message("ack", inc, CFG, T0 + 601, label="acknowledged by alice")
    assert msg.title == "[watchtower acme-hq] #12 acknowledged by alice: escalation stopped (hypervisor pve1)"
    assert "Acknowledged by alice at 22:23 UTC: escalation stopped" in lines(msg)
    assert msg.sms == "WT acme-hq #12 ACK by alice: HV pve1, escalation stopped"
    # the name from the label when the incident does not carry it
    bare = hv_incident()
    assert "acknowledged by bob" in incident_message("ack", bare, CFG, T0, label="acknowledged by bob").title


def test_reopen() -> None:
    msg = incident_message("reopen", hv_incident(flaps=2), CFG, T0 + 600, label="failed again (flap 2)")
    assert msg.title == (
        "[watchtower acme-hq] #12 FAILED AGAIN (flap 2): hypervisor pve1 DOWN (power off), 10 affected"
    )
    assert lines(msg)[0].startswith("FAILED AGAIN after the all-clear (flap 2)")
    assert "What: hypervisor pve1 is DOWN again" in lines(msg)
    assert msg.sms.startswith("WT acme-hq #12 FAILED AGAIN flap 2 HV pve1 DOWN pwr off")
    assert msg.sms.endswith("ack: watchtower ack 12")


def test_resolve_with_targets_still_down() -> None:
    inc = hv_incident(
        state=IncidentState.RESOLVED,
        resolved_at=T0 + 23 * 60,
        back=[v for v in VMS if v not in ("mail1", "vm09")],
    )
    msg = incident_message("resolve", inc, CFG, T0 + 23 * 60, label="all clear")
    assert msg.title == "[watchtower acme-hq] #12 RESOLVED: pve1 back after 23m; still down: mail1, vm09"
    body = lines(msg)
    assert body[0] == "What: hypervisor pve1 is back"
    assert "Still down (2), now incidents of their own: mail1, vm09" in body
    assert "Back (8): dc1, erp1, vm04, vm05, vm06, vm07, vm08, vm10" in body
    assert "Down: 22:13 to 22:36 UTC (23m)" in body
    assert "RTO clock: ERP (erp1) 4h: met, with 3h37m to spare" in body
    assert "- Post-mortem within the week: watchtower report 12" in body
    assert "Evidence:" not in body and "watchtower ack" not in msg.body
    assert msg.sms == "WT acme-hq #12 OK HV pve1 back after 23m, still down: mail1, vm09, RTO ERP met"


def test_resolve_rto_missed_and_still_running() -> None:
    late = hv_incident(state=IncidentState.RESOLVED, resolved_at=T0 + 5 * 3600, back=tuple(VMS))
    assert "RTO clock: ERP (erp1) 4h: RTO MISSED by 1h" in lines(incident_message("resolve", late, CFG, T0))
    # erp1 itself is still down: its clock keeps running, nothing was "met"
    early = hv_incident(state=IncidentState.RESOLVED, resolved_at=T0 + 3600, back=("dc1",))
    body = lines(incident_message("resolve", early, CFG, T0 + 3600))
    assert "RTO clock: ERP (erp1) 4h, 3h left" in body


def test_times_carry_the_date_when_not_today() -> None:
    body = lines(incident_message("page", hv_incident(), CFG, T0 + 86400))
    assert (
        "Since: 2023-11-14 22:13 UTC (first failed probe), confirmed 2023-11-14 22:14 UTC; down 24h" in body
    )


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown message kind"):
        incident_message("panic", hv_incident(), CFG, T0)


def test_no_status_url_line_when_unset() -> None:
    cfg = make_config(notify={**BASE["notify"], "status_url": None})
    assert "Status/ack" not in incident_message("page", hv_incident(), cfg, T0).body


# --------------------------------------------------------------------------- warnings, tests, channels


def test_warning_and_test_messages() -> None:
    warn = warning_message("channel sms-oncall failing for 6m: connection refused", CFG, T0)
    assert warn.title == "[watchtower acme-hq] WARNING: channel sms-oncall failing for 6m: connection refused"
    assert lines(warn)[0] == "Warning: channel sms-oncall failing for 6m: connection refused"
    assert warn.sms == "WT acme-hq WARN: channel sms-oncall failing for 6m: connection refused"
    long = warning_message("x" * 500 + "\nsecond line", CFG, T0)
    assert "\n" not in long.title and len(long.sms) == 160
    check_sms(long.sms)
    test = make_test_message(CFG, "sms-oncall", T0)
    assert test.title == "[watchtower acme-hq] TEST via sms-oncall: no action needed"
    assert "No action needed" in test.body and "TEST" in test.body
    assert test.sms == "WT acme-hq TEST, no action needed, via sms-oncall 22:13Z"


def channel(url: str, fmt: str = "auto") -> Channel:
    return Channel.model_validate({"name": "c", "url": url, "format": fmt})


@pytest.mark.parametrize(
    ("url", "fmt", "expected"),
    [
        ("smseagle://token@10.0.0.9/+4915100000", "auto", True),
        ("smseagles://token@sms.example/+4915100000", "auto", True),
        ("twilio://sid:token@+15551234567/+15557654321", "auto", True),
        ("SNS://key/secret/us-east-1/+15551234567", "auto", True),
        ("mailto://user:pw@mail.example", "auto", False),
        ("signal://127.0.0.1:8080/+4915100000", "auto", False),
        ("mailto://user:pw@mail.example", "sms", True),
        ("smseagle://token@10.0.0.9/+4915100000", "long", False),
        ("not a url", "auto", False),
    ],
)
def test_is_sms_channel(url: str, fmt: str, expected: bool) -> None:
    assert is_sms_channel(channel(url, fmt)) is expected


def test_no_secrets_in_any_message() -> None:
    others = [Incident(7, Scope.SERVICE, "web1", T0), Incident(8, Scope.SERVICE, "crm1", T0)]
    msgs = [
        incident_message(kind, hv_incident(), CFG, T0 + 600, label="x", others=others)
        for kind in ("page", "escalation", "update", "ack", "reopen", "resolve")
    ]
    msgs += [warning_message("w", CFG, T0), make_test_message(CFG, "sms-oncall", T0)]
    for msg in msgs:
        for text in (msg.title, msg.body, msg.sms):
            assert BMC_PASSWORD not in text and SMS_TOKEN not in text and "mailpw" not in text
            assert "smseagle://" not in text and "mailto:" not in text


def test_sms_text_is_plain_gsm() -> None:
    assert sms_text("Zürich–Süd {ß} ~ | `x`\n€") == "Zurich-Sud (ss) - / 'x' EUR"
    cfg = make_config(site="Zürich–Süd")
    msg = incident_message("page", hv_incident(), cfg, T0)
    assert msg.title.startswith("[watchtower Zürich–Süd] ")  # long forms keep the name as written
    assert msg.sms.startswith("WT Zurich-Sud #12 ")
    check_sms(msg.sms)


# --------------------------------------------------------------------------- property: SMS always fits

NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)
ANY_TEXT = st.text(max_size=300)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Incident, Config, float, str, list[Incident]]:
    site = draw(st.text(min_size=1, max_size=80).filter(str.strip))
    services = draw(
        st.lists(
            st.tuples(NAME.filter(lambda n: n != "h"), st.text(min_size=1, max_size=80)),
            max_size=4,
            unique_by=lambda t: t[0],
        )
    )
    targets: dict[str, Any] = {"h": {"role": "hypervisor", "paths": [{"icmp": "10.0.0.1"}]}}
    for name, service in services:
        targets[name] = {
            "role": "vm",
            "runs_on": "h",
            "service": {"name": service, "rto": draw(st.sampled_from(["1m", "4h", "24h"]))},
            "service_tag": draw(st.none() | st.text(max_size=80)),
            "vendor_contact": draw(st.none() | st.text(max_size=200)),
            "runbook": draw(st.none() | ANY_TEXT),
            "description": draw(st.none() | ANY_TEXT),
            "paths": [{"icmp": "10.0.0.2"}],
        }
    cfg = parse_config({"site": site, "targets": targets}, Path("."))
    scope = draw(st.sampled_from(list(Scope)))
    names = [n for n, _ in services]
    root = draw(NAME | st.sampled_from(["h", *names]))
    affected = tuple(draw(st.lists(NAME | st.sampled_from(["h", *names]), max_size=120, unique=True)))
    t0 = draw(st.floats(0, 4e9))
    state = draw(st.sampled_from(list(IncidentState)))
    inc = Incident(
        draw(st.integers(1, 10**12)),
        scope,
        site if scope is Scope.MONITOR else root,
        opened_at=t0 + draw(st.floats(0, 1e6)),
        cause=draw(st.none() | st.sampled_from(list(Cause))),
        affected=affected,
        state=state,
        acknowledged_by=draw(st.none() | st.text(max_size=80)),
        acknowledged_at=draw(st.none() | st.just(t0 + 5)),
        resolved_at=draw(st.none() | st.floats(t0, t0 + 1e7)),
        first_failure_at=draw(st.none() | st.just(t0)),
        evidence=tuple(draw(st.lists(ANY_TEXT, max_size=20))),
        flaps=draw(st.integers(0, 10**6)),
        back=tuple(draw(st.lists(st.sampled_from(affected), unique=True))) if affected else (),
    )
    for event_text in draw(st.lists(ANY_TEXT, max_size=8)):
        inc = inc.noted(t0, "x", event_text)
    others = [
        Incident(i + 10**13, draw(st.sampled_from([Scope.SERVICE, Scope.VM])), draw(NAME), t0)
        for i in range(draw(st.integers(0, 4)))
    ]
    kind = draw(st.sampled_from(["page", "escalation", "update", "ack", "reopen", "resolve"]))
    return kind, inc, cfg, t0 + draw(st.floats(0, 1e8)), draw(ANY_TEXT), others


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sms_always_one_segment(case: tuple[str, Incident, Config, float, str, list[Incident]]) -> None:
    kind, inc, cfg, now, label, others = case
    msg = incident_message(kind, inc, cfg, now, label=label, others=others)
    check_sms(msg.sms)
    assert f"#{inc.id}" in msg.sms
    assert "\n" not in msg.title and "\r" not in msg.title
    assert msg.title.startswith("[watchtower ")
    assert msg.body
    for other in (warning_message(label or "x", cfg, now), make_test_message(cfg, label or "c", now)):
        check_sms(other.sms)
        assert "\n" not in other.title


# --------------------------------------------------------------------------- networks and partitions

PARTITION_EVIDENCE = [
    "production network via core-sw1: 9 hosts unreachable on it, all alive on management",
    "pve1: no answer on prod, http; answers on management",
    "nas1: no answer on prod, iscsi; answers on management",
]


def partition_incident(**kw: Any) -> Incident:
    inc = Incident(
        21,
        Scope.NETWORK,
        "core-sw1",
        opened_at=T0 + 60,
        cause=Cause.PARTITION,
        affected=("pve1", "pve2", "nas1", "dc1", "erp1", "mail1", "vm04", "vm05", "vm06"),
        first_failure_at=T0,
        evidence=tuple(PARTITION_EVIDENCE),
    )
    return replace(inc, **kw)


def test_partition_page_names_the_network_and_says_the_hosts_are_alive() -> None:
    msg = incident_message("page", partition_incident(), CFG, T0 + 120)
    assert msg.title == (
        "[watchtower acme-hq] #21 production network via core-sw1 DOWN: 9 hosts unreachable on it, "
        "all alive on management"
    )
    body = lines(msg)
    assert body[0] == "What: production network via core-sw1 is DOWN"
    assert body[1] == (
        "Cause: 9 hosts unreachable on it, all alive on management: the network failed, not its hosts: "
        "they answer on another network"
    )
    assert "- The hosts are alive (they answer on another network): do not reset or power-cycle them" in body
    assert "- Check the switch/uplink core-sw1: power, link LEDs, which ports are down" in body
    assert not any("OS hung" in line or "os_unresponsive" in line for line in body)
    check_sms(msg.sms)
    assert msg.sms.startswith(
        "WT acme-hq #21 production network via core-sw1 DOWN: 9 hosts unreachable on it, all alive on "
        "management"
    )
    assert msg.sms.endswith("ack: watchtower ack 21")


def test_partition_reopen_and_resolve() -> None:
    again = incident_message("reopen", partition_incident(flaps=1), CFG, T0 + 120)
    assert again.title.startswith("[watchtower acme-hq] #21 FAILED AGAIN (flap 1): production network via")
    check_sms(again.sms)
    assert "FAILED AGAIN" in again.sms and "production network via core-sw1" in again.sms
    done = incident_message(
        "resolve",
        partition_incident(
            state=IncidentState.RESOLVED, resolved_at=T0 + 600, back=partition_incident().affected
        ),
        CFG,
        T0 + 600,
    )
    assert done.title == "[watchtower acme-hq] #21 RESOLVED: production network via core-sw1 back after 10m"
    check_sms(done.sms)


def test_link_down_page_is_not_os_hung() -> None:
    inc = hv_incident(
        Cause.LINK_DOWN,
        evidence=[
            "production link down: pve1 silent on it (prod, http), its OS answers on management (mgmt)",
            "prod: no echo reply",
            "BMC: chassis on",
        ],
    )
    msg = incident_message("page", inc, CFG, T0 + 120)
    assert (
        msg.title
        == "[watchtower acme-hq] #12 hypervisor pve1 UNREACHABLE (production link down), 10 affected"
    )
    body = lines(msg)
    assert body[1] == (
        "Cause: production link down: pve1 silent on it (prod, http), its OS answers on management (mgmt): "
        "its link to one network is down: its OS answers on another, it is not hung"
    )
    assert any(
        line.startswith("- pve1 is alive (its OS answers on another network): do not reset it")
        for line in body
    )
    assert not any("OS hung" in line for line in body)
    check_sms(msg.sms)
    assert msg.sms.startswith("WT acme-hq #12 HV pve1 UNREACH production link down")


def test_contradiction_is_named_not_guessed() -> None:
    inc = hv_incident(
        None,
        evidence=["prod: no echo reply", "contradictory: BMC says chassis off, but mgmt answers: no cause"],
    )
    body = lines(incident_message("page", inc, CFG, T0 + 120))
    assert "Cause: unknown: contradictory: BMC says chassis off, but mgmt answers: no cause" in body
