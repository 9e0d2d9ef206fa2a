"""Alerting on the demo site (shipped timings, two-path confirmation): a hypervisor dies with its VMs.
One message per channel of the first step, naming the hypervisor (none for the VMs); after the ack
no `unless: acknowledged` step fires; on recovery one all-clear per channel that was notified."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sinks import HttpSink, SmtpSink, mailto_url, signal_url, smseagle_url
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon
from watchtower.lab import Lab

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TIER2_AFTER = 25.0  # seconds; the shipped 15 m, shortened so the test can watch it not fire


@pytest.fixture
def lab(demo_lab: Lab) -> Lab:
    return demo_lab  # one demo site for the whole run (tests/conftest.py)


@pytest.fixture
def peers() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, http = SmtpSink().start(), HttpSink().start()
    try:
        yield smtp, http
    finally:
        smtp.stop()
        http.stop()


@pytest.fixture
async def api(lab: Lab, peers: tuple[SmtpSink, HttpSink], tmp_path: Path) -> AsyncIterator[Any]:
    smtp, http = peers
    data = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    port = free_port()
    data["listen"] = f"127.0.0.1:{port}"
    data["state_dir"] = str(tmp_path / "state")
    data["notify"]["channels"] = [
        {"name": "signal-oncall", "url": signal_url(http.port), "tags": ["tier1"]},
        {"name": "sms-oncall", "url": smseagle_url(http.port), "tags": ["tier1"]},
        {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
        {"name": "mail-provider", "url": mailto_url(smtp.port, to="provider@lab.test"), "tags": ["tier2"]},
        {"name": "mail-management", "url": mailto_url(smtp.port, to="md@lab.test"), "tags": ["tier4"]},
    ]
    data["notify"]["escalation"][1]["after"] = f"{TIER2_AFTER:g}s"
    data["notify"]["all_clear_after"] = "5s"
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    task = asyncio.create_task(run_daemon(load_config(cfg_path)))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

        async def call(method: str, path: str, body: Any = None) -> Any:
            async with session.request(method, path, json=body) as r:
                assert r.status == 200, (path, r.status)
                return await r.json()

        async def all_up() -> bool:
            try:
                doc = await call("GET", "/api/v1/state")
            except aiohttp.ClientError:
                return False
            return doc["vantage"] == "up" and all(t["state"] == "up" for t in doc["targets"].values())

        await wait_for(all_up, 30, "the healthy demo site to be all up")
        yield call
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def by_channel(smtp: SmtpSink, http: HttpSink) -> dict[str, list[str]]:
    """What each channel received, as text (Signal and SMS share one receiver, told apart by path)."""
    out: dict[str, list[str]] = {"signal": [], "sms": [], "mail-oncall": [], "provider": [], "md": []}
    for r in http.requests:
        if r.path == "/v2/send":
            out["signal"].append(r.json["message"])
        elif r.path == "/jsonrpc/sms":
            out["sms"].append(r.json["params"]["message"])
    for m in smtp.messages:
        key = {"oncall@lab.test": "mail-oncall", "provider@lab.test": "provider", "md@lab.test": "md"}
        out[key[m.rcpt_tos[0]]].append(m.subject + "\n" + m.text)
    return out


async def test_hypervisor_down_pages_once_per_channel_names_the_root_and_clears(
    lab: Lab, peers: tuple[SmtpSink, HttpSink], api: Any
) -> None:
    smtp, http = peers
    tier1 = ("signal", "sms", "mail-oncall")
    await asyncio.to_thread(lab.break_host, "pve1", "poweroff")
    broke = time.monotonic()
    try:

        async def paged() -> bool:
            got = by_channel(smtp, http)
            return all(got[c] for c in tier1)

        await wait_for(paged, 30, "the page on every tier-1 channel")
        page_after = time.monotonic() - broke

        async def grown() -> dict[str, Any] | None:
            (incident,) = await api("GET", "/api/v1/incidents")
            return incident if {"dc1", "mail1"} <= set(incident["affected"]) else None

        incident = await wait_for(grown, 30, "the VMs counted as affected")
        n = incident["id"]
        assert (incident["scope"], incident["root"]) == ("hypervisor", "pve1")
        got = by_channel(smtp, http)
        for channel in tier1:
            assert len(got[channel]) == 1, (channel, got[channel])  # one page, none for the VMs
            assert f"#{n}" in got[channel][0] and "pve1" in got[channel][0]
            assert "dc1 " not in got[channel][0].split("\n")[0]  # the title names the root, not a VM
        assert "hypervisor pve1 DOWN" in got["mail-oncall"][0]
        assert "No repair attempts before diagnosis" in got["mail-oncall"][0]

        acked = await api("POST", f"/api/v1/incidents/{n}/ack", {"by": "alice"})
        assert acked["state"] == "acknowledged"

        async def ack_announced() -> bool:
            got = by_channel(smtp, http)
            return all(len(got[c]) == 2 for c in tier1)

        await wait_for(ack_announced, 15, "the ack announced on every channel notified")
        assert "acknowledged by alice" in by_channel(smtp, http)["mail-oncall"][1]

        async def past_tier2() -> bool:
            return time.monotonic() > broke + page_after + TIER2_AFTER + 3

        await wait_for(past_tier2, TIER2_AFTER + 40, "the tier-2 time to pass")
        assert by_channel(smtp, http)["provider"] == []  # unless: acknowledged
    finally:
        await asyncio.to_thread(lab.repair, "pve1")

    async def cleared() -> bool:
        got = by_channel(smtp, http)
        return all(len(got[c]) == 3 for c in tier1)

    await wait_for(cleared, 60, "one all-clear per notified channel")
    got = by_channel(smtp, http)
    for channel in tier1:
        assert "RESOLVED" in got[channel][2] or "back" in got[channel][2], got[channel][2]
    assert got["provider"] == [] and got["md"] == []
    doc = await api("GET", f"/api/v1/incidents/{n}")
    assert doc["state"] == "resolved"
    assert sorted(x["kind"] for x in doc["notifications"]) == sorted(["page", "ack", "resolve"] * 3)


def _pages(doc: dict[str, Any]) -> list[str]:
    """An incident's page-like notifications as 'channel kind', kinds from the step ids."""
    out = []
    for n in doc["notifications"]:
        step = n["step"]
        kind = "page" if step == "step0" else step.split(":")[0]
        if kind in ("page", "reopen", "resolve"):
            out.append(f"{n['channel']} {kind}")
    return sorted(out)


