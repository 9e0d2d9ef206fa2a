"""``nut``: a UPS as a NUT server (upsd) sees it, over the NUT network protocol (TCP, default 3493).

One connection per probe, one ``LIST VAR <ups>`` (a single round trip gives every variable), then
``LOGOUT``. The probe never sends ``LOGIN``: that command registers the connection as a upsmon
client of the UPS and would change upsd's shutdown bookkeeping (``numlogins``) on a production
power setup. ``USERNAME``/``PASSWORD`` are sent when configured; upsd accepts them for any read,
but a server that rejects them answers ``ERR ...`` and that is reported.

A site on battery is news even while every host still answers, so ``OB`` is a failure (CONTENT)
with charge and runtime in the detail; ``LB`` says the shutdown is near. Numeric readings go to
``ProbeResult.values`` on every outcome that has them, because the charge while on battery is
exactly the number an on-call admin wants to graph.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from contextlib import suppress

from watchtower.config import NutPath
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.tcp import classify_os_error

# Variables worth a metric, in the order they are reported.
NUMERIC_VARS = (
    "battery.charge",
    "battery.runtime",
    "battery.voltage",
    "input.voltage",
    "input.frequency",
    "output.voltage",
    "ups.load",
    "ups.realpower",
    "ups.temperature",
)
# A real UPS has 30-150 variables with short values. The caps bound what a broken or hostile peer
# can make us buffer; the StreamReader limit also bounds one line (no newline -> error, not OOM).
_MAX_LINE = 4096
_MAX_VARS = 2000

# upsd error codes (docs/net-protocol.txt) -> words an admin understands.
_ERR_TEXT = {
    "UNKNOWN-UPS": "upsd knows no UPS named {ups!r}",
    "DRIVER-NOT-CONNECTED": "upsd has lost its driver for {ups!r} (UPS state unknown)",
    "DATA-STALE": "the driver for {ups!r} has no fresh data (UPS not answering its driver)",
    "ACCESS-DENIED": "upsd denied access (check upsd.users / LISTEN)",
    "INVALID-USERNAME": "upsd rejected the username",
    "INVALID-PASSWORD": "upsd rejected the password",
    "USERNAME-REQUIRED": "upsd wants a username",
    "PASSWORD-REQUIRED": "upsd wants a password",
}
# Status flags with a meaning worth spelling out in a detail line.
_FLAG_TEXT = {
    "RB": "replace battery",
    "OVER": "overload",
    "FSD": "forced shutdown in progress",
    "OFF": "UPS output off",
    "BYPASS": "on bypass",
    "CAL": "calibrating",
    "ALARM": "alarm",
    "TRIM": "trimming voltage",
    "BOOST": "boosting voltage",
    "WAIT": "driver still starting",
}
# With any of these the load is (about to be) unprotected or unpowered, even when "OL" is set.
_BAD_FLAGS = {"LB", "FSD", "OFF"}

_VAR_LINE = re.compile(r'VAR (\S+) (\S+) "((?:[^"\\]|\\.)*)"')


class _PeerError(Exception):
    def __init__(self, failure: Failure, detail: str):
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _quote(arg: str) -> str:
    """A NUT protocol argument: quoted, with ``"`` and ``\\`` escaped (names may hold spaces)."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _readline(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError):
        raise _PeerError(Failure.PROTOCOL, f"line longer than {_MAX_LINE} bytes: not a NUT server?") from None
    if not raw.endswith(b"\n"):
        raise _PeerError(Failure.PROTOCOL, "connection closed in the middle of the answer")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _PeerError(Failure.PROTOCOL, "answer is not text: not a NUT server?") from None


def _check_err(line: str, ups: str) -> None:
    if line == "ERR" or line.startswith("ERR "):
        code = line[4:].strip().split(" ", 1)[0] or "?"
        text = _ERR_TEXT.get(code, "upsd error").format(ups=ups)
        raise _PeerError(Failure.ERROR, f"{text} (ERR {code})")


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, ups: str) -> str:
    writer.write(line.encode() + b"\n")
    await writer.drain()
    answer = await _readline(reader)
    _check_err(answer, ups)
    return answer


