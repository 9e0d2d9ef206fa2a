"""The daemon's clock: UTC epoch seconds that advance with the monotonic clock.

Incident times are stored as UTC, and escalation compares them with "now". If "now" were the
wall clock, an NTP step or an admin's `date -s` would fire a 15-minute escalation at once (or an
hour late). So the wall clock is read once, at start, and time then advances by the monotonic
clock; a jump of the wall clock is reported (:func:`offset`), not followed.
"""

from __future__ import annotations

import time

_anchor_wall = time.time()
_anchor_mono = time.monotonic()


def now() -> float:
    return _anchor_wall + (time.monotonic() - _anchor_mono)


def offset() -> float:
    """How far the wall clock has moved away from :func:`now` (seconds; + = wall ahead)."""
    return time.time() - now()
