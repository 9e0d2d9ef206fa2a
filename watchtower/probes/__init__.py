"""Probe kinds: one module each, one ``async def probe(spec, ctx) -> ProbeResult``, one registry line.

A kind whose probe is one packet or one handshake may also offer a :class:`BatchProbe` (icmp,
tcp): runs of many paths that fall due together then start in one call, without a coroutine per
run, and report in one callback. It extends the protocol; ``probe`` stays the reference (names to
resolve, confirmations, the CLI) and the batch must give the same results for the runs it takes.

A failing *target* is data: a probe reports it as ``ProbeResult(ok=False, failure=..., detail=...)``
and never raises for anything the network or the peer does. The runner
(:mod:`watchtower.engine.runner`) is the one place where an unexpected exception inside a probe
(a bug in watchtower, not a failure of the target) is turned into an ``internal`` result, which
the path tracker treats as *unknown*, never as *down*.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

    from watchtower.probes.icmp import Pinger


class Failure(enum.StrEnum):
    """Why a probe failed. Stable strings: they appear in the API and in alert texts."""

    TIMEOUT = "timeout"  # no answer within the probe's timeout
    REFUSED = "refused"  # TCP RST / port closed
    UNREACHABLE = "unreachable"  # ICMP unreachable, no route, ARP failure
    RESOLVE = "resolve"  # the host name could not be resolved
    TLS = "tls"  # handshake or certificate verification failed
    STATUS = "status"  # HTTP status not the expected one
    CONTENT = "content"  # body / DNS answer / value did not match what was expected
    PROTOCOL = "protocol"  # the peer answered garbage (garbled HTTP, bad DNS packet, ...)
    ERROR = "error"  # any other OS-level error talking to the peer
    INTERNAL = "internal"  # a watchtower bug inside the probe: the path becomes unknown, not down


@dataclass(frozen=True, slots=True)
class SelEntry:
    """One System Event Log record (IPMI SEL or a Redfish LogService entry)."""

    record_id: str  # as the BMC numbers it (IPMI: hex record id; Redfish: the entry's Id)
    text: str  # human-readable: "Power Supply PS1: Failure detected"
    severity: str  # "critical" | "warning" | "info"
    timestamp: str = ""  # as the BMC reports it


@dataclass(frozen=True, slots=True)
class SensorReading:
    name: str
    value: float | None
    unit: str  # "degrees C", "RPM", "Volts", "percent", ... ("" when discrete)
    state: str  # "ok" | "warning" | "critical" | "unknown"


@dataclass(frozen=True, slots=True)
class BmcReading:
    """What a management controller said, beyond up/down: the facts that explain an outage."""

    power_on: bool | None = None
    health: str | None = None  # Redfish Status.Health or a summary: "OK" | "Warning" | "Critical"
    new_events: tuple[SelEntry, ...] = ()  # SEL records since the previous look (all severities)
    sensors: tuple[SensorReading, ...] = ()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe run."""

    ok: bool
    latency: float | None = None  # seconds; the round trip or time to answer, when measured
    failure: Failure | None = None
    detail: str = ""
    bmc: BmcReading | None = None  # ipmi / redfish probes: the controller's facts
    values: tuple[tuple[str, float], ...] = ()  # numeric readings worth a metric (UPS charge, disk %)

    @classmethod
    def success(cls, latency: float | None, detail: str = "") -> ProbeResult:
        return cls(True, latency, None, detail)

    @classmethod
    def fail(
        cls, failure: Failure, detail: str, latency: float | None = None, bmc: BmcReading | None = None
    ) -> ProbeResult:
        return cls(False, latency, failure, detail, bmc)


@dataclass(slots=True)
class ProbeContext:
    """Shared, long-lived resources a probe may use. Created once by the daemon (or the CLI)."""

    timeout: float
    pinger: Pinger | None = None
    http_session: aiohttp.ClientSession | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-path memory that survives between runs of the same path (e.g. the last SEL record id
    # seen, a Redfish session token). The runner passes the same dict every time.
    state: dict[str, Any] = field(default_factory=dict)


ProbeFunc = Callable[[Any, ProbeContext], Awaitable[ProbeResult]]


@dataclass(frozen=True, slots=True)
class BatchProbe:
    """The batch extension of a probe kind.

    ``item(spec, state)``: what a batch needs of this run (e.g. the parsed address), or None when
    this run must go alone through ``probe`` (``state`` is the path's memory, as in
    :class:`ProbeContext`; ``state["confirming"]`` is set by the monitor).
    ``start(ctx, items, timeout, on_done)``: begin every item's run without awaiting and call
    ``on_done(results)`` exactly once, on the event loop, with one result per item in order,
    within ``timeout`` (plus scheduling). Never raises for what the network does.
    """

    item: Callable[[Any, dict[str, Any]], Any | None]
    start: Callable[[ProbeContext, list[Any], float, Callable[[list[ProbeResult]], None]], None]


def _registry() -> dict[str, ProbeFunc]:
    # Imported lazily so that `watchtower check` does not pay for aiohttp/dnspython imports.
    from watchtower.probes import dns, http, icmp, ipmi, nut, redfish, snmp, tcp

    return {
        "icmp": icmp.probe,
        "tcp": tcp.probe,
        "http": http.probe,
        "dns": dns.probe,
        "snmp": snmp.probe,
        "ipmi": ipmi.probe,
        "redfish": redfish.probe,
        "nut": nut.probe,
    }


_PROBES: dict[str, ProbeFunc] | None = None


def get_batch_probe(kind: str) -> BatchProbe | None:
    """The batch extension of a kind, or None when its runs always go one by one."""
    global _BATCH
    if _BATCH is None:
        from watchtower.probes import icmp, tcp

        _BATCH = {"icmp": icmp.BATCH, "tcp": tcp.BATCH}
    return _BATCH.get(kind)


_BATCH: dict[str, BatchProbe] | None = None


def get_probe(kind: str) -> ProbeFunc | None:
    """The probe function for a path kind, or None when this version has no prober for it."""
    global _PROBES
    if _PROBES is None:
        _PROBES = _registry()
    return _PROBES.get(kind)
