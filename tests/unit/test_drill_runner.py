"""Drills without a daemon: the compressed plan, the rows and their keys, outcomes, tokens, schedule."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from watchtower.config import Config, parse_config
from watchtower.drill import (
    TOKEN_MARK,
    URL_MARK,
    DrillError,
    DrillRunner,
    due_messages,
    outcome,
    parse_key,
    plan,
    verification_of,
)
from watchtower.engine.incidents import IncidentTracker
from watchtower.notify.outbox import Alerting
from watchtower.notify.sender import DeliveryResult
from watchtower.store import AsyncStore, Notification, Store

T0 = 1_796_000_000.0


def config(**over: Any) -> Config:
    doc: dict[str, Any] = {
        "site": "acme",
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"icmp": "10.213.10.23"}],
                "service": {"name": "ERP", "rto": "4h"},
            }
        },
        "contacts": {
            "alice": {"channels": ["mail-alice", "sms-alice"]},
            "bob": {"channels": ["mail-bob"], "on_call": True},
            "carol": {"channels": ["mail-carol"]},
            "dave": {"channels": ["mail-bob"], "verify_every": "30d"},
        },
        "notify": {
            "channels": [
                {"name": "mail-alice", "url": "mailto://127.0.0.1:1?to=a@lab.test"},
                {"name": "sms-alice", "url": "smseagle://t@127.0.0.1:1/+15550004"},
                {"name": "mail-bob", "url": "mailto://127.0.0.1:1?to=b@lab.test"},
                {"name": "mail-carol", "url": "mailto://127.0.0.1:1?to=c@lab.test"},
            ],
            "escalation": [
                {"after": "0s", "contacts": ["alice", "bob"]},
                {"after": "15m", "contacts": ["bob", "carol"]},
                {"rto_fraction": 0.5, "contacts": ["carol"]},
            ],
        },
    }
    doc.update(over)
    return parse_config(doc, Path("/tmp"))


def test_plan_compresses_the_chain_and_drills_everyone_once() -> None:
    p = plan(config(), T0, 0.1)
    assert [(x.contact, x.step, x.due_at - T0) for x in p] == [
        ("dave", None, 0.0), ("alice", 0, 0.0), ("bob", 0, 0.0), ("carol", 1, 90.0),
    ]  # fmt: skip


class FakeSender:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[tuple[str, str]] = []
        self.hung_threads = 0

    async def send(self, title: str, body: str) -> DeliveryResult:
        self.sent.append((title, body))
        return DeliveryResult(True, None, 0.0)

    def close(self) -> None:
        pass


async def test_runner_rows_links_outcome_and_single_use(tmp_path: Path) -> None:
    cfg = config()
    clock = [T0]
    store = AsyncStore(Store(":memory:"), ThreadPoolExecutor(1))
    senders: dict[str, Any] = {c.name: FakeSender(c.name) for c in cfg.notify.channels}
    alerting = Alerting(cfg, store, IncidentTracker(), senders, clock_now=lambda: clock[0])
    runner = DrillRunner(store, alerting, state_dir=tmp_path, clock_now=lambda: clock[0])
    drill = await runner.start("tester", 0.1)
    with pytest.raises(DrillError):
        await runner.start("tester")  # one at a time
    assert (tmp_path / "drill.key").stat().st_mode & 0o077 == 0
    rows = due_messages(cfg, drill, T0)
    assert sorted((r.step, r.channel) for r in rows) == [
        ("drill:1:alice", "mail-alice"), ("drill:1:alice", "sms-alice"), ("drill:1:bob", "mail-bob"),
        ("drill:1:dave", "mail-bob"),
    ]  # fmt: skip
    assert all(r.incident == 0 and r.kind == "drill" for r in rows)
    mail = next(r for r in rows if r.channel == "mail-alice")
    assert URL_MARK in mail.body and TOKEN_MARK in mail.body  # the token is never in the row
    sms = next(r for r in rows if r.channel == "sms-alice")
    assert sms.title == "" and len(sms.body.replace(URL_MARK, "x" * 80)) <= 160 + 80
    assert parse_key("drill:1:alice") == (1, "alice") and parse_key("drill:1:result") is None
    assert parse_key("step0") is None

    await runner.tick()
    n = Notification(1, 0, "drill:1:alice", "drill", "mail-alice", mail.title, mail.body, T0, "pending", 0,
                     T0, None, None, None)  # fmt: skip
    _title, body = runner.expand(n)
    token = runner.token(1, "alice")
    assert f"/api/v1/drills/1/confirm/{token}" in body and f"watchtower drill confirm 1 {token}" in body
    assert runner.expand(replace(n, kind="page", step="step0")) == (n.title, n.body)

    clock[0] = T0 + 30
    with pytest.raises(DrillError) as err:
        await runner.confirm(1, "0" * 32, "api")
    assert err.value.status == 404
    assert await runner.confirm(1, token, "link") == "alice"
    with pytest.raises(DrillError) as err:
        await runner.confirm(1, token, "link")
    assert err.value.status == 409
    clock[0] = T0 + 90 + cfg.drills.confirm_within + 1  # bob's link expired
    with pytest.raises(DrillError) as err:
        await runner.confirm(1, runner.token(1, "bob"), "link")
    assert err.value.status == 410

    (drill,) = await runner.drills()
    notes = [replace(r, sent_at=T0 + 2) for r in await store.call(store.store.drill_notifications, 1)]
    done, results, failed = outcome(drill, notes, clock[0])
    assert done and sorted(failed) == ["bob", "carol", "dave"]
    assert results["alice"].startswith("reached in 28s via ")
    assert results["bob"].startswith("not confirmed in 15m")

    await runner.tick()  # finishes it: the warning goes to every channel, as a warning
    (drill,) = await runner.drills()
    assert drill.state == "failed"
    warnings = [n for n in await store.call(store.store.notifications, 0) if n.kind == "warning"]
    assert {n.channel for n in warnings} == {c.name for c in cfg.notify.channels}
    assert all(n.step == "drill:1:result" for n in warnings)
    states = {v.contact: v for v in verification_of(store.store, cfg, clock[0])}
    assert states["alice"].last_verified == T0 + 30 and not states["alice"].overdue
    assert states["bob"].overdue and states["bob"].last_result is not None
    assert states["dave"].due_at is None
    await store.close()


async def test_scheduled_drill_waits_for_its_window(tmp_path: Path) -> None:
    # Monday 7 December 2026, 09:00 UTC; the window is Tuesday 10:00-11:00 UTC
    monday = 1_796_634_000.0
    cfg = config(drills={"every": "90d", "window": "Tue 10:00-11:00"})
    clock = [monday]
    store = AsyncStore(Store(":memory:"), ThreadPoolExecutor(1))
    senders: dict[str, Any] = {c.name: FakeSender(c.name) for c in cfg.notify.channels}
    alerting = Alerting(cfg, store, IncidentTracker(), senders, clock_now=lambda: clock[0])
    runner = DrillRunner(store, alerting, clock_now=lambda: clock[0])
    await runner.tick()
    assert await runner.drills() == []
    clock[0] = monday + 86400 + 3600 + 60  # Tuesday 10:01
    await runner.tick()
    (drill,) = await runner.drills()
    assert drill.requested_by == "schedule"
    await store.close()
