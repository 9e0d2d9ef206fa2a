"""Partitions on real namespaces (the lab's partition site, config/partition.yaml): production dark
while management answers is one network page, not one per host; one hypervisor's production NIC is
that host's link, not a hung OS; a real hang still is one. Messages asserted as the peers got them."""

from __future__ import annotations

import asyncio
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
from watchtower.lab.spec import PARTITION

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TIER1 = ("signal", "sms", "mail-oncall")
HOSTS = ("pve1", "pve2", "nas1")  # on production and management
VMS = ("dc1", "mail1", "erp1", "files1")  # production only
DETECT = 30.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    site = Lab(PARTITION)
    site.up()
    try:
        yield site
    finally:
        site.down()


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
    data = yaml.safe_load((REPO / "config" / "partition.yaml").read_text())
    port = free_port()
    data["listen"] = f"127.0.0.1:{port}"
    data["state_dir"] = str(tmp_path / "state")
    data["notify"]["channels"] = [
        {"name": "signal-oncall", "url": signal_url(http.port), "tags": ["tier1"]},
        {"name": "sms-oncall", "url": smseagle_url(http.port), "tags": ["tier1"]},
        {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
    ]
    data["notify"]["all_clear_after"] = "5s"
    cfg_path = tmp_path / "partition.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    task = asyncio.create_task(run_daemon(load_config(cfg_path)))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

        async def call(method: str, path: str) -> Any:
            async with session.request(method, path) as r:
                assert r.status == 200, (path, r.status)
                return await r.json()

        async def all_up() -> bool:
            try:
                doc = await call("GET", "/api/v1/state")
            except aiohttp.ClientError:
                return False
            return doc["vantage"] == "up" and all(t["state"] == "up" for t in doc["targets"].values())

        await wait_for(all_up, 30, "the healthy partition site to be all up")
        yield call
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def by_channel(smtp: SmtpSink, http: HttpSink) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"signal": [], "sms": [], "mail-oncall": []}
    for r in http.requests:
        if r.path == "/v2/send":
            out["signal"].append(r.json["message"])
        elif r.path == "/jsonrpc/sms":
            out["sms"].append(r.json["params"]["message"])
    for m in smtp.messages:
        out["mail-oncall"].append(m.subject + "\n" + m.text)
    return out


async def messages(
    smtp: SmtpSink, http: HttpSink, n: int, what: str, timeout: float = DETECT
) -> dict[str, list[str]]:
    """Wait until every tier-1 channel has ``n`` messages; then make sure none has more."""

    async def arrived() -> bool:
        got = by_channel(smtp, http)
        return all(len(got[c]) >= n for c in TIER1)

    await wait_for(arrived, timeout, what)
    got = by_channel(smtp, http)
    assert {c: len(got[c]) for c in TIER1} == dict.fromkeys(TIER1, n), got
    return got


async def lab_do(lab: Lab, method: str, *args: Any) -> None:
    await asyncio.to_thread(getattr(lab, method), *args)


async def core_switch_loses_production(lab: Lab) -> None:
    """Production dark at the core switch; the VMs will come back 12 s after it (staged)."""
    await lab_do(lab, "break_host", "core-sw1", "prodloss")
    for vm in VMS:
        await lab_do(lab, "break_host", vm, "linkdown")


async def staged_recovery(lab: Lab) -> None:
    await lab_do(lab, "repair", "core-sw1")
    await asyncio.sleep(12)
    for vm in VMS:
        await lab_do(lab, "repair", vm)


async def quiet(api: Any, timeout: float = 90) -> None:
    async def none_open() -> bool:
        return await api("GET", "/api/v1/incidents") == []

    await wait_for(none_open, timeout, "every incident resolved")


