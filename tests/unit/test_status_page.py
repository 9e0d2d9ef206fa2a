"""The status page: the verdict in the banner, everything escaped, readable without JavaScript."""

from __future__ import annotations

from typing import Any

from watchtower.web.app import render_status_page


def doc(**targets: Any) -> dict[str, Any]:
    return {"site": "acme", "vantage": "up", "generated_at": "2026-11-22T02:14:00Z", "targets": targets}


def target(role: str, state: str, *paths: tuple[str, str]) -> dict[str, Any]:
    rows = [{"name": n, "kind": "icmp", "state": s, "detail": "d", "last_ok": None} for n, s in paths]
    return {"role": role, "state": state, "paths": rows}


def test_banner_names_the_worst_target() -> None:
    html = render_status_page(
        doc(
            sw=target("network", "up", ("icmp 10.0.0.2", "up")),
            pve1=target("hypervisor", "down", ("prod", "down"), ("mgmt", "down")),
            nas1=target("storage", "degraded", ("icmp 10.0.20.5", "down"), ("tcp 10.0.20.5:3260", "up")),
        )
    )
    assert "<h1>hypervisor pve1 down (+1 more)</h1>" in html
    assert 'http-equiv="refresh"' in html and "<script" not in html
    assert html.index("<h2>network</h2>") < html.index("<h2>hypervisor</h2>") < html.index("<h2>storage</h2>")


def test_all_up_and_blind_banners() -> None:
    assert "<h1>all targets up</h1>" in render_status_page(doc(sw=target("network", "up", ("p", "up"))))
    blind = doc(sw=target("network", "down", ("p", "down")))
    blind["vantage"] = "down"
    assert "watchtower is cut off" in render_status_page(blind)


def test_hostile_names_are_escaped() -> None:
    html = render_status_page(doc(sw=target("network", "down", ("<script>alert(1)</script>", "down"))))
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_banner_leads_with_the_incident() -> None:
    incident = {"id": 7, "scope": "hypervisor", "headline": "hypervisor pve1 down (power_off), 2 affected",
                "opened_at": "2026-11-22T02:14:05Z", "affected": ["dc1", "mail1"], "state": "open",
                "acknowledged_by": None, "evidence": ["prod: no echo reply", "BMC: chassis off"]}  # fmt: skip
    html = render_status_page(doc(pve1=target("hypervisor", "down", ("prod", "down"))), [incident])
    assert "<h1>#7 hypervisor pve1 down (power_off), 2 affected since 02:14 UTC: dc1, mail1</h1>" in html
    assert "BMC: chassis off" in html
