"""``icmp``: ICMP echo ("ping") to one address, through one process-wide :class:`Pinger`.

Design
======

One socket per address family for the whole process
    Every ICMP path in the daemon (10,000 of them, thousands in flight at once) goes through the
    same :class:`Pinger`, which owns exactly one ICMP socket for IPv4 and, opened lazily on the
    first IPv6 ping, one for IPv6. Outstanding echo requests live in a dict keyed by the 16-bit
    sequence number; one ``loop.add_reader`` callback drains the socket and resolves the matching
    futures. The work per ping is one ``sendto``, one ``recvmsg``, a parse and a dict lookup, and
    it does not depend on how many others are in flight. Measured on the 2-vCPU lab VM: 10,000
    concurrent loopback pings take 0.4-0.5 s of CPU, about 40 µs each. About 20 µs of that is
    asyncio's own cost for a task plus an ``asyncio.timeout`` on that VM.

Why not icmplib
    icmplib opens a socket *per ping*. In privileged mode that is one ``SOCK_RAW`` socket per
    ping, and every raw ICMP socket receives a copy of *every* ICMP packet on the host: with N
    pings in flight each reply is cloned and parsed N times (O(N²)), each socket's small receive
    buffer overflows, and replies are lost for good. The lab measured 1000 concurrent pings to
    hosts that were all alive at 200 ms RTT: about 110 reported alive, 890 falsely "down"
    (``tests/scenarios/test_icmp_at_scale.py`` guards that case). Unprivileged icmplib scales linearly but
    still pays a socket per ping (about 0.15 ms CPU), and it takes the receive timestamp when the
    coroutine resumes, so its RTT includes event-loop latency. Here the receive time is the
    kernel's arrival timestamp (``SO_TIMESTAMPNS``), used only while it lies inside the
    monotonic bound. Failing that, it is ``perf_counter()`` read in the reader callback. Either
    way, a reply that waits while the loop sends the rest of a burst does not inflate its RTT:
    p50 is about 10 µs at 10,000 concurrent loopback pings, against about 60 ms with
    callback-only timestamps.

Demultiplexing and the sanity checks on replies
    * Sequence numbers are 16-bit and allocated per family. A number still in flight is skipped,
      so wrap-around can never give two pending pings the same key.
    * Each echo request carries an 8-byte random token at the start of its payload. A reply is
      accepted only if the token matches. A late reply to a ping that already timed out, whose
      sequence number has since been reused, is therefore counted as ``stray`` and never credited
      to the new ping. The same goes for a forged reply with a guessed id/seq.
    * ``dgram`` mode: the kernel owns the identifier (it is the socket's "port") and only delivers
      replies for our socket, so replies are matched by sequence number (plus token).
    * ``raw`` mode: we pick a random identifier. A raw socket sees *all* ICMP on the host,
      including other processes' replies, so three filters apply. A kernel ``ICMP_FILTER`` /
      ``ICMP6_FILTER`` passes only echo-reply, destination-unreachable and time-exceeded. A small
      classic-BPF program drops echo replies that carry another identifier. Python then checks the
      identifier, the sequence number and the token. IPv4 raw reads include the IP header (IHL is
      parsed); IPv6 raw reads do not.

Modes and privileges (``Pinger(mode=...)``)
    ``dgram``
        An unprivileged ``SOCK_DGRAM``/``IPPROTO_ICMP`` "ping socket". It works for any process
        whose gid (or a supplementary group) is inside ``net.ipv4.ping_group_range``. That sysctl
        covers IPv6 too and applies **per network namespace**. The Debian default is ``1 0``,
        which means nobody, root included. To enable it, add a sysctl.d drop-in, e.g.
        ``/etc/sysctl.d/99-watchtower-ping.conf`` containing
        ``net.ipv4.ping_group_range = 0 2147483647`` (or only the daemon's gid, ``G G``), then run
        ``sysctl --system``.
    ``raw``
        One ``SOCK_RAW`` socket per family. Needs root or ``CAP_NET_RAW``, e.g. systemd
        ``AmbientCapabilities=CAP_NET_RAW``, or ``setcap cap_net_raw+ep`` on the interpreter.
    ``auto`` (the default)
        Try ``dgram`` first: it needs no capability, and the kernel demultiplexes for us. Fall
        back to ``raw``. If neither can be opened, :meth:`Pinger.open` raises
        :class:`IcmpSocketError`, naming both fixes.

ICMP errors (destination unreachable / time exceeded)
    ``raw``
        The error arrives as an ordinary ICMP packet. We parse the quoted original echo request
        (id, seq, destination, and the token when quoted), and the matching ping fails at once
        with ``unreachable=True`` and a detail like ``"host unreachable (from 10.0.0.1)"``.
    ``dgram``
        Ping sockets do not deliver ICMP errors as data. We enable ``IP_RECVERR`` /
        ``IPV6_RECVERR`` and read the socket's error queue (``recvmsg(MSG_ERRQUEUE)``, decoding
        ``struct sock_extended_err`` and the offender address). So errors are handled in this mode
        too, not left to time out. With RECVERR on, the kernel also reports a pending ICMP error
        once, as the errno of the *next* ``sendto``/``recvfrom`` on the socket, whichever ping
        that call belongs to. :meth:`Pinger._sendto` therefore drains the error queue and retries
        before it believes a send error. Routing errors are synchronous and repeat; stale ones do
        not.

Receive buffer and bursts
    The socket asks for an 8 MiB receive buffer with ``SO_RCVBUFFORCE``, which needs
    ``CAP_NET_ADMIN``. Failing that it falls back to ``SO_RCVBUF``, capped by
    ``net.core.rmem_max``. On a path with a very short RTT the replies to a burst of sends pile
    up in the socket before the event loop gets to read them. So :meth:`Pinger.ping` also drains
    the socket inline every ``rcvbuf / 4 KiB`` sends, which keeps a 10,000-ping burst correct
    even with the unprivileged 208 KiB buffer. ``SO_SNDBUF`` is deliberately left at its
    default: a full send buffer gives back-pressure (``EAGAIN``, awaited by
    ``loop.sock_sendto``). A huge one would let a burst overflow the qdisc, which drops packets
    silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from watchtower.probes import Failure, ProbeContext, ProbeResult

if TYPE_CHECKING:
    from watchtower.config import IcmpPath

__all__ = [
    "IcmpMessage",
    "IcmpSocketError",
    "PingReply",
    "Pinger",
    "build_echo_request",
    "checksum",
    "describe_icmp_error",
    "parse_icmp",
    "probe",
]

Mode = Literal["auto", "dgram", "raw"]

ICMP_ECHO_REPLY: Final = 0
ICMP_DEST_UNREACH: Final = 3
ICMP_ECHO_REQUEST: Final = 8
ICMP_TIME_EXCEEDED: Final = 11
ICMP6_DEST_UNREACH: Final = 1
ICMP6_TIME_EXCEEDED: Final = 3
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129

# Linux constants the socket module of Python 3.11 does not export.
_SOL_RAW: Final = 255
_ICMP_FILTER: Final = 1  # SOL_RAW option: bitmask of ICMPv4 types to *drop*
_ICMP6_FILTER: Final = 1  # IPPROTO_ICMPV6 option: 256-bit mask of ICMPv6 types to *drop*
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25
_SO_RCVBUFFORCE: Final = 33
_SO_ATTACH_FILTER: Final = 26
_SO_TIMESTAMPNS: Final = 35  # also the cmsg type (SCM_TIMESTAMPNS)
_SO_EE_ORIGIN_LOCAL: Final = 1
_SO_EE_ORIGIN_ICMP: Final = 2
_SO_EE_ORIGIN_ICMP6: Final = 3

TOKEN_LEN: Final = 8
MAX_PAYLOAD: Final = 65_000
_MAX_IN_FLIGHT: Final = 65_536  # the whole 16-bit sequence space of one family
_RCVBUF_WANTED: Final = 8 * 1024 * 1024
_TRUESIZE_GUESS: Final = 2048  # kernel memory charged per queued small ICMP packet, generously
_READER_BATCH: Final = 4096  # packets per reader wake-up, so a flood cannot starve the loop
_RECV_BUF: Final = 2048  # enough for outer+inner headers and the token; longer datagrams are cut
_STALE_ERROR_RETRIES: Final = 3
# A fixed filler after the token, like ping(8)'s pattern. The content does not matter. It is built
# once so that building a packet is one concatenation.
_FILLER: Final = bytes(i & 0xFF for i in range(MAX_PAYLOAD))
_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


class IcmpSocketError(OSError):
    """An ICMP socket could not be opened (no privilege for either mode, or no IPv6 on this host).

    This is a problem with how watchtower is set up, not with the target. :meth:`Pinger.open`
    raises it, and so does :meth:`Pinger.ping` when the IPv6 socket, opened lazily, cannot be
    created. The runner then records the path as *unknown*, not *down*.
    """


@dataclass(frozen=True, slots=True)
class PingReply:
    """The outcome of one echo request."""

    ok: bool
    rtt: float | None  # seconds, when ok
    detail: str
    unreachable: bool  # an ICMP error or a local routing error, as opposed to plain silence


class IcmpMessage(NamedTuple):
    """The parts of a received ICMP packet that matter for matching it to a ping."""

    is_reply: bool  # True: echo reply; False: an ICMP error quoting one of our echo requests
    ident: int
    seq: int
    token: bytes | None  # the first TOKEN_LEN payload bytes, None when the packet or quote is shorter
    icmp_type: int  # of the outer message
    icmp_code: int
    target: bytes | None  # errors: packed destination of the quoted datagram (when quoted)


# --------------------------------------------------------------------------- packet helpers


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 Internet checksum of ``data``, as an integer to be packed in network order."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\x00"
    # One struct.unpack + sum() runs in C. It is much faster in CPython than a per-word Python loop.
    total: int = sum(struct.unpack(f"!{len(raw) // 2}H", raw))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_echo_request(
    v6: bool, ident: int, seq: int, token: bytes, payload: int, *, with_checksum: bool
) -> bytes:
    """An ICMP(v6) echo request whose payload is ``token`` padded to ``payload`` bytes.

    The checksum is needed only for IPv4 raw sockets. The kernel fills it in on ICMPv6 sockets of
    either kind, and on IPv4 ping sockets, where it also overwrites the identifier.
    """
    body = token + _FILLER[: payload - len(token)]
    icmp_type = ICMP6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    if not with_checksum:
        return struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + body
    csum = checksum(struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + body)
    return struct.pack("!BBHHH", icmp_type, 0, csum, ident, seq) + body


def _token_at(data: bytes | memoryview, offset: int) -> bytes | None:
    end = offset + TOKEN_LEN
    return bytes(data[offset:end]) if len(data) >= end else None


def parse_icmp(data: bytes | memoryview, *, v6: bool, ip_header: bool) -> IcmpMessage | None:
    """Parse an echo reply or an ICMP error that quotes an echo request; None for anything else.

    ``ip_header``: the data starts with the IPv4 header (IPv4 raw sockets). IPv6 raw sockets and
    ping sockets of both families deliver the ICMP message alone. Never raises on malformed input.
    """
    n = len(data)
    off = 0
    if ip_header:
        if n < 20 or data[0] >> 4 != 4:
            return None
        off = (data[0] & 0x0F) * 4
        if off < 20:
            return None
    if n < off + 8:
        return None
    icmp_type, code = data[off], data[off + 1]
    if icmp_type == (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY):
        ident, seq = struct.unpack_from("!HH", data, off + 4)
        return IcmpMessage(True, ident, seq, _token_at(data, off + 8), icmp_type, code, None)
    inner = off + 8
    if v6:
        if icmp_type not in (ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED):
            return None
        # The quoted IPv6 header. Extension headers are not walked: echo requests carry none.
        if n < inner + 40 + 8 or data[inner] >> 4 != 6 or data[inner + 6] != socket.IPPROTO_ICMPV6:
            return None
        target = bytes(data[inner + 24 : inner + 40])
        quoted = inner + 40
        if data[quoted] != ICMP6_ECHO_REQUEST:
            return None
    else:
        if icmp_type not in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
            return None
        if n < inner + 20 or data[inner] >> 4 != 4 or data[inner + 9] != socket.IPPROTO_ICMP:
            return None
        target = bytes(data[inner + 16 : inner + 20])
        inner_ihl = (data[inner] & 0x0F) * 4
        quoted = inner + inner_ihl
        # RFC 792 routers quote only 8 bytes past the IP header: enough for id/seq, not the token.
        if inner_ihl < 20 or n < quoted + 8 or data[quoted] != ICMP_ECHO_REQUEST:
            return None
    ident, seq = struct.unpack_from("!HH", data, quoted + 4)
    return IcmpMessage(False, ident, seq, _token_at(data, quoted + 8), icmp_type, code, target)


_V4_UNREACH: Final = {
    0: "network unreachable",
    1: "host unreachable",
    2: "protocol unreachable",
    3: "port unreachable",
    4: "fragmentation needed",
    5: "source route failed",
    6: "destination network unknown",
    7: "destination host unknown",
    8: "source host isolated",
    9: "network administratively prohibited",
    10: "host administratively prohibited",
    11: "network unreachable for TOS",
    12: "host unreachable for TOS",
    13: "communication administratively prohibited",
    14: "host precedence violation",
    15: "precedence cutoff in effect",
}
_V4_TIME_EXCEEDED: Final = {0: "TTL exceeded in transit", 1: "fragment reassembly time exceeded"}
_V6_UNREACH: Final = {
    0: "no route to destination",
    1: "communication administratively prohibited",
    2: "beyond scope of source address",
    3: "address unreachable",
    4: "port unreachable",
    5: "source address failed ingress/egress policy",
    6: "reject route to destination",
}
_V6_TIME_EXCEEDED: Final = {0: "hop limit exceeded in transit", 1: "fragment reassembly time exceeded"}


def describe_icmp_error(v6: bool, icmp_type: int, code: int) -> str:
    """Human text for an ICMP(v6) destination-unreachable / time-exceeded type and code."""
    if v6:
        table = _V6_UNREACH if icmp_type == ICMP6_DEST_UNREACH else _V6_TIME_EXCEEDED
    else:
        table = _V4_UNREACH if icmp_type == ICMP_DEST_UNREACH else _V4_TIME_EXCEEDED
    return table.get(code, f"ICMP{'v6' if v6 else ''} type {icmp_type} code {code}")


def _parse_literal(address: str) -> tuple[bool, tuple[Any, ...], bytes]:
    """(is_v6, sockaddr, packed) for an IP literal; ValueError for anything else."""
    try:
        return False, (address, 0), socket.inet_pton(socket.AF_INET, address)
    except (OSError, TypeError):
        pass
    if not isinstance(address, str):
        raise ValueError(f"not an IP address literal: {address!r}")
    base, sep, scope = address.partition("%")
    try:
        packed = socket.inet_pton(socket.AF_INET6, base)
    except OSError:
        raise ValueError(f"not an IP address literal: {address!r}") from None
    if packed.startswith(_V4_MAPPED_PREFIX):  # ::ffff:a.b.c.d is an IPv4 destination
        return False, (socket.inet_ntop(socket.AF_INET, packed[12:]), 0), packed[12:]
    scope_id = 0
    if sep:
        try:
            scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        except OSError:
            raise ValueError(f"unknown interface in scoped address {address!r}") from None
    return True, (base, 0, 0, scope_id), packed


def _fmt_seconds(value: float) -> str:
    return f"{value:.1f}s" if round(value, 1) == value else f"{value:g}s"


def _send_error_detail(exc: OSError) -> str:
    hints = {
        errno.EINVAL: "invalid argument (blackhole route?)",
        errno.EACCES: "permission denied (prohibit route or firewall)",
        errno.EPERM: "operation not permitted (firewall?)",
    }
    text = hints.get(exc.errno or 0) or (exc.strerror or str(exc))
    return f"{text} (local send error)"


# --------------------------------------------------------------------------- the Pinger


class _Pending:
    __slots__ = ("dst", "fut", "sent_at", "sent_wall", "token")

    def __init__(self, fut: asyncio.Future[PingReply], token: bytes, dst: bytes) -> None:
        self.fut = fut
        self.token = token
        self.dst = dst
        self.sent_at = 0.0  # time.perf_counter() just before sendto
        self.sent_wall = 0.0  # time.time() just before sendto, to compare with kernel timestamps


class _Family:
    """The socket and the in-flight table of one address family."""

    __slots__ = (
        "buf",
        "drain_every",
        "ident",
        "ip_header",
        "kind",
        "next_seq",
        "not_full",
        "pending",
        "rcvbuf",
        "recverr",
        "send_lock",
        "sends_since_drain",
        "sock",
        "timestamps",
        "v6",
        "view",
    )

    def __init__(
        self, sock: socket.socket, kind: str, v6: bool, ident: int, rcvbuf: int, timestamps: bool
    ) -> None:
        self.sock = sock
        self.timestamps = timestamps  # SO_TIMESTAMPNS is on: replies carry the kernel's arrival time
        self.kind = kind
        self.v6 = v6
        self.ident = ident  # ours in raw mode; 0 (kernel-owned) in dgram mode
        self.ip_header = kind == "raw" and not v6
        self.recverr = kind == "dgram"
        self.rcvbuf = rcvbuf
        self.drain_every = max(32, rcvbuf // _TRUESIZE_GUESS // 2)
        self.sends_since_drain = 0
        self.pending: dict[int, _Pending] = {}
        self.next_seq = random.randrange(0x10000)
        # loop.sock_sendto() is not safe for concurrent waiters on one socket. A second waiter's
        # writer callback replaces the first one's, and the first future never completes. Only
        # the slow path (socket buffer full) ever waits under this lock.
        self.send_lock = asyncio.Lock()
        self.not_full = asyncio.Event()
        self.not_full.set()
        self.buf = bytearray(_RECV_BUF)
        self.view = memoryview(self.buf)

    def alloc_seq(self) -> int:
        seq = self.next_seq
        while seq in self.pending:  # the caller guarantees a free number exists
            seq = (seq + 1) & 0xFFFF
        self.next_seq = (seq + 1) & 0xFFFF
        return seq


class Pinger:
    """ICMP echo for the whole process, over one shared socket per address family.

    Use ``async with Pinger() as p: await p.ping("192.0.2.1", 1.0)``, or :meth:`open` and
    :meth:`close`. It is bound to the event loop it was opened in.

    Counters, for metrics and benchmarks: ``sent`` (echo requests handed to the kernel),
    ``received`` (matching echo replies), ``errors`` (matching ICMP errors, including ones from
    the error queue), ``stray`` (packets that matched no in-flight ping: late replies, other
    processes' traffic on a raw socket, forged replies) and :attr:`in_flight`.
    """

    def __init__(self, mode: Mode = "auto", *, rcvbuf: int = _RCVBUF_WANTED) -> None:
        if mode not in ("auto", "dgram", "raw"):
            raise ValueError(f"mode must be 'auto', 'dgram' or 'raw', not {mode!r}")
        self.mode: Mode = mode
        self._rcvbuf_wanted = rcvbuf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._v4: _Family | None = None
        self._v6: _Family | None = None
        self._closed = False
        # The token is not a secret from anyone who can see the packets. It only has to be
        # unpredictable off-path, so a seeded PRNG is enough, and it is cheaper than os.urandom
        # per ping.
        self._rng = random.Random(os.urandom(16))
        self.sent = 0
        self.received = 0
        self.errors = 0
        self.stray = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the IPv4 socket (IPv6 follows on first use). Raises :class:`IcmpSocketError`."""
        if self._closed:
            raise RuntimeError("a closed Pinger cannot be reopened")
        if self._v4 is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._v4 = self._open_family(v6=False)

    def close(self) -> None:
        """Close the sockets. Pings still in flight complete with ``ok=False``, "pinger closed"."""
        self._closed = True
        for fam in (self._v4, self._v6):
            if fam is None:
                continue
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fam.sock.fileno())
                self._loop.remove_writer(fam.sock.fileno())
            fam.sock.close()
            for entry in fam.pending.values():
                if not entry.fut.done():
                    entry.fut.set_result(PingReply(False, None, "pinger closed", False))
        self._v4 = self._v6 = None

    async def __aenter__(self) -> Pinger:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return sum(len(fam.pending) for fam in (self._v4, self._v6) if fam is not None)

    @property
    def mode_v4(self) -> str | None:
        """Either "dgram" or "raw" once open, else None."""
        return self._v4.kind if self._v4 else None

    @property
    def mode_v6(self) -> str | None:
        """Either "dgram" or "raw" once the IPv6 socket is open (on the first IPv6 ping), else None."""
        return self._v6.kind if self._v6 else None

    def _open_family(self, *, v6: bool) -> _Family:
        af = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        failures: dict[str, OSError] = {}
        sock: socket.socket | None = None
        kind = ""
        kinds = ("dgram", "raw") if self.mode == "auto" else (self.mode,)
        for kind in kinds:
            try:
                sock = socket.socket(af, socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_RAW, proto)
                break
            except OSError as exc:
                failures[kind] = exc
        if sock is None:
            raise _open_error(v6, failures)
        try:
            sock.setblocking(False)
            rcvbuf = _set_rcvbuf(sock, self._rcvbuf_wanted)
            ident = 0
            if kind == "raw":
                ident = random.randrange(1, 0x10000)
                _install_raw_filters(sock, v6, ident)
            else:
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, _IP_RECVERR, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                timestamps = True
            except OSError:
                timestamps = False
            fam = _Family(sock, kind, v6, ident, rcvbuf, timestamps)
            assert self._loop is not None
            self._loop.add_reader(sock.fileno(), self._on_readable, fam)
        except BaseException:
            sock.close()
            raise
        return fam

    # ------------------------------------------------------------------ ping

    # The per-call timeout is the point of the API: each of thousands of concurrent pings has its own.
    async def ping(self, address: str, timeout: float, *, payload: int = 56) -> PingReply:  # noqa: ASYNC109
        """Send one echo request to the IP literal ``address`` and wait up to ``timeout`` seconds.

        Network conditions never raise: silence gives ``ok=False`` with "no echo reply within Ns".
        An ICMP error, or a local send error such as no route, gives ``ok=False,
        unreachable=True``. Raises ValueError for a non-literal address or a bad payload size,
        RuntimeError when the Pinger is not open, and :class:`IcmpSocketError` when the IPv6
        socket cannot be opened.
        """
        v6, sockaddr, dst = _parse_literal(address)
        if not TOKEN_LEN <= payload <= MAX_PAYLOAD:
            raise ValueError(f"payload must be {TOKEN_LEN}..{MAX_PAYLOAD} bytes, not {payload}")
        if self._closed or self._v4 is None or self._loop is None:
            raise RuntimeError("Pinger is not open: use 'async with Pinger()' or 'await pinger.open()'")
        fam = self._v4
        if v6:
            if self._v6 is None:
                self._v6 = self._open_family(v6=True)
            fam = self._v6
        silence = PingReply(False, None, f"no echo reply within {_fmt_seconds(timeout)}", False)
        if not timeout > 0:
            return silence
        entry: _Pending | None = None
        seq = -1
        try:
            async with asyncio.timeout(timeout):
                while len(fam.pending) >= _MAX_IN_FLIGHT:
                    fam.not_full.clear()
                    await fam.not_full.wait()
                seq = fam.alloc_seq()
                token = self._rng.getrandbits(64).to_bytes(TOKEN_LEN, "big")
                entry = _Pending(self._loop.create_future(), token, dst)
                fam.pending[seq] = entry
                packet = build_echo_request(v6, fam.ident, seq, token, payload, with_checksum=fam.ip_header)
                if fam.sends_since_drain >= fam.drain_every:
                    # A burst on a short path: collect the replies already queued before sending
                    # more, so the receive buffer cannot overflow before the reader callback runs.
                    self._drain(fam, sys.maxsize)
                fam.sends_since_drain += 1
                entry.sent_wall = time.time()
                entry.sent_at = time.perf_counter()
                error = await self._sendto(fam, packet, sockaddr)
                if error is not None:
                    if self._closed:
                        return PingReply(False, None, "pinger closed", False)
                    return PingReply(False, None, _send_error_detail(error), True)
                self.sent += 1
                return await entry.fut
        except TimeoutError:
            return silence
        finally:
            # Always forget the ping, whether it completed, timed out or was cancelled.
            if entry is not None and fam.pending.get(seq) is entry:
                del fam.pending[seq]
                if not fam.not_full.is_set():
                    fam.not_full.set()

    async def _sendto(self, fam: _Family, packet: bytes, sockaddr: tuple[Any, ...]) -> OSError | None:
        """Send one packet. Returns the OSError for a hard failure, None once it is sent.

        EAGAIN is awaited by loop.sock_sendto. ENOBUFS/ENOMEM are retried with a short back-off:
        they mean "local queue full", not "target down", and the caller's timeout bounds the
        retries.
        """
        assert self._loop is not None
        delay = 0.0005
        stale_retries = 0
        while True:
            try:
                async with fam.send_lock:
                    await self._loop.sock_sendto(fam.sock, packet, sockaddr)
                return None
            except OSError as exc:
                if self._closed:
                    return exc
                if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                # With IP_RECVERR the kernel reports an earlier ICMP error once, as the errno of
                # the next call on the socket, whichever ping it belongs to. Drain the error queue
                # (which fails the right pings) and retry. A genuine routing error repeats.
                if fam.recverr and stale_retries < _STALE_ERROR_RETRIES and self._clear_async_error(fam):
                    stale_retries += 1
                    continue
                return exc

    # ------------------------------------------------------------------ receive side

    def _on_readable(self, fam: _Family) -> None:
        if fam.recverr:
            self._drain_errqueue(fam)
        self._drain(fam, _READER_BATCH)

    def _drain(self, fam: _Family, limit: int) -> None:
        """Read up to ``limit`` packets without blocking and dispatch them."""
        fam.sends_since_drain = 0
        sock, buf, view, timestamps = fam.sock, fam.buf, fam.view, fam.timestamps
        bufs = [buf]
        perf_counter = time.perf_counter
        kernel_ts: float | None = None
        for _ in range(limit):
            try:
                if timestamps:
                    n, ancdata, _flags, src = sock.recvmsg_into(bufs, 64)
                else:
                    n, src = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # With RECVERR, a pending ICMP error is reported once by recv, even with data
                # queued. Its details are in the error queue.
                if fam.recverr and self._clear_async_error(fam):
                    continue
                return
            # Taken here, not when the awaiting coroutine resumes, so the RTT never includes
            # event-loop latency.
            now = perf_counter()
            if timestamps:
                kernel_ts = None
                for level, ctype, cdata in ancdata:
                    if level == socket.SOL_SOCKET and ctype == _SO_TIMESTAMPNS and len(cdata) >= 16:
                        sec, nsec = struct.unpack_from("=qq", cdata)
                        kernel_ts = sec + nsec * 1e-9
            self._dispatch(fam, view[:n], src, now, kernel_ts)

    def _dispatch(
        self,
        fam: _Family,
        data: bytes | memoryview,
        src: tuple[Any, ...],
        now: float,
        kernel_ts: float | None = None,
    ) -> None:
        """Match one received packet to an in-flight ping and resolve it; count it stray otherwise.

        ``now`` is perf_counter() right after the read. ``kernel_ts`` is the kernel's arrival time
        (CLOCK_REALTIME). When available, it is preferred, because it also leaves out the time the
        reply waited in the socket queue while the loop was busy, e.g. sending the rest of a
        burst. It is trusted only if it lies inside the monotonic bound, which guards against a
        wall-clock step between send and receive.
        """
        msg = parse_icmp(data, v6=fam.v6, ip_header=fam.ip_header)
        if msg is None or (fam.kind == "raw" and msg.ident != fam.ident):
            self.stray += 1
            return
        entry = fam.pending.get(msg.seq)
        if entry is None or entry.fut.done():
            self.stray += 1
            return
        if msg.is_reply:
            if msg.token != entry.token:
                self.stray += 1
                return
            self.received += 1
            rtt = max(now - entry.sent_at, 0.0)
            if kernel_ts is not None and 0.0 <= kernel_ts - entry.sent_wall <= rtt:
                rtt = kernel_ts - entry.sent_wall
            entry.fut.set_result(PingReply(True, rtt, f"rtt {rtt * 1000:.2f} ms", False))
            return
        # An ICMP error quoting our request. When the token or the destination is quoted, it must
        # match: a guessed id/seq alone must not fail someone else's ping.
        if (msg.token is not None and msg.token != entry.token) or (
            msg.target is not None and msg.target != entry.dst
        ):
            self.stray += 1
            return
        self.errors += 1
        what = describe_icmp_error(fam.v6, msg.icmp_type, msg.icmp_code)
        entry.fut.set_result(PingReply(False, None, f"{what} (from {src[0]})", True))

    def _clear_async_error(self, fam: _Family) -> bool:
        """Consume queued ICMP errors and the pending socket error; True if there was any."""
        drained = self._drain_errqueue(fam)
        try:
            pending = fam.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            pending = 0
        return drained > 0 or pending != 0

    def _drain_errqueue(self, fam: _Family) -> int:
        """Dgram sockets: read ICMP errors from the error queue and fail the matching pings."""
        count = 0
        level, cmsg_type = (socket.IPPROTO_IPV6, _IPV6_RECVERR) if fam.v6 else (socket.SOL_IP, _IP_RECVERR)
        while True:
            try:
                data, ancdata, _flags, _addr = fam.sock.recvmsg(_RECV_BUF, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError:
                return count
            count += 1
            for cmsg_level, ctype, cdata in ancdata:
                if cmsg_level == level and ctype == cmsg_type:
                    self._handle_extended_err(fam, data, cdata)
                    break
            else:
                self.stray += 1

    def _handle_extended_err(self, fam: _Family, data: bytes, cdata: bytes) -> None:
        # struct sock_extended_err { u32 ee_errno; u8 ee_origin, ee_type, ee_code, ee_pad;
        # u32 ee_info, ee_data; }, then the offender's sockaddr (SO_EE_OFFENDER).
        if len(cdata) < 16 or len(data) < 8:
            self.stray += 1
            return
        ee_errno, origin, ee_type, ee_code = struct.unpack_from("=IBBB", cdata)
        # The payload is our own echo request as the kernel quoted it: type, code, csum, id, seq.
        seq = struct.unpack_from("!H", data, 6)[0]
        entry = fam.pending.get(seq)
        if (
            entry is None
            or entry.fut.done()
            or data[0] != (ICMP6_ECHO_REQUEST if fam.v6 else ICMP_ECHO_REQUEST)
        ):
            self.stray += 1
            return
        token = _token_at(data, 8)
        if token is not None and token != entry.token:
            self.stray += 1
            return
        if origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
            what = describe_icmp_error(fam.v6, ee_type, ee_code)
            offender = _sockaddr_host(cdata[16:], fam.v6)
            detail = f"{what} (from {offender})" if offender else what
        elif origin == _SO_EE_ORIGIN_LOCAL:
            detail = f"{os.strerror(ee_errno)} (local error)"
        else:
            detail = os.strerror(ee_errno) if ee_errno else f"socket error origin {origin}"
        self.errors += 1
        entry.fut.set_result(PingReply(False, None, detail, True))


def _sockaddr_host(raw: bytes, v6: bool) -> str | None:
    """The address in a kernel ``struct sockaddr_in``/``sockaddr_in6``, None if absent."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for a big receive buffer, which absorbs reply bursts. Returns what the kernel granted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)  # ignores rmem_max; CAP_NET_ADMIN
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)  # capped at net.core.rmem_max
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _install_raw_filters(sock: socket.socket, v6: bool, ident: int) -> None:
    """Have the kernel drop, before it queues them, the ICMP packets a raw socket would copy to us.

    Both filters are optimisations: Python still checks type, identifier and token. So a failure
    to install them is ignored.
    """
    try:
        if v6:
            blocked = [0xFFFFFFFF] * 8  # Linux: a set bit means "drop this type"
            for t in (ICMP6_ECHO_REPLY, ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED):
                blocked[t >> 5] &= ~(1 << (t & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *blocked))
        else:
            passed = (1 << ICMP_ECHO_REPLY) | (1 << ICMP_DEST_UNREACH) | (1 << ICMP_TIME_EXCEEDED)
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("=I", ~passed & 0xFFFFFFFF))
    except OSError:
        pass
    # Classic BPF: let every echo reply with our identifier through, drop echo replies with
    # another one (other processes' pings), and let everything else through (the type filter
    # above already limited it to errors, whose quoted id is checked in Python).
    accept, drop = 0x40000, 0
    if v6:
        # IPv6 raw sockets see the packet from the ICMPv6 header on.
        prog = [
            (0x30, 0, 0, 0),  # ldb [0]          ; type
            (0x15, 0, 2, ICMP6_ECHO_REPLY),  # jeq #129, next, +2
            (0x28, 0, 0, 4),  # ldh [4]          ; identifier
            (0x15, 1, 2, ident),  # jeq #ident, accept, drop
            (0x06, 0, 0, accept),
            (0x06, 0, 0, accept),
            (0x06, 0, 0, drop),
        ]
    else:
        # IPv4 raw sockets see the IP header first; X = its length.
        prog = [
            (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)
            (0x50, 0, 0, 0),  # ldb [x+0]        ; type
            (0x15, 0, 2, ICMP_ECHO_REPLY),  # jeq #0, next, +2
            (0x48, 0, 0, 4),  # ldh [x+4]        ; identifier
            (0x15, 1, 2, ident),  # jeq #ident, accept, drop
            (0x06, 0, 0, accept),
            (0x06, 0, 0, accept),
            (0x06, 0, 0, drop),
        ]
    insns = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(insns)
    fprog = struct.pack(
        "=HxxxxxxQ" if struct.calcsize("P") == 8 else "=HxxI", len(prog), ctypes.addressof(buf)
    )
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)  # the kernel copies the program


def _ping_group_range() -> str:
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            return " ".join(f.read().split())
    except OSError:
        return "unknown"


def _open_error(v6: bool, failures: dict[str, OSError]) -> IcmpSocketError:
    fam = "IPv6" if v6 else "IPv4"
    if any(exc.errno == errno.EAFNOSUPPORT for exc in failures.values()):
        return IcmpSocketError(errno.EAFNOSUPPORT, f"cannot ping {fam}: this host has no {fam} support")
    parts = []
    if "dgram" in failures:
        parts.append(
            f"unprivileged ICMP (SOCK_DGRAM) is not allowed for gid {os.getgid()}: "
            f"net.ipv4.ping_group_range is '{_ping_group_range()}' ({failures['dgram'].strerror})"
        )
    if "raw" in failures:
        parts.append(f"a raw ICMP socket needs root or CAP_NET_RAW ({failures['raw'].strerror})")
    last = next(reversed(failures.values()))
    return IcmpSocketError(
        last.errno,
        f"cannot open an {fam} ICMP socket: "
        + "; ".join(parts)
        + ". Fix one of: grant CAP_NET_RAW (systemd: AmbientCapabilities=CAP_NET_RAW), or allow "
        "unprivileged ICMP for the daemon's group with a sysctl.d drop-in, e.g. "
        "/etc/sysctl.d/99-watchtower-ping.conf: 'net.ipv4.ping_group_range = 0 2147483647' "
        "(or 'G G' for the daemon's gid only), then 'sysctl --system'",
    )


# --------------------------------------------------------------------------- the probe


CONFIRM_COUNT = 3


async def probe(spec: IcmpPath, ctx: ProbeContext) -> ProbeResult:
    """``count`` echo requests to ``spec.host``, 0.1 s apart. Up when at least one is answered.

    ``ctx.timeout`` bounds the whole probe, name resolution included. If ``count`` requests 0.1 s
    apart would leave the last one less than half the timeout to be answered, the spacing
    shrinks so that every request gets at least that long.
    """
    pinger = ctx.pinger
    if pinger is None:
        raise RuntimeError("the icmp probe needs ctx.pinger, an open Pinger")
    loop = asyncio.get_running_loop()
    timeout = ctx.timeout
    deadline = loop.time() + timeout
    host = str(spec.host).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    count = max(1, int(getattr(spec, "count", 1) or 1))
    if ctx.state.get("confirming"):
        # The last probe of this up path failed: before it counts twice, ask three times. One
        # echo per round keeps the steady cost at fping's; 30 % loss then needs ~0.3 x 0.03 to
        # look like two failures in a row, instead of 0.3 x 0.3.
        count = max(count, CONFIRM_COUNT)
    try:
        _parse_literal(host)
        address, via = host, ""
    except ValueError:
        resolved = await _resolve(loop, host, deadline, timeout)
        if isinstance(resolved, ProbeResult):
            return resolved
        address, via = resolved, f" ({resolved})"

    remaining = deadline - loop.time()
    interval = 0.1
    if count > 1 and (count - 1) * interval > remaining / 2:
        interval = remaining / 2 / (count - 1)

    async def one(i: int) -> PingReply | None:
        if i:
            await asyncio.sleep(i * interval)
        left = deadline - loop.time()
        return await pinger.ping(address, left) if left > 0 else None

    # count == 1 (the common case) skips gather's task creation.
    replies = [await one(0)] if count == 1 else list(await asyncio.gather(*(one(i) for i in range(count))))

    answered = [r for r in replies if r is not None and r.ok and r.rtt is not None]
    lost = count - len(answered)
    loss = f"{lost}/{count} lost" if count > 1 else ""
    if answered:
        best = min(r.rtt for r in answered if r.rtt is not None)
        detail = f"rtt {best * 1000:.2f} ms{via}" + (f", {loss}" if lost else "")
        return ProbeResult.success(latency=best, detail=detail)
    unreachable = next((r for r in replies if r is not None and r.unreachable), None)
    suffix = f" ({loss})" if loss else ""
    if unreachable is not None:
        return ProbeResult.fail(Failure.UNREACHABLE, f"{unreachable.detail}{via}{suffix}")
    return ProbeResult.fail(Failure.TIMEOUT, f"no echo reply within {_fmt_seconds(timeout)}{via}{suffix}")


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, deadline: float, budget: float
) -> str | ProbeResult:
    """The first address getaddrinfo gives for ``host`` (in its preference order), or a failure.

    getaddrinfo runs in the default executor, so a timed-out lookup keeps its thread until libc
    gives up. The probe itself still returns at the deadline.
    """
    try:
        async with asyncio.timeout_at(deadline):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except TimeoutError:
        return ProbeResult.fail(Failure.RESOLVE, f"resolving {host} timed out after {_fmt_seconds(budget)}")
    except socket.gaierror as exc:
        return ProbeResult.fail(Failure.RESOLVE, f"cannot resolve {host}: {exc.strerror or exc}")
    except OSError as exc:
        return ProbeResult.fail(Failure.RESOLVE, f"cannot resolve {host}: {exc.strerror or exc}")
    for af, _type, _proto, _canon, sockaddr in infos:
        if af in (socket.AF_INET, socket.AF_INET6):
            addr = str(sockaddr[0])
            # A scoped IPv6 result (fe80::1%eth0) comes back with the scope in the string already.
            return addr
    return ProbeResult.fail(Failure.RESOLVE, f"cannot resolve {host}: no IPv4 or IPv6 address")
