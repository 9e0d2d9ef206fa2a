"""Disk trouble: ``state_dir`` on a small tmpfs that fills up while
``watchtower run`` works. Probing and alerting go on (the page still arrives at the SMTP sink),
the log says so loudly, ``/healthz`` is 503 with the reason, ``watchtower_store_writable`` is 0;
when space returns the store is written again and /healthz is 200.

Needs root (mount). The tmpfs is mounted in the test's temp dir and unmounted at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sinks import SmtpSink, mailto_url
from support import free_port, stop_process, until

from watchtower.store import Store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root and mount"),
]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


# "read-only" (``mount -o remount,ro``) is refused by the kernel (EBUSY) while the daemon holds the
# database open for writing; a read-only state_dir at start is covered by tests/unit/test_store.py.
@pytest.mark.parametrize("trouble", ["full"])
def test_alerting_goes_on_when_the_state_dir_fails_and_recovers(
    tmp_path: Path, tmpfs: Path, trouble: str
) -> None:
    service = socket.socket()
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    service.listen(64)
    port = service.getsockname()[1]
    smtp = SmtpSink().start()
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "disk",
                "listen": listen,
                "state_dir": str(tmpfs),
                "defaults": {
                    "interval": "500ms",
                    "retry_interval": "200ms",
                    "timeout": "300ms",
                    "fail_after": 1,
                },
                "targets": {"erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{port}"}]}},
                "notify": {
                    "channels": [{"name": "mail", "url": mailto_url(smtp.port), "tags": ["tier1"]}],
                    "escalation": [{"after": "0s", "notify": ["tier1"]}],
                    "all_clear_after": "0s",
                },
            }
        )
    )
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)], stdout=out, stderr=out, env=env
        )
    filler: Path | None = None
    try:
        until(lambda: get(base + "/healthz")[0] == 200, 20, "healthz 200", log)
        if trouble == "full":
            filler = fill(tmpfs)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=10)
        service.close()  # the service dies while the disk is in trouble
        [page] = until(lambda: smtp.messages[:1], 20, "the page, delivered from memory", log)
        assert "erp1 DOWN" in page.subject
        _code, text = until(lambda: (r := get(base + "/healthz"))[0] == 503 and r, 10, "healthz 503", log)
        assert "state store not writable" in text
        _, metrics = get(base + "/metrics")
        assert "watchtower_store_writable 0.0" in metrics
        assert "state store not writable, alerting from memory" in log.read_text()
        # probing goes on: the state API still follows the target
        _, state = get(base + "/api/v1/state")
        assert '"erp1"' in state and '"down"' in state

        # space / write access returns: the incident is written, healthz recovers
        if filler is not None:
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True, timeout=10)
        # the service comes back too, so the incident changes and the store is tried again
        revived = socket.socket()
        revived.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        revived.bind(("127.0.0.1", port))
        revived.listen(64)
        try:
            until(lambda: get(base + "/healthz")[0] == 200, 20, "healthz 200 again", log)
            _, metrics = get(base + "/metrics")
            assert "watchtower_store_writable 1.0" in metrics
            assert "state store writable again" in log.read_text()
            until(lambda: len(smtp.messages) >= 2, 20, "the all-clear", log)
            # What was decided while the disk was full is on disk now: a restart neither loses
            # the page nor decides it again.
            store = Store(tmpfs / "watchtower.sqlite")
            try:
                assert (1, "step0") in store.steps(1)
                assert ("step0", "sent") in {(n.step, n.state) for n in store.notifications(1)}
            finally:
                store.close()
            assert "kept in memory while it failed are written now" in log.read_text()
        finally:
            revived.close()
    finally:
        stop_process(proc)
        smtp.stop()
        service.close()
        with contextlib.suppress(OSError):
            subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=False, timeout=10)
