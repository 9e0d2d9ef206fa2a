"""Crash safety: ``watchtower run`` is SIGKILLed at random moments while incidents open, escalate,
get acknowledged and resolve, with the SMTP server up or down at random. After every restart and
at the end: no notification lost (every decided (incident, step, channel) ends ``sent`` and
arrived at the SMTP sink), none delivered twice, no incident duplicated, SQLite passes
``PRAGMA integrity_check``.

Delivery is at-least-once by design: a kill after the SMTP server accepted a message but before
the outbox recorded it as sent (a few milliseconds: the attempt's commit) makes the restarted
daemon send it again. The test tells such a duplicate apart from a bug: it is allowed only when a
copy arrived less than ``KILL_WINDOW`` before a kill AND the row was still unsent in the store
that the kill left behind. Every other duplicate fails the test.

CI runs ``WATCHTOWER_CRASH_RUNS`` (default 5) runs; ``WATCHTOWER_FULL=1`` runs 20. The seed of
each run is printed on failure (``WATCHTOWER_CRASH_SEED`` replays it).

Targets are TCP listeners on 127.0.0.1 the test opens and closes; the sink listens on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sinks import SmtpMessage, SmtpSink, mailto_url
from support import free_port

FULL = os.environ.get("WATCHTOWER_FULL") == "1"
RUNS = int(os.environ.get("WATCHTOWER_CRASH_RUNS", "20" if FULL else "5"))
BASE_SEED = int(os.environ.get("WATCHTOWER_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
CHAOS = 6.0  # seconds of random events per run
KILL_WINDOW = 1.0  # a copy that reached the sink this long before a kill may legitimately go again
SERVICES = ("erp1", "mail1", "files1")
RCPT = {"mail-a": "a@crash.test", "mail-b": "b@crash.test"}

pytestmark = pytest.mark.slow

# Totals over the runs of this session, printed at the end (the README's figures come from here).
TOTALS: Counter[str] = Counter()


class Listener:
    """A TCP service on 127.0.0.1 (accepts and closes) that can die and come back on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        return self.sock is not None

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.1)
        self.sock = sock
        self.thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self.thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while self.sock is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def stop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if self.thread is not None:
            self.thread.join(2)
            self.thread = None


@dataclass
class Kill:
    at: float  # time.monotonic() of the SIGKILL
    unsent: set[tuple[str, str]]  # (channel, title) of rows the store held as not yet sent


@dataclass
class Run:
    tmp: Path
    seed: int
    rng: random.Random
    smtp: SmtpSink
    services: dict[str, Listener]
    cfg: Path
    base: str
    db: Path
    log_path: Path
    arrivals: list[tuple[float, SmtpMessage]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    events: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic():.2f} {text}")

    def fail(self, what: str) -> str:
        tail = self.log_path.read_text(errors="replace")[-4000:]
        return f"seed {self.seed}: {what}\nevents:\n" + "\n".join(self.events[-40:]) + f"\nlog tail:\n{tail}"


def write_config(tmp: Path, smtp_port: int, services: dict[str, Listener]) -> tuple[Path, str]:
    listen = f"127.0.0.1:{free_port()}"
    doc: dict[str, Any] = {
        "site": "crash",
        "listen": listen,
        "state_dir": str(tmp / "state"),
        "defaults": {
            "interval": "300ms",
            "retry_interval": "100ms",
            "timeout": "200ms",
            "fail_after": 2,
            "recover_after": 2,
        },
        "targets": {
            name: {
                "role": "service",
                "paths": [{"tcp": f"127.0.0.1:{svc.port}"}],
                "service": {"name": name.upper(), "rto": "4h"},
            }
            for name, svc in services.items()
        },
        "notify": {
            "channels": [
                {"name": ch, "url": mailto_url(smtp_port, to=to), "tags": [f"tier{i}"]}
                for i, (ch, to) in enumerate(RCPT.items(), 1)
            ],
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "2s", "notify": ["tier2"], "unless": "acknowledged"},
            ],
            "retry_max": "1s",
            "all_clear_after": "0s",  # all-clears at once: the test counts them within its window
            "channel_warn_after": "1h",  # channel warnings (incident 0) are not what this test counts
        },
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, f"http://{listen}"


