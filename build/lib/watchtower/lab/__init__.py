"""Simulated small-business site in network namespaces, shared by the demo, tests and benchmarks.

Import cost is stdlib-only on purpose: the helper processes (responder, nfqdelay) are started as
``python -m watchtower.lab.X`` and must come up fast.
"""

from watchtower.lab.site import (
    BREAK_MODES,
    DEMO,
    SITES,
    Lab,
    LabError,
    LabHost,
    LabSpec,
    LabUsageError,
    SpecError,
    bulk_site,
)


def lab_main(argv: list[str]) -> int:
    """``watchtower lab ARGV`` (imported lazily so ``import watchtower.lab`` stays light)."""
    from watchtower.lab.cli import lab_main as _lab_main

    return _lab_main(argv)


__all__ = [
    "BREAK_MODES",
    "DEMO",
    "SITES",
    "Lab",
    "LabError",
    "LabHost",
    "LabSpec",
    "LabUsageError",
    "SpecError",
    "bulk_site",
    "lab_main",
]
