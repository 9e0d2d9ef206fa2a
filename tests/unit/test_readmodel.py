"""The incident read model over a real tracker, a real alerting and a real (in-memory) store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest

from watchtower.config import Config, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.incidents import Incident, IncidentState, IncidentTracker
from watchtower.notify.outbox import Alerting
from watchtower.notify.sender import DeliveryResult
from watchtower.readmodel import IncidentReadModel
from watchtower.store import AsyncStore, NewNotification, Store, StoreError

T0 = 1_796_000_000.0


def config() -> Config:
    return parse_config(
        {
            "site": "acme",
            "targets": {
                "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.213.40.11"}]},
                "erp1": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": "10.213.40.23"}]},
            },
            "notify": {
                "channels": [{"name": "mail-ops", "url": "mailto://127.0.0.1:1?to=ops@lab.test"}],
                "escalation": [{"after": "0s", "notify": ["mail-ops"]}],
            },
        },
        Path("/tmp"),
    )


class IdleSender:
    """Never asked to deliver here: the alerting's workers are not started."""

    name = "mail-ops"

    async def send(self, title: str, body: str) -> DeliveryResult:
        raise AssertionError("no delivery in these tests")

    def close(self) -> None:
        pass


def senders() -> dict[str, Any]:
    return {"mail-ops": IdleSender()}


@pytest.fixture
async def store() -> AsyncIterator[AsyncStore]:
    store = AsyncStore(Store(":memory:"), ThreadPoolExecutor(1))
    yield store
    await store.close()


def pve1_down(incident_id: int = 7) -> Incident:
    return Incident(
        incident_id,
        Scope.HYPERVISOR,
        "pve1",
        T0,
        cause=Cause.POWER_OFF,
        affected=("erp1",),
        first_failure_at=T0 - 14,
    ).noted(T0, "opened", "confirmed: hypervisor pve1 down (power_off), 1 affected")


def resolved(incident: Incident, at: float) -> Incident:
    return replace(incident, state=IncidentState.RESOLVED, resolved_at=at).noted(
        at, "resolved", "pve1 is back"
    )


def break_store(store: AsyncStore) -> None:
    """The database goes away under the daemon (as a disk that is pulled): every read fails."""
    store.store.close()


async def test_the_live_incident_wins_over_the_stored_one(store: AsyncStore) -> None:
    old = pve1_down(7)
    history = resolved(Incident(3, Scope.VM, "erp1", T0 - 9000), T0 - 8000)
    await store.call(store.store.commit, [old, history], now=T0)
    # since it was written: acknowledged (in memory, the store not written yet)
    acked = replace(old, state=IncidentState.ACKNOWLEDGED, acknowledged_by="alice", acknowledged_at=T0 + 60)
    tracker = IncidentTracker()
    tracker.load([acked], 8)
    reads = IncidentReadModel(tracker, None, store)

    assert await reads.incident(7) == acked
    assert await reads.incident(3) == history  # only the store has it
    assert await reads.incident(99) is None
    assert [i.id for i in await reads.listing(include_resolved=False, limit=200)] == [7]
    listed = await reads.listing(include_resolved=True, limit=200)
    assert listed == (acked, history)  # newest first, the live copy of #7
    assert await reads.listing(include_resolved=True, limit=1) == (acked,)  # the store's newest is #7 too
    assert reads.open_by_scope()[[s for s, _ in reads.open_by_scope()].index("hypervisor")] == (
        "hypervisor",
        1,
    )
    assert sum(n for _, n in reads.open_by_scope()) == 1
    with pytest.raises(FrozenInstanceError):
        listed[0].root = "pve2"  # type: ignore[misc]


async def test_a_resolved_incident_the_tracker_forgot_comes_from_the_store(store: AsyncStore) -> None:
    cfg = config()
    tracker = IncidentTracker()
    tracker.load([pve1_down(7)], 8)
    alerting = Alerting(cfg, store, tracker, senders(), clock_now=lambda: T0 + 1)
    await alerting.sync()  # the page: written with the incident, one transaction
    (page,) = alerting.notifications_of(7) or []
    await store.call(store.store.record_attempt, page.id, T0 + 3, False, "HTTP 503", T0 + 10)
    blind = resolved(Incident(8, Scope.MONITOR, "acme", T0 + 100), T0 + 160)
    done = resolved(tracker.incidents[7], T0 + 600)
    await store.call(store.store.commit, [done, blind], now=T0 + 600)
    tracker.forget([7, 8])  # past the flap window: memory lets go, the store keeps it
    reads = IncidentReadModel(tracker, alerting, store)

    assert reads.live(7) is None  # nothing left to acknowledge or annotate
    assert await reads.incident(7) == done
    assert await reads.listing(include_resolved=False, limit=200) == ()
    assert [i.id for i in await reads.listing(include_resolved=True, limit=200)] == [8, 7]
    (notes,) = await reads.notifications([done])
    assert [(n.step, n.channel, n.kind) for n in notes] == [("step0", "mail-ops", "page")]
    report = await reads.report(7)
    assert report is not None
    assert report.incident == done
    assert [n.id for n in report.notifications] == [page.id]
    assert [(a.notification, a.ok, a.error) for a in report.attempts] == [(page.id, False, "HTTP 503")]
    assert report.blind_windows == ((T0 + 100, T0 + 160),)
    assert await reads.report(99) is None