async def test_core_switch_loses_production_while_management_answers(
    lab: Lab, peers: tuple[SmtpSink, HttpSink], api: Any
) -> None:
    smtp, http = peers
    await core_switch_loses_production(lab)
    try:

        async def grown() -> dict[str, Any] | None:
            incidents = await api("GET", "/api/v1/incidents")
            if len(incidents) == 1 and {*HOSTS, *VMS} <= set(incidents[0]["affected"]):
                return dict(incidents[0])
            return None

        incident = await wait_for(grown, DETECT, "one incident with every host and VM behind the switch")
        assert (incident["scope"], incident["root"], incident["cause"]) == (
            "network",
            "core-sw1",
            "partition",
        )
        got = await messages(smtp, http, 1, "the page on every tier-1 channel")
        await asyncio.sleep(6)  # a while longer: still one page per channel, nothing for the hosts
        got = await messages(smtp, http, 1, "still one page")
        for channel in TIER1:
            assert "production network via core-sw1" in got[channel][0], got[channel][0]
            assert "os_unresponsive" not in got[channel][0] and "OS hung" not in got[channel][0]
        mail = got["mail-oncall"][0]
        title = mail.splitlines()[0]
        assert (
            "production network via core-sw1 DOWN: 7 hosts unreachable on it, 3 alive on management ("
            in title
        )
        assert all(host in title for host in HOSTS), title
        for host in HOSTS:  # each listed as unreachable on production and alive on management
            assert any(
                line.startswith(f"- {host}: no answer on prod") and line.endswith("answers on management")
                for line in mail.splitlines()
            ), mail
        assert "do not reset or power-cycle them" in mail
        assert len(got["sms"][0]) <= 160 and got["sms"][0].startswith(
            f"WT partition #{incident['id']} production"
        )
        state = await api("GET", "/api/v1/state")
        assert {state["targets"][t]["state"] for t in (*HOSTS, *VMS)} == {"unreachable"}
        assert state["targets"]["core-sw1"]["state"] == "degraded"  # its management address answers
    finally:
        await staged_recovery(lab)
    got = await messages(smtp, http, 2, "one all-clear per channel", timeout=90)
    for channel in TIER1:
        assert "RESOLVED" in got[channel][1] or " OK " in got[channel][1], got[channel][1]
    await quiet(api)

    # The same outage a minute later: the incident is reopened and pages once more.
    await asyncio.sleep(60)
    await core_switch_loses_production(lab)
    try:
        got = await messages(smtp, http, 3, "the 'failed again' page")
        for channel in TIER1:
            assert "FAILED AGAIN" in got[channel][2] and "production network via core-sw1" in got[channel][2]
    finally:
        await staged_recovery(lab)
    got = await messages(smtp, http, 4, "the second all-clear", timeout=90)
    await quiet(api)
    everything = await api("GET", "/api/v1/incidents?all=1")
    assert [(i["scope"], i["root"], i["cause"]) for i in everything] == [("network", "core-sw1", "partition")]


async def test_one_hypervisor_loses_its_production_nic(
    lab: Lab, peers: tuple[SmtpSink, HttpSink], api: Any
) -> None:
    smtp, http = peers
    await lab_do(lab, "break_host", "pve1", "linkdown")
    try:

        async def found() -> dict[str, Any] | None:
            incidents = await api("GET", "/api/v1/incidents")
            if len(incidents) == 1 and {"dc1", "mail1"} <= set(incidents[0]["affected"]):
                return dict(incidents[0])
            return None

        incident = await wait_for(found, DETECT, "one incident for pve1 with its VMs")
        assert (incident["scope"], incident["root"], incident["cause"]) == ("hypervisor", "pve1", "link_down")
        got = await messages(smtp, http, 1, "the page")
        assert "hypervisor pve1 UNREACHABLE (production link down)" in got["mail-oncall"][0].splitlines()[0]
        assert "OS hung" not in got["mail-oncall"][0]
        assert "HV pve1 UNREACH production link down" in got["sms"][0]
        state = await api("GET", "/api/v1/state")
        assert state["targets"]["pve1"]["state"] == "degraded"  # alive: its management NIC answers
        assert state["targets"]["dc1"]["state"] == "unreachable"
        assert state["targets"]["pve2"]["state"] == "up"
    finally:
        await lab_do(lab, "repair", "pve1")
    await quiet(api)


async def test_a_real_os_hang_is_still_os_unresponsive(
    lab: Lab, peers: tuple[SmtpSink, HttpSink], api: Any
) -> None:
    await lab_do(lab, "break_host", "pve2", "hang")
    try:

        async def found() -> dict[str, Any] | None:
            incidents = await api("GET", "/api/v1/incidents")
            if len(incidents) == 1 and incidents[0]["cause"] == "os_unresponsive":
                return dict(incidents[0])
            return None

        incident = await wait_for(
            found, DETECT, "pve2 os_unresponsive (every OS NIC silent, BMC: chassis on)"
        )
        assert (incident["scope"], incident["root"]) == ("hypervisor", "pve2")
        assert any(e == "BMC: chassis on" for e in incident["evidence"])
    finally:
        await lab_do(lab, "repair", "pve2")
    await quiet(api)