def http(url: str, body: Any = None, timeout: float = 2.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def until(run: Run, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(run.fail(f"timed out after {timeout}s waiting for {what}"))


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet (the daemon is starting)
        return []
    finally:
        conn.close()


def start(run: Run) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with run.log_path.open("a") as log:
        run.proc = subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(run.cfg)], stdout=log, stderr=log, env=env
        )
    run.note(f"start pid={run.proc.pid}")
    until(run, lambda: http(run.base + "/healthz", timeout=1)[0] in (200, 503), 20, "the daemon to answer")


def kill(run: Run) -> None:
    assert run.proc is not None
    run.proc.send_signal(signal.SIGKILL)
    at = time.monotonic()
    run.proc.wait(10)
    run.proc = None
    unsent = {
        (ch, title)
        for ch, title in query(run.db, "SELECT channel, title FROM notifications WHERE state != 'sent'")
    }
    run.kills.append(Kill(at, unsent))
    run.note(f"SIGKILL ({len(unsent)} unsent rows)")


def stop(run: Run) -> None:
    proc, run.proc = run.proc, None
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError(run.fail("SIGTERM did not stop the daemon within 15 s")) from None


def ack_one(run: Run) -> None:
    status, body = http(run.base + "/api/v1/incidents")
    if status != 200:
        return
    open_ = [i for i in json.loads(body) if i["state"] == "open"]
    if open_:
        incident = run.rng.choice(open_)
        status, _ = http(f"{run.base}/api/v1/incidents/{incident['id']}/ack", {"by": "crash-test"})
        run.note(f"ack #{incident['id']} -> {status}")


def chaos(run: Run) -> None:
    rng = run.rng
    end = time.monotonic() + CHAOS
    next_kill = time.monotonic() + rng.uniform(0.5, 2.5)
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_kill:
            kill(run)
            time.sleep(rng.choice((0.0, 0.0, rng.uniform(0.1, 1.0))))  # dead for a while, sometimes
            if rng.random() < 0.3:  # the world changes while nobody watches
                name = rng.choice(SERVICES)
                toggle(run, name)
            start(run)
            next_kill = time.monotonic() + rng.uniform(0.3, 2.5)
            continue
        action = rng.choices(("service", "smtp", "ack", "wait"), weights=(4, 1.5, 1, 2))[0]
        if action == "service":
            toggle(run, rng.choice(SERVICES))
        elif action == "smtp":
            if run.smtp.running:
                run.smtp.stop()
            else:
                run.smtp.start()
            run.note(f"smtp {'up' if run.smtp.running else 'down'}")
        elif action == "ack":
            ack_one(run)
        time.sleep(rng.uniform(0.1, 0.9))


def toggle(run: Run, name: str) -> None:
    svc = run.services[name]
    if svc.up:
        svc.stop()
    else:
        svc.start()
    run.note(f"{name} {'up' if svc.up else 'down'}")


def settled(run: Run) -> bool:
    """Everything decided is sent, nothing is open, and what the sink got covers the store."""
    if query(run.db, "SELECT 1 FROM incidents WHERE state != 'resolved' LIMIT 1"):
        return False
    if query(run.db, "SELECT 1 FROM notifications WHERE state != 'sent' LIMIT 1"):
        return False
    if not query(run.db, "SELECT 1 FROM incidents LIMIT 1"):
        return False
    sent = Counter(query(run.db, "SELECT channel, title FROM notifications"))
    got = Counter(_key(m) for _, m in list(run.arrivals))
    return all(got[k] >= n for k, n in sent.items())


def _key(m: SmtpMessage) -> tuple[str, str]:
    channel = next((ch for ch, to in RCPT.items() if to in m.rcpt_tos), "?")
    return channel, m.subject


