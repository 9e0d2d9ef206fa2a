"""What the web, the metrics and systemd's status line read about incidents: one read model.

Incidents live in two places: the tracker holds the open ones and those resolved within the
flap window (the freshest timeline), the store holds every one ever recorded; messages live in
the alerting's memory (their delivery state as it is now) and in the store. The rule of which
copy answers is kept here, once, instead of in every handler:

- an incident: the tracker's while it holds it (the live one wins), else the store's;
- an incident's messages: the alerting's memory while it holds them, else the store's;
- a report: the store's messages, attempts and blind windows (they survive a restart), the
  alerting's memory and the tracker's blind windows when there is no store or it fails.

A store that fails (disk gone, corrupt page) is handled here too: reads answer from memory
alone, never an error page; the failure itself is reported by /healthz and the metrics.

Everything returned is a frozen value (tuples of frozen dataclasses, copies of the channel
statistics): a caller can hold it across an ``await`` without seeing it change. The writers
stay where they are: incidents change only through the monitor's tracker, messages only
through the alerting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import outage_start
from watchtower.engine.incidents import Incident, IncidentTracker
from watchtower.store import AsyncStore, Attempt, Notification, Store, StoreError

if TYPE_CHECKING:  # the alerting imports senders (apprise); reading needs only its type
    from watchtower.notify.outbox import Alerting, ChannelStats

log = logging.getLogger("watchtower.readmodel")

T = TypeVar("T")

BlindWindow = tuple[float, float | None]  # a monitor-blind stretch: from, to (None: still blind)


@dataclass(frozen=True, slots=True)
class IncidentReport:
    """What a post-mortem of one incident is written from."""

    incident: Incident
    notifications: tuple[Notification, ...]
    attempts: tuple[Attempt, ...]
    blind_windows: tuple[BlindWindow, ...]


class IncidentReadModel:
    """Read-only view of the incidents over the tracker, the alerting's memory and the store.

    ``alerting`` and ``store`` may be None (unit tests, a web app without them): the reads then
    answer from what there is.
    """

    def __init__(
        self,
        tracker: IncidentTracker,
        alerting: Alerting | None = None,
        store: AsyncStore | None = None,
    ):
        self._tracker = tracker
        self._alerting = alerting
        self._store = store

    async def _stored(self, read: Callable[[Store], T]) -> T | None:
        """``read`` on the store's thread; None without a store or when it fails (the one place
        a store error is caught for reading)."""
        if self._store is None:
            return None
        store = self._store.store
        try:
            return await self._store.call(read, store)
        except StoreError as exc:
            log.debug("state store unreadable, answering from memory: %s", exc)
            return None

    # ------------------------------------------------------------------ incidents
    def live(self, incident_id: int) -> Incident | None:
        """The incident the tracker holds (open or recently resolved): what acknowledging and
        notes may change; None for one only the store remembers."""
        return self._tracker.get(incident_id)

    async def open_incidents(self) -> tuple[Incident, ...]:
        return tuple(self._tracker.open_incidents())

    async def incident(self, incident_id: int) -> Incident | None:
        """The live incident, else the store's (None: unknown, or the store failed)."""
        live = self._tracker.get(incident_id)
        if live is not None:
            return live
        return await self._stored(lambda db: db.incident(incident_id))

    async def listing(self, *, include_resolved: bool, limit: int) -> tuple[Incident, ...]:
        """Newest first: the open incidents, or (``include_resolved``) every one the tracker holds
        plus the newest ``limit`` of the store's, the live copy winning over the stored one."""
        live = self._tracker.incidents.values() if include_resolved else self._tracker.open_incidents()
        chosen = {i.id: i for i in live}
        if include_resolved:
            for incident in await self._stored(lambda db: db.incidents(limit=limit)) or ():
                chosen.setdefault(incident.id, incident)
        return tuple(sorted(chosen.values(), key=lambda i: i.id, reverse=True))

    def open_by_scope(self) -> tuple[tuple[str, int], ...]:
        """(scope, open incidents) for every scope, zeros included (a gauge per scope)."""
        open_ = self._tracker.open_incidents()
        return tuple((scope.value, sum(1 for i in open_ if i.scope is scope)) for scope in Scope)

    # ------------------------------------------------------------------ messages
    def _remembered(self, incident_id: int) -> tuple[Notification, ...] | None:
        if self._alerting is None:
            return None
        notes = self._alerting.notifications_of(incident_id)
        return None if notes is None else tuple(notes)

    async def notifications(self, incidents: Sequence[Incident]) -> tuple[tuple[Notification, ...], ...]:
        """Each incident's messages, in the order given: the alerting's memory (delivery state as
        it is now), else the store's record (one store round trip for all of them), else none."""
        remembered = [self._remembered(i.id) for i in incidents]
        missing = [i.id for i, notes in zip(incidents, remembered, strict=True) if notes is None]
        stored: dict[int, list[Notification]] = {}
        if missing:
            stored = await self._stored(lambda db: {i: db.notifications(i) for i in missing}) or {}
        return tuple(
            notes if notes is not None else tuple(stored.get(i.id, ()))
            for i, notes in zip(incidents, remembered, strict=True)
        )

    async def report(self, incident_id: int) -> IncidentReport | None:
        """The post-mortem's material: the live incident (freshest timeline) else the store's;
        messages, delivery attempts and blind windows from the store, from memory without one."""
        live = self._tracker.get(incident_id)

        def read(db: Store) -> IncidentReport | None:
            found = live or db.incident(incident_id)
            if found is None:
                return None
            return IncidentReport(
                found,
                tuple(db.notifications(incident_id)),
                tuple(db.attempts(incident_id)),
                tuple(db.blind_windows(outage_start(found), found.resolved_at)),
            )

        if self._store is not None:
            stored = await self._stored(read)
            if stored is not None or live is None:
                # found, or unknown to both (a store error with nothing live: unknown as well)
                return stored
        if live is None:
            return None
        windows = tuple(
            (i.opened_at, i.resolved_at) for i in self._tracker.incidents.values() if i.scope is Scope.MONITOR
        )
        return IncidentReport(live, self._remembered(incident_id) or (), (), windows)

    # ------------------------------------------------------------------ delivery health
    def channels(self) -> tuple[ChannelStats, ...]:
        """Per channel: messages sent, failed, pending, failing since (copies)."""
        return self._alerting.stats() if self._alerting is not None else ()

    def store_problem(self) -> str | None:
        """Why the state store does not take writes, None while it does (or there is none)."""
        if self._alerting is None or self._alerting.store_ok:
            return None
        return str(self._alerting.store_error)
