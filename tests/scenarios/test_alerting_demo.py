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
