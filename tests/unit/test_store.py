"""The SQLite store: schema versions, one-transaction commits, dedup, attempts, retention, reload."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState
from watchtower.store import DB_NAME, MIGRATIONS, NewNotification, Store, StoreError


def incident(n: int = 1, at: float = 1000.0) -> Incident:
    return (
        Incident(
            n, Scope.HYPERVISOR, "pve1", at, cause=Cause.POWER_OFF, affected=("dc1", "mail1"),
            first_failure_at=at - 12,
        )
        .noted(at - 12, "first_failure", "first failed probe of pve1")
        .noted(at, "opened", "confirmed: hypervisor pve1 down")
    )  # fmt: skip


def page(n: int = 1, channel: str = "signal", step: str = "step0") -> NewNotification:
    return NewNotification(n, step, "page", channel, "title", "body")


def test_fresh_store_has_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    store = Store.in_dir(tmp_path / "state")
    assert store.version == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.integrity_check() == "ok"
    assert (tmp_path / "state" / DB_NAME).exists()


def test_a_newer_schema_is_refused_not_touched(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    sqlite3.connect(db).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this watchtower knows"):
        Store(db)


def test_commit_writes_incident_timeline_steps_and_messages_once(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_NAME)
    inc = incident()
    added = store.commit([inc], [page(), page(channel="sms")], [(1, "step0")], now=1001.0)
    assert [(n.channel, n.state, n.created_at) for n in added] == [
        ("signal", "pending", 1001.0),
        ("sms", "pending", 1001.0),
    ]
    # The same decision again (a restart, a race): no second row, nothing to send twice.
    assert store.commit([inc], [page()], [(1, "step0")], now=1002.0) == []
    assert len(store.notifications(1)) == 2 and store.steps(1) == {(1, "step0")}

    inc = replace(
        inc.noted(1010.0, "ack", "acknowledged by alice"),
        state=IncidentState.ACKNOWLEDGED, acknowledged_at=1010.0, acknowledged_by="alice",
    )  # fmt: skip
    store.commit([inc])
    store.close()

    again = Store(tmp_path / DB_NAME).incident(1)
    assert again is not None
    assert (again.state, again.acknowledged_by, again.cause, again.affected) == (
        IncidentState.ACKNOWLEDGED, "alice", Cause.POWER_OFF, ("dc1", "mail1"),
    )  # fmt: skip
    assert [e.kind for e in again.timeline] == ["first_failure", "opened", "ack"]


def test_attempts_retry_then_sent_or_given_up(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_NAME)
    a, b = store.commit([incident()], [page(), page(channel="sms")], now=1000.0)
    store.record_attempt(a.id, 1001.0, False, "connection refused", 1003.0)
    store.record_attempt(a.id, 1003.0, True, None, None)
    store.record_attempt(b.id, 1001.0, False, "HTTP 500", None)  # given up
    rows = {n.channel: n for n in store.notifications(1)}
    assert (rows["signal"].state, rows["signal"].attempts, rows["signal"].sent_at) == ("sent", 2, 1003.0)
    assert (rows["sms"].state, rows["sms"].error) == ("failed", "HTTP 500")
    assert store.pending() == []
    assert [(x.ok, x.error) for x in store.attempts(1)] == [
        (False, "connection refused"), (False, "HTTP 500"), (True, None),
    ]  # fmt: skip


def test_pending_survives_a_reopen_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_NAME)
    store.commit([incident()], [page(step="step0"), page(step="ack:1")], now=1000.0)
    store.close()
    assert [n.step for n in Store(tmp_path / DB_NAME).pending()] == ["step0", "ack:1"]


def test_retention_purges_old_resolved_incidents_with_everything_hanging_off_them(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_NAME)
    old, recent = (
        replace(i, state=IncidentState.RESOLVED, resolved_at=i.opened_at + 60)
        for i in (incident(1, 1000.0), incident(2, 5000.0))
    )
    still_open = incident(3, 100.0)
    (n,) = store.commit([old, recent, still_open], [page(1)], [(1, "step0")], now=1000.0)
    store.record_attempt(n.id, 1001.0, True, None, None)
    assert store.purge(before=4000.0) == 1
    assert [i.id for i in store.incidents()] == [3, 2]  # the open one stays, however old
    assert store.notifications(1) == [] and store.steps(1) == set() and store.attempts(1) == []
    assert store.db.execute("SELECT COUNT(*) FROM timeline WHERE incident = 1").fetchone()[0] == 0
    assert store.integrity_check() == "ok"


def test_open_and_recent_incidents_and_blind_windows(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_NAME)
    a = replace(incident(1, 1000.0), state=IncidentState.RESOLVED, resolved_at=1100.0)
    b = incident(2, 2000.0)
    blind = Incident(3, Scope.MONITOR, "acme", 1050.0, state=IncidentState.RESOLVED, resolved_at=1080.0)
    store.commit([a, b, blind])
    assert [i.id for i in store.incidents(open_only=True)] == [2]
    assert {i.id for i in store.incidents(open_only=True, since=1090.0)} == {1, 2}
    assert store.blind_windows(1000.0, 1100.0) == [(1050.0, 1080.0)]
    assert store.blind_windows(1081.0, 1100.0) == []
    assert store.max_incident_id() == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    state = tmp_path / "ro"
    state.mkdir()
    state.chmod(0o500)
    with pytest.raises(StoreError):
        Store.in_dir(state)


def test_a_read_only_database_is_a_store_error_on_write_not_a_crash(tmp_path: Path) -> None:
    Store(tmp_path / DB_NAME).close()
    store = Store(tmp_path / DB_NAME)
    store.db.execute("PRAGMA query_only = ON")  # what a read-only or full disk looks like to a writer
    with pytest.raises(StoreError):
        store.commit([incident()], [page()], now=1.0)
    store.db.execute("PRAGMA query_only = OFF")
    assert store.commit([incident()], [page()], now=2.0)  # and it recovers when writes work again


def test_concurrent_opens_of_a_new_file_migrate_it_once(tmp_path: Path) -> None:
    """The daemon creating its store while a CLI (or a test) opens it too: nobody fails with
    "table ... already exists", everyone ends at the current version."""
    import threading

    from watchtower.store import MIGRATIONS

    for round_ in range(15):
        path = tmp_path / f"race{round_}.sqlite"
        errors: list[BaseException] = []
        versions: list[int] = []
        go = threading.Barrier(6)

        def open_it(path: Path = path, errors: list[BaseException] = errors, versions: list[int] = versions,
                    go: threading.Barrier = go) -> None:  # fmt: skip
            go.wait()
            try:
                store = Store(path)
                versions.append(store.version)
                store.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert versions == [len(MIGRATIONS)] * 6


# --------------------------------------------------------------------------- issue 15: broken files


def filled(path: Path) -> None:
    """A store with two incidents, their timelines, a sent page and its attempt; closed, so the
    WAL is checkpointed into the file and the file alone holds everything."""
    store = Store(path)
    added = store.commit(
        [incident(1), incident(2, 1100.0)], [page(1), page(2)], [(1, "step0"), (2, "step0")], 1.0
    )
    store.record_attempt(added[0].id, 2.0, True, None, None)
    store.close()


def corrupt_table(path: Path, table: str) -> None:
    db = sqlite3.connect(path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("empty", r"is empty \(0 bytes\)"),
        ("garbage", "is not an SQLite database"),
        ("truncated", "is corrupt"),
        ("directory", "is a directory"),
        ("table page", "is corrupt"),
    ],
)
def test_a_broken_file_is_a_store_error_naming_it_never_a_new_database(
    tmp_path: Path, breakage: str, message: str
) -> None:
    db = tmp_path / DB_NAME
    filled(db)
    if breakage == "empty":
        db.write_bytes(b"")
    elif breakage == "garbage":
        db.write_bytes(b"\x00garbage" * 1000 + db.read_bytes()[8000:])
    elif breakage == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3])
    elif breakage == "directory":
        db.unlink()
        db.mkdir()
    else:
        corrupt_table(db, "timeline")
    before = db.read_bytes() if db.is_file() else None
    with pytest.raises(StoreError, match=message) as err:
        Store(db)
    assert str(db) in str(err.value)
    if before is not None:
        assert db.read_bytes() == before  # evidence left as it was: no new database over it


def test_reads_of_a_page_corrupted_while_open_are_store_errors(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    filled(db)
    corrupt_table(db, "notifications")
    # A page that goes bad after start-up (the check at open would refuse the file): a Store
    # around a plain connection to it.
    store = Store.__new__(Store)
    store.path, store.db, store._persisted = db, sqlite3.connect(db, isolation_level=None), {}
    for read in (store.pending, store.notifications):
        with pytest.raises(StoreError, match="database disk image is malformed"):
            read()


def test_salvage_reads_what_survives_and_names_what_does_not(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    filled(db)
    corrupt_table(db, "timeline")
    memory = Store(":memory:")
    salvage = memory.salvage(db)
    assert salvage.rows == {"incidents": 2, "steps": 2, "notifications": 2, "attempts": 1}
    assert list(salvage.lost) == ["timeline"] and not salvage.complete
    assert memory.steps() == {(1, "step0"), (2, "step0")}
    assert [n.state for n in memory.notifications()] == ["sent", "pending"]
    assert [i.id for i in memory.incidents(open_only=True)] == [2, 1]
    nothing = Store(":memory:").salvage(tmp_path / "missing.sqlite")
    assert set(nothing.lost) == {"incidents", "timeline", "steps", "notifications", "attempts"}


def test_one_process_per_state_dir(tmp_path: Path) -> None:
    import subprocess
    import sys

    from watchtower.store import StoreLock, StoreLocked

    lock = StoreLock.acquire(tmp_path)
    code = (
        "import sys; from pathlib import Path; from watchtower.store import StoreLock, StoreLocked\n"
        "try:\n    StoreLock.acquire(Path(sys.argv[1]))\n"
        "except StoreLocked as e:\n    print(e); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout, other
    with pytest.raises(StoreLocked):
        StoreLock.acquire(tmp_path)  # a second open file description in this process too
    lock.release()
    again = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again


def test_store_cli_check_reset_and_repair_of_a_good_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from watchtower.cli import main

    cfg = tmp_path / "wt.yaml"
    state = tmp_path / "state"
    cfg.write_text(
        f"site: s\nstate_dir: {state}\ntargets:\n  a: {{role: service, paths: [tcp: 127.0.0.1:9]}}\n"
    )
    assert main(["store", "check", "-c", str(cfg)]) == 0 and "no database yet" in capsys.readouterr().out
    state.mkdir()
    filled(state / DB_NAME)
    assert main(["store", "check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "incidents: 2 rows" in out and out.rstrip().endswith(": ok")
    assert main(["store", "repair", "-c", str(cfg)]) == 0 and "nothing to repair" in capsys.readouterr().out
    (state / DB_NAME).write_bytes(b"")
    assert main(["store", "check", "-c", str(cfg)]) == 1 and "is empty" in capsys.readouterr().out
    assert main(["store", "reset", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "kept the old database as" in out and "created a new, empty" in out
    assert [
        p.stat().st_size for p in state.glob(f"{DB_NAME}.broken-*") if p.name[-4:] not in ("-wal", "-shm")
    ] == [0]
    assert Store(state / DB_NAME).integrity_check() == "ok"


def test_a_new_store_appears_whole(tmp_path: Path) -> None:
    """Created under a temporary name and renamed into place: a reader (the CLI, a test) that
    opens it meanwhile never finds a zero-byte file, which would be refused as damage."""
    Store(tmp_path / DB_NAME).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]
    data = (tmp_path / DB_NAME).read_bytes()
    assert data.startswith(b"SQLite format 3\x00") and len(data) >= 4096
    assert Store(tmp_path / DB_NAME).version == len(MIGRATIONS)
