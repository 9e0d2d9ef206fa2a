"""``tcp``: a TCP handshake to HOST:PORT. Up when the connection is accepted within the timeout."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
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


def _literal(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]] | None:
    """(family, sockaddr) for an IP literal; None for a name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), port)


async def _connect_literal(family: socket.AddressFamily, sockaddr: tuple[str, int]) -> None:
    """One handshake on a bare non-blocking socket, closed at once. For an IP literal this is all
    a probe needs: no resolver, no transport, no stream objects (at thousands of paths the
    asyncio streams cost more than the connect)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    finally:
        sock.close()


async def _connect_name(host: str, port: int) -> None:
    _, writer = await asyncio.open_connection(host, port)
    # Close without waiting for the peer: a hanging peer must not hold the probe past its result.
    with suppress(Exception):
        writer.close()


async def probe(spec: TcpPath, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    literal = _literal(spec.host, spec.port)
    try:
        async with asyncio.timeout(ctx.timeout):
            if literal is not None:
                await _connect_literal(*literal)
            else:
                await _connect_name(spec.host, spec.port)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no TCP handshake within {ctx.timeout:g}s")
    except OSError as exc:
        failure, detail = classify_os_error(exc)
        return ProbeResult.fail(failure, detail, time.perf_counter() - start)
    latency = time.perf_counter() - start
    return ProbeResult.success(latency, f"connected in {latency * 1000:.1f} ms")