async def test_readme_walkthrough_one_page_and_one_all_clear_per_outage(
    lab: Lab, peers: tuple[SmtpSink, HttpSink], api: Any
) -> None:
    """The README's demo walk-through as a new user runs it: pve1 powered off (acknowledged), pve2's
    PSU fails, nas1 drops pings, all three repaired; then the core switch loses every packet for
    12 s, and the same again a little later. Each outage: one page per tier-1 channel naming its
    root and one all-clear; the switch's recovery pages no VM and does not reopen pve1's incident
    with its old cause (issue 14)."""
    smtp, http = peers
    tier1 = ("signal-oncall", "sms-oncall", "mail-oncall")

    async def incidents() -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = await api("GET", "/api/v1/incidents?all=1")
        return docs

    async def incident_of(root: str, kind: str, count: int = 1) -> dict[str, Any] | None:
        for doc in await incidents():
            done = sum(1 for p in _pages(doc) if p.endswith(kind))
            if doc["root"] == root and done >= count * len(tier1):
                return doc
        return None

    try:
        await asyncio.to_thread(lab.break_host, "pve1", "poweroff")
        pve1 = await wait_for(lambda: incident_of("pve1", "page"), 40, "pve1 paged")
        await api("POST", f"/api/v1/incidents/{pve1['id']}/ack", {"by": "alice"})
        await asyncio.to_thread(lab.break_host, "pve2", "psufail")
        pve2 = await wait_for(lambda: incident_of("pve2", "page"), 40, "pve2 paged")
        assert pve2["cause"] == "hardware_fault"
        await asyncio.to_thread(lab.break_host, "nas1", "icmpdrop")
    finally:
        for host in ("pve1", "pve2", "nas1"):
            await asyncio.to_thread(lab.repair, host)
    await wait_for(lambda: incident_of("pve1", "resolve"), 90, "pve1's all-clear")
    await wait_for(lambda: incident_of("pve2", "resolve"), 90, "pve2's all-clear")

    for outage in (1, 2):
        try:
            await asyncio.to_thread(lab.break_host, "core-sw1", "loss", 100)
            first = "page" if outage == 1 else "reopen"

            async def switch_paged(kind: str = first) -> dict[str, Any] | None:
                return await incident_of("core-sw1", kind)

            await wait_for(switch_paged, 40, "the switch paged")
            await asyncio.sleep(max(0.0, 12.0 - 5.0))  # the outage lasts ~12 s in all
        finally:
            await asyncio.to_thread(lab.repair, "core-sw1")

        async def switch_cleared(n: int = outage) -> dict[str, Any] | None:
            return await incident_of("core-sw1", "resolve", n)

        await wait_for(switch_cleared, 120, "the switch's all-clear")
        await asyncio.sleep(10)  # room for a wrong page on the way up (the VMs, pve1 again)

    docs = await incidents()
    roots = sorted(d["root"] for d in docs if d["scope"] != "monitor" and d["notifications"])
    assert roots == ["core-sw1", "pve1", "pve2"], [(d["root"], d["scope"], _pages(d)) for d in docs]
    for doc in docs:
        # tier 2 (unacknowledged after 25 s here) joins the later messages; tier 1 is what is counted
        got = [p for p in _pages(doc) if p.split()[0] in tier1]
        if doc["root"] in ("pve1", "pve2"):
            assert got == sorted(f"{c} {k}" for c in tier1 for k in ("page", "resolve")), doc
            assert doc["timeline"][-1]["event"] != "reopened"
        if doc["root"] == "core-sw1":
            kinds = ("page", "resolve", "reopen", "resolve")
            assert got == sorted(f"{c} {k}" for c in tier1 for k in kinds), doc
    texts = by_channel(smtp, http)
    for channel in ("signal", "sms", "mail-oncall"):
        assert not any("VM " in t.split("\n")[0] or "FAILED AGAIN hypervisor" in t for t in texts[channel])
