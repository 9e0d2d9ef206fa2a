"""Keep the garbage collector's passes short, so they do not stall probing.

The daemon freezes the config and the path table out of the collector's view at start and after a
reload (``gc.freeze()`` in daemon.py). What accumulates afterwards (each path's last result, memory,
histograms, incident state) lands in the oldest generation, and a full pass over it held the loop
for 60-90 ms at 10,000 paths (bench/RESULTS.md, before this module). So every ``every`` seconds
:func:`settle` collects once, then freezes what survived: a full pass then only ever scans what
survived since the last one (about one probe round's results at 10k paths), never the whole heap.

The trade-off: a frozen object that later becomes part of a reference *cycle* is not reclaimed
until the next reload (which unfreezes and collects everything). Acyclic garbage (probe results,
strings, most of what a run allocates) is freed by reference counting whether frozen or not; the
scale bench shows RSS flat over its runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("watchtower.gc")

SETTLE_EVERY = 60.0
FIRST_AFTER = 15.0  # the first rounds of probes have filled every path's memory by then


def settle_once() -> float:
    """One collection of every generation, then freeze the survivors; returns its seconds."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


async def settle(every: float = SETTLE_EVERY, first: float = FIRST_AFTER) -> None:
    """Run :func:`settle_once` after ``first`` seconds, then every ``every`` seconds, until cancelled."""
    await asyncio.sleep(first)
    while True:
        took = settle_once()
        log.debug("gc settled seconds=%.3f frozen=%d", took, gc.get_freeze_count())
        await asyncio.sleep(every)
