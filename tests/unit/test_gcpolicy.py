"""The GC policy: a settle pass reclaims cyclic garbage first, then takes the survivors out of later
passes (frozen), so the next full pass scans only what is new."""

from __future__ import annotations

import gc
import weakref

from watchtower import gcpolicy


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector reclaims it


def test_settle_collects_cycles_then_freezes_the_survivors() -> None:
    gc.unfreeze()
    try:
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        kept = [Node() for _ in range(100)]
        took = gcpolicy.settle_once()
        assert gone() is None  # collected before the freeze, not frozen with the survivors
        assert took >= 0 and gc.get_freeze_count() >= len(kept)
        assert not any(gc.is_tracked(k) and k in gc.get_objects(generation=2) for k in kept[:3])
    finally:
        gc.unfreeze()
