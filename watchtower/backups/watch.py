"""Backup freshness against each service's RPO: reads the sources, raises and clears warnings.

:func:`assess` is pure (a reading, the backup's policy, ``now`` -> what is wrong); :class:`BackupWatch`
reads every source on its ``interval``, keeps the newest reading, and opens one ``backup`` warning
incident per backup while anything is wrong, cleared when a fresh restore point appears.
Push backups report themselves (``POST /api/v1/backups/NAME``); their last report survives
restarts in ``state_dir/backup-pushes.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from watchtower import clock
from watchtower.backups import get_source
from watchtower.config import Config, ResolvedBackup
from watchtower.durations import coarse
from watchtower.engine.correlate import WARNING_SCOPES, Scope
from watchtower.engine.escalation import outage_start
from watchtower.engine.incidents import Change, Incident, IncidentTracker
from watchtower.probes import ProbeContext, ProbeResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BackupStatus:
    name: str
    target: str
    service: str
    kind: str
    read_at: float | None = None  # last read (or push)
    ok: bool | None = None  # the last read worked (None: not read yet)
    detail: str = ""
    newest: float | None = None
    newest_verified: float | None = None
    count: int | None = None
    failed_at: float | None = None  # push: the last `/fail`; pve: the newest failed vzdump task
    uncovered: tuple[int, ...] = ()  # pve: guests no backup job covers (site-wide)


def _hhmm(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def assess(backup: ResolvedBackup, status: BackupStatus, now: float) -> list[str]:
    """What is wrong with this backup now, as sentences naming the service; [] when all is well."""
    spec, service = backup.spec, backup.service
    problems = []
    if status.ok is False:
        problems.append(f"{service}: cannot read backup {backup.name}: {status.detail}")
    if status.failed_at is not None and (status.newest is None or status.failed_at > status.newest):
        problems.append(
            f"{service}: backup job {backup.name} reported a failure at {_hhmm(status.failed_at)}"
        )
    pve = backup.spec.pve
    if pve is not None and pve.vmid in status.uncovered:
        problems.append(f"{service}: guest {pve.vmid} is covered by no backup job ({backup.name})")
    if status.ok is None and status.newest is None:
        if backup.spec.push is not None and backup.max_age is not None:
            return [f"{service}: backup {backup.name} has not reported yet"]
        return problems
    if backup.max_age is not None and status.ok is not False:
        if status.newest is None:
            problems.append(f"{service}: backup {backup.name} holds no restore point")
        elif now - status.newest > backup.max_age:
            problems.append(
                f"{service}: newest restore point {_hhmm(status.newest)} is {coarse(now - status.newest)} "
                f"old, RPO {coarse(backup.max_age)} ({backup.name})"
            )
    if spec.verified_within is not None and status.ok is not False:
        verified = status.newest_verified
        if verified is None or now - verified > spec.verified_within:
            age = "none verified" if verified is None else f"newest verified {coarse(now - verified)} old"
            problems.append(f"{service}: {age}, wanted within {coarse(spec.verified_within)} ({backup.name})")
    if spec.min_count is not None and status.count is not None and status.count < spec.min_count:
        problems.append(
            f"{service}: {status.count} restore point(s), wanted at least {spec.min_count} ({backup.name})"
        )
    return problems


def restore_loss(backup: ResolvedBackup, status: BackupStatus, now: float) -> str:
    """What a restore loses now, for the page and the restore board."""
    point = status.newest_verified if status.newest_verified is not None else status.newest
    which = "newest verified restore point" if status.newest_verified is not None else "newest restore point"
    if point is None:
        if status.ok is None:
            return f"{backup.service}: restore point unknown yet ({backup.name} not read)"
        return f"{backup.service}: no restore point known ({backup.name})"
    age = coarse(max(0.0, now - point))
    rpo = f", RPO {coarse(backup.max_age)}" if backup.max_age is not None else ""
    return (
        f"{backup.service}: {which} {_hhmm(point)}, {age} ago{rpo}: restore loses up to {age} ({backup.name})"
    )


def restore_at(backup: ResolvedBackup, status: BackupStatus, start: float) -> str:
    """The restore point as of the outage's start (T+0), for the post-mortem."""
    point = status.newest_verified if status.newest_verified is not None else status.newest
    if point is None or point > start:
        known = "no restore point known" if point is None else "newest known restore point is after T+0"
        return f"{backup.service}: {known} ({backup.name}); record the one actually used"
    lost = coarse(start - point)
    rpo = backup.max_age
    verdict = "" if rpo is None else (" - within the RPO" if start - point <= rpo else " - RPO BROKEN")
    which = "newest verified restore point" if status.newest_verified is not None else "newest restore point"
    return (
        f"{backup.service}: {which} at T+0 was {_hhmm(point)}, {lost} before the first failed probe"
        f"{f' (RPO {coarse(rpo)})' if rpo is not None else ''}: a restore loses up to {lost}{verdict} "
        f"({backup.name})"
    )


