"""SQLite store: incidents, their timelines, the notification outbox and its delivery attempts.

The only module that writes SQL. One file in ``state_dir`` (WAL, ``synchronous=FULL``: an alert
the store accepted survives ``kill -9`` and a power cut). The schema is versioned with
``PRAGMA user_version`` and migrated forward at open.

All methods are synchronous and must run on one thread: :class:`AsyncStore` wraps them in a
single-thread executor so the event loop never waits for a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState, TimelineEvent
from watchtower.engine.maintenance import Mute

T = TypeVar("T")
P = ParamSpec("P")

DB_NAME = "watchtower.sqlite"
LOCK_NAME = "watchtower.lock"
SQLITE_HEADER = b"SQLite format 3\x00"

# Each entry migrates from version i to i+1. Never edit a shipped entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        scope TEXT NOT NULL,
        root TEXT NOT NULL,
        cause TEXT,
        state TEXT NOT NULL,
        opened_at REAL NOT NULL,
        first_failure_at REAL,
        acknowledged_at REAL,
        acknowledged_by TEXT,
        resolved_at REAL,
        flaps INTEGER NOT NULL DEFAULT 0,
        merged_into INTEGER,
        affected TEXT NOT NULL DEFAULT '[]',
        back TEXT NOT NULL DEFAULT '[]',
        evidence TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX incidents_state ON incidents(state);
    CREATE TABLE timeline (
        incident INTEGER NOT NULL REFERENCES incidents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (incident, seq)
    );
    CREATE TABLE notifications (
        id INTEGER PRIMARY KEY,
        incident INTEGER NOT NULL,
        step TEXT NOT NULL,
        kind TEXT NOT NULL,
        channel TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_attempt_at REAL,
        sent_at REAL,
        error TEXT,
        UNIQUE (incident, step, channel)
    );
    CREATE INDEX notifications_pending ON notifications(state, channel, id);
    CREATE TABLE attempts (
        notification INTEGER NOT NULL REFERENCES notifications(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        ok INTEGER NOT NULL,
        error TEXT
    );
    CREATE INDEX attempts_notification ON attempts(notification);
    CREATE TABLE steps (
        incident INTEGER NOT NULL,
        step TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (incident, step)
    );
    """,
    # issue 17: alert-chain drills, one row per drill and per contact drilled (tokens hashed)
    """
    CREATE TABLE drills (
        id INTEGER PRIMARY KEY,
        started_at REAL NOT NULL,
        compress REAL NOT NULL,
        confirm_within REAL NOT NULL,
        requested_by TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'running',
        finished_at REAL
    );
    CREATE TABLE drill_contacts (
        drill INTEGER NOT NULL REFERENCES drills(id) ON DELETE CASCADE,
        contact TEXT NOT NULL,
        step INTEGER,
        token_hash TEXT NOT NULL,
        due_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        confirmed_at REAL,
        confirmed_via TEXT,
        result TEXT,
        PRIMARY KEY (drill, contact)
    );
    CREATE UNIQUE INDEX drill_contacts_token ON drill_contacts(drill, token_hash);
    """,
    # issue 19: maintenance mutes (watchtower mute, POST /api/v1/mutes); they survive a restart
    """
    CREATE TABLE mutes (
        id INTEGER PRIMARY KEY,
        target TEXT NOT NULL,
        start REAL NOT NULL,
        end REAL NOT NULL,
        reason TEXT NOT NULL,
        by TEXT NOT NULL,
        created_at REAL NOT NULL,
        ended_by TEXT
    );
    CREATE INDEX mutes_end ON mutes(end);
    """,
)


@dataclass(frozen=True, slots=True)
class Notification:
    """One message for one channel: a row of the outbox, and afterwards the record of it."""

    id: int
    incident: int  # 0 for watchtower's own warnings (a channel failing) and test messages
    step: str  # dedup key within the incident: "step0", "update:2", "ack", "resolve:0", ...
    kind: str  # page | escalation | update | ack | reopen | resolve | warning | test
    channel: str
    title: str
    body: str
    created_at: float
    state: str  # pending | sent | failed (given up)
    attempts: int
    next_attempt_at: float
    last_attempt_at: float | None
    sent_at: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Attempt:
    notification: int
    at: float
    ok: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class NewNotification:
    """What the alerting decided to send; the store gives it an id (or drops it as a duplicate)."""

    incident: int
    step: str
    kind: str
    channel: str
    title: str
    body: str


