"""The Alertmanager sink against Debian's prometheus-alertmanager, with a local webhook receiver that
counts notifications: one incident is one alert with the labels of the contract and resolves; two
watchtower instances (two vantage points of one site) give on-call one notification, not two."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from support import free_port, wait_for

from watchtower import clock
from watchtower.config import Config, load_config
from watchtower.daemon import run_daemon
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState, IncidentTracker
from watchtower.notify.alertmanager import AlertmanagerSink

ALERTMANAGER = shutil.which("prometheus-alertmanager")
pytestmark = pytest.mark.skipif(
    ALERTMANAGER is None, reason="prometheus-alertmanager (Debian package) not installed"
)


class Webhook:
    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.notifications.append(await request.json())
        return web.Response(text="ok")

    def firing(self) -> list[dict[str, Any]]:
        return [n for n in self.notifications if n["status"] == "firing"]

    def resolved(self) -> list[dict[str, Any]]:
        return [n for n in self.notifications if n["status"] == "resolved"]


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    assert ALERTMANAGER is not None
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()

    port = free_port()
    webhook = {"url": f"http://127.0.0.1:{hook_port}/hook", "send_resolved": True}
    conf = {
        "route": {
            "receiver": "hook",
            "group_by": ["alertname", "site", "scope", "root"],
            "group_wait": "500ms",
            "group_interval": "2s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "hook", "webhook_configs": [webhook]}],
    }
    (tmp_path / "am.yml").write_text(yaml.safe_dump(conf))
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(url) as session:

            async def ready() -> bool:
                try:
                    async with session.get("/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, 30, "alertmanager to be ready")
            yield {"url": url, "session": session, "hook": hook, "log": tmp_path / "alertmanager.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        await runner.cleanup()


async def active_alerts(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with session.get("/api/v2/alerts", params={"active": "true", "silenced": "false"}) as r:
        return [a for a in await r.json() if a["status"]["state"] == "active"]


def config(tmp_path: Path, url: str, instance: str, extra: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {
        "site": "acme-hq",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp_path / f"state-{instance}"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {"t": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]}},
        "alertmanager": {"url": url, "every": "1s", "instance": instance, "labels": {"customer": "acme"}},
        **(extra or {}),
    }
    path = tmp_path / f"{instance}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tracker_with_outage(first_id: int) -> tuple[IncidentTracker, Incident]:
    """The same hypervisor outage as a watchtower sees it (ids differ between instances)."""
    tracker = IncidentTracker(next_id=first_id)
    now = clock.now()
    incident = Incident(
        first_id, Scope.HYPERVISOR, "pve1", now - 5, cause=Cause.POWER_OFF, affected=("dc1", "erp1"),
        first_failure_at=now - 8,
    )  # fmt: skip
    tracker.incidents[incident.id] = incident
    return tracker, incident


async def test_incident_is_one_alert_with_the_contract_labels_and_resolves(
    alertmanager: dict[str, Any], tmp_path: Path
) -> None:
    session, hook = alertmanager["session"], alertmanager["hook"]
    cfg: Config = load_config(config(tmp_path, alertmanager["url"], "vp1"))
    tracker, incident = tracker_with_outage(12)
    sink = AlertmanagerSink(cfg, tracker)
    await sink.tick()
    assert sink.failures == 0

    alerts = await wait_for(lambda: active_alerts(session), 10, "the alert in alertmanager")
    assert len(alerts) == 1
    (alert,) = alerts
    assert alert["labels"] == {
        "alertname": "WatchtowerIncident", "site": "acme-hq", "scope": "hypervisor", "root": "pve1",
        "cause": "power_off", "customer": "acme",
    }  # fmt: skip
    assert alert["annotations"]["instance"] == "vp1" and alert["annotations"]["incident_id"] == "12"
    assert alert["annotations"]["summary"] == "acme-hq: hypervisor pve1 down (power_off), 2 affected"
    assert "dc1, erp1" in alert["annotations"]["description"]

    async def fired() -> list[dict[str, Any]]:
        return hook.firing()

    (note,) = await wait_for(fired, 10, "the firing webhook notification")
    assert [a["labels"]["root"] for a in note["alerts"]] == ["pve1"]

    # nothing changed: a second round posts nothing new (and a re-post is a no-op for alertmanager)
    posts = sink.posts
    await sink.tick()
    assert sink.posts == posts
    await sink.tick(force=True)
    assert sink.posts == posts + 1

    tracker.incidents[incident.id] = replace(incident, state=IncidentState.RESOLVED, resolved_at=clock.now())
    await sink.tick()

    async def resolved() -> list[dict[str, Any]]:
        return hook.resolved()

    (done,) = await wait_for(resolved, 10, "the resolved webhook notification")
    assert done["alerts"][0]["labels"]["root"] == "pve1" and done["alerts"][0]["status"] == "resolved"
    assert await active_alerts(session) == []
    assert len(hook.firing()) == 1


async def test_two_vantage_points_give_one_notification(alertmanager: dict[str, Any], tmp_path: Path) -> None:
    """Two watchtowers of one site (different ids, different instance names) post the same outage."""
    session, hook = alertmanager["session"], alertmanager["hook"]
    sinks = []
    for instance, first_id in (("vp1", 3), ("vp2", 41)):
        cfg = load_config(config(tmp_path, alertmanager["url"], instance))
        tracker, _ = tracker_with_outage(first_id)
        sinks.append((AlertmanagerSink(cfg, tracker), tracker))
    for sink, _ in sinks:
        await sink.tick()

    async def fired() -> list[dict[str, Any]]:
        return hook.firing()

    await wait_for(fired, 10, "the firing webhook notification")
    alerts = await active_alerts(session)
    assert len(alerts) == 1 and alerts[0]["annotations"]["instance"] in ("vp1", "vp2")
    for sink, tracker in sinks:  # both keep posting while open, then both resolve
        await sink.tick(force=True)
        for incident in tracker.open_incidents():
            tracker.incidents[incident.id] = replace(
                incident, state=IncidentState.RESOLVED, resolved_at=clock.now()
            )
    for sink, _ in sinks:
        await sink.tick()

    async def resolved() -> list[dict[str, Any]]:
        return hook.resolved()

    await wait_for(resolved, 10, "the resolved webhook notification")
    assert len(hook.firing()) == 1, hook.notifications


async def test_two_daemons_one_notification_end_to_end(alertmanager: dict[str, Any], tmp_path: Path) -> None:
    """Two real daemons watch one target that is down; the webhook gets one firing notification, and
    one resolved notification once the target is back."""
    session, hook = alertmanager["session"], alertmanager["hook"]
    dead_port = free_port()
    cfgs = []
    for instance in ("vp1", "vp2"):
        path = config(tmp_path, alertmanager["url"], instance)
        data = yaml.safe_load(path.read_text())
        data["targets"] = {"erp": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{dead_port}"}]}}
        path.write_text(yaml.safe_dump(data))
        cfgs.append(load_config(path))
    tasks = [asyncio.create_task(run_daemon(cfg)) for cfg in cfgs]
    server: asyncio.Server | None = None
    try:

        async def fired() -> list[dict[str, Any]]:
            return hook.firing()

        (note,) = await wait_for(fired, 20, "the firing webhook notification")
        assert note["alerts"][0]["labels"] == {
            "alertname": "WatchtowerIncident", "site": "acme-hq", "scope": "service", "root": "erp",
            "customer": "acme",
        }  # fmt: skip
        # both vantage points post (the annotation says who posted last): each has seen the outage
        seen: set[str] = set()

        async def both_posted() -> bool:
            for alert in await active_alerts(session):
                seen.add(alert["annotations"]["instance"])
            return seen == {"vp1", "vp2"}

        await wait_for(both_posted, 20, "both instances to post the alert", every=0.02)

        async def back(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(back, "127.0.0.1", dead_port)

        async def resolved() -> list[dict[str, Any]]:
            return hook.resolved()

        await wait_for(resolved, 30, "the resolved webhook notification")
        firing_before_resolved = hook.notifications[: hook.notifications.index(hook.resolved()[0])]
        assert len(firing_before_resolved) == 1, hook.notifications
        assert await wait_for(lambda: _none_active(session), 10, "no active alert left")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            server.close()


async def _none_active(session: aiohttp.ClientSession) -> bool:
    return await active_alerts(session) == []


async def test_alertmanager_down_backs_off_and_logs_state_changes_only(
    alertmanager: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alertmanager unreachable: posts back off (were: one a second, a WARNING each); one WARNING
    when it goes, one INFO when it is back, and the alert arrives then."""
    from watchtower.notify import alertmanager as am_module

    monkeypatch.setattr(am_module, "BACKOFF_MAX", 2.0, raising=False)
    dead = load_config(config(tmp_path, f"http://127.0.0.1:{free_port()}", "vp1"))
    tracker, _ = tracker_with_outage(3)
    sink = AlertmanagerSink(dead, tracker)
    caplog.set_level("DEBUG", logger="watchtower.alertmanager")
    loop = asyncio.get_running_loop()
    until = loop.time() + 5.0
    ticks = 0
    while loop.time() < until:  # the daemon's loop, LOOK_EVERY shortened to 50 ms: 100 rounds
        await sink.tick()
        ticks += 1
        await asyncio.sleep(0.05)
    assert ticks >= 50 and 2 <= sink.posts <= 5 and sink.failures == sink.posts, (ticks, sink.posts)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "retrying with backoff" in warnings[0].getMessage()

    sink.reload(load_config(config(tmp_path, alertmanager["url"], "vp1")))  # it is reachable now

    async def delivered() -> list[dict[str, Any]]:
        await sink.tick()
        return await active_alerts(alertmanager["session"])

    await wait_for(delivered, 10, "the alert once alertmanager is back", every=0.05)
    back = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(back) == 1 and [r.levelname for r in caplog.records].count("WARNING") == 1, back
