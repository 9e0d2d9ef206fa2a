"""Runs one probe: the hard timeout, and the ONE place where a crashed probe becomes ``internal``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from watchtower.config import ResolvedPath
from watchtower.probes import Failure, ProbeContext, ProbeResult, get_probe

log = logging.getLogger("watchtower.runner")

# Probes enforce ctx.timeout themselves; this outer bound catches one that does not (a library
# that ignores cancellation for a moment, a bug) without making the path look slower than it is.
HARD_TIMEOUT_GRACE = 0.5


async def run_probe(
    path: ResolvedPath, shared: ProbeContext, state: dict[str, Any] | None = None
) -> ProbeResult:
    """Probe ``path`` once. Never raises, except CancelledError on shutdown. ``state`` is the
    path's memory between runs (the caller keeps it; see ProbeContext.state)."""
    probe = get_probe(path.kind)
    if probe is None:
        return ProbeResult.fail(Failure.INTERNAL, f"this watchtower has no prober for kind {path.kind!r} yet")
    ctx = ProbeContext(
        timeout=path.timeout,
        pinger=shared.pinger,
        http_session=shared.http_session,
        extra=shared.extra,
        state=state if state is not None else {},
    )
    try:
        async with asyncio.timeout(path.timeout + HARD_TIMEOUT_GRACE):
            result = await probe(path.spec, ctx)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no answer within {path.timeout:g}s (probe overran)")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug in watchtower, not a failure of the target
        log.exception("probe crashed target=%s path=%r", path.target, path.name)
        return ProbeResult.fail(Failure.INTERNAL, f"probe crashed: {exc.__class__.__name__}: {exc}")
    if not isinstance(result, ProbeResult):
        return ProbeResult.fail(
            Failure.INTERNAL, f"probe returned {type(result).__name__}, not a ProbeResult"
        )
    return result
