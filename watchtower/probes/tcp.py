"""``tcp``: a TCP handshake to HOST:PORT. Up when the connection is accepted within the timeout."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from contextlib import suppress

from watchtower.config import TcpPath
from watchtower.probes import Failure, ProbeContext, ProbeResult

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def classify_os_error(exc: OSError) -> tuple[Failure, str]:
    """Map a connect-time OSError to a failure kind; shared by the tcp and http probes."""
    if isinstance(exc, socket.gaierror):
        return Failure.RESOLVE, f"cannot resolve: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return Failure.REFUSED, "connection refused"
    if exc.errno in _UNREACHABLE:
        return Failure.UNREACHABLE, exc.strerror or "unreachable"
    if exc.errno == errno.ETIMEDOUT:
        return Failure.TIMEOUT, "connect timed out"
    return Failure.ERROR, f"{exc.__class__.__name__}: {exc.strerror or exc}"


async def probe(spec: TcpPath, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(ctx.timeout):
            _, writer = await asyncio.open_connection(spec.host, spec.port)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no TCP handshake within {ctx.timeout:g}s")
    except OSError as exc:
        failure, detail = classify_os_error(exc)
        return ProbeResult.fail(failure, detail, time.perf_counter() - start)
    latency = time.perf_counter() - start
    # Close without waiting for the peer: a hanging peer must not hold the probe past its result.
    with suppress(Exception):
        writer.close()
    return ProbeResult.success(latency, f"connected in {latency * 1000:.1f} ms")