class BackupWatch:
    def __init__(self, config: Config, tracker: IncidentTracker, shared: ProbeContext | None = None):
        self.tracker = tracker
        self.shared = shared or ProbeContext(timeout=0)
        self.status: dict[str, BackupStatus] = {}
        self.changed: asyncio.Event | None = None  # the alerting's: set when a warning opens/clears
        self._wake = asyncio.Event()
        self._next: dict[str, float] = {}
        self.apply(config)
        self._load_pushes()

    def apply(self, config: Config) -> None:
        self.config = config
        self.backups = {b.name: b for b in config.backups}
        old = self.status
        self.status = {}
        for b in config.backups:
            kept = old.get(b.name)
            if kept is not None and kept.kind == b.spec.source.kind:
                kept.target, kept.service = b.target, b.service
                self.status[b.name] = kept
            else:
                self.status[b.name] = BackupStatus(b.name, b.target, b.service, b.spec.source.kind)
        self._wake.set()

    # ------------------------------------------------------------------ push
    @property
    def _push_file(self) -> Path:
        return self.config.state_dir / "backup-pushes.json"

    def _load_pushes(self) -> None:
        try:
            saved = json.loads(self._push_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for name, row in saved.items() if isinstance(saved, dict) else ():
            status = self.status.get(name)
            if status is not None and status.kind == "push" and isinstance(row, dict):
                status.newest, status.failed_at = row.get("newest"), row.get("failed_at")
                status.read_at = row.get("read_at")
                status.ok, status.count = True, row.get("count")

    def _save_pushes(self) -> None:
        rows = {n: asdict(s) for n, s in self.status.items() if s.kind == "push"}
        tmp = self._push_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(rows), encoding="utf-8")
            os.replace(tmp, self._push_file)

    def push(self, name: str, ok: bool, now: float) -> BackupStatus:
        """A push backup reported (KeyError for an unknown or non-push name)."""
        status = self.status[name]
        if status.kind != "push":
            raise KeyError(name)
        status.read_at, status.ok = now, True
        if ok:
            status.newest = now
            status.count = (status.count or 0) + 1
            status.detail = "reported a finished backup"
        else:
            status.failed_at = now
            status.detail = "reported a failed backup"
        self._save_pushes()
        self.evaluate(now)
        return status

    # ------------------------------------------------------------------ reading
    def record(self, name: str, result: ProbeResult, now: float) -> None:
        status = self.status.get(name)
        if status is None:
            return
        status.read_at, status.ok, status.detail = now, result.ok, result.detail
        if result.ok:
            values = dict(result.values)
            if "newest" in values or status.kind != "truenas":
                # TrueNAS reports a task's last state only: while it runs or after an error, the
                # last good run seen before is still the newest restore point
                status.newest = values.get("newest")
            status.newest_verified = values.get("newest_verified")
            count = values.get("count")
            status.count = int(count) if count is not None else None
            if status.kind != "push":
                status.failed_at = values.get("failed_at")
            status.uncovered = tuple(int(v) for k, v in result.values if k == "uncovered_vmid")

    async def read(self, backup: ResolvedBackup) -> ProbeResult:
        source = get_source(backup.spec.source.kind)
        assert source is not None
        ctx = ProbeContext(
            timeout=backup.spec.timeout, http_session=self.shared.http_session, extra=self.shared.extra
        )
        try:
            return await source(backup.spec, ctx)
        except Exception as exc:  # a bug in a source must not end the watch; it is logged with its trace
            log.exception("backup source failed backup=%s", backup.name)
            from watchtower.probes import Failure

            return ProbeResult.fail(Failure.INTERNAL, f"internal error: {exc.__class__.__name__}")

    async def read_all(self, now: float) -> None:
        """Read every pulled source once (the CLI's `readiness`, tests)."""
        pulled = [b for b in self.backups.values() if b.spec.source.kind != "push"]
        results = await asyncio.gather(*(self.read(b) for b in pulled))
        for backup, result in zip(pulled, results, strict=True):
            self.record(backup.name, result, now)

    def evaluate(self, now: float) -> list[Change]:
        changes: list[Change] = []
        for name, backup in self.backups.items():
            status = self.status[name]
            problems = assess(backup, status, now)
            if problems:
                text = problems[0] if len(problems) == 1 else f"{problems[0]} (+{len(problems) - 1} more)"
                changes += self.tracker.raise_warning(Scope.BACKUP, name, text, problems, now)
            else:
                point = f"newest {_hhmm(status.newest)}" if status.newest is not None else "ok"
                changes += self.tracker.clear_warning(
                    Scope.BACKUP, name, f"{backup.service}: backup {name} fresh again ({point})", now
                )
        for change in changes:
            log.info("backup warning id=%d change=%s: %s", change.incident, change.kind, change.text)
        if changes and self.changed is not None:
            self.changed.set()
        return changes

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            mono = loop.time()
            due = [
                b
                for b in self.backups.values()
                if b.spec.source.kind != "push" and self._next.get(b.name, 0.0) <= mono
            ]
            for b in due:
                self._next[b.name] = mono + b.spec.interval
            if due:
                results = await asyncio.gather(*(self.read(b) for b in due))
                now = clock.now()
                for backup, result in zip(due, results, strict=True):
                    self.record(backup.name, result, now)
                    if not result.ok:
                        log.warning("backup read failed backup=%s detail=%r", backup.name, result.detail)
            try:
                self.evaluate(clock.now())
            except Exception:  # a bug here must not end the daemon; the trace says where
                log.exception("backup evaluation failed")
            pending = [
                self._next.get(b.name, 0.0) for b in self.backups.values() if b.spec.source.kind != "push"
            ]
            wait = min([*(t - loop.time() for t in pending), 60.0])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

    # ------------------------------------------------------------------ for pages and reports
    def _targets_of(self, incident: Incident) -> list[str]:
        from watchtower.engine.topology import Topology

        names = [incident.root, *incident.affected]
        if incident.root in self.config.targets:
            names += Topology.from_config(self.config).dependents(incident.root)
        return list(dict.fromkeys(names))

    def restore_lines(self, incident: Incident, now: float) -> list[str]:
        """Per backed-up service the outage hits: what a restore loses now. The first time, the
        restore point as of T+0 goes into the incident's timeline, for the post-mortem's RPO line."""
        if incident.scope in WARNING_SCOPES or incident.scope is Scope.MONITOR:
            return []
        targets = self._targets_of(incident)
        mine = [b for b in self.backups.values() if b.target in targets]
        known = incident.id in self.tracker.incidents  # the tracker is the incidents' only writer
        if mine and known and not any(e.kind == "restore_point" for e in incident.timeline):
            start = outage_start(incident)
            for b in mine:
                point = restore_at(b, self.status[b.name], start)
                self.tracker.annotate(incident.id, "restore_point", point, now)
        return [restore_loss(b, self.status[b.name], now) for b in mine]

    def restore_by_target(self, now: float) -> dict[str, str]:
        """target -> what a restore of it loses now, for the restore board."""
        out: dict[str, list[str]] = {}
        for b in self.backups.values():
            out.setdefault(b.target, []).append(restore_loss(b, self.status[b.name], now))
        return {t: "; ".join(lines) for t, lines in out.items()}