@dataclass(frozen=True, slots=True)
class DrillContact:
    contact: str
    step: int | None  # the escalation step that first names them (None: in no step)
    token_hash: str
    due_at: float  # when their DRILL message is due (compressed)
    expires_at: float  # their link stops working; unconfirmed by then = not reached
    confirmed_at: float | None = None
    confirmed_via: str | None = None
    result: str | None = None  # the sentence, once the drill is over


@dataclass(frozen=True, slots=True)
class Drill:
    id: int
    started_at: float
    compress: float
    confirm_within: float
    requested_by: str
    state: str  # running | passed | failed
    finished_at: float | None
    contacts: tuple[DrillContact, ...]


class StoreError(Exception):
    """The state directory cannot be used (missing, read-only, full, corrupt)."""


class StoreLocked(OSError):
    """Another watchtower holds the state directory."""


def _reading(fn: Callable[P, T]) -> Callable[P, T]:
    """A read that meets a corrupt page raises StoreError like a write does, never a bare
    sqlite3.DatabaseError that would end the daemon."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            raise StoreError(f"{getattr(store, 'path', '?')}: {exc}") from exc

    return wrapper


def file_problem(path: Path) -> str | None:
    """What is wrong with the database file before SQLite opens it (which would treat an empty
    file as a new database and lose the history without a word), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if path.is_dir():
        return f"{path} is a directory, not a database file"
    if st.st_size == 0:
        return f"{path} is empty (0 bytes): the history it held is gone"
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if head != SQLITE_HEADER:
        return f"{path} is not an SQLite database (its header is wrong)"
    return None


