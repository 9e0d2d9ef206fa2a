"""The daemon end to end on loopback: metrics turn, API and auth, clean stop, real Prometheus scrape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon


def write_config(
    tmp_path: Path, listen_port: int, alive_port: int, dead_port: int, token: str | None = None
) -> Path:
    data: dict[str, Any] = {
        "site": "loopback",
        "listen": f"127.0.0.1:{listen_port}",
        "state_dir": str(tmp_path / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {
            "web1": {
                "role": "service",
                "paths": [
                    {"tcp": f"127.0.0.1:{alive_port}"},
                    {"http": {"url": f"http://127.0.0.1:{alive_port}/", "timeout": "1s"}},
                ],
            },
            "gone": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{dead_port}"}]},
        },
    }
    if token:
        (tmp_path / "api-token").write_text(token + "\n")
        data["api_token_file"] = "api-token"
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


async def http_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1024)
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    await writer.drain()
    writer.close()


@dataclass
class DaemonProcess:
    """``watchtower run`` as a subprocess on the loopback config, its log in a file."""

    proc: asyncio.subprocess.Process
    port: int  # the daemon's HTTP port
    alive: int  # the port of the HTTP server web1 probes
    cfg: Path
    log_path: Path


@contextlib.asynccontextmanager
async def daemon_process(tmp_path: Path, token: str | None = None) -> AsyncIterator[DaemonProcess]:
    server = await asyncio.start_server(http_ok, "127.0.0.1", 0)
    alive = server.sockets[0].getsockname()[1]
    port = free_port()
    cfg = write_config(tmp_path, port, alive, free_port(), token=token)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchtower.cli", "run", "-c", str(cfg),
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        yield DaemonProcess(proc, port, alive, cfg, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    server = await asyncio.start_server(http_ok, "127.0.0.1", 0)
    alive = server.sockets[0].getsockname()[1]
    port = free_port()
    cfg = load_config(write_config(tmp_path, port, alive, free_port(), token="s3cret-token"))
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(cfg, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        yield {"session": session, "server": server, "task": task, "alive": alive}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.close()


def series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_metrics_turn_and_api(daemon: dict[str, Any]) -> None:
    session: aiohttp.ClientSession = daemon["session"]
    alive = daemon["alive"]

    async def metrics() -> str:
        async with session.get("/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def settled() -> bool:
        text = await metrics()
        states = series(text, "watchtower_target_state")
        return (
            len(series(text, "watchtower_path_up")) == 3
            and states.get('watchtower_target_state{role="service",state="up",target="web1"}') == 1.0
            and states.get('watchtower_target_state{role="service",state="down",target="gone"}') == 1.0
        )

    await wait_for(settled, 10, "all three paths and both targets to settle")
    text = await metrics()
    up = series(text, "watchtower_path_up")
    assert up[f'watchtower_path_up{{path="tcp 127.0.0.1:{alive}",target="web1"}}'] == 1.0
    assert any(
        k.startswith("watchtower_path_up{") and 'target="gone"' in k and v == 0.0 for k, v in up.items()
    )
    states = series(text, "watchtower_target_state")
    assert states['watchtower_target_state{role="service",state="up",target="web1"}'] == 1.0
    assert states['watchtower_target_state{role="service",state="down",target="gone"}'] == 1.0
    assert "watchtower_scheduler_lag_seconds_bucket" in text and "watchtower_build_info{" in text
    assert "s3cret-token" not in text

    # the API needs the token; /metrics and /healthz do not
    async with session.get("/api/v1/state") as r:
        assert r.status == 401
    async with session.get("/api/v1/state", headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    async with session.get("/api/v1/state", headers={"Authorization": "Bearer s3cret-token"}) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["vantage"] == "up"
    assert doc["targets"]["gone"]["state"] == "down"
    web1 = doc["targets"]["web1"]
    assert web1["role"] == "service" and web1["state"] == "up"
    assert {p["kind"] for p in web1["paths"]} == {"tcp", "http"}
    assert all(p["last_ok"].endswith("Z") for p in web1["paths"])
    async with session.get("/healthz") as r:
        assert r.status == 200 and (await r.text()).strip() == "ok"
    async with session.get("/") as r:
        assert r.status == 401
    async with session.get("/", headers={"Authorization": "Bearer s3cret-token"}) as r:
        page = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "service gone down" in page and "web1" in page

    # one incident for the target that never answered; acknowledge it
    auth = {"Authorization": "Bearer s3cret-token"}
    async with session.get("/api/v1/incidents", headers=auth) as r:
        incidents = await r.json()
    assert [(i["scope"], i["root"], i["state"]) for i in incidents] == [("service", "gone", "open")]
    gone_id = incidents[0]["id"]
    assert incidents[0]["evidence"] and incidents[0]["timeline"][-1]["event"].startswith("confirmed:")
    async with session.post(f"/api/v1/incidents/{gone_id}/ack", json={"by": "alice"}) as r:
        assert r.status == 401
    async with session.post(f"/api/v1/incidents/{gone_id}/ack", data="nope", headers=auth) as r:
        assert r.status == 400
    async with session.post("/api/v1/incidents/999/ack", json={"by": "alice"}, headers=auth) as r:
        assert r.status == 404
    async with session.post(f"/api/v1/incidents/{gone_id}/ack", json={"by": "alice"}, headers=auth) as r:
        acked = await r.json()
    assert acked["state"] == "acknowledged" and acked["acknowledged_by"] == "alice"
    async with session.get(f"/api/v1/incidents/{gone_id}", headers=auth) as r:
        assert (await r.json())["acknowledged_at"].endswith("Z")

    # break web1: its listener goes away -> its paths flip to 0 within fail_after x retry + timeout + 1s
    server: asyncio.base_events.Server = daemon["server"]
    server.close()
    await server.wait_closed()
    broke = time.monotonic()

    async def web1_down() -> bool:
        up = series(await metrics(), "watchtower_path_up")
        return all(v == 0.0 for k, v in up.items() if 'target="web1"' in k)

    await wait_for(web1_down, 10, "web1's paths to go down")
    # interval 1s (a probe is at most 1 s away) + fail_after 2 x retry 0.2 s + http timeout 1 s + 1 s slack
    assert time.monotonic() - broke < 1 + 2 * 0.2 + 1 + 1


async def test_sigterm_stops_cleanly_within_5s(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, free_port(), free_port())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchtower.cli", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(healthy, 15, "the daemon to answer /healthz")
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), 5)
        assert code == 0
        assert time.monotonic() - start < 5
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert "stopped" in err and "Traceback" not in err
        assert "watchtower started" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL), reason="prometheus/promtool (Debian package) not installed"
)
async def test_real_prometheus_scrapes_and_promtool_accepts(daemon: dict[str, Any], tmp_path: Path) -> None:
    assert PROMETHEUS and PROMTOOL
    session: aiohttp.ClientSession = daemon["session"]
    listen = str(session._base_url).removeprefix("http://").rstrip("/")
    async with session.get("/metrics") as r:
        body = await r.text()
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "watchtower", "static_configs": [{"targets": [listen]}]}],
            }
        )
    )
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115
    )  # fmt: skip
    try:

        async def query(expr: str) -> list[Any]:
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": expr}) as r,
                ):
                    doc = await r.json()
                    return list(doc["data"]["result"]) if doc.get("status") == "success" else []
            except aiohttp.ClientError:
                return []

        result = await wait_for(
            lambda: query('up{job="watchtower"} == 1'), 30, "prometheus to scrape watchtower"
        )
        assert result[0]["value"][1] == "1"
        success = await wait_for(
            lambda: query("watchtower_probe_success"), 15, "watchtower_probe_success series"
        )
        assert {s["metric"]["target"] for s in success} >= {"web1", "gone"}
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
    print(
        json.dumps({"prometheus_log_tail": (tmp_path / "prometheus.log").read_text()[-300:]}), file=sys.stderr
    )
    assert os.path.exists(tmp_path / "tsdb")


async def test_status_command(daemon: dict[str, Any], tmp_path: Path) -> None:
    session: aiohttp.ClientSession = daemon["session"]
    port = int(str(session._base_url).rsplit(":", 1)[1].rstrip("/"))
    cfg = write_config(tmp_path, port, daemon["alive"], free_port(), token="s3cret-token")

    async def settled() -> bool:
        async with session.get("/metrics") as r:
            return len(series(await r.text(), "watchtower_path_up")) == 3

    await wait_for(settled, 10, "paths to settle")

    async def cli(*argv: str, config: Path = cfg) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchtower.cli", *argv, "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli("status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"]["gone"]["state"] == "down" and doc["targets"]["web1"]["state"] == "up"

    async def incident_open() -> bool:
        code, out, _ = await cli("incidents", "--json")
        return code == 0 and len(json.loads(out)) == 1

    await wait_for(incident_open, 10, "the incident for 'gone'")
    code, out, _ = await cli("incidents")
    header, row = out.splitlines()  # a table: ID STATE SCOPE ROOT CAUSE OPENED (UTC) DURATION ...
    assert code == 0 and header.split()[:4] == ["ID", "STATE", "SCOPE", "ROOT"]
    assert row.split()[1:4] == ["open", "service", "gone"]
    incident_id = row.split()[0].lstrip("#")
    code, out, _ = await cli("ack", incident_id, "--by", "bob")
    assert code == 0 and "acknowledged by bob" in out
    code, _, err = await cli("ack", "999", "--by", "bob")
    assert code == 1 and "no incident 999" in err

    other = tmp_path / "other"
    other.mkdir()
    unreachable = write_config(other, free_port(), daemon["alive"], free_port())
    code, _, err = await cli("status", config=unreachable)
    assert code == 3
    assert "not reachable" in err and "Traceback" not in err


async def test_sighup_reload_keeps_state_and_rejects_bad_config(tmp_path: Path) -> None:
    async with daemon_process(tmp_path) as d:
        proc, port, alive, cfg, log_path = d.proc, d.port, d.alive, d.cfg, d.log_path
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def state() -> dict[str, Any]:
                try:
                    async with session.get("/api/v1/state") as r:
                        return dict(await r.json()) if r.status == 200 else {}
                except aiohttp.ClientError:
                    return {}

            async def metric(name: str) -> float | None:
                async with session.get("/metrics") as r:
                    values = series(await r.text(), name)
                return next(iter(values.values()), None)

            async def web1_up() -> bool:
                doc = await state()
                return bool(doc) and doc["targets"]["web1"]["state"] == "up"

            await wait_for(web1_up, 15, "web1 up")
            before = (await state())["targets"]["web1"]["paths"]

            # Good reload: 'gone' removed, 'extra' added, web1 unchanged.
            data = yaml.safe_load(cfg.read_text())
            del data["targets"]["gone"]
            data["targets"]["extra"] = {"role": "service", "paths": [{"tcp": f"127.0.0.1:{alive}"}]}
            cfg.write_text(yaml.safe_dump(data))
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> dict[str, Any]:
                doc = await state()
                return doc if doc and set(doc["targets"]) == {"web1", "extra"} else {}

            doc = await wait_for(reloaded, 10, "the reload to apply")
            # unchanged paths keep their state: still up at once, no unknown phase
            assert doc["targets"]["web1"]["state"] == "up", log_path.read_text()
            assert {p["name"] for p in doc["targets"]["web1"]["paths"]} == {p["name"] for p in before}
            assert await metric("watchtower_config_last_reload_success") == 1.0

            # Bad reload: the old config keeps running, the gauge says so
            cfg.write_text("site: x\ntargets:\n  web1: {role: nope, paths: []}\n")
            proc.send_signal(signal.SIGHUP)

            async def rejected() -> bool:
                return await metric("watchtower_config_last_reload_success") == 0.0

            await wait_for(rejected, 10, "the bad reload to be rejected")
            assert set((await state())["targets"]) == {"web1", "extra"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        err = log_path.read_text()
        assert "config reloaded added=1 removed=1" in err
        assert "reload rejected, keeping the running config: targets.web1.role" in err
        assert "Traceback" not in err


async def test_heartbeat_pings_while_healthy_and_fails_when_blind(tmp_path: Path) -> None:
    from aiohttp import web

    hits: list[tuple[str, str, str]] = []

    async def record(request: web.Request) -> web.Response:
        hits.append((request.method, request.path, await request.text()))
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    hb_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hb_port).start()
    vantage = await asyncio.start_server(http_ok, "127.0.0.1", 0)
    vantage_port = vantage.sockets[0].getsockname()[1]

    port = free_port()
    cfg_path = write_config(tmp_path, port, free_port(), free_port())
    data = yaml.safe_load(cfg_path.read_text())
    (tmp_path / "hb-url").write_text(f"http://127.0.0.1:{hb_port}/ping/s3cret-uuid\n")
    data["heartbeat"] = {"url_file": "hb-url", "every": "1s", "timeout": "1s"}
    data["vantage"] = [{"tcp": f"127.0.0.1:{vantage_port}"}]
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_path)
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(cfg, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)

        async def pinged() -> bool:
            return any(h[:2] == ("GET", "/ping/s3cret-uuid") for h in hits)

        await wait_for(pinged, 10, "a heartbeat ping while healthy")
        vantage.close()  # the monitor's own uplink goes away
        await vantage.wait_closed()

        async def failed() -> bool:
            return any(h[:2] == ("POST", "/ping/s3cret-uuid/fail") for h in hits)

        await wait_for(failed, 15, "a /fail heartbeat once vantage is down")
        reason = next(h[2] for h in hits if h[0] == "POST")
        assert "vantage down" in reason
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


async def test_reload_keeps_open_incidents_and_retimes_paths_in_place(tmp_path: Path) -> None:
    """An interval change and a new target on SIGHUP: the open incident keeps its id and stays
    open (no re-page, no resolution), web1 stays up, and the changed path is re-timed, not reset."""
    async with daemon_process(tmp_path) as d:
        proc, port, alive, cfg, log_path = d.proc, d.port, d.alive, d.cfg, d.log_path
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def get(path: str) -> Any:
                try:
                    async with session.get(path) as r:
                        return await r.json() if r.status == 200 else None
                except aiohttp.ClientError:
                    return None

            async def gone_incident() -> dict[str, Any] | None:
                found = await get("/api/v1/incidents")
                return found[0] if found else None

            before = await wait_for(gone_incident, 15, "the incident for 'gone'")

            async def web1_up() -> bool:
                doc = await get("/api/v1/state")
                return bool(doc) and doc["targets"]["web1"]["state"] == "up"

            # web1 must have settled before the reload, or "still up after it" proves nothing
            await wait_for(web1_up, 15, "web1 up before the reload")
            data = yaml.safe_load(cfg.read_text())
            data["targets"]["web1"]["interval"] = "2s"
            data["targets"]["extra"] = {"role": "service", "paths": [{"tcp": f"127.0.0.1:{alive}"}]}
            cfg.write_text(yaml.safe_dump(data))
            proc.send_signal(signal.SIGHUP)

            async def extra_up() -> dict[str, Any] | None:
                doc = await get("/api/v1/state")
                return doc if doc and doc["targets"].get("extra", {}).get("state") == "up" else None

            doc = await wait_for(extra_up, 10, "the new target up after the reload")
            assert doc["targets"]["web1"]["state"] == "up", log_path.read_text()
            after = await get("/api/v1/incidents?all=1")
            assert [(i["id"], i["state"], i["root"]) for i in after] == [(before["id"], "open", "gone")]
            assert [e["kind"] for e in after[0]["timeline"]].count("opened") == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        err = log_path.read_text()
        assert "config reloaded added=1 removed=0 changed=2 kept=" in err  # web1's two paths re-timed
        assert "Traceback" not in err


async def test_reload_replaces_the_api_token(tmp_path: Path) -> None:
    """A rotated token file takes effect on SIGHUP: the new token opens the API, the old one and
    the cookies made from it no longer do, and /metrics stays open throughout."""
    async with daemon_process(tmp_path, token="first-token") as d:
        proc, port, log_path = d.proc, d.port, d.log_path
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def status(token: str, path: str = "/api/v1/state") -> int | None:
                try:
                    async with session.get(path, headers={"Authorization": f"Bearer {token}"}) as r:
                        return r.status
                except aiohttp.ClientError:
                    return None

            async def opens(token: str) -> bool:
                return await status(token) == 200

            await wait_for(lambda: opens("first-token"), 15, "the API open to the first token")
            assert await status("second-token") == 401
            (tmp_path / "api-token").write_text("second-token\n")
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: opens("second-token"), 10, "the API open to the rotated token")
            assert await status("first-token") == 401, log_path.read_text()
            assert await status("first-token", "/metrics") == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = log_path.read_text()
        assert "first-token" not in log and "second-token" not in log
