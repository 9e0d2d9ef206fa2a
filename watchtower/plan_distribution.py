"""``plan.distribute``: the recovery plan as an attachment to the phones, once per period.

Each channel named by ``plan.distribute.notify`` that takes attachments (apprise's mail and
Signal plugins do; SMS does not) gets a fresh copy when it has had none for ``every``. The time of
the last good delivery per channel is kept in ``state_dir/plan-distribution.json`` (written
atomically after each delivery), so a restart neither sends it again nor forgets it. A failed
delivery is retried at the next look (every 5 minutes), not counted as sent. The window between
a delivery and its record is the only way to get a copy twice (a crash right then).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watchtower import clock
from watchtower.config import Config
from watchtower.durations import coarse
from watchtower.engine.escalation import channels_for
from watchtower.notify.sender import ChannelSender

log = logging.getLogger(__name__)
LOOK_EVERY = 300.0


class PlanDistributor:
    def __init__(self, config: Config, backups: Any = None):
        self.config = config
        self.backups = backups  # a BackupWatch, for the backups' age at export
        self.senders: dict[str, ChannelSender] = {}
        self._skipped: set[str] = set()

    @property
    def _state_file(self) -> Path:
        return self.config.state_dir / "plan-distribution.json"

    def sent(self) -> dict[str, float]:
        try:
            raw = json.loads(self._state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return (
            {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}
            if isinstance(raw, dict)
            else {}
        )

    def _record(self, channel: str, at: float) -> None:
        rows = self.sent()
        rows[channel] = at
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        os.replace(tmp, self._state_file)

    def due(self, now: float) -> list[str]:
        """Channels owed a copy now (pure given the state file)."""
        policy = self.config.plan.distribute
        if policy is None:
            return []
        last = self.sent()
        return [
            name
            for name in channels_for(self.config.notify, policy.notify)
            if name not in last or now - last[name] >= policy.every
        ]

    def _sender(self, name: str) -> ChannelSender | None:
        if name not in self.senders:
            channel = next((c for c in self.config.notify.channels if c.name == name), None)
            if channel is None:
                return None
            self.senders[name] = ChannelSender(channel, timeout=60.0)
        return self.senders[name]

    async def look(self, now: float) -> dict[str, str]:
        """Send the plan where it is due. Returns channel -> outcome ("sent" or why not)."""
        from watchtower.plan import PdfUnavailable, export

        due = self.due(now)
        outcome: dict[str, str] = {}
        targets = []
        for name in due:
            sender = self._sender(name)
            if sender is None or not sender.takes_attachments:
                outcome[name] = "this channel takes no attachments"
                if name not in self._skipped:
                    self._skipped.add(name)
                    log.warning("plan not sent channel=%s: it takes no attachments", name)
                continue
            targets.append((name, sender))
        if not targets:
            return outcome
        fmt = self.config.plan.format
        readings: Mapping[str, Any] = self.backups.status if self.backups is not None else {}
        try:
            data = await export(self.config, fmt, dict(readings), now)
        except PdfUnavailable as exc:
            log.error("plan not sent: %s", exc)
            return {**outcome, **{name: str(exc) for name, _ in targets}}
        assert self.config.plan.distribute is not None
        every = coarse(self.config.plan.distribute.every)
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        title = f"[watchtower {self.config.site}] Recovery plan, {day}"
        body = (
            f"The recovery plan of {self.config.site} ({day}) is attached: restore order, contacts, "
            f"first steps, service tags, backups. Keep it on your phone; the day it is needed the "
            f"servers may be down. A fresh copy comes every {every}."
        )
        with tempfile.TemporaryDirectory(prefix="watchtower-plan-") as tmp:
            path = Path(tmp) / f"recovery-plan-{self.config.site}-{day}.{fmt}"
            path.write_bytes(data)
            for name, sender in targets:
                result = await sender.send(title, body, attach=str(path))
                if result.ok:
                    self._record(name, now)
                    outcome[name] = "sent"
                    log.info("plan sent channel=%s format=%s bytes=%d", name, fmt, len(data))
                else:
                    outcome[name] = result.error or "delivery failed"
                    log.warning("plan not delivered channel=%s: %s", name, result.error)
        return outcome

    async def run(self) -> None:
        while True:
            if self.config.plan.distribute is not None:
                try:
                    await self.look(clock.now())
                except OSError as exc:  # state dir unwritable: said, retried at the next look
                    log.error("plan distribution failed: %s", exc)
                except Exception:  # a bug here must not end the daemon; the trace says where
                    log.exception("plan distribution failed")
            await asyncio.sleep(LOOK_EVERY)

    def reload(self, config: Config) -> None:
        self.close()
        self.config = config

    def close(self) -> None:
        for sender in self.senders.values():
            with contextlib.suppress(Exception):
                sender.close()
        self.senders = {}
