"""Runs one probe: the hard timeout, and the ONE place where a crashed probe becomes ``internal``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from watchtower.config import ResolvedPath
from watchtower.probes import Failure, ProbeContext, ProbeFunc, ProbeResult, get_probe

log = logging.getLogger("watchtower.runner")

# Probes enforce ctx.timeout themselves; this outer bound catches one that does not (a library
# that ignores cancellation for a moment, a bug) without making the path look slower than it is.
HARD_TIMEOUT_GRACE = 0.5

# Confirming a failure of an up path (``state["confirming"]``): kinds whose probe is one cheap
# request try again, staggered inside the same timeout, so one lost SYN or datagram does not count
# as the path's second failure. A lost SYN costs a TCP connect the kernel's 1 s retransmit, i.e.
# the whole default timeout. Only a timeout is retried: a refusal or a wrong answer is the peer's
# word. icmp confirms with its own echoes (see probes/icmp.py); BMC and SNMP probes open sessions
# that are not worth racing.
CONFIRM_TRIES = {"tcp": 3, "dns": 3, "http": 3}


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
    tries = CONFIRM_TRIES.get(path.kind, 1) if ctx.state.get("confirming") else 1
    try:
        async with asyncio.timeout(path.timeout + HARD_TIMEOUT_GRACE):
            if tries == 1:
                result = await probe(path.spec, ctx)
            else:
                result = await staggered(probe, path.spec, ctx, tries)
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


async def staggered(probe: ProbeFunc, spec: Any, ctx: ProbeContext, tries: int) -> ProbeResult:
    """Up to ``tries`` runs of ``probe``, started ``ctx.timeout / tries`` apart (or at once when the
    previous one timed out), all ending by the same deadline. The first success wins; so does the
    first failure that is not a timeout (the peer answered). When every try timed out, the first
    timeout is the result."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.timeout
    gap = ctx.timeout / tries
    running: dict[asyncio.Task[ProbeResult], int] = {}
    first_timeout: ProbeResult | None = None
    started = 0
    try:
        while True:
            left = deadline - loop.time()
            if started < tries and left > 0 and (not running or started * gap <= ctx.timeout - left):
                attempt = dataclasses.replace(ctx, timeout=left)
                running[asyncio.ensure_future(probe(spec, attempt))] = started + 1
                started += 1
            if not running:
                assert first_timeout is not None
                return first_timeout
            next_start = deadline - ctx.timeout + started * gap
            wait = max(0.0, next_start - loop.time()) if started < tries else None
            done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                number = running.pop(task)
                result = task.result()  # a crash propagates to run_probe: internal
                if result.ok:
                    if number > 1:
                        note = f"try {number} of {tries}: the earlier ones got no answer"
                        result = dataclasses.replace(result, detail=f"{result.detail} ({note})")
                    return result
                if result.failure is not Failure.TIMEOUT:
                    return result
                if first_timeout is None:
                    first_timeout = dataclasses.replace(result, detail=f"{result.detail} ({tries} tries)")
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
