"""Which messages a warning incident (``backup``, ``certificate``) is owed: pure, like ``due``.

A warning is not an outage: it goes once to ``notify.warnings.notify`` and only within
``notify.warnings.hours`` (default Mon-Fri 08:00-18:00), never through the escalation steps, never
as a status update. One raised at night waits for the next opening; one that cleared before
anyone was told is not sent at all. Its clearing goes to the same channels, also within hours.
Step ids: ``warning`` (the one message) and ``resolve:0`` (cleared).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from watchtower.config import Config

if TYPE_CHECKING:
    from watchtower.engine.escalation import DueStep
    from watchtower.engine.incidents import Incident


def warning_due(incident: Incident, config: Config, now: float, fired: Collection[str]) -> list[DueStep]:
    from watchtower.engine.escalation import DueStep, channels_for

    policy = config.notify.warnings
    channels = channels_for(config.notify, policy.notify)
    if not channels or not policy.window.contains(now):
        return []
    if incident.is_open:
        if "warning" in fired:
            return []
        return [DueStep("warning", "page", channels, f"{incident.scope} warning")]
    if "warning" in fired and "resolve:0" not in fired:
        return [DueStep("resolve:0", "resolve", channels, "cleared")]
    return []
