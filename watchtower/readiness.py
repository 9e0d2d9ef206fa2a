"""Readiness: is each service prepared for its outage, before it happens? Pure: config, backup
readings, recorded restore tests and ``now`` in; one verdict per service and a site score out.

Levels: ``red`` (it would hurt in an outage: no RTO/RPO, no backup, a restore point older than the
RPO, never restore-tested or not within a year, a failed or too slow last test, expired warranty),
``amber`` (worth fixing: no service tag, warranty ending within 90 days, passphrase location not
written down, contacts not verified), ``green``. ``watchtower readiness`` exits 1 while anything
is red, so a cron job or CI can gate on it.

Restore tests come from the config (``service.restore_tests``) and from
``watchtower restore-test record`` (``state_dir/restore-tests.json``: the config file stays the
admin's). Contacts come from ``contacts:``, verified when a drill reached each of them within its
``verify_every`` (:mod:`watchtower.drill`); without contacts the item says "not configured".
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchtower.backups.watch import BackupStatus, assess
from watchtower.config import Config, RestoreTest
from watchtower.durations import coarse
from watchtower.people import ContactVerification

YEAR = 365 * 86400.0
WARRANTY_AHEAD = 90  # days
LEVELS = ("green", "amber", "red")


@dataclass(frozen=True, slots=True)
class Item:
    name: str  # rto, rpo, backup, restore_test, contacts, service_tag, warranty, passphrase, ...
    level: str  # green | amber | red
    text: str


@dataclass(slots=True)
class ServiceReadiness:
    service: str
    target: str
    items: list[Item] = field(default_factory=list)

    @property
    def level(self) -> str:
        return max((i.level for i in self.items), key=LEVELS.index, default="green")

    @property
    def verdict(self) -> str:
        bad = [i.text for i in self.items if i.level != "green"]
        return f"{self.service}: {self.level.upper()}" + (f" - {'; '.join(bad)}" if bad else " - ready")


@dataclass(slots=True)
class Readiness:
    services: list[ServiceReadiness]
    at: float

    @property
    def score(self) -> int:
        """Per cent of the items that are green, over all services."""
        items = [i for s in self.services for i in s.items]
        return round(100 * sum(i.level == "green" for i in items) / len(items)) if items else 0

    @property
    def red(self) -> bool:
        return any(s.level == "red" for s in self.services)

    def document(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "score": self.score,
            "level": "red"
            if self.red
            else max((s.level for s in self.services), key=LEVELS.index, default="green"),
            "services": [
                {
                    "service": s.service,
                    "target": s.target,
                    "level": s.level,
                    "verdict": s.verdict,
                    "items": [asdict(i) for i in s.items],
                }
                for s in self.services
            ],
        }

    def text(self) -> str:
        lines = [f"readiness score {self.score}% ({'RED' if self.red else 'no red item'})"]
        for s in self.services:
            lines.append(s.verdict)
            for i in s.items:
                lines.append(f"  [{i.level:5}] {i.name}: {i.text}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- restore tests


def _tests_file(config: Config) -> Path:
    return config.state_dir / "restore-tests.json"


def recorded_tests(config: Config) -> dict[str, list[RestoreTest]]:
    """Restore tests recorded with the CLI, by target name (unreadable file: none)."""
    try:
        raw = json.loads(_tests_file(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, list[RestoreTest]] = {}
    for target, rows in raw.items() if isinstance(raw, dict) else ():
        for row in rows if isinstance(rows, list) else ():
            try:
                out.setdefault(target, []).append(RestoreTest.model_validate(row))
            except ValueError:
                continue
    return out


def record_test(config: Config, target: str, test: RestoreTest) -> Path:
    """Append one restore test to ``state_dir/restore-tests.json`` (atomic replace)."""
    path = _tests_file(config)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    raw.setdefault(target, []).append(test.model_dump(mode="json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the rules


def _age_days(date: dt.date, now: float) -> float:
    start = dt.datetime.combine(date, dt.time(), dt.UTC).timestamp()
    return (now - start) / 86400.0


def assess_site(
    config: Config,
    backups: Mapping[str, BackupStatus],
    now: float,
    tests: Mapping[str, list[RestoreTest]] | None = None,
    verified: Sequence[ContactVerification] | None = None,
) -> Readiness:
    """``verified``: the drills' record per contact (None: not known, e.g. no store yet)."""
    tests = tests or {}
    out = []
    for tname, target in config.targets.items():
        svc = target.service
        if svc is None:
            continue
        sr = ServiceReadiness(svc.name, tname)
        add = sr.items.append
        add(Item("rto", "green", f"RTO {coarse(svc.rto)}") if svc.rto else Item("rto", "red", "no RTO set"))
        add(Item("rpo", "green", f"RPO {coarse(svc.rpo)}") if svc.rpo else Item("rpo", "red", "no RPO set"))
        mine = [b for b in config.backups if b.target == tname]
        if not mine:
            add(Item("backup", "red", "no backup configured (service.backups)"))
        for b in mine:
            status = backups.get(b.name) or BackupStatus(b.name, tname, svc.name, b.spec.source.kind)
            problems = assess(b, status, now)
            if status.ok is None and status.newest is None and not problems:
                problems = [f"backup {b.name} not read yet"]
            if problems:
                add(Item("backup", "red", "; ".join(problems)))
            else:
                point = coarse(now - status.newest) if status.newest is not None else "?"
                checked = (
                    f", newest verified {coarse(now - status.newest_verified)} old"
                    if status.newest_verified is not None
                    else ", not verified by the source"
                )
                add(Item("backup", "green", f"{b.name}: newest restore point {point} old{checked}"))
            if b.spec.kept_at:
                add(Item("passphrase", "green", f"{b.name}: kept at {b.spec.kept_at}"))
            elif b.spec.source.kind in ("restic", "borg"):
                add(
                    Item(
                        "passphrase",
                        "amber",
                        f"{b.name}: where the passphrase is kept is not written down (kept_at)",
                    )
                )
        done = sorted([*svc.restore_tests, *tests.get(tname, [])], key=lambda t: t.date)
        if not done:
            add(Item("restore_test", "red", "never restore-tested (watchtower restore-test record)"))
        else:
            last = done[-1]
            age = _age_days(last.date, now)
            took = f" in {coarse(last.duration)}" if last.duration else ""
            if last.result != "ok":
                add(Item("restore_test", "red", f"last restore test {last.date} {last.result}"))
            elif age * 86400.0 > YEAR:
                add(
                    Item(
                        "restore_test", "red", f"last restore test {last.date}, {int(age)} days ago (yearly)"
                    )
                )
            elif svc.rto and last.duration and last.duration > svc.rto:
                add(
                    Item(
                        "restore_test",
                        "red",
                        f"last restore took {coarse(last.duration)}, RTO {coarse(svc.rto)}",
                    )
                )
            else:
                add(Item("restore_test", "green", f"restored {last.date}{took}, {int(age)} days ago"))
        add(_contacts(config, verified))
        host = target.runs_on and config.targets.get(target.runs_on)
        tag = target.service_tag or (host.service_tag if host else None)
        add(
            Item("service_tag", "green", f"service tag {tag}")
            if tag
            else Item("service_tag", "amber", "no service tag recorded")
        )
        warranty = target.warranty_until or (host.warranty_until if host else None)
        if warranty is None:
            add(Item("warranty", "amber", "warranty end not recorded (warranty_until)"))
        else:
            left = -_age_days(warranty, now)
            if left < 0:
                add(Item("warranty", "red", f"warranty ended {warranty}"))
            elif left < WARRANTY_AHEAD:
                add(Item("warranty", "amber", f"warranty ends {warranty} (in {int(left)} days)"))
            else:
                add(Item("warranty", "green", f"warranty until {warranty}"))
        out.append(sr)
    uncovered = sorted({vmid for status in backups.values() for vmid in status.uncovered})
    if uncovered:
        # guests no backup job includes (Proxmox VE's own list): each is a restore that cannot happen
        site = ServiceReadiness("(site)", config.site)
        guests = ", ".join(map(str, uncovered))
        site.items.append(Item("coverage", "red", f"guests covered by no backup job: {guests}"))
        out.append(site)
    out.sort(key=lambda s: (-LEVELS.index(s.level), s.service))
    return Readiness(out, now)


def _contacts(config: Config, verified: Sequence[ContactVerification] | None) -> Item:
    """Contacts verified: each reached by a drill within its ``verify_every``."""
    if not config.contacts:
        return Item("contacts", "amber", "contacts not configured (contacts:)")
    if verified is None:
        return Item("contacts", "amber", "contacts not verified: no drill on record (watchtower drill run)")
    overdue = [v for v in verified if v.overdue]
    if overdue:
        names = ", ".join(
            f"{v.contact} ({'never' if v.last_verified is None else 'last ' + _day(v.last_verified)})"
            for v in overdue
        )
        return Item("contacts", "amber", f"contacts not verified by a drill in time: {names}")
    return Item("contacts", "green", f"{len(verified)} contact(s) verified by drills")


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")
