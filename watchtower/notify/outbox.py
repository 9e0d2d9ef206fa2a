"""The alerting loop: incident changes -> due steps -> one SQLite transaction -> per-channel delivery.

Nothing is lost between decision and delivery: the incident as it now is, the escalation steps
that fired and every message they cause are written in **one transaction before any channel is
tried**. Delivery then runs per channel, each in its own task with its own sender thread, so a
dead or hanging gateway never delays another channel. A failed attempt is retried with
exponential backoff and jitter until it is delivered or ``give_up_after`` passes; after a crash
the pending rows are picked up again (at-least-once; the unique key (incident, step, channel)
makes a step that is decided twice a no-op, so nobody gets the same page twice).

Per channel, messages go out in the order they were decided: a recovering gateway must not
deliver the all-clear before the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from watchtower import clock
from watchtower.checklist import checklist
from watchtower.config import Config
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import NOTIFYING_KINDS, DueStep, due, owes_all_clear
from watchtower.engine.incidents import Incident, IncidentTracker
from watchtower.engine.maintenance import Mute, MutedBy, maintenance_note, muted_targets
from watchtower.notify.messages import Message, incident_message, is_sms_channel, warning_message
from watchtower.notify.sender import ChannelSender, DeliveryResult, make_senders
from watchtower.store import AsyncStore, NewNotification, Notification, StoreError

log = logging.getLogger("watchtower.alerting")

RETRY_BASE = 2.0  # first retry after ~2 s, then 4, 8, ... up to notify.retry_max
TICK = 1.0  # time-driven steps (escalation after 15 min, updates) are looked at this often


@dataclass(slots=True)
class ChannelStats:
    """What the metrics and the heartbeat need to know about one channel."""

    name: str
    sent: int = 0
    failed: int = 0  # failed attempts
    given_up: int = 0
    pending: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    last_ok_at: float | None = None
    warned: bool = False


@dataclass(slots=True)
class _Channel:
    sender: ChannelSender
    sms: bool
    queue: deque[Notification] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stats: ChannelStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ChannelStats(self.sender.name)


def _key(n: Notification) -> tuple[int, str, str]:
    return (n.incident, n.step, n.channel)


def _fingerprint(i: Incident) -> tuple[object, ...]:
    """Changes the store must see: every change of substance adds a timeline event or moves state."""
    return (len(i.timeline), i.state, i.root, i.scope, i.cause, len(i.affected), len(i.back), i.flaps)


class Alerting:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        tracker: IncidentTracker,
        senders: dict[str, ChannelSender] | None = None,
        *,
        clock_now: Callable[[], float] = clock.now,
        changed: asyncio.Event | None = None,
    ):
        self.config = config
        self.store = store
        self.tracker = tracker
        self.now = clock_now
        if senders is None:
            senders = make_senders(config.notify.channels)
        self.channels = {
            c.name: _Channel(senders[c.name], is_sms_channel(c))
            for c in config.notify.channels
            if c.name in senders
        }
        self.fired: dict[int, set[str]] = {}
        self.notified: dict[int, set[str]] = {}
        self.sent_log: dict[int, list[Notification]] = {}  # per incident, the latest state of each message
        self._saved: dict[int, tuple[object, ...]] = {}
        # Set by the incident owner's side (the monitor) when incidents changed: look at once.
        self.changed = changed if changed is not None else asyncio.Event()
        # What a restore loses now, per backed-up service the incident hits (issue 16)
        self.restore_lines: Callable[[Incident, float], list[str]] | None = None
        self.store_ok = True
        self.store_error: str | None = None
        self._memory_ids = -1  # ids of messages that could not be written (disk full): negative
        self._unsaved_steps: set[tuple[int, str]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # A row's (title, body) as sent: drills put each person's one-time link in at delivery.
        self.expand: Callable[[Notification], tuple[str, str]] = lambda n: (n.title, n.body)
        self.mutes: list[Mute] = []  # from the store at start, then kept current by the API

    def muted(self, now: float) -> dict[str, MutedBy]:
        """Targets in maintenance at ``now`` (ad-hoc mutes and the config's windows)."""
        return muted_targets(self.config.targets, self.mutes, self.config.maintenance_windows, now)

    def reload(self, config: Config) -> None:
        """A new config: new channels start, removed ones stop (their pending rows stay in the
        store), changed URLs get a new sender; policy changes apply from the next tick on."""
        old = {c.name: c for c in self.config.notify.channels}
        self.config = config
        for c in config.notify.channels:
            if c.name in self.channels and old.get(c.name) == c:
                continue
            if c.name in self.channels:
                channel = self.channels[c.name]
                channel.sender.close()
                channel.sender = make_senders([c])[c.name]
                channel.sms = is_sms_channel(c)
                continue
            self.channels[c.name] = _Channel(make_senders([c])[c.name], is_sms_channel(c))
            if self._tg is not None:
                self._workers[c.name] = self._tg.create_task(self._deliver(self.channels[c.name]))
        keep = {c.name for c in config.notify.channels}
        for name in [n for n in self.channels if n not in keep]:
            task = self._workers.pop(name, None)
            if task is not None:
                task.cancel()
            self.channels.pop(name).sender.close()

    # ------------------------------------------------------------------ start-up
    async def restore(self) -> None:
        """Load open (and recently resolved) incidents, the steps they fired and the outbox."""
        since = self.now() - max(self.tracker.flap_window, 3600.0)
        store = self.store.store
        incidents, max_id, steps, pending = await self.store.call(
            lambda: (
                store.incidents(open_only=True, since=since),
                store.max_incident_id(),
                store.steps(),
                store.pending(),
            )
        )
        self.tracker.load(incidents, max_id + 1)
        for incident in incidents:
            self._saved[incident.id] = _fingerprint(incident)
            notes = await self.store.call(store.notifications, incident.id)
            self.sent_log[incident.id] = notes
            self.notified[incident.id] = {n.channel for n in notes if n.kind in NOTIFYING_KINDS}
        for incident_id, step in steps:
            self.fired.setdefault(incident_id, set()).add(step)
        for n in pending:
            channel = self.channels.get(n.channel)
            if channel is None:
                log.warning(
                    "pending message for a channel no longer configured id=%d channel=%s", n.id, n.channel
                )
                continue
            channel.queue.append(n)
            channel.wake.set()
        if incidents or pending:
            log.info("restored incidents=%d pending_messages=%d", len(incidents), len(pending))

    # ------------------------------------------------------------------ deciding
    def _message(self, kind: str, incident: Incident, label: str, now: float) -> Message:
        others = [i for i in self.tracker.open_incidents() if i.id != incident.id]
        lines: list[str] = []
        if kind == "update":
            sent = self.sent_log.get(incident.id, [])
            lines = [c.line() for c in checklist(incident, sent, self.config, now, others)]
        restore = self.restore_lines(incident, now) if self.restore_lines else []
        return incident_message(
            kind, incident, self.config, now, label=label, others=others, checklist=lines, restore=restore
        )

    def _plan(
        self, now: float
    ) -> tuple[list[tuple[Incident, tuple[object, ...]]], list[NewNotification], list[tuple[int, str]]]:
        """What is due now, and the incidents that changed since they were last written."""
        dirty: list[tuple[Incident, tuple[object, ...]]] = []
        new: list[NewNotification] = []
        steps: list[tuple[int, str]] = []
        finished = self._finished
        muted = self.muted(now)
        for incident in list(self.tracker.incidents.values()):
            fired = self.fired.get(incident.id, set())
            due_steps: list[DueStep] = []
            if incident.id not in finished:
                quiet, mark = maintenance_note(incident, muted, now)
                if mark is not None:
                    incident = self.tracker.annotate(incident.id, *mark, now)
                others = [i for i in self.tracker.open_incidents() if i.id != incident.id]
                due_steps = due(
                    incident,
                    self.config,
                    now,
                    fired,
                    self.notified.get(incident.id, set()),
                    others,
                    muted=quiet,
                )
            for step in due_steps:
                steps.append((incident.id, step.step))
                if step.kind in NOTIFYING_KINDS:
                    names = ", ".join(step.channels) or "no channel matches"
                    kind = "notify" if step.kind == "page" else "escalated"
                    incident = self.tracker.annotate(incident.id, kind, f"{step.label}: {names}", now)
                message = self._message(step.kind, incident, step.label, now)
                incident = self.tracker.get(incident.id) or incident  # the message may have noted
                for name in step.channels:
                    channel = self.channels.get(name)
                    if channel is None:
                        continue
                    title, body = ("", message.sms) if channel.sms else (message.title, message.body)
                    new.append(NewNotification(incident.id, step.step, step.kind, name, title, body))
            print_ = _fingerprint(incident)
            if print_ != self._saved.get(incident.id):
                dirty.append((incident, print_))  # a frozen value: the store's thread may read it
        return dirty, new, steps

    @property
    def _finished(self) -> set[int]:
        """Resolved incidents that owe nothing more (their all-clear fired or was never owed)."""
        policy = self.config.notify
        return {
            incident.id
            for incident in self.tracker.incidents.values()
            if not incident.is_open
            and not owes_all_clear(
                incident, policy, self.fired.get(incident.id, set()), self.notified.get(incident.id, set())
            )
        }

    async def sync(self) -> None:
        """Decide what is due now and make it durable, then hand it to the channels."""
        now = self.now()
        if self._unsaved_steps:
            await self._adopt(now)
        dirty, new, steps = self._plan(now)
        if not (dirty or new or steps):
            return
        try:
            added = await self.store.call(self.store.store.commit, [i for i, _ in dirty], new, steps, now)
            if self.store.durable:  # an in-memory stand-in accepts everything and keeps nothing
                if not self.store_ok:
                    log.warning("state store writable again")
                self.store_ok, self.store_error = True, None
        except StoreError as exc:
            # Disk full or read-only: alerting goes on from memory (and says so loudly); the
            # incident rows are retried on the next sync because their fingerprints stay unsaved.
            if self.store_ok:
                log.error("state store not writable, alerting from memory: %s", exc)
            self.store_ok, self.store_error = False, str(exc)
            added = [self._in_memory(n, now) for n in self._dedup_memory(new)]
            self._unsaved_steps.update(steps)  # written with their messages once the disk is back
        else:
            for incident, print_ in dirty:
                self._saved[incident.id] = print_
        for incident_id, step in steps:
            self.fired.setdefault(incident_id, set()).add(step)
        for n in added:
            if n.kind in NOTIFYING_KINDS:
                self.notified.setdefault(n.incident, set()).add(n.channel)
            self.sent_log.setdefault(n.incident, []).append(n)
            channel = self.channels[n.channel]
            channel.queue.append(n)
            channel.wake.set()
            log.info(
                "notification queued id=%d incident=%d step=%s kind=%s channel=%s",
                n.id, n.incident, n.step, n.kind, n.channel,
            )  # fmt: skip

    async def _adopt(self, now: float) -> None:
        """The store works again: write what was decided while it did not, so a restart neither
        forgets a pending message nor decides (and sends) the same step a second time."""
        rows = [n for notes in self.sent_log.values() for n in notes if n.id < 0]
        try:
            ids = await self.store.call(self.store.store.adopt, rows, sorted(self._unsaved_steps), now)
        except StoreError:
            return
        self._unsaved_steps.clear()
        for notes in self.sent_log.values():
            for k, n in enumerate(notes):
                if n.id < 0 and _key(n) in ids:
                    notes[k] = replace(n, id=ids[_key(n)])
        for channel in self.channels.values():
            for k, n in enumerate(channel.queue):
                if n.id < 0 and _key(n) in ids:
                    channel.queue[k] = replace(n, id=ids[_key(n)])
        if rows:
            log.warning(
                "state store: %d message(s) kept in memory while it failed are written now", len(rows)
            )

    def _dedup_memory(self, new: Iterable[NewNotification]) -> list[NewNotification]:
        seen = {(n.incident, n.step, n.channel) for notes in self.sent_log.values() for n in notes}
        return [n for n in new if (n.incident, n.step, n.channel) not in seen]

    def _in_memory(self, n: NewNotification, now: float) -> Notification:
        self._memory_ids -= 1
        return Notification(
            self._memory_ids, n.incident, n.step, n.kind, n.channel, n.title, n.body, now, "pending", 0, now,
            None, None, None,
        )  # fmt: skip

    def _prune(self, now: float) -> None:
        """Finished incidents leave memory once past the flap window (the store keeps them)."""
        finished = self._finished
        for incident in list(self.tracker.incidents.values()):
            if (
                incident.id in finished
                and incident.resolved_at is not None
                and now - incident.resolved_at > self.tracker.flap_window
                and self._saved.get(incident.id) == _fingerprint(incident)
                and not any(n.state == "pending" for n in self.sent_log.get(incident.id, ()))
            ):
                self.tracker.forget((incident.id,))
                self.fired.pop(incident.id, None)
                self.notified.pop(incident.id, None)
                self.sent_log.pop(incident.id, None)
                self._saved.pop(incident.id, None)

    # ------------------------------------------------------------------ channel health
    def _check_channels(self, now: float) -> list[NewNotification]:
        """A channel failing for longer than ``channel_warn_after`` is reported through the others."""
        out: list[NewNotification] = []
        limit = self.config.notify.channel_warn_after
        for name, channel in self.channels.items():
            st = channel.stats
            if st.failing_since is not None and not st.warned and now - st.failing_since >= limit:
                st.warned = True
                minutes = int((now - st.failing_since) // 60)
                text = f"channel {name} failing for {minutes}m: {st.last_error or 'unknown error'}"
                log.warning(
                    "channel failing channel=%s for=%ds error=%s", name, now - st.failing_since, st.last_error
                )
                out += self._warning(f"warn:{name}:{int(st.failing_since)}", text, exclude=name, now=now)
        return out

    def _warning(self, step: str, text: str, *, exclude: str, now: float) -> list[NewNotification]:
        message = warning_message(text, self.config, now)
        return [
            NewNotification(
                0, step, "warning", other, *(("", message.sms) if ch.sms else (message.title, message.body))
            )
            for other, ch in self.channels.items()
            if other != exclude
        ]

    async def _queue_warnings(self, warnings: list[NewNotification]) -> None:
        now = self.now()
        try:
            added = await self.store.call(self.store.store.commit, (), warnings, (), now)
        except StoreError:
            added = [self._in_memory(n, now) for n in warnings]
        for n in added:
            self.channels[n.channel].queue.append(n)
            self.channels[n.channel].wake.set()

    async def warn(self, step: str, text: str) -> None:
        """A warning about watchtower itself to every channel (e.g. its store is unusable)."""
        await self._queue_warnings(self._warning(step, text, exclude="", now=self.now()))

    def enqueue(self, added: Iterable[Notification]) -> None:
        """Rows another part wrote to the outbox (drills): delivered like the rest."""
        for n in added:
            channel = self.channels.get(n.channel)
            if channel is not None:
                channel.queue.append(n)
                channel.wake.set()

    def problem(self) -> str | None:
        """For the heartbeat and /healthz: a channel failing long, or the store unwritable."""
        if not self.store_ok:
            return f"state store not writable: {self.store_error}"
        now = self.now()
        for name, ch in self.channels.items():
            since = ch.stats.failing_since
            if since is not None and now - since >= self.config.notify.channel_warn_after:
                return f"channel {name} failing for {int(now - since)}s"
        return None

    def stats(self) -> tuple[ChannelStats, ...]:
        out = []
        for ch in self.channels.values():
            ch.stats.pending = len(ch.queue)
            out.append(replace(ch.stats))
        return tuple(out)

    def notifications_of(self, incident_id: int) -> list[Notification] | None:
        return self.sent_log.get(incident_id)

    # ------------------------------------------------------------------ delivering
    def _backoff(self, attempts: int) -> float:
        delay = min(self.config.notify.retry_max, RETRY_BASE * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.8, 1.2)  # jitter: many sites' retries must not align

    async def _deliver(self, channel: _Channel) -> None:
        """One channel's worker: its messages in order, retried with backoff, never giving way
        to another channel's trouble."""
        while True:
            if not channel.queue:
                channel.wake.clear()
                await channel.wake.wait()
                continue
            head = channel.queue[0]
            wait = head.next_attempt_at - self.now()
            if wait > 0:
                channel.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(channel.wake.wait(), wait)
                continue
            if self._superseded(head):
                # "watchtower is blind" never got out while it was blind: the all-clear that
                # reports the blind window (from, to) says it all; don't deliver a stale alarm.
                result = DeliveryResult(False, "superseded: the all-clear reports the blind window", 0.0)
                now = self.now()
                await self._record(head, now, result, None)
                channel.queue.popleft()
                continue
            result = await channel.sender.send(*self.expand(head))
            now = self.now()
            given_up = not result.ok and now - head.created_at >= self.config.notify.give_up_after
            next_at = None if result.ok or given_up else now + self._backoff(head.attempts + 1)
            self._account(channel, head, result, now, given_up)
            updated = await self._record(head, now, result, next_at)
            if channel.queue and _key(channel.queue[0]) == _key(head):
                if next_at is None:
                    channel.queue.popleft()
                else:
                    channel.queue[0] = updated

    async def _record(
        self, n: Notification, now: float, result: DeliveryResult, next_at: float | None
    ) -> Notification:
        """Write one attempt's outcome (``next_at`` None and not ok: given up) and return the row
        as it now is; the incident's in-memory list of messages follows."""
        # The row may have been written to the store while this attempt ran (its id changed).
        n = self._current(n)
        updated = replace(
            n,
            state="sent" if result.ok else ("pending" if next_at is not None else "failed"),
            attempts=n.attempts + 1,
            next_attempt_at=next_at if next_at is not None else n.next_attempt_at,
            last_attempt_at=now,
            sent_at=now if result.ok else None,
            error=None if result.ok else result.error,
        )
        if n.id > 0:
            try:
                await self.store.call(
                    self.store.store.record_attempt, n.id, now, result.ok, result.error, next_at
                )
            except StoreError as exc:
                log.error("could not record a delivery attempt id=%d: %s", n.id, exc)
        notes = self.sent_log.get(n.incident)
        if notes is not None:
            for k, old in enumerate(notes):
                if _key(old) == _key(n):
                    notes[k] = updated
        return updated

    def _current(self, n: Notification) -> Notification:
        for old in self.sent_log.get(n.incident, ()):
            if _key(old) == _key(n):
                return old
        return n

    def _superseded(self, n: Notification) -> bool:
        incident = self.tracker.get(n.incident) if n.incident else None
        return (
            incident is not None
            and incident.scope is Scope.MONITOR
            and not incident.is_open
            and n.kind in ("page", "escalation", "update")
            and n.attempts > 0
        )

    def _account(
        self, channel: _Channel, n: Notification, result: DeliveryResult, now: float, given_up: bool
    ) -> None:
        st = channel.stats
        if result.ok:
            st.sent += 1
            if st.failing_since is not None:
                log.info("channel delivers again channel=%s after=%ds", st.name, now - st.failing_since)
                if st.warned:
                    minutes = int((now - st.failing_since) // 60)
                    text = f"channel {st.name} delivers again (failed for {minutes}m)"
                    warnings = self._warning(
                        f"warn-ok:{st.name}:{int(st.failing_since)}", text, exclude="", now=now
                    )
                    task = asyncio.get_running_loop().create_task(self._queue_warnings(warnings))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            st.failing_since, st.warned, st.last_ok_at, st.last_error = None, False, now, None
            log.info(
                "notification sent id=%d incident=%d step=%s channel=%s attempts=%d elapsed=%.2fs",
                n.id, n.incident, n.step, st.name, n.attempts + 1, result.elapsed,
            )  # fmt: skip
            return
        st.failed += 1
        st.last_error = result.error
        if st.failing_since is None:
            st.failing_since = now
        if given_up:
            st.given_up += 1
        log.warning(
            "notification failed id=%d incident=%d step=%s channel=%s attempts=%d error=%s%s",
            n.id, n.incident, n.step, st.name, n.attempts + 1, result.error,
            " (given up)" if given_up else "",
        )  # fmt: skip

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for name, channel in self.channels.items():
                self._workers[name] = tg.create_task(self._deliver(channel), name=f"deliver-{name}")
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), TICK)
                self.changed.clear()
                now = self.now()
                await self.sync()
                warnings = self._check_channels(now)
                if warnings:
                    await self._queue_warnings(warnings)
                self._prune(now)

    async def purge(self) -> None:
        """Retention: resolved incidents older than ``retention`` leave the store."""
        before = self.now() - self.config.retention
        with contextlib.suppress(StoreError):
            count = await self.store.call(self.store.store.purge, before)
            if count:
                log.info(
                    "retention: deleted %d resolved incidents older than %ds", count, self.config.retention
                )

    def close(self) -> None:
        for channel in self.channels.values():
            channel.sender.close()
