"""The status page: the verdict in the banner, the restore board, everything escaped, readable
without JavaScript; and the login that guards it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident
from watchtower.engine.monitor import Monitor
from watchtower.web.app import MONITOR, SESSION_COOKIE, incident_document, make_app, render_status_page
from watchtower.web.page import category_of, page_incident

T0 = datetime(2026, 11, 22, 2, 14, tzinfo=UTC).timestamp()  # the first failed probe
HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')


def doc(**targets: Any) -> dict[str, Any]:
    return {"site": "acme", "vantage": "up", "generated_at": "2026-11-22T02:14:00Z", "targets": targets}


def target(role: str, state: str, *paths: tuple[str, str]) -> dict[str, Any]:
    rows = [{"name": n, "kind": "icmp", "state": s, "detail": "d", "last_ok": None} for n, s in paths]
    return {"role": role, "state": state, "paths": rows}


def banner(html: str) -> str:
    match = re.search(r'<h1 id="banner">(.*?)</h1>', html, re.S)
    assert match, html
    return match.group(1)


def make_config(services: Mapping[str, Mapping[str, Any] | None], **extra: Any) -> Config:
    """pve1 (hypervisor) with one VM per entry of ``services`` (name -> service block or None)."""
    targets: dict[str, Any] = {"pve1": {"role": "hypervisor", "paths": [{"icmp": "127.0.0.2"}]}}
    for n, (name, service) in enumerate(services.items(), 10):
        targets[name] = {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": f"127.0.0.{n}"}]}
        if service is not None:
            targets[name]["service"] = dict(service)
    for name, fields in extra.pop("target_fields", {}).items():
        targets[name].update(fields)
    return parse_config({"site": "acme", "targets": targets, **extra}, Path("."))


def hypervisor_incident(affected: list[str], **kw: Any) -> Incident:
    return Incident(
        7,
        Scope.HYPERVISOR,
        "pve1",
        T0 + 30,
        cause=Cause.POWER_OFF,
        affected=tuple(affected),
        first_failure_at=T0,
        evidence=("prod: no echo reply", "BMC: chassis off"),
        **kw,
    )


def state_for(config: Config, down: str = "unreachable", **states: str) -> dict[str, Any]:
    out = {}
    for name, t in config.targets.items():
        state = states.get(name, "down" if name == "pve1" else down)
        out[name] = target(t.role, state, ("p", "down" if state != "up" else "up"))
    return doc(**out)


def render(config: Config, incident: Incident, now: float, **states: str) -> str:
    page = page_incident(incident_document(incident), incident, config)
    return render_status_page(state_for(config, **states), [page], config=config, now=now)


# --------------------------------------------------------------------------- banner


def test_banner_names_the_worst_target() -> None:
    html = render_status_page(
        doc(
            sw=target("network", "up", ("icmp 10.0.0.2", "up")),
            pve1=target("hypervisor", "down", ("prod", "down"), ("mgmt", "down")),
            nas1=target("storage", "degraded", ("icmp 10.0.20.5", "down"), ("tcp 10.0.20.5:3260", "up")),
        )
    )
    assert banner(html) == "hypervisor pve1 down (+1 more)"
    assert 'http-equiv="refresh"' in html and "<script" not in html
    assert 'name="viewport"' in html and "max-width: 700px" in html
    assert (
        html.index('id="role-network"') < html.index('id="role-hypervisor"') < html.index('id="role-storage"')
    )


def test_all_up_and_blind_banners() -> None:
    assert banner(render_status_page(doc(sw=target("network", "up", ("p", "up"))))) == "all targets up"
    blind = doc(sw=target("network", "down", ("p", "down")))
    blind["vantage"] = "down"
    monitor = {"id": 3, "scope": "monitor", "root": "acme", "affected": [], "state": "open",
               "opened_at": "2026-11-22T02:14:05Z", "headline": "monitor acme is blind"}  # fmt: skip
    text = banner(render_status_page(blind, [monitor], now=T0 + 60))
    assert text.startswith("watchtower is cut off since 02:14 UTC: its own uplink is down")


def test_banner_for_a_dead_hypervisor_says_cause_scope_and_rto() -> None:
    vms: dict[str, dict[str, Any]] = {f"vm{n}": {"name": f"Svc{n}", "rto": "24h"} for n in range(1, 8)}
    vms["erp1"] = {"name": "ERP", "rto": "4h", "restore_order": 5}
    config = make_config(vms)
    now = T0 + 2 * 3600 + 48 * 60  # 2h48m into a 4h RTO
    html = render(config, hypervisor_incident(list(vms)), now)
    assert (
        banner(html)
        == "hypervisor pve1 down since 02:14 UTC, BMC: power off, 8 VMs affected, RTO clock ERP 1h12m left"
    )
    later = render(config, hypervisor_incident(list(vms)), T0 + 5 * 3600)
    assert banner(later).endswith("RTO ERP exceeded by 1h")
    assert "BMC: chassis off" in html  # the evidence
    assert (
        'action="/incidents/7/ack"' in html and "acknowledge #7" in html
    )  # an open incident offers the form


def test_acknowledged_incident_shows_who_and_no_form() -> None:
    from watchtower.engine.incidents import IncidentState

    config = make_config({"erp1": {"name": "ERP", "rto": "4h"}})
    incident = hypervisor_incident(["erp1"], state=IncidentState.ACKNOWLEDGED, acknowledged_by="alice",
                                   acknowledged_at=T0 + 600)  # fmt: skip
    html = render(config, incident, T0 + 900)
    assert banner(html).endswith("· acknowledged by alice")
    assert "acknowledged by alice at 02:24 UTC" in html and 'action="/incidents/7/ack"' not in html


# --------------------------------------------------------------------------- escaping


def test_hostile_names_are_escaped() -> None:
    html = render_status_page(doc(sw=target("network", "down", ("<script>alert(1)</script>", "down"))))
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_services_runbooks_and_evidence_are_text(evil: str) -> None:
    config = make_config(
        {"erp1": {"name": evil, "rto": "4h"}, "dc1": {"name": "AD", "restore_order": 1}},
        target_fields={
            "erp1": {"runbook": "javascript:alert(1)", "description": evil, "vendor_contact": evil},
            "dc1": {"runbook": f"https://wiki.example.org/dc1?{evil}", "service_tag": evil},
        },
    )
    incident = replace(hypervisor_incident(["erp1", "dc1"]), evidence=(f"prod: {evil}",))
    page = page_incident(incident_document(incident), incident, config)
    page["root"] = evil  # a name from anywhere (a future API, a store row) is text too
    state = state_for(config)
    state["targets"][evil] = target("vm", "down", (evil, "down"))
    html = render_status_page(state, [page], config=config, now=T0 + 60)
    assert "<script>" not in html and "<img" not in html and "onerror=alert(1)>" not in html
    assert 'href="javascript' not in html and "javascript:alert(1)" in html  # shown, not linked
    assert "https://wiki.example.org/dc1?&lt;" in html or "https://wiki.example.org/dc1?&#34;&gt;" in html
    assert html.count("&lt;") + html.count("&#34;") >= 6


def test_a_quote_cannot_leave_the_href() -> None:
    config = make_config(
        {"dc1": {"name": "AD"}},
        target_fields={"dc1": {"runbook": 'https://wiki.example.org/"onmouseover="alert(1)'}},
    )
    html = render(config, hypervisor_incident(["dc1"]), T0 + 60)
    assert 'href="https://wiki.example.org/&#34;onmouseover=&#34;alert(1)"' in html
    assert '"onmouseover' not in html


# --------------------------------------------------------------------------- restore board


def board(html: str) -> list[tuple[str, str]]:
    """(position, service) rows of the restore board, in page order."""
    rows = re.findall(
        r'<tr class="restore"[^>]*>\s*<td>(\d+)</td>\s*<td><strong class="service">(.*?)</strong>', html
    )
    return [(n, s) for n, s in rows]


def test_restore_board_follows_the_configured_order() -> None:
    config = make_config(
        {
            "erp1": {"name": "ERP", "rto": "4h", "restore_order": 5},
            "mail1": {"name": "Mail", "rto": "8h", "restore_order": 4},
            "dc1": {"name": "Active Directory", "rto": "4h", "restore_order": 2},
            "files1": {"name": "File server", "rto": "24h", "restore_order": 3},
            "print1": None,  # no service: not on the board
        },
        target_fields={"dc1": {"runbook": "https://wiki.example.org/restore/dc1"}},
    )
    incident = hypervisor_incident(["erp1", "mail1", "dc1", "files1", "print1"])
    incident = incident.noted(T0 + 3600, "back", "dc1 is back")
    html = render(config, incident, T0 + 3 * 3600, dc1="up")
    assert board(html) == [("1", "Active Directory"), ("2", "File server"), ("3", "Mail"), ("4", "ERP")]
    dc1_row = html[html.index('data-target="dc1"') :].split("</tr>")[0]
    assert "back, smoke probes pass since 03:14 UTC" in dc1_row and "met, back after 1h" in dc1_row
    assert '<a href="https://wiki.example.org/restore/dc1"' in dc1_row
    erp_row = html[html.index('data-target="erp1"') :].split("</tr>")[0]
    assert "RTO 4h: 1h left" in erp_row and "unreachable" in erp_row
    mail_row = html[html.index('data-target="mail1"') :].split("</tr>")[0]
    assert "RTO 8h: 5h left" in mail_row


def test_restore_board_guesses_the_playbook_order() -> None:
    services = {
        "intranet1": {"name": "Intranet"},
        "erp1": {"name": "Warenwirtschaft ERP"},
        "ex1": {"name": "Exchange"},
        "nas2": {"name": "Scans"},  # storage by its target name
        "ad1": {"name": "Domain controller"},
        "ns1": {"name": "DNS resolver"},
        "read1": {"name": "Reader"},  # neither "ad" nor "db": secondary
    }
    config = make_config(services)
    html = render(config, hypervisor_incident(list(services)), T0 + 60)
    assert [s for _, s in board(html)] == [
        "DNS resolver", "Domain controller", "Scans", "Exchange", "Warenwirtschaft ERP", "Intranet", "Reader",
    ]  # fmt: skip
    assert "no RTO set" in html


def test_configured_restore_order_beats_the_guess() -> None:
    config = make_config(
        {
            "ns1": {"name": "DNS"},
            "intranet1": {"name": "Intranet", "restore_order": 0},
            "db1": {"name": "SQL"},
        }
    )
    html = render(config, hypervisor_incident(["ns1", "intranet1", "db1"]), T0 + 60)
    assert [s for _, s in board(html)] == ["Intranet", "DNS", "SQL"]


def test_configured_category_beats_the_guess() -> None:
    config = make_config(
        {
            "mail1": {"name": "Mail"},
            "app1": {"name": "Kasse", "category": "directory"},  # nothing in the names says so
            "dc1": {"name": "Domain controller", "category": "secondary"},
        }
    )
    assert category_of("app1", config.targets["app1"]) == "directory"
    html = render(config, hypervisor_incident(["mail1", "app1", "dc1"]), T0 + 60)
    assert [s for _, s in board(html)] == ["Kasse", "Mail", "Domain controller"]


def test_category_heuristics() -> None:
    config = make_config({"x": {"name": "Mail"}, "dc2": {"name": "Printing"}, "fs": {"name": "fileserver"}})
    assert category_of("x", config.targets["x"]) == "mail"
    assert (
        category_of("dc2", config.targets["dc2"]) == "directory"
    )  # nothing in the service name: the target's
    assert category_of("fs", config.targets["fs"]) == "storage"


# --------------------------------------------------------------------------- contacts


def test_contacts_show_channel_names_never_urls() -> None:
    config = make_config(
        {"erp1": {"name": "ERP", "rto": "4h"}},
        target_fields={"erp1": {"vendor_contact": "+49 30 1234", "service_tag": "ABC123"}},
        notify={
            "channels": [
                {"name": "signal-oncall", "url": "json://127.0.0.1:1/secret-path-1", "tags": ["tier1"]},
                {"name": "mail-md", "url": "json://127.0.0.1:1/secret-path-2", "tags": ["tier4"]},
                {"name": "spare", "url": "json://127.0.0.1:1/secret-path-3", "tags": ["tier9"]},
            ],
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "15m", "notify": ["tier1", "mail-md"], "unless": "acknowledged"},
                {"rto_fraction": 0.75, "notify": ["tier4"]},
            ],
        },
    )
    html = render(config, hypervisor_incident(["erp1"]), T0 + 60)
    contacts = html[html.index('id="contacts"') :]
    assert "at once → tier1 → signal-oncall" in contacts
    assert "after 15m, unless acknowledged → tier1, mail-md → signal-oncall, mail-md" in contacts
    assert "at 75% of the smallest RTO → tier4 → mail-md" in contacts
    assert "+49 30 1234" in contacts and "service tag ABC123" in contacts
    assert "secret-path" not in html and "json://" not in html


# --------------------------------------------------------------------------- auth

TOKEN = "s3cret-token-value"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    config = parse_config(
        {
            "site": "acme",
            "api_token_file": "api-token",
            "targets": {"pve1": {"role": "hypervisor", "paths": [{"icmp": "127.0.0.2"}]}},
        },
        tmp_path,
    )
    monitor = Monitor(config)
    monitor.tracker.incidents[7] = Incident(7, Scope.HYPERVISOR, "pve1", T0, cause=Cause.POWER_OFF)
    async with TestClient(TestServer(make_app(monitor))) as c:
        yield c


HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


async def login(client: TestClient[Any, Any], token: str = TOKEN) -> Any:
    """POST /login; the cookie is returned, not kept (each test sends it explicitly)."""
    r = await client.post(
        "/login", data={"token": token}, allow_redirects=False, headers={"Origin": str(client.make_url(""))}
    )
    client.session.cookie_jar.clear()
    return r


def session_cookie(response: Any) -> str:
    return str(response.cookies[SESSION_COOKIE].value)


async def test_without_token_api_is_401_and_browsers_go_to_login(client: TestClient[Any, Any]) -> None:
    r = await client.get("/api/v1/state")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await client.get("/", allow_redirects=False)
    assert r.status == 401
    r = await client.get("/", headers=HTML, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/login"
    r = await client.get("/api/v1/state", headers=HTML, allow_redirects=False)
    assert r.status == 401  # the API never redirects
    r = await client.get("/login")
    assert r.status == 200 and 'type="password"' in await r.text()
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


async def test_bearer(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/api/v1/state", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 401
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get("/api/v1/state", headers=ok)).status == 200
    r = await client.get("/", headers=ok)
    assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]


async def test_metrics_and_healthz_stay_open(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/healthz")).status in (200, 503)  # open; 503 only because nothing ticks


async def test_login_form_sets_a_cookie_that_is_not_the_token(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await login(client)
    assert r.status == 303 and r.headers["Location"] == "/"
    raw = r.headers["Set-Cookie"]
    assert "HttpOnly" in raw and "SameSite=Strict" in raw and "Path=/" in raw
    assert "Secure" not in raw  # plain http here; over https the cookie is Secure
    value = session_cookie(r)
    assert TOKEN not in value
    # a random session id the daemon keeps, not a fixed function of the token (issue 15)
    assert len(value) >= 40
    assert value != hmac.new(TOKEN.encode(), b"watchtower status page session v1", hashlib.sha256).hexdigest()
    cookie = {"Cookie": f"{SESSION_COOKIE}={value}"}
    page = await client.get("/", headers={**HTML, **cookie}, allow_redirects=False)
    assert page.status == 200 and "log out" in await page.text()
    assert (await client.get("/api/v1/state", headers=cookie)).status == 200
    assert (await client.get("/login", headers=cookie, allow_redirects=False)).headers["Location"] == "/"
    bad = {"Cookie": f"{SESSION_COOKIE}={TOKEN}"}  # the raw token is no session
    assert (await client.get("/api/v1/state", headers=bad)).status == 401
    assert all(TOKEN not in rec.getMessage() for rec in caplog.records)


async def test_wrong_login_and_hostile_login_requests(client: TestClient[Any, Any]) -> None:
    r = await login(client, "wrong")
    assert r.status == 401 and "wrong token" in await r.text() and SESSION_COOKIE not in r.cookies
    big = await client.post("/login", data={"token": "x" * 10_000}, allow_redirects=False)
    assert big.status in (400, 413)
    odd = await client.post("/login?next=https://evil.example/", data={"token": TOKEN}, allow_redirects=False)
    client.session.cookie_jar.clear()
    assert odd.status == 303 and odd.headers["Location"] == "/"  # never anywhere else
    forged = await client.post(
        "/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}, allow_redirects=False
    )
    assert forged.status == 403


async def test_ack_form_needs_login_and_same_origin(client: TestClient[Any, Any]) -> None:
    app = client.app
    assert app is not None
    monitor = app[MONITOR]
    origin = str(client.make_url("")).rstrip("/")
    cookie = {"Cookie": f"{SESSION_COOKIE}={session_cookie(await login(client))}"}
    page = await (await client.get("/", headers={**HTML, **cookie})).text()
    assert 'action="/incidents/7/ack"' in page and 'name="by"' in page
    # not logged in
    r = await client.post("/incidents/7/ack", data={"by": "mallory"}, allow_redirects=False)
    assert r.status == 401
    # logged in, but posted from another site (SameSite keeps the cookie home; this checks Origin)
    for evil in ("http://evil.example", "null"):
        r = await client.post("/incidents/7/ack", data={"by": "mallory"}, allow_redirects=False,
                              headers={**cookie, "Origin": evil})  # fmt: skip
        assert r.status == 403
    r = await client.post("/incidents/7/ack", data={"by": "mallory"}, allow_redirects=False,
                          headers={**cookie, "Referer": "http://evil.example/x"})  # fmt: skip
    assert r.status == 403
    assert monitor.tracker.incidents[7].acknowledged_by is None
    r = await client.post("/incidents/7/ack", data={"by": " "}, allow_redirects=False,
                          headers={**cookie, "Origin": origin})  # fmt: skip
    assert r.status == 400
    r = await client.post("/incidents/7/ack", data={"by": "alice"}, allow_redirects=False,
                          headers={**cookie, "Origin": origin, "Referer": f"{origin}/"})  # fmt: skip
    assert r.status == 303 and r.headers["Location"] == "/"
    assert monitor.tracker.incidents[7].acknowledged_by == "alice"
    assert (await client.post("/incidents/99/ack", data={"by": "a"}, headers=cookie)).status == 404
    out = await client.post("/logout", headers={**cookie, "Origin": origin}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/login"
    assert 'watchtower_session=""' in out.headers["Set-Cookie"] and "Max-Age=0" in out.headers["Set-Cookie"]


async def test_without_a_token_everything_is_open(tmp_path: Path) -> None:
    config = parse_config(
        {"site": "acme", "targets": {"h": {"role": "vm", "paths": [{"icmp": "127.0.0.2"}]}}}, tmp_path
    )
    async with TestClient(TestServer(make_app(Monitor(config)))) as c:
        assert (await c.get("/")).status == 200
        r = await c.get("/login", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"
        page = await (await c.get("/")).text()
        assert "log out" not in page
        assert (
            await c.post("/incidents/1/ack", data={"by": "a"}, headers={"Origin": "http://evil.example"})
        ).status == 403
