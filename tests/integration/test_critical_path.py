"""`critical: true` on a path: the daemon (in process) with a host that still answers on TCP but
whose login page fails. Without the flag the target is only degraded and nobody is paged; with
it the target is down, an incident opens and the page reaches the SMTP peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from sinks import SmtpSink, mailto_url
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
async def login_page() -> AsyncIterator[int]:
    """An HTTP server whose /login answers 500 (the application behind it is dead)."""

    async def dead(request: web.Request) -> web.Response:
        return web.Response(status=500, text="application error")

    app = web.Application()
    app.router.add_get("/login", dead)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


def site(tmp: Path, web_port: int, smtp_port: int, critical: bool) -> Path:
    login: dict[str, Any] = {"url": f"http://127.0.0.1:{web_port}/login", "timeout": "1s", "interval": "1s"}
    if critical:
        login["critical"] = True
    doc = {
        "site": "crit",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": f"127.0.0.1:{web_port}"}, {"http": login}],
            }
        },
        "notify": {
            "channels": [{"name": "mail-oncall", "url": mailto_url(smtp_port), "tags": ["tier1"]}],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
        },
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _get(base: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(base + path) as r:
        return await r.json()


@pytest.mark.parametrize("critical", [False, True])
async def test_critical_path_pages_a_target_that_would_only_be_degraded(
    tmp_path: Path, smtp: SmtpSink, login_page: int, critical: bool
) -> None:
    cfg = load_config(site(tmp_path, login_page, smtp.port, critical))
    base = "http://{}:{}".format(*cfg.listen_host_port)
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(cfg, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)

        async def settled() -> str | None:
            doc = await _get(base, "/api/v1/state")
            target = doc["targets"]["erp1"]
            http = next(p for p in target["paths"] if p["kind"] == "http")
            settled = http["state"] == "down" and target["state"] in ("degraded", "down")
            return str(target["state"]) if settled else None

        state = await wait_for(settled, 20, "the login page path down")
        if not critical:
            assert state == "degraded"
            await asyncio.sleep(3)  # several correlation rounds: still nothing opens
            assert await _get(base, "/api/v1/incidents") == []
            assert smtp.messages == []
            return
        assert state == "down"
        [page] = await smtp.wait_messages(1, timeout=15)
        assert "erp1" in page.subject
        (incident,) = await _get(base, "/api/v1/incidents")
        assert incident["root"] == "erp1"
        assert any("500" in e for e in incident["evidence"]), incident["evidence"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
