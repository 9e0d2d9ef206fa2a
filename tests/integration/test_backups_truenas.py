"""TrueNAS over JSON-RPC 2.0 on a websocket (wss): a fake middleware answering
auth.login_with_api_key and the task queries with the state dicts upstream builds (datetimes as
``{"$date": ms}``); a stale replication warns, a fresh one clears it, a failed one is reported,
and a bad key, garbage or a hang is a failed read without the key in it."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from support import make_cert

from watchtower.backups import truenas
from watchtower.backups.watch import BackupWatch
from watchtower.config import Backup, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import IncidentTracker
from watchtower.probes import Failure, ProbeContext

API_KEY = "1-abcdefghijklmnopqrstuvwxyz0123456789"


class Middleware:
    def __init__(self) -> None:
        self.replication: dict[str, Any] = {}
        self.mode = "ok"
        self.calls: list[tuple[str, Any]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        authed = False
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                break
            call = json.loads(message.data)
            self.calls.append((call["method"], call["params"]))
            if self.mode == "hang":
                await asyncio.sleep(30)
            if self.mode == "garbage":
                await ws.send_str("<html>")
                continue
            # an event notification first: the client must skip what is not its answer
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "collection_update", "params": {}}))
            if call["method"] == "auth.login_with_api_key":
                authed = call["params"] == [API_KEY]
                result: Any = authed
            elif not authed:
                error = {"code": -32001, "message": "Not authenticated"}
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": call["id"], "error": error}))
                continue
            elif call["method"] == "replication.query":
                result = [self.replication] if call["params"] == [[["id", "=", 3]]] else []
            else:
                result = []
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}))
        return ws


@pytest.fixture
async def nas(tmp_path: Path) -> AsyncIterator[tuple[Middleware, int, Path]]:
    key, cert = make_cert(tmp_path, "nas")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    middleware = Middleware()
    app = web.Application()
    app.router.add_get("/api/current", middleware.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield middleware, port, cert
    finally:
        await runner.cleanup()


def _state(state: str, at: float, **more: Any) -> dict[str, Any]:
    return {
        "id": 3,
        "name": "erp-to-offsite",
        "direction": "PUSH",
        "source_datasets": ["tank/erp"],
        "target_dataset": "backup/erp",
        "state": {"state": state, "datetime": {"$date": int(at * 1000)}, **more},
        "last_snapshot": "tank/erp@auto-2026-12-07_02-00",
    }


def _spec(port: int, cert: Path, key: str = API_KEY) -> dict[str, Any]:
    return {"truenas": {"url": f"wss://127.0.0.1:{port}/api/current", "task": "replication", "id": 3,
                        "api_key": key, "ca_file": str(cert)}}  # fmt: skip


async def test_stale_replication_warns_a_failure_is_reported_and_a_fresh_run_clears(
    tmp_path: Path, nas: tuple[Middleware, int, Path]
) -> None:
    middleware, port, cert = nas
    now = time.time()
    middleware.replication = _state("FINISHED", now - 3 * 3600)
    doc = {
        "site": "acme",
        "state_dir": str(tmp_path),
        "targets": {
            "erp1": {"role": "vm", "paths": [{"icmp": "127.0.0.1"}],
                     "service": {"name": "ERP", "rpo": "1h", "backups": [_spec(port, cert)]}},
        },
    }  # fmt: skip
    tracker = IncidentTracker()
    watch = BackupWatch(parse_config(doc, tmp_path), tracker)
    await watch.read_all(now)
    status = watch.status["erp1-truenas"]
    assert status.ok, status.detail
    assert status.newest is not None and abs(status.newest - (now - 3 * 3600)) < 1
    assert "tank/erp@auto-2026-12-07_02-00" in status.detail
    assert middleware.calls[:2] == [
        ("auth.login_with_api_key", [API_KEY]),
        ("replication.query", [[["id", "=", 3]]]),
    ]
    watch.evaluate(now)
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.BACKUP and "3h" in incident.evidence[0] and "ERP" in incident.evidence[0]

    # running: the last good run is still the newest point; an error is reported as a failure
    middleware.replication = _state("RUNNING", now - 60)
    await watch.read_all(now)
    assert status.newest is not None and abs(status.newest - (now - 3 * 3600)) < 1
    middleware.replication = _state(
        "ERROR", now - 30, error="ssh: connect to host offsite: No route to host."
    )
    await watch.read_all(now)
    watch.evaluate(now)
    incident = tracker.incidents[incident.id]  # a frozen value: the tracker holds the new one
    assert any("reported a failure" in e for e in incident.evidence)
    assert "No route to host" in status.detail

    middleware.replication = _state("FINISHED", now - 10)
    await watch.read_all(now)
    assert [c.kind for c in watch.evaluate(now)] == ["resolved"]


async def test_bad_key_garbage_and_hang_fail_with_a_reason_and_no_key(
    nas: tuple[Middleware, int, Path],
) -> None:
    middleware, port, cert = nas
    middleware.replication = _state("FINISHED", time.time())
    result = await truenas.probe(
        Backup.model_validate(_spec(port, cert, key="wrong-key-000")), ProbeContext(5.0)
    )
    assert not result.ok and "API key refused" in result.detail
    middleware.mode = "garbage"
    result = await truenas.probe(Backup.model_validate(_spec(port, cert)), ProbeContext(5.0))
    assert not result.ok and result.failure is Failure.PROTOCOL and "not JSON" in result.detail
    middleware.mode = "hang"
    result = await truenas.probe(Backup.model_validate(_spec(port, cert)), ProbeContext(1.0))
    assert not result.ok and result.failure is Failure.TIMEOUT
    for r in (result,):
        assert API_KEY not in r.detail
    middleware.mode = "ok"
    other = Backup.model_validate({**_spec(port, cert), "truenas": {**_spec(port, cert)["truenas"], "id": 9}})
    result = await truenas.probe(other, ProbeContext(5.0))
    assert not result.ok and "no replication task with id 9" in result.detail
