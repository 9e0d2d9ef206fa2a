"""Backup sources (issue 16): where a service's restore points are, and how old the newest is.

One module per source, each ``async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult``
like the path probes: read-only, secrets from ``*_file``, a failure is a ``ProbeResult`` with a
reason (never a secret), never an exception. What a source found travels in ``values``:

- ``newest``: UNIX time of the newest restore point (absent: the repository holds none);
- ``newest_verified``: of the newest one verified (sources that verify: PBS, PVE);
- ``count``: restore points seen (a source that lists only the newest says 1);
- ``failed_at``: the newest failed job, where the source reports failures (PVE tasks);
- ``uncovered_vmid`` (repeated): guests no backup job covers (PVE).

:mod:`watchtower.backups.watch` turns these into ``backup`` warnings against the RPO.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from watchtower.probes import ProbeContext, ProbeResult

BackupProbe = Callable[[Any, ProbeContext], Awaitable[ProbeResult]]


def get_source(kind: str) -> BackupProbe | None:
    """The probe for a backup source kind (``push`` has none: the job reports itself)."""
    from watchtower.backups import borg, pbs, pve, restic, truenas

    sources: dict[str, BackupProbe] = {
        "restic": restic.probe,
        "borg": borg.probe,
        "pbs": pbs.probe,
        "pve": pve.probe,
        "truenas": truenas.probe,
    }
    return sources.get(kind)
