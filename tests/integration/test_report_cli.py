"""The post-mortem over HTTP (GET /api/v1/incidents/{id}/report) and on the command line:
from the running daemon, and straight from the store when the daemon is not running."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from support import free_port, wait_for

from watchtower.config import Config, load_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState
from watchtower.engine.monitor import Monitor
from watchtower.store import AsyncStore, NewNotification, Store
from watchtower.web.app import make_app

T0 = datetime(2026, 11, 22, 2, 13, 53, tzinfo=UTC).timestamp()
TOKEN = "r3port-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_config(tmp_path: Path, port: int, targets: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {
        "site": "acme-hq",
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "api_token_file": "api-token",
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": targets
        or {
            "pve1": {"role": "hypervisor", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]},
            "erp1": {
                "role": "vm",
                "runs_on": "pve1",
                "paths": [{"tcp": f"127.0.0.1:{free_port()}"}],
                "service": {"name": "ERP", "rto": "4h", "rpo": "15m", "restore_order": 1},
            },
        },
    }
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    path = tmp_path / "wt.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def recorded_incident() -> Incident:
    incident = Incident(12, Scope.HYPERVISOR, "pve1", T0 + 14, cause=Cause.POWER_OFF, affected=("erp1",),
                        first_failure_at=T0)  # fmt: skip
    incident = incident.noted(T0, "first_failure", "first failed probe of pve1")
    return incident.noted(T0 + 14, "opened", "confirmed: hypervisor pve1 down (power_off), 1 affected")


def fill(store: Store) -> None:
    """#12 pve1 down, paged (sms failed once, then sent), acked, erp1 back, resolved; #13 the
    monitor blind for 2m10s in the middle of it."""
    incident = recorded_incident()
    (page, sms) = store.commit(
        [incident],
        [NewNotification(12, "step0", "page", "signal-oncall", "t", "b"),
         NewNotification(12, "step0", "page", "sms-oncall", "t", "b")],
        [(12, "step0")],
        now=T0 + 14,
    )  # fmt: skip
    store.record_attempt(page.id, T0 + 16, True, None, None)
    store.record_attempt(sms.id, T0 + 15, False, "HTTP 503", T0 + 40)
    store.record_attempt(sms.id, T0 + 40, True, None, None)
    incident = replace(
        incident, state=IncidentState.ACKNOWLEDGED, acknowledged_at=T0 + 1339, acknowledged_by="alice"
    ).noted(T0 + 1339, "ack", "acknowledged by alice")
    incident = replace(incident, back=(*incident.back, "erp1")).noted(T0 + 4000, "back", "erp1 is back")
    incident = replace(incident, state=IncidentState.RESOLVED, resolved_at=T0 + 4200).noted(
        T0 + 4200, "resolved", "pve1 is back after 1h09m"
    )
    blind = Incident(
        13, Scope.MONITOR, "acme-hq", T0 + 1800, state=IncidentState.RESOLVED, resolved_at=T0 + 1930
    ).noted(T0 + 1800, "opened", "blind since 02:43:53Z: every vantage path is down")
    store.commit([incident, blind], now=T0 + 4200)


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Monitor]]:
    config = load_config(write_config(tmp_path, free_port()))
    store = await AsyncStore.open(config.state_dir)
    await store.call(fill, store.store)
    monitor = Monitor(config)
    async with TestClient(TestServer(make_app(monitor, store))) as client:
        yield client, monitor
    await store.close()


async def test_route_renders_from_the_store(app_client: tuple[TestClient[Any, Any], Monitor]) -> None:
    client, _ = app_client
    response = await client.get("/api/v1/incidents/12/report", headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/markdown; charset=utf-8"
    text = await response.text()
    assert text.startswith("# Incident #12: hypervisor pve1 down (power_off)\n")
    assert "| time to detect | 14s |" in text
    assert "| time to notify | 2s | confirmed → first page delivered 02:14:09 via signal-oncall |" in text
    assert "| time to acknowledge | 22m05s |" in text
    assert "| 15s | 02:14:08 | page (step0) to sms-oncall: 1 attempt failed (last error: HTTP 503) |" in text
    assert "| 40s | 02:14:33 | page (step0) to sms-oncall: sent after 1 failed attempt |" in text
    assert "| ERP | erp1 | 4h | 1h06m | yes |" in text
    assert "| 2026-11-22T02:43:53Z | 2026-11-22T02:46:03Z | 2m10s |" in text  # from the store's #13
    assert "ERP: yes (down 1h06m of 4h)" in text


async def test_route_needs_the_token_and_knows_unknown_ids(
    app_client: tuple[TestClient[Any, Any], Monitor],
) -> None:
    client, _ = app_client
    assert (await client.get("/api/v1/incidents/12/report")).status == 401
    assert (await client.get("/api/v1/incidents/999/report", headers=AUTH)).status == 404
    assert (await client.get("/api/v1/incidents/abc/report", headers=AUTH)).status == 404


async def test_route_takes_the_live_incident(app_client: tuple[TestClient[Any, Any], Monitor]) -> None:
    client, monitor = app_client
    live = Incident(40, Scope.SERVICE, "erp1", T0 + 100, first_failure_at=T0 + 95)  # only in memory
    monitor.tracker.incidents[40] = live
    text = await (await client.get("/api/v1/incidents/40/report", headers=AUTH)).text()
    assert text.startswith("# Incident #40: service erp1 down\n")
    assert "| time to detect | 5s |" in text


async def test_route_without_a_store_uses_memory(tmp_path: Path) -> None:
    monitor = Monitor(load_config(write_config(tmp_path, free_port())))
    monitor.tracker.incidents[12] = recorded_incident()
    blind = Incident(13, Scope.MONITOR, "acme-hq", T0 + 5, state=IncidentState.RESOLVED, resolved_at=T0 + 65)
    monitor.tracker.incidents[13] = blind
    async with TestClient(TestServer(make_app(monitor, None))) as client:
        response = await client.get("/api/v1/incidents/12/report", headers=AUTH)
        assert response.status == 200
        text = await response.text()
        assert "| time to detect | 14s |" in text
        assert "| 2026-11-22T02:13:58Z | 2026-11-22T02:14:58Z | 1m |" in text
        assert (await client.get("/api/v1/incidents/7/report", headers=AUTH)).status == 404


# --------------------------------------------------------------------------- CLI


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchtower", *args, "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def stored_site(tmp_path: Path) -> tuple[Path, Config]:
    path = write_config(tmp_path, free_port())  # nothing listens there: the daemon is "down"
    config = load_config(path)
    store = Store.in_dir(config.state_dir)
    fill(store)
    store.close()
    return path, config


def test_cli_report_falls_back_to_the_store(tmp_path: Path) -> None:
    path, config = stored_site(tmp_path)
    done = cli(path, "report", "12")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Incident #12: hypervisor pve1 down (power_off)\n")
    assert "| time to detect | 14s |" in done.stdout
    assert "| 40s | 02:14:33 | page (step0) to sms-oncall: sent after 1 failed attempt |" in done.stdout
    assert "not reachable" in done.stderr and "reading the store" in done.stderr
    assert str(config.state_dir) in done.stderr

    unknown = cli(path, "report", "999")
    assert unknown.returncode == 1 and "no incident #999" in unknown.stderr and not unknown.stdout


def test_cli_incidents_falls_back_to_the_store(tmp_path: Path) -> None:
    path, _ = stored_site(tmp_path)
    table = cli(path, "incidents", "--all")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["ID", "STATE", "SCOPE", "ROOT", "CAUSE", "OPENED", "(UTC)", "DURATION", "AFFECTED", "ACKED", "BY"],
        ["#13", "resolved", "monitor", "acme-hq", "-", "2026-11-22", "02:43:53", "2m10s", "0", "-"],
        [
            "#12",
            "resolved",
            "hypervisor",
            "pve1",
            "power_off",
            "2026-11-22",
            "02:14:07",
            "1h10m",
            "1",
            "alice",
        ],
    ]
    assert lines[2].index("power_off") == lines[0].index("CAUSE")  # columns line up
    assert "reading the store" in table.stderr

    docs = json.loads(cli(path, "incidents", "--all", "--json").stdout)
    assert [(d["id"], d["acknowledged_by"]) for d in docs] == [(13, None), (12, "alice")]
    assert [n["channel"] for n in docs[1]["notifications"]] == ["signal-oncall", "sms-oncall"]

    open_only = cli(path, "incidents")
    assert open_only.returncode == 0 and open_only.stdout.strip() == "no open incidents"


def test_cli_without_daemon_or_store(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    report = cli(path, "report", "1")
    assert report.returncode == 1 and "no store at" in report.stderr
    listing = cli(path, "incidents")
    assert listing.returncode == 0 and listing.stdout.strip() == "no open incidents"
    assert not (tmp_path / "state").exists()  # reading does not create a state_dir


async def test_cli_report_asks_the_running_daemon(tmp_path: Path) -> None:
    from watchtower.daemon import run_daemon

    port = free_port()
    dead = free_port()
    path = write_config(
        tmp_path, port, {"gone": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{dead}"}]}}
    )
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(path), ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)

        async def run(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "watchtower", *args, "-c", str(path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            return proc.returncode or 0, out.decode(), err.decode()

        async def opened() -> Any:
            code, out, _ = await run("incidents", "--json")
            return code == 0 and json.loads(out)

        (incident,) = await wait_for(opened, 15, "the incident of the dead target")
        code, out, err = await run("report", str(incident["id"]))
        assert code == 0, err
        assert out.startswith(f"# Incident #{incident['id']}: service gone down\n")
        assert "| time to detect |" in out and "reading the store" not in err
        code, out, err = await run("report", "999")
        assert code == 1 and "no incident #999" in err
        code, out, err = await run("incidents")
        assert code == 0 and f"#{incident['id']}" in out and "service" in out and "gone" in out
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
