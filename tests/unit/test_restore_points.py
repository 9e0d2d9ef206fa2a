"""A hypervisor outage with a stale backup of a VM on it: the first page and the restore board say
what a restore loses now, and the post-mortem's RPO line names the real restore point at T+0."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from watchtower.backups.watch import BackupWatch
from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import Incident, IncidentTracker
from watchtower.notify.messages import incident_message
from watchtower.report import render_report
from watchtower.web.page import restore_board

T0 = 1_800_000_000.0  # the first failed probe of pve1
STALE = T0 - (7 * 3600 + 12 * 60)  # newest verified restore point: 7h12m before


def _config(tmp: Path) -> Config:
    (tmp / "pw").write_text("secret-password")
    doc = {
        "site": "acme",
        "targets": {
            "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.213.16.11"}]},
            "erp1": {
                "role": "vm",
                "runs_on": "pve1",
                "paths": [{"icmp": "10.213.16.23"}],
                "service": {
                    "name": "ERP",
                    "rto": "4h",
                    "rpo": "1h",
                    "backups": [
                        {"name": "erp-pbs", "restic": {"repository": "/srv/r", "password_file": "pw"}}
                    ],
                },
            },
        },
    }
    return parse_config(doc, tmp)


def _watch(config: Config) -> BackupWatch:
    watch = BackupWatch(config, IncidentTracker())
    status = watch.status["erp-pbs"]
    status.read_at, status.ok, status.newest, status.newest_verified, status.count = (
        T0 - 60,
        True,
        STALE,
        STALE,
        9,
    )
    return watch


def test_first_page_restore_board_and_report_say_what_a_restore_loses(tmp_path: Path) -> None:
    config = _config(tmp_path)
    watch = _watch(config)
    # the first page goes out at confirmation, before the VM is known to be affected
    watch.tracker.load([Incident(1, Scope.HYPERVISOR, "pve1", T0 + 12, first_failure_at=T0)], 2)
    now = T0 + 12
    lines = watch.restore_lines(watch.tracker.incidents[1], now)
    assert lines == [
        "ERP: newest verified restore point 2027-01-15 00:48 UTC, 7h12m ago, RPO 1h: "
        "restore loses up to 7h12m (erp-pbs)"
    ]
    incident = watch.tracker.incidents[1]  # with the note the tracker made
    page = incident_message("page", incident, config, now, restore=lines)
    assert "restore loses up to 7h12m" in page.body and "RPO 1h" in page.body
    # the restore point as of T+0 went into the timeline once
    assert [e.kind for e in incident.timeline].count("restore_point") == 1
    watch.restore_lines(incident, now + 600)
    incident = watch.tracker.incidents[1]
    assert [e.kind for e in incident.timeline].count("restore_point") == 1

    doc = {"targets": {"pve1": {"state": "down"}, "erp1": {"state": "unreachable"}}}
    inc_doc = {
        "scope": "hypervisor",
        "root": "pve1",
        "affected": ["erp1"],
        "opened_at": None,
        "outage_start": T0,
    }
    (row,) = restore_board(doc, [inc_doc], config, now + 3600, watch.restore_by_target(now + 3600))
    assert row["service"] == "ERP" and "restore loses up to 8h12m" in row["restore_point"]

    incident = replace(incident, affected=("erp1",))
    report = render_report(incident, [], [], [], config, T0 + 7200)
    assert (
        "ERP: newest verified restore point at T+0 was 2027-01-15 00:48 UTC, 7h12m before the first "
        "failed probe (RPO 1h): a restore loses up to 7h12m - RPO BROKEN (erp-pbs)"
    ) in report
    assert "secret-password" not in report + page.body


def test_no_restore_lines_for_warnings_or_services_without_backups(tmp_path: Path) -> None:
    config = _config(tmp_path)
    watch = _watch(config)
    watch.tracker.load([Incident(2, Scope.BACKUP, "erp-pbs", T0), Incident(3, Scope.VM, "elsewhere", T0)], 4)
    assert watch.restore_lines(watch.tracker.incidents[2], T0) == []
    assert watch.restore_lines(watch.tracker.incidents[3], T0) == []
    assert watch.tracker.incidents[3].timeline == ()


def test_a_warnings_report_is_titled_as_a_warning(tmp_path: Path) -> None:
    config = _config(tmp_path)
    tracker = IncidentTracker()
    text = "ERP: newest restore point 2027-01-15 00:48 UTC is 7h12m old, RPO 1h (erp-pbs)"
    tracker.raise_warning(Scope.BACKUP, "erp-pbs", text, [text], T0)
    tracker.clear_warning(Scope.BACKUP, "erp-pbs", "ERP: backup erp-pbs fresh again", T0 + 3600)
    (incident,) = tracker.incidents.values()
    report = render_report(incident, [], [], [], config, T0 + 7200)
    assert report.startswith(f"# Incident #1: backup warning: {text}")
    assert " down" not in report.splitlines()[0]
