"""Maintenance: which targets are muted at ``now``, until when, and by whom.

Two sources: ad-hoc **mutes** (``watchtower mute``, the API, the status page; stored, so they
survive a restart) and recurring **windows** from the config (``maintenance: [{every: "Sun
02:00-04:00", ...}]``). A mute only withholds pages: probing, correlation and the record go on,
and the incident's timeline says it was opened (or went on) in maintenance. An incident pages as
soon as one of its targets (root or affected) is not muted, so a patched hypervisor whose VMs are
not in the window still pages for them, and a failure that outlasts the window pages at its end.

Pure: every function takes ``now``; nothing here reads the clock or does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from watchtower.engine.incidents import Incident

SITE = "*"  # a mute of every target of the site
MAX_MUTE = 7 * 86400.0  # a longer mute is refused: nobody should forget one for weeks
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Timeline kinds this module writes; the escalation clock restarts at the last END.
IN_MAINTENANCE, MAINTENANCE_END = "maintenance", "maintenance_end"

_CLOCK = r"\d{1,2}:\d{2}(?::\d{2})?"
_EVERY = re.compile(rf"^\s*(?:(?P<days>[A-Za-z,\- ]+?)\s+)?(?P<start>{_CLOCK})\s*-\s*(?P<end>{_CLOCK})\s*$")
EVERY_HINT = (
    'must look like "Sun 02:00-04:00", "Mon-Fri 12:00-12:30", "Sat,Sun 01:00-05:00" or "daily 23:00-01:00"'
)


@dataclass(frozen=True, slots=True)
class Mute:
    """An ad-hoc mute of one target (or ``SITE``) from ``start`` to ``end``."""

    id: int
    target: str
    start: float
    end: float
    reason: str
    by: str
    created_at: float

    def covers(self, target: str, now: float) -> bool:
        return self.target in (target, SITE) and self.start <= now < self.end


@dataclass(frozen=True, slots=True)
class Schedule:
    """``every:`` parsed: on these weekdays (0 = Monday), from ``start`` for ``length`` seconds."""

    days: frozenset[int]
    start: time
    length: float  # a window that ends at or before its start time ends the next day


@dataclass(frozen=True, slots=True)
class Window:
    """A recurring window from the config."""

    schedule: Schedule
    timezone: str
    targets: tuple[str, ...]  # empty: every target
    text: str  # the ``every:`` as written, for the timeline
    reason: str | None = None

    def covers(self, target: str) -> bool:
        return not self.targets or target in self.targets


@dataclass(frozen=True, slots=True)
class MutedBy:
    """Why a target is muted now, and until when."""

    until: float
    source: str  # "mute #3 by alice" or "window Sun 02:00-04:00 (Europe/Berlin)"
    reason: str | None


def _clock(text: str) -> time:
    parts = [int(p) for p in text.split(":")]
    hour, minute, second = [*parts, 0][:3]
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"{text!r} is not a time of day; {EVERY_HINT}")
    return time(hour, minute, second)


def _day(text: str) -> int:
    key = text.strip().lower()[:3]
    if key not in DAYS:
        raise ValueError(f"{text.strip()!r} is not a weekday; {EVERY_HINT}")
    return DAYS.index(key)


def parse_every(text: str) -> Schedule:
    """``"Mon-Fri 22:00-02:00"`` -> a Schedule. Raises ValueError with the accepted forms."""
    match = _EVERY.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(EVERY_HINT)
    days: set[int] = set()
    spec = (match.group("days") or "daily").strip().lower()
    if spec in ("daily", "every day", "day", "*"):
        days = set(range(7))
    elif spec in ("weekdays",):
        days = set(range(5))
    else:
        for part in (p for p in spec.replace(" ", "").split(",") if p):
            if "-" in part:
                first, last = (_day(d) for d in part.split("-", 1))
                days.update((first + k) % 7 for k in range((last - first) % 7 + 1))
            else:
                days.add(_day(part))
    if not days:
        raise ValueError(EVERY_HINT)
    start, end = _clock(match.group("start")), _clock(match.group("end"))
    seconds = (end.hour * 3600 + end.minute * 60 + end.second) - (
        start.hour * 3600 + start.minute * 60 + start.second
    )
    return Schedule(frozenset(days), start, float(seconds if seconds > 0 else seconds + 86400))


def zone(name: str) -> ZoneInfo:
    """The time zone ``name``; ValueError for one the system does not know."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name like Europe/Berlin or UTC)") from None


