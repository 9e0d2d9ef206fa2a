"""Durations as people read them. One place, two precisions:

- :func:`exact` for records (timelines, reports): ``14s``, ``22m05s``, ``22m``, ``1h10m``, ``4h``;
- :func:`coarse` for alerts and the status page, minutes resolution, rounded down: ``45s``,
  ``23m``, ``3h12m``, ``4h``, ``2d05h`` (nobody plans a restore in seconds).
"""

from __future__ import annotations


def exact(seconds: float) -> str:
    total = max(0, round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"


def coarse(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