async def test_a_store_error_falls_back_to_what_memory_holds(store: AsyncStore) -> None:
    cfg = config()
    history = resolved(Incident(3, Scope.VM, "erp1", T0 - 9000), T0 - 8000)
    await store.call(store.store.commit, [history], now=T0)
    tracker = IncidentTracker()
    blind = resolved(Incident(5, Scope.MONITOR, "acme", T0 - 30), T0 - 10)
    tracker.load([blind, pve1_down(7)], 8)
    alerting = Alerting(cfg, store, tracker, senders(), clock_now=lambda: T0 + 1)
    await alerting.sync()
    reads = IncidentReadModel(tracker, alerting, store)
    assert [i.id for i in await reads.listing(include_resolved=True, limit=200)] == [7, 5, 3]

    break_store(store)
    with pytest.raises(StoreError):  # the store does fail...
        await store.call(store.store.incident, 3)
    # ...and every read answers from memory instead
    assert [i.id for i in await reads.listing(include_resolved=True, limit=200)] == [7, 5]
    assert [i.id for i in await reads.listing(include_resolved=False, limit=200)] == [7]
    assert (await reads.incident(7)) == tracker.incidents[7]
    assert await reads.incident(3) is None  # only the store knew it
    notes, none = await reads.notifications([tracker.incidents[7], history])
    assert [(n.step, n.channel) for n in notes] == [("step0", "mail-ops")]  # the alerting's memory
    assert none == ()
    report = await reads.report(7)
    assert report is not None
    assert report.incident == tracker.incidents[7]
    assert [n.step for n in report.notifications] == ["step0"]
    assert report.attempts == ()
    assert report.blind_windows == ((T0 - 30, T0 - 10),)  # the tracker's monitor incident
    assert await reads.report(3) is None


async def test_messages_come_from_memory_first_and_the_store_otherwise(store: AsyncStore) -> None:
    """Memory has the delivery state as it is now; the store answers for what memory let go."""
    cfg = config()
    tracker = IncidentTracker()
    tracker.load([pve1_down(7)], 8)
    alerting = Alerting(cfg, store, tracker, senders(), clock_now=lambda: T0 + 1)
    await alerting.sync()
    older = resolved(Incident(2, Scope.VM, "erp1", T0 - 9000), T0 - 8000)
    await store.call(
        store.store.commit,
        [older],
        [NewNotification(2, "step0", "page", "mail-ops", "t", "b")],
        [(2, "step0")],
        T0,
    )
    reads = IncidentReadModel(tracker, alerting, store)
    live_notes, stored_notes = await reads.notifications([tracker.incidents[7], older])
    assert [(n.incident, n.state) for n in live_notes] == [(7, "pending")]
    assert [(n.incident, n.step) for n in stored_notes] == [(2, "step0")]
    assert isinstance(live_notes, tuple)  # a copy: the alerting's list goes on changing


async def test_without_a_store_or_alerting_it_reads_the_tracker(tmp_path: Path) -> None:
    tracker = IncidentTracker()
    tracker.load([pve1_down(7)], 8)
    reads = IncidentReadModel(tracker)
    assert await reads.open_incidents() == (tracker.incidents[7],)
    assert await reads.incident(3) is None
    assert await reads.notifications([tracker.incidents[7]]) == ((),)
    assert reads.channels() == ()
    assert reads.store_problem() is None
    report = await reads.report(7)
    assert report is not None and report.notifications == () and report.blind_windows == ()


async def test_channel_health_is_the_alerting_s(store: AsyncStore) -> None:
    cfg = config()
    alerting = Alerting(cfg, store, IncidentTracker(), senders(), clock_now=lambda: T0)
    reads = IncidentReadModel(IncidentTracker(), alerting, store)
    (stats,) = reads.channels()
    assert (stats.name, stats.sent, stats.pending) == ("mail-ops", 0, 0)
    stats.sent = 99  # a copy: the alerting's own count is not touched
    assert reads.channels()[0].sent == 0
    assert reads.store_problem() is None
    alerting.store_ok, alerting.store_error = False, "disk full"
    assert reads.store_problem() == "disk full"