def window_span(window: Window, now: float) -> tuple[float, float] | None:
    """The occurrence of ``window`` that covers ``now`` as (start, end) epoch seconds, else None.
    Local wall-clock times in the window's zone: 02:00-04:00 stays 02:00-04:00 across DST."""
    tz = zone(window.timezone)
    local = datetime.fromtimestamp(now, tz)
    sched = window.schedule
    for back in range(0, 2 + int(sched.length // 86400)):
        day: date = local.date() - timedelta(days=back)
        if day.weekday() not in sched.days:
            continue
        start = datetime.combine(day, sched.start, tz)
        # wall-clock end: the same clock time `length` later, so DST does not shift it
        end = (start.replace(tzinfo=None) + timedelta(seconds=sched.length)).replace(tzinfo=tz)
        if start.timestamp() <= now < end.timestamp():
            return start.timestamp(), end.timestamp()
    return None


def muted_by(target: str, mutes: Iterable[Mute], windows: Iterable[Window], now: float) -> MutedBy | None:
    """Why ``target`` is muted at ``now`` (the cover that lasts longest), or None."""
    best: MutedBy | None = None
    for mute in mutes:
        if mute.covers(target, now) and (best is None or mute.end > best.until):
            best = MutedBy(mute.end, f"mute #{mute.id} by {mute.by}", mute.reason)
    for window in windows:
        if not window.covers(target):
            continue
        span = window_span(window, now)
        if span is not None and (best is None or span[1] > best.until):
            best = MutedBy(span[1], f"window {window.text} ({window.timezone})", window.reason)
    return best


def muted_targets(
    targets: Iterable[str], mutes: Sequence[Mute], windows: Sequence[Window], now: float
) -> dict[str, MutedBy]:
    """Every muted target among ``targets`` with its reason."""
    out: dict[str, MutedBy] = {}
    for name in targets:
        why = muted_by(name, mutes, windows, now)
        if why is not None:
            out[name] = why
    return out


def incident_muted(incident: Incident, muted: Mapping[str, MutedBy]) -> bool:
    """An incident is muted while its root and everything it took down are muted."""
    return all(name in muted for name in (incident.root, *incident.affected))


def _hhmm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%MZ")


def maintenance_note(
    incident: Incident, muted: Mapping[str, MutedBy], now: float
) -> tuple[bool, tuple[str, str] | None]:
    """Whether the incident is muted now (what the escalation policy needs), and the timeline
    event (kind, text) to record when it enters or leaves maintenance, else None."""
    is_muted = incident.is_open and incident_muted(incident, muted)
    marks = [e for e in incident.timeline if e.kind in (IN_MAINTENANCE, MAINTENANCE_END)]
    inside = bool(marks) and marks[-1].kind == IN_MAINTENANCE
    if is_muted and not inside:
        why = muted[incident.root]
        reason = f": {why.reason}" if why.reason else ""
        text = f"in maintenance until {_hhmm(why.until)} ({why.source}{reason}); no pages"
        return True, (IN_MAINTENANCE, text)
    if inside and incident.is_open and not is_muted:
        outside = [n for n in (incident.root, *incident.affected) if n not in muted]
        if incident.root in outside:
            text = "maintenance over, still down: paging as a normal incident"
        else:
            text = f"affects targets not in maintenance ({', '.join(outside)}): paging"
        return False, (MAINTENANCE_END, text)
    return is_muted, None


def paging_start(incident: Incident) -> float:
    """When the escalation clock starts: the opening, or the end of the maintenance it was opened
    in (a failure that outlasts the window pages at its end, and escalates from there)."""
    start = incident.opened_at
    for event in incident.timeline:
        if event.kind == MAINTENANCE_END and event.at > start:
            start = event.at
    return start


def check_mute_end(start: float, end: float) -> None:
    """A mute needs an end in the future, at most MAX_MUTE after its start. Raises ValueError."""
    if end <= start:
        raise ValueError("the end of a mute must be in the future")
    if end - start > MAX_MUTE:
        raise ValueError(
            "a mute lasts at most 7d (a forgotten mute hides real outages); "
            "put recurring work in the config's maintenance: windows"
        )
