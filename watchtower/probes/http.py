"""``http``: an HTTP(S) request with expected status and optional content check.

A fresh connection per probe (``force_close``): reusing a kept-alive socket would report a
service as up after its listener died. TLS verification is on unless the path says
``insecure: true``; ``ca_file`` adds the private CA that BMCs and hypervisors ship with. The body
read is capped at ``max_body`` bytes, so a peer streaming 100 MB costs a bounded amount.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from contextlib import AsyncExitStack
from functools import lru_cache
from urllib.parse import urlsplit

import aiohttp

from watchtower.config import HttpPath
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.tcp import classify_os_error

_CHUNK = 65536


@lru_cache(maxsize=64)
def ssl_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext | bool:
    """One SSLContext per (ca_file, insecure): building one per probe costs ~1 ms of CPU."""
    if insecure:
        return False
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    """The session probes share: no cookies, no keep-alive, no proxy from the environment."""
    connector = aiohttp.TCPConnector(force_close=True, limit=limit, ttl_dns_cache=10)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=True
    )


def classify_client_error(exc: aiohttp.ClientError | OSError) -> tuple[Failure, str]:
    """Why an HTTP(S) exchange failed, for the http and redfish probes."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Failure.TLS, f"certificate not accepted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return Failure.TLS, f"TLS handshake failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return classify_os_error(exc.os_error)
    if isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError
    ):
        return Failure.PROTOCOL, f"bad HTTP answer: {exc.__class__.__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return Failure.ERROR, f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, ssl.SSLError):
        return Failure.TLS, f"TLS error: {exc.reason or exc}"
    return classify_os_error(exc)


CERT_EXPIRY_VALUE = "tls_cert_expiry_days"
CERT_LOOK_EVERY = 3600.0  # one extra TLS handshake an hour per https path: expiry moves slowly


async def _cert_expiry(spec: HttpPath, budget: float) -> float | None:
    """When the certificate the server presents expires (UNIX time), from a handshake of its own:
    aiohttp hands the connection back before the probe could look at it. Only a verified
    certificate is decoded by ``ssl`` (``insecure: true`` gives none); that is the one whose
    expiry would break the service's clients. None when it cannot be read (the probe said why)."""
    context = ssl_context(spec.ca_file, spec.insecure)
    parts = urlsplit(spec.url)
    if parts.scheme != "https" or not isinstance(context, ssl.SSLContext) or budget <= 0:
        return None
    try:
        async with asyncio.timeout(budget):
            _, writer = await asyncio.open_connection(
                parts.hostname, parts.port or 443, ssl=context, server_hostname=parts.hostname
            )
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    try:
        cert = writer.get_extra_info("peercert")
    finally:
        writer.close()
    not_after = cert.get("notAfter") if cert else None
    try:
        return float(ssl.cert_time_to_seconds(not_after)) if isinstance(not_after, str) else None
    except ValueError:
        return None


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    body = bytearray()
    while len(body) < cap:
        chunk = await response.content.read(min(_CHUNK, cap - len(body)))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def probe(spec: HttpPath, ctx: ProbeContext) -> ProbeResult:
    start = time.perf_counter()
    password = spec.secret("password")
    auth = (
        aiohttp.BasicAuth(spec.username, password.get_secret_value() if password else "")
        if spec.username
        else None
    )
    try:
        async with AsyncExitStack() as stack:
            session = ctx.http_session
            if session is None:
                session = await stack.enter_async_context(new_session())
            async with asyncio.timeout(ctx.timeout):
                response = await stack.enter_async_context(
                    session.request(
                        spec.method,
                        spec.url,
                        headers=spec.headers,
                        auth=auth,
                        ssl=ssl_context(spec.ca_file, spec.insecure),
                        allow_redirects=spec.follow_redirects,
                        timeout=aiohttp.ClientTimeout(total=None),
                    )
                )
                body = b"" if spec.method == "HEAD" else await _read_capped(response, spec.max_body)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        return ProbeResult.fail(*classify_client_error(exc))
    latency = time.perf_counter() - start
    values: tuple[tuple[str, float], ...] = ()
    if spec.url.startswith("https:") and spec.tls_warn_days > 0 and not spec.insecure:
        if time.monotonic() - ctx.state.get("cert_looked", -CERT_LOOK_EVERY) >= CERT_LOOK_EVERY:
            ctx.state["cert_looked"] = time.monotonic()
            ctx.state["cert_expiry"] = await _cert_expiry(spec, ctx.timeout - latency)
        expiry = ctx.state.get("cert_expiry")
        if expiry is not None:
            values = ((CERT_EXPIRY_VALUE, (expiry - time.time()) / 86400.0),)
    if response.status not in spec.expect_status:
        expected = "/".join(map(str, spec.expect_status))
        return ProbeResult.fail(Failure.STATUS, f"status {response.status}, expected {expected}", latency)
    if spec.expect_body is not None or spec.expect_regex is not None:
        text = body.decode(response.charset or "utf-8", errors="replace")
        if spec.expect_body is not None and spec.expect_body not in text:
            return ProbeResult.fail(
                Failure.CONTENT, f"body lacks {spec.expect_body!r} (read {len(body)} bytes)", latency
            )
        if spec.expect_regex is not None and re.search(spec.expect_regex, text) is None:
            return ProbeResult.fail(
                Failure.CONTENT,
                f"body does not match /{spec.expect_regex}/ (read {len(body)} bytes)",
                latency,
            )
    return ProbeResult(True, latency, None, f"{response.status} in {latency * 1000:.0f} ms", values=values)
