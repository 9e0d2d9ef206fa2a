"""The daemon's clock: UTC epoch seconds that advance with the monotonic clock.

Incident times are stored as UTC, and escalation compares them with "now". If "now" were the
wall clock, an NTP step or an admin's `date -s` would fire a 15-minute escalation at once (or an
hour late). So the wall clock is read once, at start, and time then advances by the monotonic
clock; a jump of the wall clock is reported (:func:`offset`), not followed.

The fault simulator (:mod:`watchtower.sim`) runs the engine on virtual time: it hands in its own
source with :func:`use` for the length of a run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

_anchor_wall = time.time()
_anchor_mono = time.monotonic()
_source: Callable[[], float] | None = None


def now() -> float:
    if _source is not None:
        return _source()
    return _anchor_wall + (time.monotonic() - _anchor_mono)


def offset() -> float:
    """How far the wall clock has moved away from :func:`now` (seconds; + = wall ahead)."""
    return time.time() - now()


@contextlib.contextmanager
def use(source: Callable[[], float]) -> Iterator[None]:
    """Make :func:`now` read ``source`` until the block ends (the simulator's virtual clock)."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
