"""Hostile input to the daemon's HTTP side (the real daemon, in this process, on 127.0.0.1):
unauthenticated writes, oversized bodies, slow clients (trickled request heads and bodies),
path traversal, hostile names. XSS in rendered names is covered in tests/unit/test_status_page.py;
here the names come from a config through the running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon
from watchtower.web import app as web_app

TOKEN = "hostile-test-token-0123456789"
EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


@pytest.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(web_app, "IDLE_TIMEOUT", 1.5)
    monkeypatch.setattr(web_app, "BODY_TIMEOUT", 1.5)
    monkeypatch.setattr(web_app, "LINGER", 0.5)
    listen = f"127.0.0.1:{free_port()}"
    doc = {
        "site": "hostile",
        "listen": listen,
        "state_dir": str(tmp_path / "state"),
        "api_token": TOKEN,
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "300ms", "fail_after": 1},
        "targets": {
            "erp1": {
                "role": "service",
                "description": EVIL,
                "runbook": "javascript:alert(3)",
                "service": {"name": EVIL, "rto": "1h"},
                "paths": [{"tcp": {"host": "127.0.0.1", "port": free_port(), "name": EVIL}}],
            }
        },
    }
    cfg_path = tmp_path / "wt.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(cfg_path), ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    base = f"http://{listen}"

    async def incident() -> Any:
        async with aiohttp.ClientSession() as s, s.get(base + "/api/v1/incidents", headers=AUTH) as r:
            found = await r.json()
            return found[0] if found else None

    await wait_for(incident, 15, "the incident of erp1")
    try:
        yield base
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_unauthenticated_writes_are_401_and_change_nothing(daemon: str) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Cookie": "watchtower_session=forged"},
        ):
            async with s.post(
                daemon + "/api/v1/incidents/1/ack", json={"by": "mallory"}, headers=headers
            ) as r:
                assert r.status == 401, headers
            async with s.post(daemon + "/incidents/1/ack", data={"by": "mallory"}, headers=headers) as r:
                assert r.status == 401, headers
        for method in ("PUT", "DELETE", "PATCH"):
            async with s.request(method, daemon + "/api/v1/incidents/1", json={"state": "resolved"}) as r:
                assert r.status in (401, 405), method
        async with s.get(daemon + "/api/v1/incidents/1", headers=AUTH) as r:
            doc = await r.json()
    assert doc["state"] == "open" and doc["acknowledged_by"] is None


async def test_oversized_bodies_are_refused(daemon: str) -> None:
    big = json.dumps({"by": "x" * (1 << 20)})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            daemon + "/api/v1/incidents/1/ack", data=big, headers={**AUTH, "Content-Type": "application/json"}
        ) as r:
            assert r.status == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked, the size is learnt late
            for _ in range(64):
                yield b" " * 4096

        async with s.post(
            daemon + "/api/v1/incidents/1/ack",
            data=chunks(),
            headers={**AUTH, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
        async with s.post(daemon + "/login", data={"token": "x" * 100_000}) as r:
            assert r.status in (400, 413)
        async with s.post(daemon + "/incidents/1/ack", data={"by": "y" * 100_000}, headers=AUTH) as r:
            assert r.status in (400, 413)
        # an over-long header line or too many headers: refused by the parser, not a crash
        async with s.get(daemon + "/healthz", headers={"X-Big": "z" * 20_000}) as r:
            assert r.status in (400, 431)
        async with s.get(daemon + "/api/v1/incidents/1", headers=AUTH) as r:
            assert (await r.json())["acknowledged_by"] is None
        async with s.get(daemon + "/healthz") as r:
            assert r.status == 200


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_slow_clients_are_cut_off_and_leave_nothing_behind(daemon: str) -> None:
    host, port = daemon.removeprefix("http://").split(":")
    await asyncio.sleep(0)
    tasks_before, fds_before = len(asyncio.all_tasks()), _open_fds()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    n = 20
    started = time.monotonic()
    for k in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        if k % 2:
            # a head trickled one byte at a time, never finished
            writer.write(b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        else:
            # a complete head and a body that never comes (Content-Length promises 1000 bytes)
            writer.write(
                b"POST /api/v1/incidents/1/ack HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"by": '
            )
        await writer.drain()
        conns.append((reader, writer))

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.3)
            for _, w in conns:
                if not w.is_closing():
                    w.write(b"a")
                    with contextlib_suppress():
                        await w.drain()

    trickler = asyncio.create_task(trickle())
    try:
        # while they trickle, the daemon answers everyone else at once
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.get(daemon + "/healthz") as r:
                assert r.status == 200
            assert time.monotonic() - t0 < 1.0

        async def all_cut() -> bool:
            return all(r.at_eof() or w.is_closing() for r, w in conns) or await _all_eof(conns)

        await wait_for(all_cut, 10, "the server to close every slow connection")
        cut_after = time.monotonic() - started
        assert cut_after < 6, cut_after  # IDLE_TIMEOUT / BODY_TIMEOUT are 1.5 s here
    finally:
        trickler.cancel()
        await asyncio.gather(trickler, return_exceptions=True)
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)

    async def back_to_baseline() -> bool:
        return len(asyncio.all_tasks()) <= tasks_before + 3 and _open_fds() <= fds_before + 3

    await wait_for(back_to_baseline, 10, "tasks and fds back to what they were")
    # the trickled body got a 408 (or the connection was closed); the incident was not acked
    async with aiohttp.ClientSession() as s, s.get(daemon + "/api/v1/incidents/1", headers=AUTH) as r:
        assert (await r.json())["acknowledged_by"] is None


async def _all_eof(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> bool:
    for reader, _ in conns:
        if reader.at_eof():
            continue
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(65536), 0.05)
        if not reader.at_eof():
            return False
    return True


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ConnectionError, OSError))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2fetc%2fpasswd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%5c..%5cetc%5cpasswd",
        "/static/....//....//etc/passwd",
        "/api/v1/../../../../etc/passwd",
        "/api/v1/incidents/..%2f..%2fetc%2fpasswd",
        "/api/v1/incidents/1/report/../../../../etc/passwd",
        "//etc/passwd",
    ],
)
async def test_path_traversal_finds_no_file(daemon: str, path: str) -> None:
    reader, writer = await asyncio.open_connection(*daemon.removeprefix("http://").split(":"))
    try:  # raw, so no client normalises the path first
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), (path, answer[:200])
    assert b"root:" not in answer


async def test_hostile_names_from_the_config_are_escaped(daemon: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(daemon + "/", headers={**AUTH, "Accept": "text/html"}) as r:
            html = await r.text()
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        async with s.get(daemon + "/api/v1/incidents/1/report", headers=AUTH) as r:
            assert r.content_type == "text/markdown" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in html and "<img" not in html and 'href="javascript' not in html
    assert "&lt;script&gt;" in html


# --------------------------------------------------------------------------- issue 15: auth edges


async def test_huge_ids_are_404_and_deep_json_is_400(daemon: str) -> None:
    async with aiohttp.ClientSession() as s:
        for path in (
            "/api/v1/incidents/99999999999999999999999",
            "/api/v1/incidents/99999999999999999999999/report",
            "/api/v1/incidents/%D9%A1",  # an Arabic-Indic digit: isdigit() but no id of ours
        ):
            async with s.get(daemon + path, headers=AUTH) as r:
                assert r.status == 404, path
        async with s.post(
            daemon + "/api/v1/incidents/99999999999999999999999/ack", headers=AUTH, json={"by": "a"}
        ) as r:
            assert r.status == 404
        deep = "[" * 20_000 + "]" * 20_000  # 40 KB
        async with s.post(
            daemon + "/api/v1/incidents/1/ack",
            headers={**AUTH, "Content-Type": "application/json"},
            data=deep,
        ) as r:
            assert r.status == 400


async def test_control_characters_in_by_are_refused(daemon: str) -> None:
    async with aiohttp.ClientSession() as s:
        for by in (
            "alice\n2026-12-07 INFO watchtower.monitor: forged",
            "bob\rINFO forged",
            "eve\x1b[31m",
            "x\u2028y",
        ):
            async with s.post(daemon + "/api/v1/incidents/1/ack", headers=AUTH, json={"by": by}) as r:
                assert r.status == 400, by
            async with s.post(
                daemon + "/incidents/1/ack", headers=AUTH, data={"by": by}, allow_redirects=False
            ) as r:
                assert r.status == 400, by
        async with s.get(daemon + "/api/v1/incidents/1", headers=AUTH) as r:
            assert (await r.json())["acknowledged_by"] is None


async def test_sessions_are_server_side_and_logout_revokes_them(daemon: str) -> None:
    import hashlib
    import hmac

    origin = {"Origin": daemon}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.post(
            daemon + "/login", data={"token": TOKEN}, headers=origin, allow_redirects=False
        ) as r:
            assert r.status == 303
            cookie = r.cookies[web_app.SESSION_COOKIE].value
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as again,
            again.post(daemon + "/login", data={"token": TOKEN}, headers=origin, allow_redirects=False) as r,
        ):
            assert r.cookies[web_app.SESSION_COOKIE].value != cookie  # random, not a function of the token
        jar = {"Cookie": f"{web_app.SESSION_COOKIE}={cookie}"}
        async with s.get(daemon + "/api/v1/state", headers=jar) as r:
            assert r.status == 200
        # The old cookie (an HMAC of the token) opens nothing.
        forged = hmac.new(TOKEN.encode(), b"watchtower status page session v1", hashlib.sha256).hexdigest()
        async with s.get(
            daemon + "/api/v1/state", headers={"Cookie": f"{web_app.SESSION_COOKIE}={forged}"}
        ) as r:
            assert r.status == 401
        async with s.post(daemon + "/logout", headers={**jar, **origin}, allow_redirects=False) as r:
            assert r.status == 303
        async with s.get(daemon + "/api/v1/state", headers=jar) as r:
            assert r.status == 401  # a copy of the cookie kept after logout is worth nothing


async def test_wrong_tokens_are_limited_per_client_even_in_parallel(
    daemon: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_app, "AUTH_FAILURE_WINDOW", 3.0)
    async with aiohttp.ClientSession() as s:

        async def guess(n: int) -> int:
            async with s.get(daemon + "/api/v1/state", headers={"Authorization": f"Bearer guess-{n}"}) as r:
                return r.status

        async def login(n: int) -> int:
            async with s.post(daemon + "/login", data={"token": f"guess-{n}"}, allow_redirects=False) as r:
                return r.status

        statuses = await asyncio.gather(*(guess(n) for n in range(20)), *(login(n) for n in range(20)))
        assert (
            statuses.count(401) == web_app.AUTH_FAILURES_MAX
            and statuses.count(429) == 40 - web_app.AUTH_FAILURES_MAX
        )
        async with s.get(daemon + "/api/v1/state", headers=AUTH) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1  # even the right token, meanwhile
        async with s.get(daemon + "/healthz") as r:
            assert r.status in (200, 503)  # open paths are not limited

        async def allowed_again() -> bool:
            async with s.get(daemon + "/api/v1/state", headers=AUTH) as r:
                return r.status == 200

        await wait_for(allowed_again, 10, "the window to pass")


async def _start(tmp_path: Path, **extra: Any) -> tuple[asyncio.Task[None], str]:
    listen = f"127.0.0.1:{free_port()}"
    doc = {
        "site": "edges",
        "listen": listen,
        "state_dir": str(tmp_path / "state"),
        "defaults": {"interval": "1s", "timeout": "300ms"},
        "targets": {
            "web1": {
                "role": "service",
                "paths": [
                    {
                        "http": {
                            "url": f"http://127.0.0.1:{free_port()}/health?api_key=Zqquerysecret77",
                            "timeout": "300ms",
                        }
                    }
                ],
            }
        },
        **extra,
    }
    cfg_path = tmp_path / "wt.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(cfg_path), ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task, f"http://{listen}"


async def test_without_a_token_only_known_hosts_are_served(tmp_path: Path) -> None:
    """DNS rebinding: a page on rebind.example whose name now resolves to 127.0.0.1 is
    same-origin with the daemon; its Host header gives it away."""
    task, base = await _start(tmp_path, allowed_hosts=["watchtower.lan"])
    port = base.rsplit(":", 1)[1]
    try:
        async with aiohttp.ClientSession() as s:
            for host, status in (
                (f"rebind.example:{port}", 403),
                ("rebind.example", 403),
                (f"127.0.0.1:{port}", 200),
                (f"localhost:{port}", 200),
                (f"[::1]:{port}", 200),
                (f"WatchTower.LAN:{port}", 200),
            ):
                async with s.get(base + "/api/v1/state", headers={"Host": host}) as r:
                    assert r.status == status, host
            async with s.post(
                base + "/api/v1/incidents/1/ack",
                headers={"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"},
                json={"by": "attacker"},
            ) as r:
                assert r.status == 403

            async def scraped() -> str | None:
                async with s.get(base + "/metrics", headers={"Host": "prometheus-scrapes-by-name"}) as r:
                    assert r.status == 200  # open paths stay open to scrapers that use a name
                    text = await r.text()
                    return text if 'path="http ' in text else None

            text = await wait_for(scraped, 15, "the path in /metrics")
            assert "Zqquerysecret77" not in text and "api_key=***" in text
            async with s.get(base + "/api/v1/state") as r:
                assert "Zqquerysecret77" not in await r.text()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_metrics_auth_puts_metrics_behind_the_token(tmp_path: Path) -> None:
    task, base = await _start(tmp_path, api_token=TOKEN, metrics_auth=True)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/metrics") as r:
                assert r.status == 401
            async with s.get(base + "/metrics", headers=AUTH) as r:
                assert r.status == 200 and "watchtower_build_info" in await r.text()
            async with s.get(base + "/healthz") as r:
                assert r.status in (200, 503)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
