"""Weekly hours such as ``Mon-Fri 08:00-18:00``: when warnings may be sent.

Pure: the caller passes the time. Parsing errors are ``ValueError`` with a message that says what
form is expected, so the config can name the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FORM = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z,\- ]+?)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)
_EXAMPLE = 'expected "always" or days and hours like "Mon-Fri 08:00-18:00" or "daily 07:00-22:00"'


def _minutes(text: str) -> int:
    hours, minutes = (int(p) for p in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or hours * 60 + minutes > 24 * 60:
        raise ValueError(f"{text!r} is not a time of day; {_EXAMPLE}")
    return hours * 60 + minutes


def _days(text: str | None) -> frozenset[int]:
    if text is None or text.strip().lower() in ("daily", "every day"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        try:
            a = DAYS.index(first[:3])
            b = DAYS.index(last[:3]) if last else a
        except ValueError:
            raise ValueError(f"{part!r} is not a weekday (Mon..Sun); {_EXAMPLE}") from None
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class WeeklyHours:
    """Days of the week and one span of local time on each (``end`` may be 24:00)."""

    text: str
    days: frozenset[int]
    start: int  # minutes after local midnight
    end: int
    zone: str

    @classmethod
    def parse(cls, text: str, zone: str = "UTC") -> WeeklyHours:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r} (an IANA name like Europe/Berlin)") from None
        if text.strip().lower() == "always":
            return cls(text, frozenset(range(7)), 0, 24 * 60, zone)
        match = _FORM.match(text)
        if match is None:
            raise ValueError(f"{text!r}: {_EXAMPLE}")
        start, end = _minutes(match["start"]), _minutes(match["end"])
        if end <= start:
            raise ValueError(f"{text!r}: the span must end after it starts (no spans over midnight)")
        return cls(text, _days(match["days"]), start, end, zone)

    def contains(self, ts: float) -> bool:
        local = datetime.fromtimestamp(ts, ZoneInfo(self.zone))
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.days and self.start <= minute < self.end

    def next_open(self, ts: float) -> float:
        """``ts`` itself when inside, else the start of the next span (at most a week ahead)."""
        if self.contains(ts):
            return ts
        local = datetime.fromtimestamp(ts, ZoneInfo(self.zone))
        for ahead in range(8):
            day = (local + timedelta(days=ahead)).replace(hour=0, minute=0, second=0, microsecond=0)
            opening = day + timedelta(minutes=self.start)
            if day.weekday() in self.days and opening.timestamp() > ts:
                return opening.timestamp()
        return ts  # no day listed: unreachable, parse() needs at least one day