async def _list_vars(
    spec: NutPath, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> dict[str, str]:
    if spec.username:
        # "OK" is the only success answer (an ERR answer raises in _command); anything else is not upsd.
        for line in (f"USERNAME {_quote(spec.username)}", f"PASSWORD {_password(spec)}"):
            if await _command(reader, writer, line, spec.ups) != "OK":
                raise _PeerError(Failure.PROTOCOL, f"unexpected answer to {line.split()[0]}")
    first = await _command(reader, writer, f"LIST VAR {_quote(spec.ups)}", spec.ups)
    if first != f"BEGIN LIST VAR {spec.ups}":
        raise _PeerError(Failure.PROTOCOL, f"unexpected answer to LIST VAR: {first[:80]!r}")
    values: dict[str, str] = {}
    end = f"END LIST VAR {spec.ups}"
    while (line := await _readline(reader)) != end:
        match = _VAR_LINE.fullmatch(line)
        if match is None or match.group(1) != spec.ups:
            raise _PeerError(Failure.PROTOCOL, f"malformed LIST VAR line: {line[:80]!r}")
        if len(values) >= _MAX_VARS:
            raise _PeerError(Failure.PROTOCOL, f"more than {_MAX_VARS} variables: not a UPS?")
        values[match.group(2)] = _unescape(match.group(3))
    return values


def _password(spec: NutPath) -> str:
    secret = spec.secret("password")
    return _quote(secret.get_secret_value()) if secret else '""'


def _numbers(values: dict[str, str]) -> tuple[tuple[str, float], ...]:
    out: list[tuple[str, float]] = []
    for name in NUMERIC_VARS:
        try:
            value = float(values[name])
        except (KeyError, ValueError):
            continue  # absent on this model, or a driver that reports "unknown"
        if math.isfinite(value):  # "nan", "inf" or 1e400 from a confused driver is no reading
            out.append((name, value))
    return tuple(out)


def _runtime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def _battery(numbers: dict[str, float]) -> list[str]:
    parts = []
    if "battery.charge" in numbers:
        parts.append(f"charge {numbers['battery.charge']:g}%")
    if "battery.runtime" in numbers:
        parts.append(f"runtime {_runtime(numbers['battery.runtime'])}")
    return parts


def _judge(values: dict[str, str], latency: float) -> ProbeResult:
    numbers = _numbers(values)
    by_name = dict(numbers)
    status = values.get("ups.status", "").strip()
    if not status:
        return ProbeResult(False, latency, Failure.CONTENT, "the UPS reports no ups.status", None, numbers)
    flags = status.split()
    notes = [_FLAG_TEXT[f] for f in flags if f in _FLAG_TEXT]
    if "OL" in flags and not _BAD_FLAGS & set(flags):
        extra = [*_battery(by_name)]
        if "ups.load" in by_name:
            extra.append(f"load {by_name['ups.load']:g}%")
        detail = ", ".join([f"online ({status})", *notes, *extra])
        return ProbeResult(True, latency, None, detail, None, numbers)
    head: list[str] = []
    if "LB" in flags:
        head.append("low battery")
    if "OB" in flags:
        head.append("on battery")
    elif "OL" not in flags:
        head.append(f"status {status}")
    detail = ", ".join([*head, *_battery(by_name), *notes])
    return ProbeResult(False, latency, Failure.CONTENT, detail, None, numbers)


async def probe(spec: NutPath, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(ctx.timeout):
            reader, writer = await asyncio.open_connection(spec.host, spec.effective_port, limit=_MAX_LINE)
            values = await _list_vars(spec, reader, writer)
            # Polite goodbye so upsd does not log a dropped client; the answer is not awaited.
            writer.write(b"LOGOUT\n")
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except _PeerError as exc:
        return ProbeResult.fail(exc.failure, exc.detail, time.perf_counter() - start)
    except OSError as exc:
        failure, detail = classify_os_error(exc)
        return ProbeResult.fail(failure, detail, time.perf_counter() - start)
    finally:
        if writer is not None:
            # Close without waiting for the peer: a hanging peer must not hold the probe.
            with suppress(Exception):
                writer.close()
    return _judge(values, time.perf_counter() - start)
