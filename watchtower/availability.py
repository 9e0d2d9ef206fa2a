"""Weekly availability windows like ``Mon-Fri 07:00-19:00; Sat 09:00-12:00`` in a time zone.

Pure: parsing is done once (the config validates with :func:`parse_windows`), and
:func:`is_available` takes the instant to look at. A window whose end is before its start runs
over midnight into the next day (``Mon-Fri 19:00-07:00`` is the weeknight on-call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK = 7 * 1440  # minutes
ALWAYS = ("always", "24/7")

_WINDOW = re.compile(r"^(?P<days>[A-Za-z,\-]+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})$")


@dataclass(frozen=True, slots=True)
class Windows:
    """Minutes of the week (Monday 00:00 = 0) covered, as half-open [start, end) spans."""

    spans: tuple[tuple[int, int], ...]
    text: str

    def covers(self, minute_of_week: int) -> bool:
        m = minute_of_week % WEEK
        return any(a <= m < b for a, b in self.spans)


def _minutes(text: str, *, end: bool) -> int:
    hh, mm = (int(x) for x in text.split(":"))
    if mm > 59 or hh > 24 or (hh == 24 and (mm or not end)):
        raise ValueError(f"{text!r} is not a time of day (HH:MM, 00:00 to 24:00)")
    return hh * 60 + mm


def _days(text: str) -> list[int]:
    out: list[int] = []
    for part in text.lower().split(","):
        if part == "daily":
            out += range(7)
            continue
        first, _, last = part.partition("-")
        if first[:3] not in DAYS or (last and last[:3] not in DAYS):
            raise ValueError(f"{part!r} is not a day or range of days (Mon, Tue, ..., Sun, Mon-Fri, daily)")
        a = DAYS.index(first[:3])
        b = DAYS.index(last[:3]) if last else a
        out += [(a + k) % 7 for k in range((b - a) % 7 + 1)]
    return out


@lru_cache(maxsize=256)
def parse_windows(text: str) -> Windows:
    """``always``, ``never`` or ``DAYS HH:MM-HH:MM[; ...]``; raises ValueError with what is wrong."""
    value = " ".join(text.split())
    if value.lower() in ALWAYS:
        return Windows(((0, WEEK),), value)
    if value.lower() == "never":  # on leave: kept in the config, paged by no step
        return Windows((), value)
    spans: list[tuple[int, int]] = []
    for raw in value.split(";"):
        part = raw.strip()
        match = _WINDOW.match(part)
        if match is None:
            raise ValueError(
                f"{part!r} is not a window like 'Mon-Fri 07:00-19:00' (or 'always'; several with ';')"
            )
        start = _minutes(match["start"], end=False)
        stop = _minutes(match["end"], end=True)
        if start == stop:
            raise ValueError(f"{part!r} is empty: start and end are the same")
        length = (stop - start) % 1440 or 1440
        for day in _days(match["days"]):
            a = day * 1440 + start
            b = a + length
            if b <= WEEK:
                spans.append((a, b))
            else:  # Sunday night into Monday morning
                spans += [(a, WEEK), (0, b - WEEK)]
    return Windows(tuple(sorted(spans)), value)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone (like Europe/Berlin or UTC)") from None


def minute_of_week(at: float, tz: str) -> int:
    local = datetime.fromtimestamp(at, zone(tz))
    return local.weekday() * 1440 + local.hour * 60 + local.minute


def is_available(windows: str, tz: str, at: float) -> bool:
    return parse_windows(windows).covers(minute_of_week(at, tz))


def describe_minute(minute: int) -> str:
    m = minute % WEEK
    return f"{DAYS[m // 1440].capitalize()} {m % 1440 // 60:02d}:{m % 60:02d}"