def _create(path: Path) -> None:
    """A new database appears whole, made under a temporary name and linked into place: nothing that
    opens it, now or after a crash, ever finds a half-made (zero-byte) file at ``path``, so a
    zero-byte file there is always damage (see :func:`file_problem`)."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            for version in range(len(MIGRATIONS)):
                db.executescript(
                    f"BEGIN IMMEDIATE;{MIGRATIONS[version]};PRAGMA user_version = {version + 1};COMMIT;"
                )
        finally:
            db.close()  # the last connection: the WAL is checkpointed into the file and removed
        # link, not rename: it never replaces a file another opener put there meanwhile
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as exc:  # a file system without hard links
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            os.replace(tmp, path)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot create: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot create: {exc.strerror or exc}") from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(OSError):
                leftover.unlink()


@dataclass(slots=True)
class Salvage:
    """What could be read out of a broken database: rows per table, and the tables that failed."""

    rows: dict[str, int] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.lost

    def summary(self) -> str:
        got = ", ".join(f"{t} {n}" for t, n in self.rows.items())
        lost = "; ".join(f"{t}: {e}" for t, e in self.lost.items())
        return f"read {got or 'nothing'}" + (f"; unreadable {lost}" if lost else "")


SALVAGE_TABLES = ("incidents", "timeline", "steps", "notifications", "attempts")


class StoreLock:
    """One watchtower per state directory: an exclusive ``flock`` on ``watchtower.lock``, which
    holds the owner's PID. Two daemons on one store would each deliver every pending page."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StoreLock:
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise StoreLocked(
                f"state_dir {state_dir} is in use by another watchtower (pid {owner}); "
                "one instance per state directory"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _incident_row(i: Incident) -> tuple[Any, ...]:
    return (
        i.id, i.scope.value, i.root, i.cause.value if i.cause else None, i.state.value, i.opened_at,
        i.first_failure_at, i.acknowledged_at, i.acknowledged_by, i.resolved_at, i.flaps, i.merged_into,
        json.dumps(i.affected), json.dumps(i.back), json.dumps(i.evidence),
    )  # fmt: skip


_INCIDENT_COLUMNS = (
    "id, scope, root, cause, state, opened_at, first_failure_at, acknowledged_at, acknowledged_by, "
    "resolved_at, flaps, merged_into, affected, back, evidence"
)
_UPSERT = ", ".join(f"{c} = excluded.{c}" for c in _INCIDENT_COLUMNS.split(", ")[1:])
_NOTIFICATION_COLUMNS = (
    "id, incident, step, kind, channel, title, body, created_at, state, attempts, next_attempt_at, "
    "last_attempt_at, sent_at, error"
)


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._persisted: dict[int, int] = {}  # incident id -> timeline events already written
        self._thread: int | None = None
        memory = str(path) == ":memory:"
        if not memory and not self.path.exists():
            _create(self.path)
        problem = None if memory else file_problem(self.path)
        if problem is not None:
            raise StoreError(problem)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        try:
            # Switching a new file to WAL needs it to itself: a second opener at that moment gets
            # "database is locked" at once (SQLite's busy timeout does not cover it), so try again.
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    self.db.execute("PRAGMA journal_mode=WAL")
                    self.db.execute("PRAGMA synchronous=FULL")
                    self.db.execute("PRAGMA foreign_keys=ON")
                    self._migrate()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            if not memory:
                # Every page once at start (46 ms for 10,000 incidents, bench/bench_store_open.py):
                # a corrupt page found now is one clear error, not a crash while alerting.
                result = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
                if result != ["ok"]:
                    raise StoreError(f"{self.path} is corrupt: {'; '.join(map(str, result))}")
        except (sqlite3.Error, StoreError) as exc:
            self.db.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
                raise StoreError(f"{self.path} is corrupt: {exc}") from exc
            raise StoreError(f"{self.path}: {exc}") from exc

    @classmethod
    def in_dir(cls, state_dir: Path) -> Store:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"state_dir {state_dir}: {exc.strerror or exc}") from exc
        return cls(state_dir / DB_NAME)

    def close(self) -> None:
        self.db.close()

    def salvage(self, source: Path) -> Salvage:
        """Copy what can be read of the broken database ``source`` into this one, table by table
        and row by row up to the first unreadable page (opened read-only: the broken file is
        evidence and stays as it is). Foreign keys are off meanwhile: a timeline whose incident
        row was lost is still worth keeping."""
        out = Salvage()
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error as exc:
            out.lost = dict.fromkeys(SALVAGE_TABLES, str(exc))
            return out
        self.db.execute("PRAGMA foreign_keys=OFF")
        try:
            for table in SALVAGE_TABLES:
                try:
                    ours = [r[1] for r in self.db.execute(f"PRAGMA table_info({table})")]
                    theirs = {r[1] for r in src.execute(f"PRAGMA table_info({table})")}
                    cols = [c for c in ours if c in theirs]
                    if not cols:
                        raise sqlite3.DatabaseError("table missing")
                    names, marks = ", ".join(cols), ", ".join("?" * len(cols))
                    insert = f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})"
                    copied = 0
                    cursor = src.execute(f"SELECT {names} FROM {table}")
                    try:
                        while batch := cursor.fetchmany(500):
                            self.db.executemany(insert, batch)
                            copied += len(batch)
                    finally:
                        out.rows[table] = copied
                except sqlite3.Error as exc:
                    out.lost[table] = str(exc)
        finally:
            src.close()
            self.db.execute("PRAGMA foreign_keys=ON")
        return out

    # ------------------------------------------------------------------ schema
    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        """Each migration in its own transaction, the version read under the write lock: two
        processes opening a new file at once (the daemon starting, a CLI reading) must not both
        run the same migration (seen: "table incidents already exists")."""
        while True:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                current = self.version
                if current > len(MIGRATIONS):
                    raise StoreError(
                        f"{self.path} has schema version {current}, newer than this watchtower knows "
                        f"({len(MIGRATIONS)}): refusing to touch it"
                    )
                if current == len(MIGRATIONS):
                    self.db.execute("COMMIT")
                    return
                # One migration, one transaction: it lands whole or not at all.
                for statement in MIGRATIONS[current].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {current + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)

    @_reading
    def integrity_check(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    # ------------------------------------------------------------------ writing
    def commit(
        self,
        incidents: Iterable[Incident] = (),
        notifications: Sequence[NewNotification] = (),
        steps: Iterable[tuple[int, str]] = (),
        now: float = 0.0,
    ) -> list[Notification]:
        """One transaction: the incidents as they are now (with their new timeline events), the
        escalation steps that fired, and the messages they cause. Returns the notifications that
        were new (a duplicate of (incident, step, channel) is dropped: at-least-once, never twice)."""
        added: list[Notification] = []
        persisted = dict(self._persisted)
        with self._tx():
            for incident in incidents:
                # An upsert, not INSERT OR REPLACE: a replace deletes the row first, and the
                # foreign key's cascade would take the timeline with it.
                self.db.execute(
                    f"INSERT INTO incidents ({_INCIDENT_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
                    f"ON CONFLICT (id) DO UPDATE SET {_UPSERT}",
                    _incident_row(incident),
                )
                start = persisted.get(incident.id, 0)
                self.db.executemany(
                    "INSERT OR REPLACE INTO timeline (incident, seq, at, kind, text) VALUES (?, ?, ?, ?, ?)",
                    [
                        (incident.id, seq, e.at, e.kind, e.text)
                        for seq, e in enumerate(incident.timeline[start:], start)
                    ],
                )
                persisted[incident.id] = len(incident.timeline)
            self.db.executemany(
                "INSERT OR IGNORE INTO steps (incident, step, at) VALUES (?, ?, ?)",
                [(i, s, now) for i, s in steps],
            )
            for n in notifications:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO notifications (incident, step, kind, channel, title, body, "
                    "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (n.incident, n.step, n.kind, n.channel, n.title, n.body, now, now),
                )
                if cur.rowcount:
                    added.append(
                        Notification(
                            int(cur.lastrowid or 0), n.incident, n.step, n.kind, n.channel, n.title, n.body,
                            now, "pending", 0, now, None, None, None,
                        )
                    )  # fmt: skip
        self._persisted = persisted
        return added

    def adopt(
        self, rows: Sequence[Notification], steps: Iterable[tuple[int, str]], now: float
    ) -> dict[tuple[int, str, str], int]:
        """Write messages (and the steps that caused them) that could only be kept in memory while
        the store was failing, as they are now (sent or still pending). Returns the stored id of
        each by (incident, step, channel), so the alerting can go on with durable rows."""
        ids: dict[tuple[int, str, str], int] = {}
        with self._tx():
            self.db.executemany(
                "INSERT OR IGNORE INTO steps (incident, step, at) VALUES (?, ?, ?)",
                [(i, s, now) for i, s in steps],
            )
            for n in rows:
                self.db.execute(
                    "INSERT OR IGNORE INTO notifications (incident, step, kind, channel, title, body, "
                    "created_at, state, attempts, next_attempt_at, last_attempt_at, sent_at, error) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (n.incident, n.step, n.kind, n.channel, n.title, n.body, n.created_at, n.state,
                     n.attempts, n.next_attempt_at, n.last_attempt_at, n.sent_at, n.error),
                )  # fmt: skip
                (row_id,) = self.db.execute(
                    "SELECT id FROM notifications WHERE incident = ? AND step = ? AND channel = ?",
                    (n.incident, n.step, n.channel),
                ).fetchone()
                ids[(n.incident, n.step, n.channel)] = int(row_id)
        return ids

    def record_attempt(
        self, notification: int, at: float, ok: bool, error: str | None, next_attempt_at: float | None
    ) -> None:
        """A delivery attempt's outcome. ``next_attempt_at`` None with ``ok`` False means give up."""
        state = "sent" if ok else ("pending" if next_attempt_at is not None else "failed")
        with self._tx():
            self.db.execute(
                "INSERT INTO attempts (notification, at, ok, error) VALUES (?, ?, ?, ?)",
                (notification, at, int(ok), error),
            )
            self.db.execute(
                "UPDATE notifications SET state = ?, attempts = attempts + 1, last_attempt_at = ?, "
                "sent_at = CASE WHEN ? THEN ? ELSE sent_at END, error = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
                (state, at, int(ok), at, None if ok else error, next_attempt_at, notification),
            )

    def purge(self, before: float) -> int:
        """Retention: delete incidents resolved before ``before`` with everything hanging off them."""
        with self._tx():
            ids = [
                r[0]
                for r in self.db.execute(
                    "SELECT id FROM incidents WHERE state = 'resolved' AND resolved_at < ?", (before,)
                )
            ]
            for chunk in range(0, len(ids), 500):
                part = ids[chunk : chunk + 500]
                marks = ", ".join("?" * len(part))
                self.db.execute(
                    f"DELETE FROM attempts WHERE notification IN "
                    f"(SELECT id FROM notifications WHERE incident IN ({marks}))",
                    part,
                )
                for table, column in (("notifications", "incident"), ("steps", "incident"),
                                      ("timeline", "incident"), ("incidents", "id")):  # fmt: skip
                    self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", part)
            self.db.execute(
                "DELETE FROM attempts WHERE notification IN (SELECT id FROM notifications "
                "WHERE incident = 0 AND created_at < ?)",
                (before,),
            )
            self.db.execute("DELETE FROM notifications WHERE incident = 0 AND created_at < ?", (before,))
        for i in ids:
            self._persisted.pop(i, None)
        return len(ids)

    # ------------------------------------------------------------------ reading
    def _incident(self, row: Sequence[Any]) -> Incident:
        incident = Incident(
            id=row[0],
            scope=Scope(row[1]),
            root=row[2],
            opened_at=row[5],
            cause=Cause(row[3]) if row[3] else None,
            affected=tuple(json.loads(row[12])),
            state=IncidentState(row[4]),
            acknowledged_at=row[7],
            acknowledged_by=row[8],
            resolved_at=row[9],
            first_failure_at=row[6],
            evidence=tuple(json.loads(row[14])),
            flaps=row[10],
            merged_into=row[11],
            back=tuple(json.loads(row[13])),
        )
        timeline = tuple(
            TimelineEvent(at, kind, text)
            for at, kind, text in self.db.execute(
                "SELECT at, kind, text FROM timeline WHERE incident = ? ORDER BY seq", (incident.id,)
            )
        )
        self._persisted[incident.id] = len(timeline)
        root_back_at = None
        if incident.is_open:  # "root back, waiting for the rest" is read back from the timeline
            for event in timeline:
                if event.kind == "root_back":
                    root_back_at = event.at
                elif event.kind in ("root_failed", "reopened"):
                    root_back_at = None
        return replace(incident, timeline=timeline, root_back_at=root_back_at)

    @_reading
    def incident(self, incident_id: int) -> Incident | None:
        row = self.db.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?", (incident_id,)
        ).fetchone()
        return None if row is None else self._incident(row)

    @_reading
    def incidents(
        self, *, open_only: bool = False, since: float | None = None, limit: int = 1000
    ) -> list[Incident]:
        """Newest first. ``since``: also resolved ones resolved at or after it (for flap damping)."""
        where: list[str] = []
        args: list[float] = []
        if open_only and since is not None:
            where.append("(state != 'resolved' OR resolved_at >= ?)")
            args.append(since)
        elif open_only:
            where.append("state != 'resolved'")
        sql = f"SELECT {_INCIDENT_COLUMNS} FROM incidents"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        return [self._incident(r) for r in self.db.execute(sql, (*args, limit)).fetchall()]

    @_reading
    def max_incident_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM incidents").fetchone()[0])

    def _notification(self, row: Sequence[Any]) -> Notification:
        return Notification(*row)

    @_reading
    def notifications(self, incident: int | None = None) -> list[Notification]:
        sql = f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications"
        rows = (
            self.db.execute(sql + " ORDER BY id")
            if incident is None
            else self.db.execute(sql + " WHERE incident = ? ORDER BY id", (incident,))
        )
        return [self._notification(r) for r in rows]

    @_reading
    def pending(self) -> list[Notification]:
        rows = self.db.execute(
            f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE state = 'pending' ORDER BY id"
        )
        return [self._notification(r) for r in rows]

    @_reading
    def attempts(self, incident: int) -> list[Attempt]:
        rows = self.db.execute(
            "SELECT a.notification, a.at, a.ok, a.error FROM attempts a JOIN notifications n "
            "ON n.id = a.notification WHERE n.incident = ? ORDER BY a.at, a.rowid",
            (incident,),
        )
        return [Attempt(n, at, bool(ok), err) for n, at, ok, err in rows]

    @_reading
    def steps(self, incident: int | None = None) -> set[tuple[int, str]]:
        rows = (
            self.db.execute("SELECT incident, step FROM steps")
            if incident is None
            else self.db.execute("SELECT incident, step FROM steps WHERE incident = ?", (incident,))
        )
        return {(i, s) for i, s in rows}

    @_reading
    def blind_windows(self, start: float, end: float | None) -> list[tuple[float, float | None]]:
        """Monitor-blind windows (``monitor`` incidents) overlapping [start, end]."""
        rows = self.db.execute(
            "SELECT opened_at, resolved_at FROM incidents WHERE scope = 'monitor' "
            "AND opened_at <= ? AND (resolved_at IS NULL OR resolved_at >= ?) ORDER BY opened_at",
            (end if end is not None else float("inf"), start),
        )
        return [(a, b) for a, b in rows]

    # ------------------------------------------------------------------ mutes
    def add_mute(self, target: str, start: float, end: float, reason: str, by: str, now: float) -> Mute:
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO mutes (target, start, end, reason, by, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (target, start, end, reason, by, now),
            )
        assert cur.lastrowid is not None
        return Mute(cur.lastrowid, target, start, end, reason, by, now)

    def end_mute(self, mute_id: int, by: str, now: float) -> Mute | None:
        """Ends a mute now (unmute); None when there is no such mute still running."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE mutes SET end = ?, ended_by = ? WHERE id = ? AND end > ?", (now, by, mute_id, now)
            )
        if cur.rowcount != 1:
            return None
        row = self.db.execute(
            "SELECT id, target, start, end, reason, by, created_at FROM mutes WHERE id = ?", (mute_id,)
        ).fetchone()
        return Mute(*row)

    def mutes(self, active_at: float) -> list[Mute]:
        """Mutes not yet over at ``active_at`` (running or planned)."""
        rows = self.db.execute(
            "SELECT id, target, start, end, reason, by, created_at FROM mutes WHERE end > ? ORDER BY id",
            (active_at,),
        )
        return [Mute(*row) for row in rows]

    # ------------------------------------------------------------------ drills (issue 17)
    def start_drill(
        self, started_at: float, compress: float, confirm_within: float, by: str,
        contacts: Sequence[DrillContact], token_hash: Callable[[int, str], str],
    ) -> int:  # fmt: skip
        """A new drill and its contacts in one transaction; ``token_hash(drill, contact)`` gives
        each contact's link hash (it depends on the drill's id, known only in here)."""
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO drills (started_at, compress, confirm_within, requested_by) VALUES (?, ?, ?, ?)",
                (started_at, compress, confirm_within, by),
            )
            drill = int(cur.lastrowid or 0)
            self.db.executemany(
                "INSERT INTO drill_contacts (drill, contact, step, token_hash, due_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (drill, c.contact, c.step, token_hash(drill, c.contact), c.due_at, c.expires_at)
                    for c in contacts
                ],
            )
        return drill

    def drills(self, *, running_only: bool = False, limit: int = 50) -> list[Drill]:
        """Newest first."""
        where = "WHERE state = 'running' " if running_only else ""
        rows = self.db.execute(
            "SELECT id, started_at, compress, confirm_within, requested_by, state, finished_at "
            f"FROM drills {where}ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        out = []
        for row in rows:
            contacts = tuple(
                DrillContact(*c)
                for c in self.db.execute(
                    "SELECT contact, step, token_hash, due_at, expires_at, confirmed_at, confirmed_via, "
                    "result FROM drill_contacts WHERE drill = ? ORDER BY due_at, rowid",
                    (row[0],),
                )
            )
            drill_id, started, compress, within, by, state, finished = row
            out.append(Drill(drill_id, started, compress, within, by, state, finished, contacts))
        return out

    def confirm_drill(self, drill: int, token_hash: str, at: float, via: str) -> tuple[str | None, str]:
        """A confirmation link used: (contact, "confirmed") once; afterwards (contact, "used"),
        past its expiry (contact, "expired"), an unknown token (None, "unknown")."""
        with self._tx():
            row = self.db.execute(
                "SELECT contact, expires_at, confirmed_at FROM drill_contacts "
                "WHERE drill = ? AND token_hash = ?",
                (drill, token_hash),
            ).fetchone()
            if row is None:
                return None, "unknown"
            contact, expires_at, confirmed_at = row
            if confirmed_at is not None:
                return contact, "used"
            if at >= expires_at:
                return contact, "expired"
            self.db.execute(
                "UPDATE drill_contacts SET confirmed_at = ?, confirmed_via = ? "
                "WHERE drill = ? AND contact = ? AND confirmed_at IS NULL",
                (at, via, drill, contact),
            )
        return contact, "confirmed"

    def finish_drill(
        self, drill: int, state: str, results: Mapping[str, str], warnings: Sequence[NewNotification],
        at: float,
    ) -> list[Notification]:  # fmt: skip
        """The drill's outcome and the warning it causes, in one transaction (a crash in between
        neither loses the warning nor sends it twice: its step key is unique)."""
        with self._tx():
            self.db.execute(
                "UPDATE drills SET state = ?, finished_at = ? WHERE id = ? AND state = 'running'",
                (state, at, drill),
            )
            self.db.executemany(
                "UPDATE drill_contacts SET result = ? WHERE drill = ? AND contact = ?",
                [(text, drill, contact) for contact, text in results.items()],
            )
            added = []
            for n in warnings:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO notifications (incident, step, kind, channel, title, body, "
                    "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (n.incident, n.step, n.kind, n.channel, n.title, n.body, at, at),
                )
                if cur.rowcount:
                    added.append(
                        Notification(
                            int(cur.lastrowid or 0), n.incident, n.step, n.kind, n.channel, n.title, n.body,
                            at, "pending", 0, at, None, None, None,
                        )
                    )  # fmt: skip
        return added

    def drill_notifications(self, drill: int) -> list[Notification]:
        rows = self.db.execute(
            f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications "
            "WHERE incident = 0 AND step LIKE ? ORDER BY id",
            (f"drill:{drill}:%",),
        )
        return [self._notification(r) for r in rows]

    def last_verified(self) -> dict[str, float]:
        """contact -> the last time a drill confirmation reached them."""
        rows = self.db.execute(
            "SELECT contact, MAX(confirmed_at) FROM drill_contacts WHERE confirmed_at IS NOT NULL "
            "GROUP BY contact"
        )
        return {c: float(at) for c, at in rows}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error; errors of the disk become StoreError."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                exc = error
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(str(exc)) from exc


class AsyncStore:
    """The store behind one worker thread: calls run in order, the loop never touches the disk."""

    def __init__(self, store: Store, executor: ThreadPoolExecutor, *, durable: bool = True):
        self.store = store
        self._executor = executor
        # False for the in-memory stand-in of an unusable store: its commits succeed but keep
        # nothing across a restart, so they must never count as "the store works again".
        self.durable = durable

    @classmethod
    async def open(cls, state_dir: Path) -> AsyncStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        store = await asyncio.get_running_loop().run_in_executor(executor, Store.in_dir, state_dir)
        return cls(store, executor)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        await self.call(self.store.close)
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- the way out (CLI)


def check_file(path: Path) -> tuple[bool, list[str]]:
    """``watchtower store check``: is the database usable, and what does it hold. Read-only:
    safe while the daemon runs."""
    if not path.exists():
        return True, [f"{path}: no database yet (the daemon creates it)"]
    problem = file_problem(path)
    if problem is not None:
        return False, [problem]
    lines: list[str] = []
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            result = [str(r[0]) for r in db.execute("PRAGMA integrity_check(20)")]
            (version,) = db.execute("PRAGMA user_version").fetchone()
            lines.append(f"{path}: schema version {version} (this watchtower: {len(MIGRATIONS)})")
            if result != ["ok"]:
                return False, [*lines, *(f"{path}: {r}" for r in result)]
            for table in SALVAGE_TABLES:
                (count,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
                lines.append(f"{table}: {count} rows")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, [*lines, f"{path} is corrupt: {exc}"]
    return True, [*lines, f"{path}: ok"]


def _move_aside(path: Path) -> Path:
    """Rename the broken file (and its -wal/-shm, whose names must follow it) next to itself."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.broken-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.broken-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(backup.with_name(backup.name + suffix))
    path.rename(backup)
    return backup


def rebuild(state_dir: Path, *, salvage: bool) -> tuple[Path | None, Salvage | None]:
    """``watchtower store repair`` (``salvage``) or ``reset``: the database is moved aside (kept
    as evidence, ``watchtower.sqlite.broken-TIME``) and a new one created; ``repair`` copies into
    it what can be read of the old. Refuses while a daemon holds the state (StoreLocked)."""
    lock = StoreLock.acquire(state_dir)
    try:
        path = state_dir / DB_NAME
        backup = _move_aside(path) if path.exists() else None
        store = Store(path)
        try:
            result = store.salvage(backup) if salvage and backup is not None and backup.is_file() else None
        finally:
            store.close()
        return backup, result
    finally:
        lock.release()
