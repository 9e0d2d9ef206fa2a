"""``tcp``: a TCP handshake to HOST:PORT. Up when the connection is accepted within the timeout."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from watchtower.config import TcpPath
from watchtower.probes import BatchProbe, Failure, ProbeContext, ProbeResult

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


# --------------------------------------------------------------------------- the batch extension

Literal = tuple[socket.AddressFamily, tuple[str, int]]


def batch_item(spec: TcpPath, state: dict[str, Any]) -> Literal | None:
    """(family, sockaddr) when this run can join a batch: an IP literal, not confirming a failure
    (a confirmation races three tries, see engine/runner.py). A name goes through :func:`probe`."""
    if state.get("confirming"):
        return None
    parsed: Literal | bool | None = state.get("tcp_literal")
    if parsed is None:
        parsed = _literal(spec.host, spec.port) or False
        state["tcp_literal"] = parsed
    return parsed if isinstance(parsed, tuple) else None


def _failed(code: int) -> ProbeResult:
    failure, detail = classify_os_error(OSError(code, os.strerror(code)))
    return ProbeResult.fail(failure, detail)


def start_batch(
    ctx: ProbeContext, items: list[Literal], timeout: float, on_done: Callable[[list[ProbeResult]], None]
) -> None:
    """A non-blocking connect per item, the loop's writer readiness as the handshake's end, one
    timer for the batch's deadline: no task, future or ``asyncio.timeout`` per connection."""
    loop = asyncio.get_running_loop()
    results: list[ProbeResult | None] = [None] * len(items)
    waiting: dict[int, tuple[socket.socket, float]] = {}
    timer: asyncio.TimerHandle | None = None

    def settle(i: int, result: ProbeResult) -> None:
        results[i] = result
        if not waiting and timer is not None:
            finish()

    def ready(i: int) -> None:
        entry = waiting.pop(i, None)
        if entry is None:
            return
        sock, started = entry
        latency = time.perf_counter() - started
        loop.remove_writer(sock.fileno())
        try:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            code = exc.errno or errno.EIO
        sock.close()
        if code == 0:
            settle(i, ProbeResult(True, latency, None, f"connected in {latency * 1000:.1f} ms"))
        else:
            failed = _failed(code)
            settle(i, ProbeResult(False, latency, failed.failure, failed.detail))

    def finish() -> None:
        nonlocal timer
        if timer is None:
            return
        timer.cancel()
        timer = None
        if waiting:
            silence = ProbeResult.fail(Failure.TIMEOUT, f"no TCP handshake within {timeout:g}s")
            for i, (sock, _) in waiting.items():
                loop.remove_writer(sock.fileno())
                sock.close()
                results[i] = silence
            waiting.clear()
        on_done([r if r is not None else ProbeResult.fail(Failure.INTERNAL, "no result") for r in results])

    for i, (family, sockaddr) in enumerate(items):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            failure, detail = classify_os_error(exc)
            results[i] = ProbeResult.fail(failure, detail)
            continue
        sock.setblocking(False)
        started = time.perf_counter()
        code = sock.connect_ex(sockaddr)
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            waiting[i] = (sock, started)
            loop.add_writer(sock.fileno(), ready, i)
            continue
        sock.close()
        if code == 0:  # loopback can complete at once
            latency = time.perf_counter() - started
            results[i] = ProbeResult(True, latency, None, f"connected in {latency * 1000:.1f} ms")
        else:
            results[i] = _failed(code)
    timer = loop.call_later(timeout, finish)
    if not waiting:
        loop.call_soon(finish)


BATCH = BatchProbe(batch_item, start_batch)
