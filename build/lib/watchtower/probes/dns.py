"""``dns``: one query to one server (UDP or TCP), answered with NOERROR and, optionally, the
expected records. NXDOMAIN or a missing record is a content failure: the server answers, but
the directory it serves is not what the business needs."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from watchtower.config import DnsPath
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.tcp import classify_os_error


async def resolve_address(host: str) -> str:
    """An IP literal for ``host`` (literals pass through). Raises socket.gaierror."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return str(infos[0][4][0])


def _answer_values(response: dns.message.Message) -> list[str]:
    values = []
    for rrset in response.answer:
        for rdata in rrset:
            values.append(rdata.to_text().rstrip(".").strip('"'))
    return values


async def probe(spec: DnsPath, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    port = spec.port or 53
    try:
        async with asyncio.timeout(ctx.timeout):
            where = await resolve_address(spec.server)
            query = dns.message.make_query(spec.query, dns.rdatatype.from_text(spec.type))
            if spec.transport == "tcp":
                response = await dns.asyncquery.tcp(query, where, port=port)
            else:
                response = await dns.asyncquery.udp(query, where, port=port, raise_on_truncation=False)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no DNS answer within {ctx.timeout:g}s")
    except dns.exception.DNSException as exc:
        # FormError, BadResponse, unexpected source...: the server answered, but not DNS we can read
        return ProbeResult.fail(Failure.PROTOCOL, f"unreadable DNS answer: {exc.__class__.__name__}: {exc}")
    except OSError as exc:
        failure, detail = classify_os_error(exc)
        return ProbeResult.fail(failure, detail)
    except (ValueError, EOFError) as exc:
        return ProbeResult.fail(Failure.PROTOCOL, f"unreadable DNS answer: {exc}")
    latency = time.perf_counter() - start
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        return ProbeResult.fail(
            Failure.CONTENT, f"{spec.query} {spec.type}: {dns.rcode.to_text(rcode)}", latency
        )
    values = _answer_values(response)
    missing = [v for v in spec.expect if v.rstrip(".") not in values]
    if missing:
        got = ", ".join(values[:5]) or "no records"
        return ProbeResult.fail(
            Failure.CONTENT, f"{spec.query} {spec.type}: expected {', '.join(missing)}, got {got}", latency
        )
    if not values and spec.type != "ANY":
        return ProbeResult.fail(Failure.CONTENT, f"{spec.query} {spec.type}: empty answer", latency)
    return ProbeResult.success(latency, f"{spec.query} {spec.type} -> {', '.join(values[:3])}")
