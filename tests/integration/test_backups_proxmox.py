"""Proxmox VE and Backup Server over HTTPS: a fake that accepts exactly the token header the
independent client proxmoxer sends (so our header format is the one Proxmox users' tools use) and
answers the upstream shapes; the pve source turns them into restore points, failed jobs and guests
no job covers."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import make_cert

from watchtower.backups import pbs, pve
from watchtower.backups.watch import BackupWatch
from watchtower.config import Backup, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import IncidentTracker
from watchtower.probes import Failure, ProbeContext
from watchtower.readiness import assess_site

USER, TOKEN, SECRET = "monitor@pve", "watchtower", "5e1d0c8a-1111-4c2b-8d3e-abcdefabcdef"
VMID = 100


class Fake:
    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.tasks: list[dict[str, Any]] = []
        self.not_backed_up: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.mode = "ok"
        self.seen: list[tuple[str, dict[str, str]]] = []

    def app(self) -> web.Application:
        def authorized(request: web.Request, scheme: str, sep: str) -> bool:
            return request.headers.get("Authorization") == f"{scheme}APIToken={USER}!{TOKEN}{sep}{SECRET}"

        async def answer(
            request: web.Request, data: Any, scheme: str = "PVE", sep: str = "="
        ) -> web.Response:
            self.seen.append((request.path, dict(request.query)))
            if not authorized(request, scheme, sep):
                return web.Response(status=401, text="authentication failure")
            if self.mode == "garbage":
                return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
            if self.mode == "hang":
                await asyncio.sleep(30)
            return web.json_response({"data": data})

        async def content(request: web.Request) -> web.Response:
            vmid = request.query.get("vmid")
            rows = [c for c in self.content if vmid is None or str(c.get("vmid")) == vmid]
            return await answer(request, rows)

        async def tasks(request: web.Request) -> web.Response:
            return await answer(request, self.tasks)

        async def not_backed_up(request: web.Request) -> web.Response:
            return await answer(request, self.not_backed_up)

        async def snapshots(request: web.Request) -> web.Response:
            return await answer(request, self.snapshots, "PBS", ":")

        app = web.Application()
        app.router.add_get("/api2/json/nodes/{node}/storage/{storage}/content", content)
        app.router.add_get("/api2/json/nodes/{node}/tasks", tasks)
        app.router.add_get("/api2/json/cluster/backup-info/not-backed-up", not_backed_up)
        app.router.add_get("/api2/json/admin/datastore/{store}/snapshots", snapshots)
        return app


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[Fake, int, Path]]:
    key, cert = make_cert(tmp_path, "pve")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    state = Fake()
    runner = web.AppRunner(state.app(), shutdown_timeout=0.5)  # a hanging handler is cut off
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state, port, cert
    finally:
        await runner.cleanup()


def _backup(port: int, cert: Path, secret: str = SECRET) -> dict[str, Any]:
    return {
        "pve": {
            "url": f"https://127.0.0.1:{port}",
            "node": "pve1",
            "storage": "pbs-main",
            "vmid": VMID,
            "token_id": f"{USER}!{TOKEN}",
            "token_secret": secret,
            "ca_file": str(cert),
        }
    }


async def test_proxmoxer_and_watchtower_read_the_same_answers(fake: tuple[Fake, int, Path]) -> None:
    """proxmoxer (an independent client) is accepted by the fake with the same token scheme."""
    from proxmoxer import ProxmoxAPI

    state, port, cert = fake
    now = int(time.time())
    state.content = [
        {"volid": f"pbs-main:backup/vm/{VMID}/x", "vmid": VMID, "ctime": now - 600, "format": "pbs-vm"}
    ]
    state.snapshots = [
        {
            "backup-type": "vm",
            "backup-id": str(VMID),
            "backup-time": now - 600,
            "files": [],
            "protected": False,
        }
    ]

    def with_proxmoxer() -> tuple[Any, Any]:
        pve_api = ProxmoxAPI(
            "127.0.0.1", port=port, user=USER, token_name=TOKEN, token_value=SECRET, verify_ssl=str(cert)
        )
        pbs_api = ProxmoxAPI(
            "127.0.0.1", port=port, user=USER, token_name=TOKEN, token_value=SECRET, verify_ssl=str(cert),
            service="PBS",
        )  # fmt: skip
        return (
            pve_api.nodes("pve1").storage("pbs-main").content.get(content="backup", vmid=VMID),
            pbs_api.admin.datastore("store1").snapshots.get(**{"backup-type": "vm", "backup-id": str(VMID)}),
        )

    by_proxmoxer = await asyncio.to_thread(with_proxmoxer)
    assert by_proxmoxer[0][0]["ctime"] == now - 600 and by_proxmoxer[1][0]["backup-time"] == now - 600

    ctx = ProbeContext(timeout=5.0)
    result = await pve.probe(Backup.model_validate(_backup(port, cert)), ctx)
    assert result.ok, result.detail
    assert dict(result.values)["newest"] == now - 600
    pbs_backup = Backup.model_validate(
        {
            "pbs": {
                "url": f"https://127.0.0.1:{port}",
                "datastore": "store1",
                "backup_id": str(VMID),
                "token_id": f"{USER}!{TOKEN}",
                "token_secret": SECRET,
                "ca_file": str(cert),
            }
        }
    )
    result = await pbs.probe(pbs_backup, ctx)
    assert result.ok, result.detail
    assert dict(result.values)["newest"] == now - 600


async def test_pve_stale_failed_and_uncovered_warn_then_clear(
    tmp_path: Path, fake: tuple[Fake, int, Path]
) -> None:
    state, port, cert = fake
    now = time.time()
    state.content = [
        {"volid": f"pbs-main:backup/vm/{VMID}/old", "vmid": VMID, "ctime": int(now - 5 * 3600),
         "format": "pbs-vm", "size": 34359738368, "verification": {"state": "ok", "upid": "UPID:pve1:1"},
         "protected": False},
        {"volid": "pbs-main:backup/vm/101/x", "vmid": 101, "ctime": int(now - 60), "format": "pbs-vm"},
    ]  # fmt: skip
    state.tasks = [
        {"upid": "UPID:pve1:2", "type": "vzdump", "id": str(VMID), "starttime": int(now - 3600),
         "endtime": int(now - 3500), "status": "job errors", "node": "pve1", "user": "root@pam"},
    ]  # fmt: skip
    state.not_backed_up = [
        {"vmid": VMID, "name": "erp1", "type": "qemu"},
        {"vmid": 105, "name": "test", "type": "lxc"},
    ]
    doc = {
        "site": "acme",
        "state_dir": str(tmp_path),
        "targets": {
            "erp1": {
                "role": "vm",
                "paths": [{"icmp": "127.0.0.1"}],
                "service": {"name": "ERP", "rpo": "1h", "backups": [_backup(port, cert)]},
            }
        },
    }
    config = parse_config(doc, tmp_path)
    tracker = IncidentTracker()
    watch = BackupWatch(config, tracker)
    await watch.read_all(now)
    status = watch.status["erp1-pve"]
    assert status.ok, status.detail
    assert (
        status.count == 1 and status.newest == int(now - 5 * 3600) and status.newest_verified == status.newest
    )
    assert status.uncovered == (VMID, 105) and status.failed_at == int(now - 3600)
    assert (
        "/api2/json/nodes/pve1/storage/pbs-main/content",
        {"content": "backup", "vmid": "100"},
    ) in state.seen
    assert (
        "/api2/json/nodes/pve1/tasks",
        {"typefilter": "vzdump", "errors": "1", "vmid": "100"},
    ) in state.seen
    report = assess_site(config, watch.status, now)
    assert report.red
    site = next(s for s in report.services if s.service == "(site)")
    assert site.items[0].text == "guests covered by no backup job: 100, 105"
    watch.evaluate(now)
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.BACKUP
    joined = " | ".join(incident.evidence)
    assert (
        "5h old, RPO 1h" in joined and "reported a failure" in joined and "covered by no backup job" in joined
    )

    state.content.append({"volid": "pbs-main:backup/vm/100/new", "vmid": VMID, "ctime": int(now - 60)})
    state.tasks, state.not_backed_up = [], []
    await watch.read_all(now)
    assert [c.kind for c in watch.evaluate(now)] == ["resolved"]


async def test_pve_bad_answers_fail_with_a_reason_and_no_secret(fake: tuple[Fake, int, Path]) -> None:
    state, port, cert = fake
    wrong = Backup.model_validate(_backup(port, cert, secret="wrong-secret-0000"))
    result = await pve.probe(wrong, ProbeContext(timeout=5.0))
    assert not result.ok and "token refused" in result.detail and "wrong-secret-0000" not in result.detail
    right = Backup.model_validate(_backup(port, cert))
    state.mode = "garbage"
    result = await pve.probe(right, ProbeContext(timeout=5.0))
    assert not result.ok and result.failure is Failure.PROTOCOL and "not JSON" in result.detail
    state.mode = "hang"
    result = await pve.probe(right, ProbeContext(timeout=1.0))
    assert not result.ok and result.failure is Failure.TIMEOUT
    assert SECRET not in result.detail
