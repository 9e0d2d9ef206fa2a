"""Backup sources against real restic and borg repositories made here, and a PBS fake serving the
upstream shapes: a stale restore point opens one ``backup`` warning naming the service and the age,
a fresh one clears it; every way a source can go wrong is a failed read with a reason, no secret."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from watchtower.backups import borg, pbs, restic
from watchtower.backups.watch import BackupWatch, assess
from watchtower.config import Backup, Config, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.incidents import IncidentState, IncidentTracker
from watchtower.probes import Failure, ProbeContext

pytestmark = pytest.mark.skipif(
    shutil.which("restic") is None or shutil.which("borg") is None,
    reason="needs Debian's restic and borgbackup (scripts/bootstrap.sh --tests)",
)

HOUR = 3600.0
PASSWORD = "correct-horse-battery-staple-7"


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _config(tmp: Path, backups: list[dict[str, Any]], rpo: str = "1h") -> Config:
    doc = {
        "site": "acme",
        "state_dir": str(tmp / "state"),
        "targets": {
            "erp1": {
                "role": "vm",
                "paths": [{"icmp": "127.0.0.1"}],
                "service": {"name": "ERP", "rto": "4h", "rpo": rpo, "backups": backups},
            }
        },
    }
    (tmp / "state").mkdir(exist_ok=True)
    return parse_config(doc, tmp)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ledger.csv").write_text("invoice,amount\n1,100\n")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    return folder


def _restic(tmp: Path, *args: str) -> None:
    env = {**os.environ, "RESTIC_PASSWORD_FILE": str(tmp / "pw"), "RESTIC_CACHE_DIR": str(tmp / "cache")}
    subprocess.run(["restic", "-r", str(tmp / "restic"), "-q", *args], env=env, check=True, timeout=120)


def _borg(tmp: Path, *args: str) -> None:
    env = {**os.environ, "BORG_PASSCOMMAND": f"cat {tmp / 'pw'}", "BORG_BASE_DIR": str(tmp / "borgbase")}
    subprocess.run(["borg", *args], env=env, check=True, timeout=120, capture_output=True)


def _ctx(timeout: float = 60.0) -> ProbeContext:
    return ProbeContext(timeout=timeout)


async def test_restic_stale_snapshot_opens_one_warning_and_a_new_one_clears_it(
    tmp_path: Path, data: Path
) -> None:
    now = time.time()
    _restic(tmp_path, "init")
    _restic(tmp_path, "backup", "--host", "erp1", "--time", _stamp(now - 3 * HOUR), str(data))
    config = _config(tmp_path, [{"restic": {"repository": str(tmp_path / "restic"), "password_file": "pw"}}])
    tracker = IncidentTracker()
    watch = BackupWatch(config, tracker)
    await watch.read_all(now)
    status = watch.status["erp1-restic"]
    assert status.ok, status.detail
    assert status.newest is not None and abs(status.newest - (now - 3 * HOUR)) < 2
    watch.evaluate(now)
    watch.evaluate(now + 60)  # a second look changes nothing: still one warning
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.BACKUP and incident.root == "erp1-restic"
    assert "ERP" in incident.evidence[0] and "3h" in incident.evidence[0] and "RPO 1h" in incident.evidence[0]
    assert PASSWORD not in json.dumps(incident.evidence)

    _restic(tmp_path, "backup", "--host", "erp1", str(data))
    later = time.time()
    await watch.read_all(later)
    changes = watch.evaluate(later)
    assert [c.kind for c in changes] == ["resolved"]
    incident = tracker.incidents[incident.id]  # a frozen value: the tracker holds the new one
    assert incident.state is IncidentState.RESOLVED and not tracker.open_incidents()
    assert "fresh again" in incident.timeline[-1].text


async def test_borg_stale_archive_warns_and_a_new_archive_clears(tmp_path: Path, data: Path) -> None:
    now = time.time()
    repo = tmp_path / "borg"
    _borg(tmp_path, "init", "-e", "repokey", str(repo))
    old = datetime.fromtimestamp(now - 3 * HOUR, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    _borg(tmp_path, "create", "--timestamp", old, f"{repo}::erp-old", str(data))
    # borg --timestamp is UTC; `borg list` prints it back as local time without a zone: the
    # source's timezone says which, here the test process's own
    zone = "UTC" if time.timezone == 0 else "Etc/UTC"
    spec = {"borg": {"repository": str(repo), "passphrase_file": "pw", "prefix": "erp-", "timezone": zone}}
    config = _config(tmp_path, [spec])
    tracker = IncidentTracker()
    watch = BackupWatch(config, tracker)
    await watch.read_all(now)
    status = watch.status["erp1-borg"]
    assert status.ok, status.detail
    assert status.newest is not None and abs(status.newest - (now - 3 * HOUR)) < 2
    watch.evaluate(now)
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.BACKUP and "ERP" in incident.evidence[0] and "3h" in incident.evidence[0]

    _borg(tmp_path, "create", f"{repo}::erp-new", str(data))
    _borg(tmp_path, "create", f"{repo}::other-newer", str(data))  # another prefix: not ERP's
    later = time.time()
    await watch.read_all(later)
    assert watch.evaluate(later)[0].kind == "resolved"
    assert not tracker.open_incidents()


@contextlib.contextmanager
def _read_only(tmp: Path, *repos: Path) -> Iterator[list[Path]]:
    """The repositories as the monitor should see them: read-only. As root (CI) a read-only bind
    mount (root ignores file modes), unmounted afterwards; otherwise the write bits removed."""
    if os.geteuid() != 0:
        for repo in repos:
            for root, dirs, files in os.walk(repo):
                for name in [*dirs, *files]:
                    p = Path(root) / name
                    p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            repo.chmod(0o555)
        yield list(repos)
        return
    mounted: list[Path] = []
    try:
        for repo in repos:
            target = tmp / f"ro-{repo.name}"
            target.mkdir()
            subprocess.run(["mount", "--bind", str(repo), str(target)], check=True)
            mounted.append(target)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield mounted
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)


async def test_read_only_restic_and_borg_repositories_are_read(tmp_path: Path, data: Path) -> None:
    _restic(tmp_path, "init")
    _restic(tmp_path, "backup", str(data))
    _borg(tmp_path, "init", "-e", "repokey", str(tmp_path / "borg"))
    _borg(tmp_path, "create", f"{tmp_path / 'borg'}::a", str(data))
    with _read_only(tmp_path, tmp_path / "restic", tmp_path / "borg") as (restic_ro, borg_ro):
        with pytest.raises(OSError):
            (restic_ro / "locks" / "probe").write_text("x")  # really read-only
        pw = str(tmp_path / "pw")
        r = Backup.model_validate({"restic": {"repository": str(restic_ro), "password_file": pw}})
        b = Backup.model_validate({"borg": {"repository": str(borg_ro), "passphrase_file": pw}})
        result = await restic.probe(r, _ctx())
        assert result.ok and dict(result.values)["count"] == 1, result.detail
        result = await borg.probe(b, _ctx())
        assert result.ok and dict(result.values)["count"] == 1, result.detail


async def test_read_only_mount_needs_no_lock(tmp_path: Path, data: Path) -> None:
    """As root (CI), file modes do not stop writes; the flags still must not take a lock: the
    repository's locks/ folder stays empty and borg's lock file is never created."""
    _restic(tmp_path, "init")
    _restic(tmp_path, "backup", str(data))
    _borg(tmp_path, "init", "-e", "repokey", str(tmp_path / "borg"))
    _borg(tmp_path, "create", f"{tmp_path / 'borg'}::a", str(data))
    r = Backup.model_validate(
        {"restic": {"repository": str(tmp_path / "restic"), "password_file": str(tmp_path / "pw")}}
    )
    b = Backup.model_validate(
        {"borg": {"repository": str(tmp_path / "borg"), "passphrase_file": str(tmp_path / "pw")}}
    )
    assert (await restic.probe(r, _ctx())).ok
    assert (await borg.probe(b, _ctx())).ok
    assert list((tmp_path / "restic" / "locks").iterdir()) == []
    assert not (tmp_path / "borg" / "lock.roster").exists()


async def test_wrong_password_corrupt_index_and_hang_fail_with_a_reason_and_no_secret(
    tmp_path: Path, data: Path
) -> None:
    _restic(tmp_path, "init")
    _restic(tmp_path, "backup", str(data))
    _borg(tmp_path, "init", "-e", "repokey", str(tmp_path / "borg"))
    _borg(tmp_path, "create", f"{tmp_path / 'borg'}::a", str(data))
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-at-all\n")

    r = Backup.model_validate(
        {"restic": {"repository": str(tmp_path / "restic"), "password_file": str(wrong)}}
    )
    result = await restic.probe(r, _ctx())
    assert not result.ok and result.failure is Failure.ERROR
    assert "restic failed" in result.detail and "password" in result.detail.lower()
    assert "not-the-password" not in result.detail

    b = Backup.model_validate({"borg": {"repository": str(tmp_path / "borg"), "passphrase_file": str(wrong)}})
    result = await borg.probe(b, _ctx())
    assert not result.ok and "borg failed" in result.detail and "passphrase" in result.detail.lower()
    assert "not-the-password" not in result.detail

    # corrupt restic index and snapshot files: garbage where the encrypted blobs were
    for folder in ("index", "snapshots"):
        for f in (tmp_path / "restic" / folder).iterdir():
            f.chmod(0o644)
            f.write_bytes(b"\x00garbage" * 64)
    r = Backup.model_validate(
        {"restic": {"repository": str(tmp_path / "restic"), "password_file": str(tmp_path / "pw")}}
    )
    result = await restic.probe(r, _ctx())
    assert not result.ok and "could not load snapshot" in result.detail and PASSWORD not in result.detail

    # a borg whose index is garbage
    for f in (tmp_path / "borg").glob("index.*"):
        f.write_bytes(b"\x00garbage" * 64)
    for f in (tmp_path / "borg").glob("hints.*"):
        f.write_bytes(b"\x00garbage" * 64)
    b = Backup.model_validate(
        {"borg": {"repository": str(tmp_path / "borg"), "passphrase_file": str(tmp_path / "pw")}}
    )
    result = await borg.probe(b, _ctx())
    # borg rebuilds a broken index from the segments when it can: either a good read or a reason
    assert result.ok or (result.detail and PASSWORD not in result.detail)

    # a tool that hangs: killed at the deadline, with its child, and said so
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 300 &\nsleep 300\n")
    hang.chmod(0o755)
    r = Backup.model_validate(
        {"restic": {"repository": "/nowhere", "password_file": str(tmp_path / "pw"), "binary": str(hang)}}
    )
    started = time.monotonic()
    result = await restic.probe(r, _ctx(timeout=1.0))
    assert not result.ok and result.failure is Failure.TIMEOUT and "killed" in result.detail
    assert time.monotonic() - started < 5
    out = subprocess.run(["pgrep", "-f", str(hang)], capture_output=True, text=True)
    assert out.stdout.strip() == "", "the hanging tool or its child survived the deadline"


def test_garbage_listings_are_failed_reads() -> None:
    for parse in (lambda b: restic.parse(b), lambda b: borg.parse(b, "UTC")):
        for body in (b"", b"{", b"\xff\xfe", b"[1, 2]", b'{"archives": [{"start": 5}]}', b"x" * 1_048_576):
            times, problem = parse(body)
            assert problem and not times
            assert len(problem) < 200


# --------------------------------------------------------------------------- PBS fake

TOKEN_ID = "monitor@pbs!watchtower"
TOKEN_SECRET = "3f1c8e2a-0000-4b7e-9d7e-5a5a5a5a5a5a"


@pytest.fixture
async def pbs_fake() -> AsyncIterator[dict[str, Any]]:
    """A Proxmox Backup Server that answers the snapshots listing like upstream:
    ``{"data": [SnapshotListItem...]}`` (pbs-api-types/src/datastore.rs), 401 without the token."""
    state: dict[str, Any] = {"snapshots": [], "mode": "ok", "requests": []}

    async def snapshots(request: web.Request) -> web.StreamResponse:
        state["requests"].append((request.match_info["store"], dict(request.query)))
        if request.headers.get("Authorization") != f"PBSAPIToken={TOKEN_ID}:{TOKEN_SECRET}":
            return web.json_response({"data": None, "message": "authentication failure\n"}, status=401)
        mode = state["mode"]
        if mode == "garbage":
            return web.Response(body=b"<html>proxy error", content_type="text/html")
        if mode == "huge":
            return web.Response(body=b"[" + b" " * (9 * 1024 * 1024) + b"]", content_type="application/json")
        if mode == "hang":
            await asyncio.sleep(30)
        items = [
            s
            for s in state["snapshots"]
            if s["backup-type"] == request.query.get("backup-type")
            and s["backup-id"] == request.query.get("backup-id")
        ]
        return web.json_response({"data": items})

    app = web.Application()
    app.router.add_get("/api2/json/admin/datastore/{store}/snapshots", snapshots)
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # a hanging handler is cut off
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _snapshot(ts: float, verified: str | None, vmid: str = "100") -> dict[str, Any]:
    item: dict[str, Any] = {
        "backup-type": "vm",
        "backup-id": vmid,
        "backup-time": int(ts),
        "files": [{"filename": "index.json.blob", "crypt-mode": "none", "size": 512}],
        "size": 34359738368,
        "protected": False,
        "owner": "root@pam",
    }
    if verified is not None:
        item["verification"] = {
            "upid": "UPID:pbs:00001234:00005678:00000001:6571A2B0:verify:store1:root@pam:",
            "state": verified,
        }
    return item


async def test_pbs_stale_and_unverified_warn_then_clear(tmp_path: Path, pbs_fake: dict[str, Any]) -> None:
    now = time.time()
    (tmp_path / "pbs-secret").write_text(TOKEN_SECRET)
    spec = {
        "pbs": {
            "url": pbs_fake["url"],
            "datastore": "store1",
            "backup_id": "100",
            "token_id": TOKEN_ID,
            "token_secret_file": "pbs-secret",
        },
        "verified_within": "1d",
    }
    pbs_fake["snapshots"] = [
        _snapshot(now - 3 * HOUR, "ok"),
        _snapshot(now - 2 * HOUR, "failed"),
        _snapshot(now - 20 * 60, None, vmid="101"),  # another guest
    ]
    config = _config(tmp_path, [spec])
    tracker = IncidentTracker()
    watch = BackupWatch(config, tracker)
    await watch.read_all(now)
    status = watch.status["erp1-pbs"]
    assert status.ok, status.detail
    assert (
        status.count == 2
        and status.newest == int(now - 2 * HOUR)
        and status.newest_verified == int(now - 3 * HOUR)
    )
    assert pbs_fake["requests"][-1] == ("store1", {"backup-type": "vm", "backup-id": "100"})
    watch.evaluate(now)
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.BACKUP and "ERP" in incident.evidence[0] and "2h" in incident.evidence[0]

    pbs_fake["snapshots"].append(_snapshot(now - 60, "ok"))
    await watch.read_all(now)
    assert watch.evaluate(now)[0].kind == "resolved"


async def test_pbs_bad_answers_are_failed_reads_without_the_secret(
    tmp_path: Path, pbs_fake: dict[str, Any]
) -> None:
    (tmp_path / "right").write_text(TOKEN_SECRET)
    (tmp_path / "wrong").write_text("wrong-secret-value")

    def backup(secret_file: str) -> Backup:
        return Backup.model_validate(
            {
                "pbs": {
                    "url": pbs_fake["url"],
                    "datastore": "store1",
                    "backup_id": "100",
                    "token_id": TOKEN_ID,
                    "token_secret_file": str(tmp_path / secret_file),
                }
            }
        )

    result = await pbs.probe(backup("wrong"), _ctx())
    assert not result.ok and "401" in result.detail and "token refused" in result.detail
    assert "wrong-secret-value" not in result.detail
    for mode, failure, words in (
        ("garbage", Failure.PROTOCOL, "not JSON"),
        ("huge", Failure.PROTOCOL, "larger than"),
        ("hang", Failure.TIMEOUT, "within"),
    ):
        pbs_fake["mode"] = mode
        result = await pbs.probe(backup("right"), _ctx(timeout=1.0))
        assert not result.ok and result.failure is failure and words in result.detail, (mode, result)
        assert TOKEN_SECRET not in result.detail


def test_assess_names_every_problem() -> None:
    from watchtower.backups.watch import BackupStatus
    from watchtower.config import ResolvedBackup

    spec = Backup.model_validate({"push": {"token": "t0ken-1234"}, "min_count": 3})
    b = ResolvedBackup("erp-nightly", "erp1", "ERP", spec, 3600.0)
    now = 1_800_000_000.0
    assert assess(b, BackupStatus("erp-nightly", "erp1", "ERP", "push"), now) == [
        "ERP: backup erp-nightly has not reported yet"
    ]
    status = BackupStatus(
        "erp-nightly", "erp1", "ERP", "push", read_at=now, ok=True, newest=now - 7 * 3600, count=1
    )
    problems = assess(b, status, now)
    assert len(problems) == 2 and "7h" in problems[0] and "at least 3" in problems[1]
