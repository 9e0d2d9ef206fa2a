"""Path states from consecutive probe results (``fail_after`` / ``recover_after``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from watchtower.config import ResolvedPath
from watchtower.probes import Failure, ProbeResult


class PathState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # not settled yet, no prober, or watchtower itself failed to probe


def sent_at(result: ProbeResult, path: ResolvedPath, now: float) -> float:
    """When the probe that gave ``result`` at ``now`` was sent: one that took its latency, or one
    that timed out, a timeout ago. (A success without a latency: now.)"""
    if result.latency is not None:
        return now - result.latency
    return now if result.ok else now - path.timeout


@dataclass(slots=True)
class PathStatus:
    """What watchtower knows about one path. Mutated only on the event loop (by :meth:`observe`)."""

    path: ResolvedPath
    state: PathState = PathState.UNKNOWN
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last: ProbeResult | None = None
    last_at: float | None = None  # wall clock of the last result
    last_ok: float | None = None  # wall clock of the last success
    changed_at: float | None = None  # wall clock of the last state change
    failing_since: float | None = None  # wall clock of the first failure of the current streak
    last_failure: float | None = None  # wall clock of the last failed probe (a lossy path has one lately)
    # ... and when it was sent: a probe that timed out just now was sent a timeout ago
    last_failure_sent: float | None = None
    # when what it showed was last dropped as stale (what it depends on came back, or the monitor
    # sees again): a failure of a probe sent before then is from before, not a fresh one
    reset_at: float | None = None
    runs: int = 0
    detail: str = ""
    failure_detail: str = ""  # the detail of the last failed probe
    memory: dict[str, Any] = field(default_factory=dict)  # the probe's state between runs

    @property
    def evidence(self) -> str:
        """What to quote about this path: while it is down, why it failed, even when the probe
        that starts its recovery already succeeded (an incident's evidence must not say "ok")."""
        if self.state is PathState.DOWN and self.failure_detail:
            return self.failure_detail
        return self.detail

    @property
    def pending(self) -> bool:
        """A streak is building toward a change of state (or the path has not settled yet):
        probe at ``retry_interval`` so the change is confirmed, or refuted, quickly."""
        if self.state is PathState.UP:
            return self.failures > 0
        if self.state is PathState.DOWN:
            return self.successes > 0
        return True

    def observe(self, result: ProbeResult, now: float) -> bool:
        """Fold one result in. Returns True when the path's state changed."""
        self.runs += 1
        self.last, self.last_at, self.detail = result, now, result.detail
        old = self.state
        if result.failure is Failure.INTERNAL:
            # A watchtower bug says nothing about the target: the path is unknown, never down.
            self.successes = self.failures = 0
            self.failing_since = None
            self.state = PathState.UNKNOWN
        elif result.ok:
            self.successes += 1
            self.failures = 0
            self.failing_since = None
            self.last_ok = now
            if self.successes >= self.path.recover_after:
                self.state = PathState.UP
        else:
            self.failure_detail = result.detail
            self.last_failure = now
            self.last_failure_sent = sent_at(result, self.path, now)
            if self.failures == 0:
                self.failing_since = now
            self.failures += 1
            self.successes = 0
            if self.failures >= self.path.fail_after:
                self.state = PathState.DOWN
        if self.state is not old:
            self.changed_at = now
            return True
        return False
