"""The test plays systemd: the notify protocol end to end, the watchdog rule, and the unit file
checked by systemd-analyze (verify, and security exposure <= 2.0)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from support import free_port

from watchtower import sdnotify
from watchtower.daemon import supervise
from watchtower.engine.incidents import IncidentTracker

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "watchtower.service"
ANALYZE = shutil.which("systemd-analyze")


class NotifySocket:
    """What systemd listens on: a unix datagram socket; records every message with its arrival time."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    async def expect(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict[str, str]:
        """The next message carrying ``key`` (=``value``), skipping others; fails after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
            if key in fields and (value is None or fields[key] == value):
                return fields

    def close(self) -> None:
        self.sock.close()


def write_config(tmp_path: Path) -> Path:
    data: dict[str, Any] = {
        "site": "loopback",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp_path / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {"gone": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{free_port()}"}]}},
    }
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


async def test_plays_systemd_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    name = f"@watchtower-test-{os.getpid()}-{time.monotonic_ns()}"  # abstract: no file, no path limit
    notify = NotifySocket(b"\0" + name[1:].encode())
    cfg = write_config(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000"}  # ping every 0.5 s
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchtower.cli", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        ready = await notify.expect("READY", "1")
        assert "targets" in ready.get("STATUS", ""), ready

        # periodic WATCHDOG=1, about every WATCHDOG_USEC/2
        start = len(notify.messages)
        for _ in range(4):
            await notify.expect("WATCHDOG", "1", timeout=5)
        pings = [t for t, m in notify.messages[start:] if m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < g < 1.5 for g in gaps), gaps

        proc.send_signal(signal.SIGHUP)
        reloading = await notify.expect("RELOADING", "1", timeout=10)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        await notify.expect("READY", "1", timeout=10)

        proc.send_signal(signal.SIGTERM)
        await notify.expect("STOPPING", "1", timeout=10)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert "config reloaded" in err and "Traceback" not in err
    finally:
        notify.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_watchdog_withheld_while_the_scheduler_is_stalled(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    notify = NotifySocket(str(path))
    notifier = sdnotify.Notifier(str(path))
    scheduler = SimpleNamespace(last_tick=time.monotonic())
    monitor: Any = SimpleNamespace(
        scheduler=scheduler, target_states=dict, tracker=IncidentTracker(), vantage_up=True
    )
    task = asyncio.create_task(supervise(notifier, monitor, 0.05))
    try:
        await notify.expect("WATCHDOG", "1", timeout=5)
        scheduler.last_tick = time.monotonic() - 60  # the scheduler stopped ticking
        await asyncio.sleep(0.1)  # let a ping already in flight arrive
        drained = len(notify.messages)
        with pytest.raises(AssertionError):
            await notify.expect("WATCHDOG", "1", timeout=0.5)
        assert all("WATCHDOG" not in m for _, m in notify.messages[drained:])
        scheduler.last_tick = time.monotonic()  # ticking again: pings resume
        await notify.expect("WATCHDOG", "1", timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
        notify.close()


def test_notifier_is_inert_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.Notifier().ready("x")
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.Notifier("/nonexistent/notify").ready() is False  # never raises


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze (Debian package systemd) not installed")
def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    assert ANALYZE is not None
    # verify wants ExecStart's binary to exist: check a copy that points at this venv's console script.
    exe = Path(sys.executable).parent / "watchtower"
    assert exe.exists(), exe
    unit = tmp_path / "watchtower.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/watchtower", str(exe)))
    verify = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stderr

    security = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout + security.stderr)
    assert found, security.stdout + security.stderr
    exposure = float(found.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 2.0
    text = UNIT.read_text()
    required = ["Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "DynamicUser=yes", "StateDirectory=",
                "AmbientCapabilities=CAP_NET_RAW", "ExecReload=/bin/kill -HUP"]  # fmt: skip
    assert [line for line in required if line not in text] == []
