"""An alert-chain drill on a real daemon and a real SMTP sink (aiosmtpd): compressed timers,
one-time confirmation links, SIGKILL mid-drill, results on the page, the API and the metrics.

Three contacts on the chain (step 0 at once, step 1 after 10m, step 2 after 20m; compress 0.01
makes that 0 s, 6 s, 12 s). The daemon is SIGKILLed after alice's DRILL message is recorded sent
and before bob's is due; after the restart bob's and carol's arrive, nobody gets a second copy.
Alice confirms through her link, bob through ``watchtower drill confirm``, carol never: the drill
fails, which sends one warning per channel and opens no incident.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sinks import SmtpSink, mailto_url
from support import free_port, stop_process

pytestmark = pytest.mark.slow

LINK = re.compile(r"(http://127\.0\.0\.1:\d+/api/v1/drills/(\d+)/confirm/([0-9a-f]+))")
TOKEN = re.compile(r"watchtower drill confirm (\d+) ([0-9a-f]+)")


def until(predicate: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:]}")


def http(
    method: str, url: str, body: bytes | None = None, ctype: str = "application/json"
) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def test_drill_survives_sigkill_and_reports_who_was_reached(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def accept() -> None:  # the monitored service: up all along, so no incident has a reason to open
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()

    threading.Thread(target=accept, daemon=True).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with SmtpSink() as smtp:
        doc: dict[str, Any] = {
            "site": "drillsite",
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(tmp_path / "state"),
            "defaults": {"interval": "1s", "timeout": "500ms"},
            "targets": {
                "erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{listener.getsockname()[1]}"}]}
            },
            "contacts": {
                "alice": {"name": "Alice", "channels": ["mail-alice"]},
                "bob": {"name": "Bob", "role": "on-call", "channels": ["mail-bob"], "on_call": True},
                "carol": {"name": "Carol", "role": "management", "channels": ["mail-carol"]},
            },
            "notify": {
                "channels": [
                    {"name": f"mail-{n}", "url": mailto_url(smtp.port, to=f"{n}@drill.test")}
                    for n in ("alice", "bob", "carol")
                ],
                "escalation": [
                    {"after": "0s", "contacts": ["alice"]},
                    {"after": "10m", "contacts": ["bob"]},
                    {"after": "20m", "contacts": ["carol"]},
                ],
                "retry_max": "1s",
            },
            "drills": {"confirm_within": "20s"},
        }
        cfg = tmp_path / "w.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        db = tmp_path / "state" / "watchtower.sqlite"
        log = tmp_path / "daemon.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)

        def start() -> subprocess.Popen[bytes]:
            with log.open("a") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)],
                    stdout=out,
                    stderr=out,
                    env=env,
                )
            until(lambda: http("GET", base + "/healthz")[0] == 200, 30, "the daemon", log)
            return proc

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "watchtower", *args, "-c", str(cfg)],
                capture_output=True,
                text=True,
                env=env,
            )

        def mails(to: str) -> list[str]:
            return [m.text for m in smtp.messages if f"{to}@drill.test" in m.to and "DRILL -" in m.text]

        proc = start()
        try:
            run = cli("drill", "run", "--compress", "0.01", "--by", "tester")
            assert run.returncode == 0, run.stderr
            assert "drill #1 running" in run.stdout
            assert cli("drill", "run").returncode != 0  # one drill at a time
            alice_sent = "SELECT 1 FROM notifications WHERE step = 'drill:1:alice' AND state = 'sent'"
            until(lambda: query(db, alice_sent), 20, "alice's DRILL message sent", log)
            # SIGKILL mid-drill: bob's message is due 6 s after the start, carol's after 12 s.
            assert not query(db, "SELECT 1 FROM notifications WHERE step = 'drill:1:bob'"), "too slow to test"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start()

            (alice_text,) = mails("alice")
            link, drill_id, _ = LINK.search(alice_text).groups()  # type: ignore[union-attr]
            assert drill_id == "1"
            # a GET (a link preview) does not confirm: it shows a button
            status, page = http("GET", link)
            assert status == 200 and '<form method="post">' in page
            status, page = http("POST", link, b"", "application/x-www-form-urlencoded")
            assert status == 200 and "Confirmed" in page, page
            status, page = http("POST", link, b"", "application/x-www-form-urlencoded")
            assert status == 409 and "already used" in page  # a link works once
            until(lambda: mails("bob") and mails("carol"), 30, "bob's and carol's DRILL messages", log)
            (bob_text,) = mails("bob")
            bob_id, bob_token = TOKEN.search(bob_text).groups()  # type: ignore[union-attr]
            confirm = cli("drill", "confirm", bob_id, bob_token)
            assert confirm.returncode == 0 and "bob confirmed" in confirm.stdout, confirm.stderr
            assert cli("drill", "confirm", bob_id, bob_token).returncode != 0
            assert http("POST", f"{base}/api/v1/drills/1/confirm/{'0' * 32}")[0] == 404

            until(lambda: query(db, "SELECT state FROM drills WHERE id = 1 AND state != 'running'"), 40,
                  "the drill to finish", log)  # fmt: skip
            # compressed time: 10m and 20m steps came after 6 s and 12 s, not before, not 10 minutes later
            offsets = dict(
                query(
                    db,
                    "SELECT substr(n.step, 9), MIN(n.created_at) - d.started_at FROM notifications n, "
                    "drills d WHERE d.id = 1 AND n.step LIKE 'drill:1:%' GROUP BY n.step",
                )
            )
            assert offsets["alice"] < 5 and 6 <= offsets["bob"] < 30 and 12 <= offsets["carol"] < 40, offsets
            results = dict(query(db, "SELECT contact, result FROM drill_contacts WHERE drill = 1"))
            assert results["alice"].startswith("reached in ") and "via mail-alice (link)" in results["alice"]
            assert results["bob"].startswith("reached in ") and "via mail-bob (cli)" in results["bob"]
            assert results["carol"].startswith("not confirmed in 20s")
            assert query(db, "SELECT state FROM drills") == [("failed",)]
            # the token is stored hashed only: no row holds it
            assert not query(db, f"SELECT 1 FROM drill_contacts WHERE token_hash = '{bob_token}'")
            assert not query(db, f"SELECT 1 FROM notifications WHERE body LIKE '%{bob_token}%'")

            # a failed drill is a warning through every channel, never an incident or a page
            until(lambda: len([m for m in smtp.messages if "WARNING: DRILL 1" in m.subject]) == 3, 20,
                  "the drill warning on every channel", log)  # fmt: skip
            assert query(db, "SELECT COUNT(*) FROM incidents") == [(0,)]
            kinds = {k for (k,) in query(db, "SELECT DISTINCT kind FROM notifications")}
            assert kinds == {"drill", "warning"}
            # nothing lost, nothing repeated across the SIGKILL
            assert [len(mails(n)) for n in ("alice", "bob", "carol")] == [1, 1, 1]

            status, page = http("GET", base + "/")
            assert status == 200
            assert "People and drills" in page and "reached in" in page and "not confirmed in 20s" in page
            status, text = http("GET", base + "/metrics")
            verified = dict(
                re.findall(
                    r'watchtower_contact_last_verified_timestamp_seconds\{contact="(\w+)"\} (\S+)', text
                )
            )
            assert (
                float(verified["alice"]) > 1e9
                and float(verified["bob"]) > 1e9
                and float(verified["carol"]) == 0
            )
            listing = cli("drills")
            assert listing.returncode == 0
            assert (
                "drill #1 failed" in listing.stdout
                and "carol" in listing.stdout
                and "OVERDUE" in listing.stdout
            )
            api = json.loads(http("GET", base + "/api/v1/drills")[1])
            assert [c["contact"] for c in api["contacts"] if c["overdue"]] == ["carol"]
            assert "token" not in json.dumps(api)
        finally:
            stop_process(proc)
            listener.close()
