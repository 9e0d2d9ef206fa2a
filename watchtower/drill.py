"""Alert-chain drills: every contact gets a DRILL message along the real chain and confirms it.

A drill walks ``notify.escalation`` with its delays multiplied by ``compress``: each contact's
message is due when the first step naming them would fire (contacts in no step: at once). The
messages go through the durable outbox as rows of incident 0 with step key
``drill:{id}:{contact}`` and kind ``drill``: no incident is opened or touched, the unique
(incident, step, channel) key makes a step decided twice (after a restart) a no-op, and pending
rows are delivered after a restart like any other.

Each contact confirms with a one-time link ``POST /api/v1/drills/{id}/confirm/{token}`` (or
``watchtower drill confirm ID TOKEN``). The token is an HMAC of (drill, contact) under a key kept
in ``state_dir/drill.key``; the store keeps only its SHA-256, and the outbox rows hold a
placeholder the link is put into at delivery, so a copy of the database confirms nothing. A link
works once and stops working ``drills.confirm_within`` after its message was due.

When everyone confirmed or every link expired, the drill's result per person ("reached in 2m14s
via mail-alice", "not confirmed in 15m: number outdated?") is stored; a drill with anyone not
reached sends a *warning* (incident 0, kind ``warning``), never a page.

:func:`plan`, :func:`due_messages` and :func:`outcome` are pure; :class:`DrillRunner` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchtower import clock
from watchtower.availability import is_available
from watchtower.config import Config
from watchtower.durations import coarse, exact
from watchtower.engine.escalation import channels_for
from watchtower.notify.messages import drill_message, is_sms_channel, one_line, warning_message
from watchtower.notify.outbox import Alerting
from watchtower.people import ContactVerification, verification
from watchtower.store import (
    AsyncStore,
    Drill,
    DrillContact,
    NewNotification,
    Notification,
    Store,
    StoreError,
)

log = logging.getLogger("watchtower.drill")

URL_MARK = "{drill-confirm-url}"
TOKEN_MARK = "{drill-token}"
KEY_FILE = "drill.key"
TICK = 1.0


# --------------------------------------------------------------------------- pure


@dataclass(frozen=True, slots=True)
class Planned:
    contact: str
    step: int | None
    due_at: float


def plan(config: Config, started_at: float, compress: float) -> list[Planned]:
    """Who is drilled when: each contact at the first step naming them, delays compressed."""
    rtos = [t.service.rto for t in config.targets.values() if t.service and t.service.rto]
    out: dict[str, Planned] = {}
    for n, step in enumerate(config.notify.escalation):
        if step.after is not None:
            delay = step.after
        else:
            assert step.rto_fraction is not None
            delay = step.rto_fraction * min(rtos) if rtos else 0.0
        for name in step.contacts:
            if name in config.contacts and name not in out:
                out[name] = Planned(name, n, started_at + delay * compress)
    for name in config.contacts:
        out.setdefault(name, Planned(name, None, started_at))
    return sorted(out.values(), key=lambda p: (p.due_at, p.step if p.step is not None else -1))


def step_key(drill: int, contact: str) -> str:
    return f"drill:{drill}:{contact}"


def parse_key(step: str) -> tuple[int, str] | None:
    kind, _, rest = step.partition(":")
    number, _, contact = rest.partition(":")
    if kind != "drill" or not number.isdigit() or not contact or contact == "result":
        return None
    return int(number), contact


def due_messages(config: Config, drill: Drill, now: float) -> list[NewNotification]:
    """The DRILL messages due now (the store drops those already written)."""
    if drill.state != "running":
        return []
    out = []
    by_name = {c.name: c for c in config.notify.channels}
    for dc in drill.contacts:
        person = config.contacts.get(dc.contact)
        if person is None or dc.due_at > now:
            continue
        for channel in channels_for(config.notify, person.channels):
            title, body = drill_message(
                config, dc.contact, drill.id, URL_MARK, TOKEN_MARK, sms=is_sms_channel(by_name[channel])
            )
            out.append(NewNotification(0, step_key(drill.id, dc.contact), "drill", channel, title, body))
    return out


def result_text(drill: Drill, dc: DrillContact, notes: Sequence[Notification]) -> tuple[bool, str]:
    """(reached, the sentence about this person)."""
    mine = [n for n in notes if n.step == step_key(drill.id, dc.contact)]
    sent = sorted((n for n in mine if n.sent_at is not None), key=lambda n: n.sent_at or 0.0)
    if dc.confirmed_at is not None:
        start = sent[0].sent_at if sent and sent[0].sent_at is not None else dc.due_at
        via = ", ".join(dict.fromkeys(n.channel for n in sent)) or "an unrecorded channel"
        how = f" ({dc.confirmed_via})" if dc.confirmed_via else ""
        return True, f"reached in {exact(max(0.0, dc.confirmed_at - start))} via {via}{how}"
    if not mine:
        return False, "no channel of theirs is configured"
    if not sent:
        errors = "; ".join(dict.fromkeys(n.error for n in mine if n.error)) or "still pending"
        return False, f"message not delivered: {one_line(errors, 200)}"
    return False, f"not confirmed in {coarse(drill.confirm_within)}: number or address outdated? person away?"


def outcome(
    drill: Drill, notes: Sequence[Notification], now: float
) -> tuple[bool, dict[str, str], list[str]]:
    """(finished, contact -> sentence, contacts not reached). Finished when everyone confirmed or
    every link expired."""
    done = all(c.confirmed_at is not None or now >= c.expires_at for c in drill.contacts)
    results: dict[str, str] = {}
    failed: list[str] = []
    for dc in drill.contacts:
        ok, text = result_text(drill, dc, notes)
        results[dc.contact] = text
        if not ok:
            failed.append(dc.contact)
    return done, results, failed


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verification_of(store: Store, config: Config, now: float) -> list[ContactVerification]:
    """Per contact verification state read from a store (synchronous: the readiness report and
    the CLI call it without a daemon; the daemon has :meth:`DrillRunner.verification`)."""
    latest: dict[str, str] = {}
    for drill in reversed(store.drills(limit=50)):
        for c in drill.contacts:
            if c.result is not None:
                latest[c.contact] = c.result
    return verification(config, store.last_verified(), latest, now)


# --------------------------------------------------------------------------- I/O


def _load_key(state_dir: Path | None) -> bytes:
    """The HMAC key of the links: a file of the state directory (0600), made on first use."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = state_dir / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        log.error("cannot keep the drill key in %s (links do not survive a restart): %s", path, exc)
    return key


