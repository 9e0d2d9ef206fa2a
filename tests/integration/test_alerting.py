"""Alerting end to end on loopback: the daemon, a service that dies (a TCP listener we close), real
peers (aiosmtpd, HTTP receivers that answer like signal-cli-rest-api and SMSEagle), the SQLite
outbox. Asserts what each channel received, not what watchtower says it sent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sinks import HttpSink, SmtpSink, mailto_url, signal_url, smseagle_url
from support import Service, free_port, stop_process, until, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon
from watchtower.store import Store

REPO = Path(__file__).resolve().parents[2]


def site_config(tmp: Path, service_port: int, channels: list[dict[str, Any]], **notify: Any) -> Path:
    doc: dict[str, Any] = {
        "site": "loop",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": f"127.0.0.1:{service_port}"}],
                "service": {"name": "ERP", "rto": "4h"},
                "service_tag": "SRV-ERP1",
            }
        },
        "notify": {
            "channels": channels,
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "4s", "notify": ["tier2"], "unless": "acknowledged"},
            ],
            "all_clear_after": "0s",
            **notify,
        },
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, HttpSink, HttpSink]]:
    smtp, signal_gw, sms_gw = SmtpSink().start(), HttpSink().start(), HttpSink().start()
    try:
        yield smtp, signal_gw, sms_gw
    finally:
        for sink in (smtp, signal_gw, sms_gw):
            sink.stop()


class Daemon:
    def __init__(self, cfg_path: Path):
        self.cfg = load_config(cfg_path)
        self.base = "http://{}:{}".format(*self.cfg.listen_host_port)

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.base + path) as r:
            assert r.status == 200, (path, r.status)
            return await (r.json() if "json" in r.content_type else r.text())

    async def post(self, path: str, body: Any) -> Any:
        async with aiohttp.ClientSession() as s, s.post(self.base + path, json=body) as r:
            assert r.status == 200, (path, r.status, await r.text())
            return await r.json()

    async def incident(self) -> dict[str, Any] | None:
        found = await self.get("/api/v1/incidents?all=1")
        return found[0] if found else None


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    async def start(cfg_path: Path) -> Daemon:
        d = Daemon(cfg_path)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(run_daemon(d.cfg, ready=ready)))
        await asyncio.wait_for(ready.wait(), 10)
        return d

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_page_once_per_channel_ack_stops_tier2_and_one_all_clear(
    tmp_path: Path, sinks: tuple[SmtpSink, HttpSink, HttpSink], running: Any
) -> None:
    smtp, signal_gw, sms_gw = sinks
    service = Service()
    await service.up()
    cfg = site_config(
        tmp_path,
        service.port,
        [
            {"name": "signal-oncall", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
            {"name": "sms-oncall", "url": smseagle_url(sms_gw.port), "tags": ["tier1"]},
            {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
            {
                "name": "mail-provider",
                "url": mailto_url(smtp.port, to="provider@lab.test"),
                "tags": ["tier2"],
            },
        ],
    )
    d = await running(cfg)
    await wait_for(lambda: _up(d), 10, "erp1 up")

    await service.down()
    started = time.monotonic()
    [mail] = await smtp.wait_messages(1, timeout=15)
    [sig] = await signal_gw.wait_requests(1, timeout=5)
    [sms] = await sms_gw.wait_requests(1, timeout=5)
    page_after = time.monotonic() - started
    incident = await d.incident()
    assert incident is not None and incident["root"] == "erp1" and incident["scope"] == "service"
    n = incident["id"]

    # What each peer received: the exact request shapes, and the playbook's content.
    assert mail.subject.startswith(f"[watchtower loop] #{n} service erp1 DOWN")
    assert mail.to == "oncall@lab.test"
    assert f"watchtower ack {n} --by NAME" in mail.text and "No repair attempts before diagnosis" in mail.text
    assert "RTO clock: ERP (erp1) 4h" in mail.text
    assert (sig.method, sig.path) == ("POST", "/v2/send")
    assert sig.json["number"] == "+15550000001" and sig.json["recipients"] == ["+15550000002"]
    assert sig.json["message"].startswith(f"[watchtower loop] #{n} service erp1 DOWN")
    assert (sms.path, sms.json["method"]) == ("/jsonrpc/sms", "sms.send_sms")
    assert sms.json["params"]["to"] == "+15550000004" and len(sms.json["params"]["message"]) <= 160
    assert f"#{n}" in sms.json["params"]["message"]

    # Acknowledge before tier 2 is due (4 s): tier 2 never fires; the ack is announced to all three.
    acked = await d.post(f"/api/v1/incidents/{n}/ack", {"by": "alice"})
    assert acked["state"] == "acknowledged" and acked["acknowledged_by"] == "alice"
    await smtp.wait_messages(2, timeout=10)
    await signal_gw.wait_requests(2, timeout=10)
    await sms_gw.wait_requests(2, timeout=10)
    assert "acknowledged by alice" in smtp.messages[1].subject

    # Past the tier-2 time plus two alerting ticks: still nothing for the provider.
    opened = time.monotonic() - page_after

    async def past_tier2() -> bool:
        return time.monotonic() > opened + 4 + 2.5

    await wait_for(past_tier2, 15, "the tier-2 time to pass")
    assert not [m for m in smtp.messages if "provider@lab.test" in m.rcpt_tos]

    await service.up()
    await smtp.wait_messages(3, timeout=15)
    await signal_gw.wait_requests(3, timeout=5)
    await sms_gw.wait_requests(3, timeout=5)
    assert "RESOLVED" in smtp.messages[2].subject
    doc = await d.get(f"/api/v1/incidents/{n}")
    assert doc["state"] == "resolved"
    kinds = sorted((x["channel"], x["kind"]) for x in doc["notifications"])
    assert kinds == sorted(
        (c, k) for c in ("signal-oncall", "sms-oncall", "mail-oncall") for k in ("page", "ack", "resolve")
    )

    async def all_recorded_sent() -> bool:
        # A sink has the message a moment before the outbox records it as sent.
        doc = await d.get(f"/api/v1/incidents/{n}")
        return all(x["ok"] for x in doc["notifications"])

    await wait_for(all_recorded_sent, 10, "every message recorded as sent")
    metrics = await d.get("/metrics")
    assert 'watchtower_notifications_total{channel="mail-oncall",result="sent"} 3.0' in metrics
    # Nothing more arrives: every row is delivered, so the outbox has nothing left to send.
    assert len(smtp.messages) == 3 and len(signal_gw.requests) == 3 and len(sms_gw.requests) == 3


async def _up(d: Daemon) -> bool:
    try:
        doc = await d.get("/api/v1/state")
    except aiohttp.ClientError:
        return False
    return bool(doc["targets"]["erp1"]["state"] == "up")


async def test_a_hanging_gateway_delays_no_other_channel_and_recovers(
    tmp_path: Path, sinks: tuple[SmtpSink, HttpSink, HttpSink], running: Any
) -> None:
    smtp, signal_gw, sms_gw = sinks
    sms_gw.mode = "hang"  # accepts, never answers
    service = Service()
    await service.up()
    cfg = site_config(
        tmp_path,
        service.port,
        [
            {"name": "sms-oncall", "url": smseagle_url(sms_gw.port) + "?rto=2", "tags": ["tier1"]},
            {"name": "signal-oncall", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
            {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
        ],
        channel_warn_after="3s",
        escalation=[{"after": "0s", "notify": ["tier1"]}],
    )
    doc = yaml.safe_load(cfg.read_text())  # the dead man's switch, on the healthy receiver
    doc["heartbeat"] = {"url": f"http://127.0.0.1:{signal_gw.port}/hb", "every": "1s", "timeout": "1s"}
    cfg.write_text(yaml.safe_dump(doc))
    d = await running(cfg)
    await wait_for(lambda: _up(d), 10, "erp1 up")
    await service.down()
    incident = await wait_for(d.incident, 15, "the incident")
    opened = time.monotonic()
    await smtp.wait_messages(1, timeout=10)

    async def signal_page() -> bool:
        return any(r.path == "/v2/send" for r in signal_gw.requests)

    await wait_for(signal_page, 10, "the Signal page")
    healthy_after = time.monotonic() - opened
    # Healthy channels deliver in ~50 ms; the budget is what an all-healthy run gets on a loaded box.
    assert healthy_after < 2.0, healthy_after

    async def sms_failed() -> bool:
        doc = await d.get(f"/api/v1/incidents/{incident['id']}")
        rows = [x for x in doc["notifications"] if x["channel"] == "sms-oncall"]
        return bool(rows and rows[0]["attempts"] >= 1 and not rows[0]["ok"] and rows[0]["error"])

    await wait_for(sms_failed, 15, "the hung SMS attempt to fail with a reason")
    metrics = await d.get("/metrics")
    assert 'watchtower_channel_up{channel="sms-oncall"} 0.0' in metrics
    # Failing for longer than channel_warn_after: a warning goes out through the other channels.
    warnings = await wait_for(
        lambda: _matching(smtp, "channel sms-oncall failing"), 20, "a channel-failing warning by mail"
    )
    assert "SinkTok3nSecret" not in warnings[0].text  # the SMS token is a secret

    async def heartbeat_fails() -> list[Any]:
        return [
            r for r in signal_gw.requests if r.path == "/hb/fail" and b"channel sms-oncall failing" in r.body
        ]

    await wait_for(heartbeat_fails, 10, "the heartbeat to report the failing channel")

    sms_gw.mode = "ok"  # the gateway recovers: the page is retried and delivered, once
    await sms_gw.wait_requests(1, timeout=30)

    async def sms_sent() -> bool:
        doc = await d.get(f"/api/v1/incidents/{incident['id']}")
        return any(x["ok"] for x in doc["notifications"] if x["channel"] == "sms-oncall")

    await wait_for(sms_sent, 30, "the SMS page delivered after recovery")
    metrics = await d.get("/metrics")
    assert 'watchtower_channel_up{channel="sms-oncall"} 1.0' in metrics
    assert 'watchtower_notifications_total{channel="sms-oncall",result="failed"}' in metrics
    assert len([r for r in sms_gw.requests if r.path == "/jsonrpc/sms" and "#" in str(r.json)]) >= 1


async def _matching(smtp: SmtpSink, text: str) -> list[Any]:
    return [m for m in smtp.messages if text in m.subject or text in m.text]


def _target_state(url: str, target: str) -> str | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(json.load(r)["targets"][target]["state"])
    except OSError:
        return None


def test_mail_accepted_while_smtp_is_down_arrives_exactly_once_across_kill_9(tmp_path: Path) -> None:
    """SMTP down when the incident opens; watchtower is SIGKILLed with the mail pending, restarted,
    SMTP comes back: the mail arrives once, the incident keeps its id and nobody is paged twice."""
    service = socket.socket()
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    service.listen(16)
    port = service.getsockname()[1]
    smtp = SmtpSink()  # not started: its port refuses connections
    cfg = site_config(
        tmp_path,
        port,
        [{"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]}],
        escalation=[{"after": "0s", "notify": ["tier1"]}],
    )
    db = tmp_path / "state" / "watchtower.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemon_log = tmp_path / "daemon.log"
    log = daemon_log.open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)], stdout=log, stderr=log, env=env
        )

    def rows() -> list[Any]:
        if not db.exists():
            return []
        store = Store(db)
        try:
            return store.notifications()
        finally:
            store.close()

    def rows_in(state: str, tried: bool = False) -> list[Any]:
        return [r for r in rows() if r.state == state and (r.attempts >= 1 or not tried)]

    first = start()
    try:
        until(lambda: rows() == [] and db.exists(), 15, "the store to exist", daemon_log)
        service.close()  # the service dies
        until(
            lambda: [r for r in rows() if r.attempts >= 1 and r.state == "pending"],
            20,
            "a failed attempt",
            daemon_log,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    finally:
        if first.poll() is None:
            first.kill()
    [row] = rows()
    assert (row.incident, row.step, row.state) == (1, "step0", "pending")

    smtp.start()
    second = start()
    try:
        until(
            lambda: [r for r in rows() if r.state == "sent"],
            40,
            "the pending mail to be delivered",
            daemon_log,
        )
        # The restarted daemon re-confirms erp1 down: that must join incident 1, not page again.
        state_url = "http://{}:{}/api/v1/state".format(*load_config(cfg).listen_host_port)
        until(lambda: _target_state(state_url, "erp1") == "down", 20, "erp1 confirmed down again", daemon_log)
        settle = time.monotonic() + 2.5  # two alerting ticks: time for a wrong second page to be decided
        until(lambda: time.monotonic() > settle, 5, "two alerting ticks", daemon_log)
        store = Store(db)
        try:
            incidents = store.incidents()
        finally:
            store.close()
        assert [i.id for i in incidents] == [1]
        pages = [m for m in smtp.messages if "#1 service erp1 DOWN" in m.subject]
        assert len(pages) == 1, [m.subject for m in smtp.messages]
        assert len(smtp.messages) == 1 and len(rows()) == 1
    finally:
        stop_process(second)
        smtp.stop()
        log.close()
    check = Store(db)
    try:
        assert check.integrity_check() == "ok"
    finally:
        check.close()


async def test_blind_alarm_not_delivered_while_blind_is_replaced_by_the_window_report(tmp_path: Path) -> None:
    """The monitor's own uplink is down, so its "blind" page cannot get out; when the vantage
    returns, one message reports the blind window and the stale alarm is dropped."""
    from dataclasses import replace

    from watchtower.engine.correlate import Scope
    from watchtower.engine.incidents import Incident, IncidentState, IncidentTracker
    from watchtower.notify.outbox import Alerting
    from watchtower.store import AsyncStore

    gateway = HttpSink()  # not started: refuses, as an unreachable gateway would
    cfg = load_config(
        site_config(
            tmp_path,
            free_port(),
            [{"name": "signal-oncall", "url": signal_url(gateway.port), "tags": ["tier1"]}],
            escalation=[{"after": "0s", "notify": ["tier1"]}],
        )
    )
    store = await AsyncStore.open(cfg.state_dir)
    tracker = IncidentTracker()
    alerting = Alerting(cfg, store, tracker)
    runner = asyncio.create_task(alerting.run())
    try:
        opened_at = alerting.now()
        blind = Incident(1, Scope.MONITOR, "loop", opened_at).noted(opened_at, "opened", "blind")
        tracker.load([blind], 2)
        alerting.changed.set()

        async def page_failed() -> bool:
            rows = alerting.notifications_of(1) or []
            return bool(rows and rows[0].attempts >= 1)

        await wait_for(page_failed, 10, "the blind page to fail")
        resolved_at = alerting.now()
        tracker.incidents[blind.id] = replace(
            blind, state=IncidentState.RESOLVED, resolved_at=resolved_at
        ).noted(resolved_at, "resolved", "blind from .. to ..")
        alerting.changed.set()
        gateway.start()
        [request] = await gateway.wait_requests(1, timeout=20)
        assert "blind from" in request.json["message"] and "RESOLVED" in request.json["message"]

        async def settled() -> list[Any]:
            rows = alerting.notifications_of(1) or []
            return rows if all(r.state != "pending" for r in rows) else []

        rows = await wait_for(settled, 20, "both rows settled")
        assert sorted((r.kind, r.state) for r in rows) == [("page", "failed"), ("resolve", "sent")]
        assert len(gateway.requests) == 1
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        alerting.close()
        await store.close()
        gateway.stop()
