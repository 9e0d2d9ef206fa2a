"""One bounded JSON GET for the API sources (PBS, PVE): a failure is a ProbeResult with a reason."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from watchtower.backups._run import scrub
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.http import _read_capped, classify_client_error, new_session, ssl_context

MAX_BODY = 8 * 1024 * 1024


async def get_json(
    ctx: ProbeContext,
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
    tls: tuple[str | None, bool],
    secret: str,
    refused: str,
) -> Any | ProbeResult:
    """The ``data`` member of a Proxmox-style ``{"data": ...}`` answer, or a failed ProbeResult.
    ``refused``: what a 401/403 means for this API (which role the token needs)."""
    try:
        async with AsyncExitStack() as stack:
            session = ctx.http_session
            if session is None:
                session = await stack.enter_async_context(new_session())
            async with asyncio.timeout(ctx.timeout):
                response = await stack.enter_async_context(
                    session.get(
                        url, params=params, headers=headers, ssl=ssl_context(*tls), allow_redirects=False
                    )
                )
                body = await _read_capped(response, MAX_BODY + 1)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        failure, why = classify_client_error(exc)
        return ProbeResult.fail(failure, scrub(why, (secret,)))
    if response.status in (401, 403):
        return ProbeResult.fail(Failure.STATUS, f"status {response.status}: token refused ({refused})")
    if response.status != 200:
        return ProbeResult.fail(Failure.STATUS, f"status {response.status}, expected 200")
    if len(body) > MAX_BODY:
        return ProbeResult.fail(Failure.PROTOCOL, f"answer larger than {MAX_BODY // 1048576} MB")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ProbeResult.fail(Failure.PROTOCOL, f"answer is not JSON ({len(body)} bytes)")
    if not isinstance(data, dict) or "data" not in data:
        return ProbeResult.fail(Failure.PROTOCOL, "answer has no `data` member")
    return data["data"]
