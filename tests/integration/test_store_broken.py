"""A broken state store, with the real daemon under a ``Restart=always``-like loop (issue 15).

Run 1 pages a dead service through a real SMTP server (aiosmtpd) and stops. A table page of its
database is then overwritten. The daemon is started again by a bounded supervisor loop that
restarts it whenever it exits, up to ``RESTARTS`` times: it must not exit at all (a crash at
start used to loop for ever without ever paging), say once and loudly that the store is
broken (one ERROR line naming the file, ``/healthz`` 503, ``watchtower_store_writable 0``,
heartbeat ``/fail``, one warning through the channels), keep probing, and not page the dead
service a second time (what could be read of the broken file is its memory). ``watchtower store
check`` then names the problem, ``store repair`` keeps the bad file and builds a good one, and
the daemon after it is healthy and still does not repeat the page. A second daemon on the same
state refuses to start, naming the first one's PID.

Everything listens on 127.0.0.1; every process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from sinks import HttpSink, SmtpSink, mailto_url
from support import free_port, stop_process, until

pytestmark = pytest.mark.slow

RESTARTS = 3  # the supervisor gives up after this many exits (systemd's StartLimitBurst is 5)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def corrupt_table(path: Path, table: str) -> None:
    """Overwrite the root page of ``table`` with garbage, as a bad sector or a stray write would."""
    db = sqlite3.connect(path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)


def test_corrupt_store_under_a_restart_loop_is_one_loud_failure_and_no_repeated_page(tmp_path: Path) -> None:
    smtp, beat = SmtpSink().start(), HttpSink().start()
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    state = tmp_path / "state"
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "broken",
                "listen": listen,
                "state_dir": str(state),
                "defaults": {
                    "interval": "500ms",
                    "retry_interval": "200ms",
                    "timeout": "300ms",
                    "fail_after": 1,
                },
                "targets": {"erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]}},
                "notify": {
                    "channels": [{"name": "mail", "url": mailto_url(smtp.port), "tags": ["tier1"]}],
                    "escalation": [{"after": "0s", "notify": ["tier1"]}],
                },
                "heartbeat": {"url": f"{beat.url}/ping", "every": "1s", "timeout": "2s"},
            }
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    logs: list[Path] = []

    def start() -> subprocess.Popen[Any]:
        log = tmp_path / f"daemon{len(logs)}.log"
        logs.append(log)
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)], stdout=out, stderr=out, env=env
            )

    def pages() -> list[str]:
        return [m.subject for m in smtp.messages if "erp1 DOWN" in m.subject]

    running: list[subprocess.Popen[Any]] = []
    try:
        # Run 1: a healthy store; the page goes out once and is recorded as sent.
        running.append(start())
        until(lambda: pages(), 40, "the first page", logs[-1])
        db = state / "watchtower.sqlite"

        def recorded_sent() -> bool:
            with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
                return conn.execute("SELECT state FROM notifications WHERE incident = 1").fetchall() == [
                    ("sent",)
                ]

        until(recorded_sent, 20, "the page recorded as sent", logs[-1])
        assert stop_process(running.pop())
        assert not (state / "watchtower.sqlite-wal").exists()  # a clean stop checkpointed it
        corrupt_table(db, "timeline")

        # The supervisor loop: restart on exit, at most RESTARTS times.
        exits = 0
        proc = start()
        running.append(proc)

        def loudly_broken() -> bool:
            code, text = get(base + "/healthz")
            return code == 503 and "corrupt" in text

        def up_or_gone(p: subprocess.Popen[Any]) -> bool:
            return p.poll() is not None or loudly_broken()

        while True:
            until(functools.partial(up_or_gone, proc), 60, "the daemon up or gone", logs[-1])
            if proc.poll() is None:
                break
            exits += 1
            assert exits < RESTARTS, f"crash loop: {exits} exits: {logs[-1].read_text()[-2000:]}"
            proc = start()
            running[-1] = proc
        assert exits == 0, "the daemon exited on a corrupt store"
        log = logs[-1]
        _, metrics = get(base + "/metrics")
        assert "watchtower_store_writable 0.0" in metrics
        until(lambda: any(r.path.endswith("/fail") for r in beat.requests), 20, "heartbeat /fail", log)
        fail = next(r for r in beat.requests if r.path.endswith("/fail"))
        assert b"corrupt" in fail.body
        warning = until(
            lambda: [m for m in smtp.messages if "WARNING" in m.subject and "state store" in m.subject],
            20,
            "the store warning through the channel",
            log,
        )
        assert len(warning) == 1 and str(db) in warning[0].subject + warning[0].text
        # The incident was read back (same id, open), and time passes: probes, alerting ticks
        # and heartbeats go by, each a chance to page again.
        _, incidents = get(base + "/api/v1/incidents")
        assert '"id": 1' in incidents.replace('"id":1', '"id": 1')
        seen = len(beat.requests)
        until(lambda: len(beat.requests) >= seen + 3, 20, "three more heartbeats", log)
        text = log.read_text()
        errors = [line for line in text.splitlines() if " ERROR " in line and "state store" in line]
        assert len(errors) == 1 and str(db) in errors[0] and "store check" in errors[0], errors
        assert "writable again" not in text
        assert get(base + "/healthz")[0] == 503  # still honest after commits to memory
        assert len(pages()) == 1, pages()

        # A second daemon on the same state refuses to start and names the first one's PID.
        second = subprocess.run(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"in use by another watchtower (pid {proc.pid})" in second.stderr

        # The way out: check names the problem (read-only, while the daemon runs), repair keeps
        # the bad file next to the new one.
        check = subprocess.run(
            [sys.executable, "-m", "watchtower", "store", "check", "-c", str(cfg)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert check.returncode == 1 and "store repair" in check.stdout, check
        assert "another watchtower" in subprocess.run(
            [sys.executable, "-m", "watchtower", "store", "repair", "-c", str(cfg)],
            capture_output=True, text=True, timeout=60, env=env,
        ).stderr  # fmt: skip
        assert stop_process(running.pop())
        bad = db.read_bytes()
        repair = subprocess.run(
            [sys.executable, "-m", "watchtower", "store", "repair", "-c", str(cfg)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert repair.returncode == 0, repair
        [backup] = [
            p for p in state.glob("watchtower.sqlite.broken-*") if not p.name.endswith(("-wal", "-shm"))
        ]
        assert backup.read_bytes() == bad and f"kept the old database as {backup}" in repair.stdout
        assert "unreadable timeline" in repair.stdout and "steps 1" in repair.stdout

        # After the repair: healthy, and the dead service is still not paged again.
        running.append(start())
        until(lambda: get(base + "/healthz")[0] == 200, 40, "healthz 200 after the repair", logs[-1])
        seen = len(beat.requests)
        until(lambda: len(beat.requests) >= seen + 3, 20, "three more heartbeats", logs[-1])
        assert "restored incidents=1" in logs[-1].read_text()
        assert len(pages()) == 1, pages()
    finally:
        for p in running:
            stop_process(p)
        smtp.stop()
        beat.stop()


@pytest.mark.parametrize("breakage", ["empty", "directory", "garbage", "read-only"])
def test_unusable_store_at_start_stays_loud_while_alerting_from_memory(tmp_path: Path, breakage: str) -> None:
    """Each of these used to log "state store writable again" after the first commit to the
    in-memory stand-in, and /healthz went back to 200 with nothing persisted."""
    import shutil

    state = tmp_path / "state"
    state.mkdir()
    db = state / "watchtower.sqlite"
    mounted = False
    if breakage == "empty":
        db.write_bytes(b"")
    elif breakage == "directory":
        db.mkdir()
    elif breakage == "garbage":
        db.write_bytes(b"this is no database\n" * 500)
    else:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a read-only state_dir needs root and mount (root writes through file modes)")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)], check=True, timeout=10
        )
        mounted = True
    smtp = SmtpSink().start()
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "unusable",
                "listen": listen,
                "state_dir": str(state),
                "defaults": {
                    "interval": "500ms",
                    "retry_interval": "200ms",
                    "timeout": "300ms",
                    "fail_after": 1,
                },
                "targets": {"erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]}},
                "notify": {
                    "channels": [{"name": "mail", "url": mailto_url(smtp.port), "tags": ["tier1"]}],
                    "escalation": [{"after": "0s", "notify": ["tier1"]}],
                },
            }
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)], stdout=out, stderr=out, env=env
        )
    try:
        until(
            lambda: [m for m in smtp.messages if "erp1 DOWN" in m.subject], 40, "the page, from memory", log
        )
        warning = until(
            lambda: [m for m in smtp.messages if "state store" in m.subject], 20, "the store warning", log
        )
        assert "may repeat an earlier one" in warning[0].text
        until(lambda: "notification sent" in log.read_text(), 20, "the page recorded in memory", log)
        code, text = get(base + "/healthz")
        assert code == 503 and "state store not writable" in text, (code, text)
        _, metrics = get(base + "/metrics")
        assert "watchtower_store_writable 0.0" in metrics
        assert "writable again" not in log.read_text()
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and str(db) in errors[0], errors
    finally:
        stop_process(proc)
        smtp.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(state)], check=False, timeout=10)


async def test_a_read_failing_after_the_check_at_open_is_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that goes bad between the check at open and the first read (restore) must not end
    the daemon either: it alerts from memory and says so."""
    import asyncio

    from watchtower.config import load_config
    from watchtower.daemon import run_daemon
    from watchtower.store import Store, StoreError

    def broken(self: Store) -> list[Any]:
        raise StoreError(f"{self.path}: database disk image is malformed")

    monkeypatch.setattr(Store, "pending", broken)
    listen = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "late",
                "listen": listen,
                "state_dir": str(tmp_path / "state"),
                "targets": {"erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]}},
            }
        )
    )
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(cfg), ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        code, text = await asyncio.to_thread(get, f"http://{listen}/healthz")
        assert code == 503 and "malformed" in text and "may repeat" in text
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
