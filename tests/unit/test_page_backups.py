"""The status page with backups: a warning turns the banner amber (not red, not "down"), the
restore board says what a restore loses, the readiness section names what to fix."""

from __future__ import annotations

from pathlib import Path

from test_status_page import T0, banner, hypervisor_incident, make_config, state_for

from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import Incident
from watchtower.readiness import assess_site
from watchtower.web.app import incident_document, render_status_page
from watchtower.web.page import page_incident


def test_a_backup_warning_is_amber_and_not_an_outage() -> None:
    config = make_config({"erp1": {"name": "ERP", "rpo": "1h"}})
    warning = Incident(
        3, Scope.BACKUP, "erp1-restic", T0, evidence=("ERP: newest restore point is 3h old, RPO 1h",)
    )
    page = page_incident(incident_document(warning), warning, config)
    html = render_status_page(state_for(config, down="up", pve1="up"), [page], config=config, now=T0 + 60)
    assert banner(html).strip() == "all targets up; warning: ERP: newest restore point is 3h old, RPO 1h"
    assert "#b06000" in html and "down since" not in banner(html)
    assert 'id="restore"' not in html  # a warning takes nothing down: no restore board


LOSS = "7h24m ago, RPO 1h: restore loses up to 7h24m (erp1-pbs)"


def test_restore_board_and_readiness_section(tmp_path: Path) -> None:
    config = make_config({"erp1": {"name": "ERP", "rto": "4h", "rpo": "1h"}})
    incident = hypervisor_incident(["erp1"])
    page = page_incident(incident_document(incident), incident, config)
    readiness = assess_site(config, {}, T0).document()
    html = render_status_page(
        state_for(config),
        [page],
        config=config,
        now=T0 + 600,
        restore_points={"erp1": f"ERP: newest restore point 2026-11-21 19:00 UTC, {LOSS}"},
        readiness=readiness,
    )
    assert 'class="note restore-point">ERP: newest restore point 2026-11-21 19:00 UTC' in html
    assert 'id="readiness"' in html and "no backup configured (service.backups)" in html
    assert 'class="readiness-red">red<' in html


def test_readiness_contacts_item_follows_the_drills_record() -> None:
    from watchtower.people import ContactVerification

    channels = [{"name": "sig", "url": "json://127.0.0.1/", "tags": ["tier1"]}]
    config = make_config(
        {"erp1": {"name": "ERP", "rto": "4h", "rpo": "1h"}},
        notify={"channels": channels},
        contacts={"alice": {"channels": ["sig"]}, "bob": {"channels": ["sig"], "verify_every": "30d"}},
    )

    def item(verified: list[ContactVerification] | None) -> tuple[str, str]:
        (service,) = assess_site(config, {}, T0, verified=verified).services
        (found,) = [i for i in service.items if i.name == "contacts"]
        return found.level, found.text

    assert item(None) == ("amber", "contacts not verified: no drill on record (watchtower drill run)")
    fresh = [ContactVerification("alice", T0 - 86400, T0 + 1, False, None),
             ContactVerification("bob", T0 - 86400, T0 + 1, False, None)]  # fmt: skip
    assert item(fresh) == ("green", "2 contact(s) verified by drills")
    stale = [fresh[0], ContactVerification("bob", None, None, True, None)]
    assert item(stale) == ("amber", "contacts not verified by a drill in time: bob (never)")


async def test_a_push_needs_its_own_token_and_no_host_listing(tmp_path: Path) -> None:
    """Without an API token the daemon refuses unknown Host names (DNS rebinding); a push carries
    its backup's own token, so a job on another box reaches it by any name."""
    from aiohttp.test_utils import TestClient, TestServer

    from watchtower.backups.watch import BackupWatch
    from watchtower.config import parse_config
    from watchtower.engine.monitor import Monitor
    from watchtower.web.app import make_app

    (tmp_path / "state").mkdir()
    doc = {
        "site": "acme",
        "state_dir": str(tmp_path / "state"),
        "targets": {
            "erp1": {"role": "vm", "paths": [{"icmp": "127.0.0.1"}],
                     "service": {"name": "ERP", "rpo": "1h",
                                 "backups": [{"name": "erp-dump", "push": {"token": "push-token-0001"}}]}},
        },
    }  # fmt: skip
    config = parse_config(doc, tmp_path)
    monitor = Monitor(config)
    watch = BackupWatch(config, monitor.tracker)
    async with TestClient(TestServer(make_app(monitor, backups=watch))) as client:
        host = {"Host": "watchtower.office.lan:9847"}
        async with client.get("/api/v1/backups", headers=host) as r:
            assert r.status == 403  # an unknown name for the API itself
        wrong = {**host, "Authorization": "Bearer nope"}
        async with client.post("/api/v1/backups/erp-dump", headers=wrong) as r:
            assert r.status == 401
        right = {**host, "Authorization": "Bearer push-token-0001"}
        async with client.post("/api/v1/backups/erp-dump", headers=right) as r:
            assert r.status == 200, await r.text()
        assert watch.status["erp-dump"].newest is not None