class DrillError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


class DrillRunner:
    def __init__(
        self,
        store: AsyncStore,
        alerting: Alerting,
        *,
        state_dir: Path | None = None,
        clock_now: Callable[[], float] = clock.now,
    ):
        self.store = store
        self.alerting = alerting
        self.now = clock_now
        self._key = _load_key(state_dir)
        self.verified: dict[str, float] = {}  # contact -> last confirmation
        self.latest: dict[str, str] = {}  # contact -> last drill's sentence
        self.wake = asyncio.Event()
        alerting.expand = self.expand

    @property
    def config(self) -> Config:
        """The alerting's: a SIGHUP reload reaches both."""
        return self.alerting.config

    def token(self, drill: int, contact: str) -> str:
        return hmac.new(self._key, f"{drill}:{contact}".encode(), hashlib.sha256).hexdigest()[:32]

    def confirm_url(self, drill: int, token: str) -> str:
        base = self.config.notify.status_url
        if base is None:
            host, port = self.config.listen_host_port
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        return f"{base.rstrip('/')}/api/v1/drills/{drill}/confirm/{token}"

    def expand(self, n: Notification) -> tuple[str, str]:
        """The outbox's hook at delivery: a DRILL row gets its contact's link put in."""
        parsed = parse_key(n.step) if n.kind == "drill" else None
        if parsed is None:
            return n.title, n.body
        token = self.token(*parsed)
        url = self.confirm_url(parsed[0], token)
        return n.title, n.body.replace(URL_MARK, url).replace(TOKEN_MARK, token)

    # ------------------------------------------------------------------ commands
    async def start(self, by: str, compress: float | None = None) -> Drill:
        if not self.config.contacts:
            raise DrillError(409, "no contacts configured: a drill needs `contacts:`")
        db = self.store.store
        if await self.store.call(db.drills, running_only=True, limit=1):
            raise DrillError(409, "a drill is already running")
        now = self.now()
        factor = compress if compress is not None else self.config.drills.compress
        within = self.config.drills.confirm_within
        rows = [
            DrillContact(p.contact, p.step, "", p.due_at, p.due_at + within)
            for p in plan(self.config, now, factor)
        ]

        def hash_for(drill: int, contact: str) -> str:
            return token_hash(self.token(drill, contact))

        def insert() -> Drill:
            drill_id = db.start_drill(now, factor, within, by, rows, hash_for)
            return next(d for d in db.drills(limit=5) if d.id == drill_id)

        drill = await self.store.call(insert)
        log.info("drill started id=%d by=%s compress=%g contacts=%d", drill.id, by, factor, len(rows))
        self.wake.set()
        return drill

    async def confirm(self, drill: int, token: str, via: str) -> str:
        now = self.now()
        contact, state = await self.store.call(
            self.store.store.confirm_drill, drill, token_hash(token), now, via
        )
        if contact is None:
            raise DrillError(404, "no such drill link")
        if state == "used":
            raise DrillError(409, "this link was already used")
        if state == "expired":
            raise DrillError(410, "this link has expired")
        log.info("drill confirmed id=%d contact=%s via=%s", drill, contact, via)
        self.verified[contact] = now
        self.wake.set()
        return contact

    async def drills(self, limit: int = 20) -> list[Drill]:
        return await self.store.call(self.store.store.drills, limit=limit)

    def verification(self) -> list[ContactVerification]:
        """Per contact: last verified, due, overdue, the latest sentence (for readiness, the page)."""
        return verification(self.config, self.verified, self.latest, self.now())

    # ------------------------------------------------------------------ loop
    async def restore(self) -> None:
        db = self.store.store
        self.verified = await self.store.call(db.last_verified)
        for v in await self.store.call(verification_of, db, self.config, self.now()):
            if v.last_result is not None:
                self.latest[v.contact] = v.last_result

    async def tick(self) -> None:
        now = self.now()
        db = self.store.store
        running = await self.store.call(db.drills, running_only=True)
        for drill in running:
            notes = await self.store.call(db.drill_notifications, drill.id)
            written = {(n.step, n.channel) for n in notes}
            new = [n for n in due_messages(self.config, drill, now) if (n.step, n.channel) not in written]
            if new:  # the store drops a duplicate anyway: this only saves a write per tick
                added = await self.store.call(db.commit, (), new, (), now)
                self.alerting.enqueue(added)
                notes += added
            finished, results, failed = outcome(drill, notes, now)
            if finished:
                await self._finish(drill, results, failed, now)
        await self._maybe_schedule(now)

    async def _finish(self, drill: Drill, results: dict[str, str], failed: list[str], now: float) -> None:
        warnings: list[NewNotification] = []
        if failed:
            text = f"DRILL {drill.id}: {len(failed)} of {len(results)} not reached: " + "; ".join(
                f"{c} ({results[c]})" for c in failed
            )
            message = warning_message(text, self.config, now)
            warnings = [
                NewNotification(
                    0,
                    f"drill:{drill.id}:result",
                    "warning",
                    name,
                    *(("", message.sms) if ch.sms else (message.title, message.body)),
                )
                for name, ch in self.alerting.channels.items()
            ]
        state = "failed" if failed else "passed"
        added = await self.store.call(self.store.store.finish_drill, drill.id, state, results, warnings, now)
        self.alerting.enqueue(added)
        self.latest.update(results)
        log.log(
            logging.WARNING if failed else logging.INFO,
            "drill finished id=%d state=%s not_reached=%s", drill.id, state, ",".join(failed) or "-",
        )  # fmt: skip

    async def _maybe_schedule(self, now: float) -> None:
        d = self.config.drills
        if d.every is None or not self.config.contacts:
            return
        if d.window is not None and not is_available(d.window, d.timezone, now):
            return
        last = await self.store.call(self.store.store.drills, limit=1)
        if last and (last[0].state == "running" or now - last[0].started_at < d.every):
            return
        with contextlib.suppress(DrillError):
            await self.start("schedule")

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK)
            self.wake.clear()
            try:
                await self.tick()
            except StoreError as exc:
                log.error("drills: state store failed: %s", exc)
