"""One helper process that serves every lab namespace's TCP, HTTP and DNS listeners.

Run as ``python -m watchtower.lab.responder --spec-json FILE [--ready-file FILE]`` (``Lab.up()``
does this).  A socket belongs to the network namespace it was *created* in, so the process enters
each namespace with ``setns(2)`` (:mod:`watchtower.lab.netns`) just long enough to create and bind
its sockets, switches back, and then serves all of them from one asyncio loop.  One process
instead of one per host keeps the demo cheap (a handful of MB for the whole site) and gives one PID
to stop.

Listeners bind 0.0.0.0, so a hypervisor's HTTP port answers on prod and mgmt, and a bulk host's
ports answer on every address of its prefix.  The process exits on SIGTERM/SIGINT, and by itself
when one of its namespaces disappears (so an orphan can never keep a deleted namespace alive).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from watchtower.lab.netns import in_netns
from watchtower.lab.spec import LabSpec

log = logging.getLogger("watchtower.lab.responder")

LISTEN_BACKLOG = 65535  # capped by the namespace's net.core.somaxconn, which Lab.up() raises
READ_TIMEOUT = 10.0
MAX_REQUEST = 16384


@dataclass
class HostSockets:
    """Sockets created inside one host's namespace."""

    host: str
    ns: str
    tcp: list[socket.socket] = field(default_factory=list)
    http: list[socket.socket] = field(default_factory=list)
    dns: socket.socket | None = None
    dns_names: dict[str, str] = field(default_factory=dict)


def _tcp_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(LISTEN_BACKLOG)  # listen now: connects succeed even before the loop starts serving
    s.setblocking(False)
    return s


def open_sockets(spec: LabSpec) -> list[HostSockets]:
    """Create every listening socket inside its host's namespace."""
    out: list[HostSockets] = []
    for h in spec.hosts:
        if not h.has_listeners:
            continue
        hs = HostSockets(h.name, spec.ns_name(h.name))
        hs.dns_names = {_norm(k): v for k, v in h.dns_names.items()}
        with in_netns(hs.ns):
            hs.tcp = [_tcp_listener(p) for p in h.tcp_ports]
            hs.http = [_tcp_listener(p) for p in h.http_ports]
            if h.dns_names:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                u.bind(("0.0.0.0", 53))
                u.setblocking(False)
                hs.dns = u
        out.append(hs)
    return out


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


# ---------------------------------------------------------------------- handlers
async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Plain TCP service: accept, swallow whatever arrives until EOF or idle timeout, close."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            while await reader.read(65536):
                pass
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def make_http_handler(host: str) -> StreamHandler:
    """Minimal HTTP/1.0 server: ``200 OK`` with body ``"<host> ok\\n"`` for any path."""
    body = f"{host} ok\n".encode()
    header = (
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nServer: watchtower-lab\r\nConnection: close\r\n\r\n"
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0].upper()
            writer.write(header + (b"" if method == b"HEAD" else body))
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # clients that hang up or send garbage just get closed
        finally:
            writer.close()

    return handle


class DnsProtocol(asyncio.DatagramProtocol):
    """Authoritative-ish UDP DNS: A records for the configured names, NXDOMAIN for others."""

    def __init__(self, host: str, names: dict[str, str]) -> None:
        self.host = host
        self.names = names
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a DatagramTransport here

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            wire = self.answer(data)
        except Exception as e:  # untrusted input: one bad packet must never stop the server
            log.debug("%s: dropping undecodable DNS packet from %s: %s", self.host, addr, e)
            return
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)

    def answer(self, data: bytes) -> bytes | None:
        """Build the reply to one query datagram (None = stay silent, e.g. for a response)."""
        q = dns.message.from_wire(data)
        if q.flags & dns.flags.QR:
            return None
        r = dns.message.make_response(q)
        if q.opcode() != dns.opcode.QUERY or len(q.question) != 1:
            r.set_rcode(dns.rcode.NOTIMP if q.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return r.to_wire()
        qs = q.question[0]
        name = _norm(qs.name.to_text())
        r.flags |= dns.flags.AA
        addr = self.names.get(name)
        if addr is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif qs.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and qs.rdclass == dns.rdataclass.IN:
            r.answer.append(dns.rrset.from_text(qs.name, 60, dns.rdataclass.IN, dns.rdatatype.A, addr))
        # other types of a known name: NOERROR with an empty answer (NODATA)
        return r.to_wire()


# ---------------------------------------------------------------------- main loop
def _same(proto: DnsProtocol) -> DnsProtocol:
    return proto


def _ns_identity(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def serve(hosts: list[HostSockets], ready_file: Path | None) -> None:
    """Serve all sockets until SIGTERM/SIGINT or until a namespace vanishes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    for hs in hosts:
        for s in hs.tcp:
            servers.append(await asyncio.start_server(handle_tcp, sock=s, backlog=LISTEN_BACKLOG))
        for s in hs.http:
            handler = make_http_handler(hs.host)
            servers.append(
                await asyncio.start_server(handler, sock=s, backlog=LISTEN_BACKLOG, limit=MAX_REQUEST)
            )
        if hs.dns is not None:
            proto = DnsProtocol(hs.host, hs.dns_names)
            dtr, _ = await loop.create_datagram_endpoint(partial(_same, proto), sock=hs.dns)
            transports.append(dtr)
    idents = {hs.ns: _ns_identity(hs.ns) for hs in hosts}
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, f"{os.getpid()}\n")
    log.info("serving %d hosts, %d sockets", len(hosts), len(servers) + len(transports))

    async def watchdog() -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            for ns, ident in idents.items():
                if _ns_identity(ns) != ident:
                    log.info("namespace %s is gone; exiting", ns)
                    stop.set()
                    return

    wd = asyncio.create_task(watchdog())
    await stop.wait()
    wd.cancel()
    for srv in servers:
        srv.close()
    for tr in transports:
        tr.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m watchtower.lab.responder", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--spec-json", required=True, type=Path, help="LabSpec as written by Lab.up()")
    ap.add_argument("--ready-file", type=Path, help="written (with our PID) once every socket is bound")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s responder[%(process)d] %(levelname)s %(message)s",
    )
    # 10,000 concurrent connects to a bulk host need 10,000 fds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        spec = LabSpec.from_json(args.spec_json.read_text())
        hosts = open_sockets(spec)
    except (OSError, ValueError) as e:
        log.error("cannot open listeners: %s", e)
        return 1
    asyncio.run(serve(hosts, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
