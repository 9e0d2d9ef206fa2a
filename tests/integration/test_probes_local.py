"""tcp, http and dns probes against real peers on loopback, including the ways peers misbehave."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
from aiohttp import web
from support import free_port, make_cert

from watchtower.config import DnsPath, HttpPath, TcpPath
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes import dns as dns_probe
from watchtower.probes import http as http_probe
from watchtower.probes import tcp as tcp_probe


async def start_app(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, port


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="<title>Proxmox VE</title> cluster ok")

    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="short and stout")

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * 65536
        for _ in range(1600):  # 100 MB if the client read it all
            await resp.write(chunk)
        return resp

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(30):
            await resp.write(b"a")
            await asyncio.sleep(1)
        return resp

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/teapot", teapot)
    app.router.add_get("/huge", huge)
    app.router.add_get("/trickle", trickle)
    runner, port = await start_app(app)
    yield port
    await runner.cleanup()


async def http(url: str, timeout: float = 2.0, **kw: Any) -> Any:
    return await http_probe.probe(HttpPath(url=url, **kw), ProbeContext(timeout=timeout))


async def test_http_ok_status_and_content(http_server: int) -> None:
    base = f"http://127.0.0.1:{http_server}"
    r = await http(f"{base}/", expect_body="cluster ok")
    assert r.ok and r.latency is not None and r.latency < 1.0
    r = await http(f"{base}/", expect_regex=r"<title>Proxmox")
    assert r.ok
    r = await http(f"{base}/", expect_body="quorum lost")
    assert not r.ok and r.failure is Failure.CONTENT and "quorum lost" in r.detail
    r = await http(f"{base}/teapot")
    assert not r.ok and r.failure is Failure.STATUS and "418" in r.detail
    r = await http(f"{base}/teapot", expect_status=[200, 418])
    assert r.ok


async def test_http_huge_body_is_capped(http_server: int) -> None:
    start = time.perf_counter()
    r = await http(
        f"http://127.0.0.1:{http_server}/huge", timeout=3.0, expect_body="needle", max_body=2_000_000
    )
    assert not r.ok and r.failure is Failure.CONTENT
    assert "read 2000000 bytes" in r.detail
    assert time.perf_counter() - start < 3.0


async def test_http_trickle_times_out_within_timeout(http_server: int) -> None:
    start = time.perf_counter()
    r = await http(f"http://127.0.0.1:{http_server}/trickle", timeout=1.5, expect_body="never")
    elapsed = time.perf_counter() - start
    assert not r.ok and r.failure is Failure.TIMEOUT
    assert 1.4 < elapsed < 2.5


async def test_http_refused_and_silent_peer() -> None:
    r = await http(f"http://127.0.0.1:{free_port()}/")
    assert not r.ok and r.failure is Failure.REFUSED
    # a TCP server that accepts and never answers HTTP
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    start = time.perf_counter()
    r = await http(f"http://127.0.0.1:{port}/", timeout=1.0)
    assert not r.ok and r.failure is Failure.TIMEOUT
    assert time.perf_counter() - start < 2.0
    silent.close()


async def test_http_garbage_answer_is_protocol_failure() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = await http(f"http://127.0.0.1:{port}/")
    assert not r.ok and r.failure is Failure.PROTOCOL, r
    server.close()


async def ok_handler(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_https_verification(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path, "good", 30)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/", ok_handler)
    runner, port = await start_app(app, ctx)
    url = f"https://127.0.0.1:{port}/"
    try:
        r = await http(url)  # self-signed, system trust store: refused
        assert not r.ok and r.failure is Failure.TLS, r
        r = await http_probe.probe(
            HttpPath.model_validate({"url": url, "ca_file": str(cert)}, context={"config_dir": tmp_path}),
            ProbeContext(timeout=2.0),
        )
        assert r.ok, r
        r = await http(url, insecure=True)
        assert r.ok
    finally:
        await runner.cleanup()


async def test_https_expired_certificate(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path, "old", -1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/", ok_handler)
    runner, port = await start_app(app, ctx)
    try:
        spec = HttpPath.model_validate(
            {"url": f"https://127.0.0.1:{port}/", "ca_file": str(cert)}, context={"config_dir": tmp_path}
        )
        r = await http_probe.probe(spec, ProbeContext(timeout=2.0))
        assert not r.ok and r.failure is Failure.TLS and "expired" in r.detail, r
    finally:
        await runner.cleanup()


async def test_tcp_probe() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = await tcp_probe.probe(TcpPath(host="127.0.0.1", port=port), ProbeContext(timeout=1.0))
    assert r.ok and r.latency is not None
    r = await tcp_probe.probe(TcpPath(host="localhost", port=port), ProbeContext(timeout=1.0))
    assert r.ok, r  # a name goes through the resolver and asyncio streams
    server.close()
    await server.wait_closed()
    r = await tcp_probe.probe(TcpPath(host="127.0.0.1", port=port), ProbeContext(timeout=1.0))
    assert not r.ok and r.failure is Failure.REFUSED
    r = await tcp_probe.probe(TcpPath(host="::1", port=free_port()), ProbeContext(timeout=1.0))
    assert not r.ok and r.failure in (Failure.REFUSED, Failure.UNREACHABLE, Failure.ERROR)


class DnsServer(asyncio.DatagramProtocol):
    """A tiny authoritative server: answers A for known names, NXDOMAIN else, or garbage on demand."""

    def __init__(self, records: dict[str, str], garbage: bool = False):
        self.records, self.garbage = records, garbage
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.garbage:
            self.transport.sendto(data[:2] + b"\x81\x80\xff\xff garbage", addr)
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        name = query.question[0].name.to_text().rstrip(".")
        if name in self.records:
            response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", self.records[name]))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


async def start_dns(server: DnsServer) -> tuple[asyncio.DatagramTransport, int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    return transport, transport.get_extra_info("sockname")[1]


async def test_dns_probe_answers_and_expectations() -> None:
    transport, port = await start_dns(DnsServer({"dc1.acme.local": "10.0.10.21"}))
    ctx = ProbeContext(timeout=1.0)
    try:
        r = await dns_probe.probe(DnsPath(server="127.0.0.1", port=port, query="dc1.acme.local"), ctx)
        assert r.ok and "10.0.10.21" in r.detail
        r = await dns_probe.probe(
            DnsPath(server="127.0.0.1", port=port, query="dc1.acme.local", expect=["10.0.10.21"]), ctx
        )
        assert r.ok
        r = await dns_probe.probe(
            DnsPath(server="127.0.0.1", port=port, query="dc1.acme.local", expect=["10.0.10.99"]), ctx
        )
        assert not r.ok and r.failure is Failure.CONTENT and "10.0.10.99" in r.detail
        r = await dns_probe.probe(DnsPath(server="127.0.0.1", port=port, query="nope.acme.local"), ctx)
        assert not r.ok and r.failure is Failure.CONTENT and "NXDOMAIN" in r.detail
    finally:
        transport.close()


async def test_dns_garbage_and_silence() -> None:
    transport, port = await start_dns(DnsServer({}, garbage=True))
    try:
        r = await dns_probe.probe(
            DnsPath(server="127.0.0.1", port=port, query="x.local"), ProbeContext(timeout=1.0)
        )
        assert not r.ok and r.failure in (Failure.PROTOCOL, Failure.TIMEOUT), r
    finally:
        transport.close()
    # nobody listening: ICMP port unreachable on loopback -> refused, or a timeout; never a raise
    start = time.perf_counter()
    r = await dns_probe.probe(
        DnsPath(server="127.0.0.1", port=free_port(), query="x.local"), ProbeContext(timeout=1.0)
    )
    assert not r.ok and time.perf_counter() - start < 1.6


async def run_tcp_batch(items: list[Any], timeout: float = 1.0) -> list[ProbeResult]:
    done: asyncio.Future[list[ProbeResult]] = asyncio.get_running_loop().create_future()
    tcp_probe.start_batch(ProbeContext(timeout=timeout), items, timeout, done.set_result)
    return await asyncio.wait_for(done, timeout + 5)


async def test_tcp_batch_matches_the_probe() -> None:
    """The batch extension gives what probe() gives for the runs it takes: accepted, refused; a
    name or a confirmation is not taken (it goes through probe())."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = free_port()
    state: dict[str, Any] = {}
    up = tcp_probe.batch_item(TcpPath(host="127.0.0.1", port=port), state)
    assert up is not None and state["tcp_literal"] == up
    down = tcp_probe.batch_item(TcpPath(host="127.0.0.1", port=closed), {})
    assert tcp_probe.batch_item(TcpPath(host="localhost", port=port), {}) is None
    assert tcp_probe.batch_item(TcpPath(host="127.0.0.1", port=port), {"confirming": True}) is None
    results = await run_tcp_batch([up, down, up] * 50)
    assert len(results) == 150
    for i, r in enumerate(results):
        if i % 3 == 1:
            assert not r.ok and r.failure is Failure.REFUSED and r.detail == "connection refused", r
        else:
            assert r.ok and r.latency is not None and r.detail.startswith("connected in "), r
    assert await run_tcp_batch([]) == []
    server.close()
    await server.wait_closed()
    [gone] = await run_tcp_batch([up])
    assert not gone.ok and gone.failure is Failure.REFUSED


async def test_tcp_batch_silent_peer_times_out_at_the_deadline() -> None:
    """A listener whose accept queue is full drops SYNs: the batch ends at its one deadline."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(2):  # backlog 0 holds one; the next handshakes stall
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        await asyncio.sleep(0.1)
        item = (socket.AF_INET, listener.getsockname())
        start = time.monotonic()
        [r] = await run_tcp_batch([item], timeout=0.3)
        assert 0.25 < time.monotonic() - start < 2.0
        assert not r.ok and r.failure is Failure.TIMEOUT and r.detail == "no TCP handshake within 0.3s", r
    finally:
        for s in fillers:
            s.close()
        listener.close()