def verify(run: Run) -> dict[str, int]:
    db = run.db
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", run.fail("integrity_check")
        incidents = conn.execute(
            "SELECT id, root, state, opened_at, resolved_at, merged_into FROM incidents ORDER BY id"
        ).fetchall()
        rows = conn.execute(
            "SELECT incident, step, channel, kind, title, state FROM notifications"
        ).fetchall()
        steps = conn.execute("SELECT incident, step FROM steps").fetchall()
    finally:
        conn.close()
    # No incident duplicated: per root, one outage at a time (the next opens after the last resolved).
    by_root: dict[str, list[tuple[Any, ...]]] = {}
    for row in incidents:
        if row[5] is None:
            by_root.setdefault(row[1], []).append(row)
    for root, rows_ in by_root.items():
        for a, b in itertools.pairwise(rows_):
            assert a[4] is not None and a[4] <= b[3] + 1e-6, run.fail(
                f"overlapping incidents of {root}: {a} {b}"
            )
    # Every incident was paged to tier 1; every fired notifying step has its messages.
    pages = {(i, ch) for i, step, ch, kind, _, _ in rows if step == "step0"}
    for row in incidents:
        if row[5] is None:
            assert (row[0], "mail-a") in pages, run.fail(f"incident #{row[0]} was never paged")
    fired = {(i, s) for i, s in steps}
    decided = {(i, s) for i, s, *_ in rows}
    for i, s in fired:
        if s == "step1":
            assert (i, s) in decided, run.fail(f"escalation of #{i} fired without a message")
    # Exactly once at the sink, but for a copy sent just before a kill that the store had not yet
    # recorded (at-least-once: the restarted daemon cannot know the server took it).
    sent = Counter((r[2], r[4]) for r in rows)
    got = Counter(_key(m) for _, m in run.arrivals)
    legit = 0
    for key, n in got.items():
        assert key in sent, run.fail(f"the sink got a message the store never decided: {key}")
        extra = n - sent[key]
        assert extra >= 0, run.fail(f"lost: {key} decided {sent[key]}x, arrived {n}x")
        if extra:
            times = [t for t, m in run.arrivals if _key(m) == key]
            explained = [
                k
                for k in run.kills
                if key in k.unsent and any(k.at - KILL_WINDOW <= t <= k.at for t in times)
            ]
            assert extra <= len(explained), run.fail(
                f"delivered twice: {key} decided {sent[key]}x, arrived {n}x; kills that explain it: "
                f"{len(explained)}"
            )
            legit += extra
    for _i, _s, ch, _k, title, _st in rows:
        assert got[(ch, title)] >= 1, run.fail(f"lost: {ch} {title}")
    return {
        "incidents": len(incidents),
        "messages": len(rows),
        "kills": len(run.kills),
        "escalations": sum(1 for r in rows if r[3] == "escalation"),
        "acks": sum(1 for r in rows if r[3] == "ack"),
        "resolves": sum(1 for r in rows if r[3] == "resolve"),
        "redelivered_after_kill": legit,
    }


@pytest.mark.parametrize("n", range(RUNS))
def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(tmp_path: Path, n: int) -> None:
    seed = BASE_SEED + n
    rng = random.Random(seed)
    services = {name: Listener() for name in SERVICES}
    for svc in services.values():
        svc.start()
    arrivals: list[tuple[float, SmtpMessage]] = []
    smtp = SmtpSink(on_message=lambda m: arrivals.append((time.monotonic(), m)))
    if rng.random() < 0.7:
        smtp.start()
    cfg, base = write_config(tmp_path, smtp.port, services)
    run = Run(
        tmp_path,
        seed,
        rng,
        smtp,
        services,
        cfg,
        base,
        tmp_path / "state" / "watchtower.sqlite",
        tmp_path / "daemon.log",
        arrivals,
    )
    try:
        start(run)
        # Everything up first, then two services fail so the run starts with incidents.
        until(run, lambda: http(base + "/healthz")[0] == 200, 20, "healthz")
        for name in rng.sample(SERVICES, 2):
            toggle(run, name)
        chaos(run)
        # The end: services and SMTP back, the daemon running; everything must arrive, once.
        if run.proc is None:
            start(run)
        for name, svc in services.items():
            if not svc.up:
                toggle(run, name)
        if not smtp.running:
            smtp.start()
        run.note("all up")
        until(run, lambda: settled(run), 60, "every incident resolved and every message sent")
        stop(run)
        figures = verify(run)
        TOTALS.update(figures)
        TOTALS["runs"] += 1
        print(f"crash-safety seed={seed} {figures} totals={dict(TOTALS)}")
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(5)
        smtp.stop()
        for svc in services.values():
            svc.stop()
