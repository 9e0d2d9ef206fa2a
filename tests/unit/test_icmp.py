"""Tests for watchtower.probes.icmp.

Real traffic goes only to 127.0.0.0/8 and ::1, with one exception: the ``netns`` test sends to
10.213.x / fd00:213:: addresses, but only inside network namespaces that it creates with
``unshare`` and that vanish when its processes exit. Nothing here changes a machine-wide sysctl
or a route in the root namespace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchtower.config import IcmpPath
from watchtower.probes import Failure, ProbeContext, icmp
from watchtower.probes.icmp import (
    IcmpSocketError,
    Pinger,
    PingReply,
    build_echo_request,
    checksum,
    describe_icmp_error,
    parse_icmp,
    probe,
)

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- environment probes


def _can_open(kind: int, af: int = socket.AF_INET) -> bool:
    proto = socket.IPPROTO_ICMPV6 if af == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        socket.socket(af, kind, proto).close()
    except OSError:
        return False
    return True


def _ping_group_range() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
    return int(lo), int(hi)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


CAN_RAW = _can_open(socket.SOCK_RAW)
CAN_DGRAM = _can_open(socket.SOCK_DGRAM)
CAN_PING = CAN_RAW or CAN_DGRAM
HAS_V6 = _has_ipv6_loopback()
IS_ROOT = os.geteuid() == 0
NS_TOOLS = all(shutil.which(t) for t in ("unshare", "nsenter", "ip", "setpriv"))

needs_ping = pytest.mark.skipif(
    not CAN_PING, reason="no ICMP socket: neither CAP_NET_RAW nor ping_group_range"
)
needs_v6 = pytest.mark.skipif(not HAS_V6, reason="no IPv6 loopback on this host")


def loopback_addresses(n: int) -> list[str]:
    """``n`` distinct 127.x.y.z addresses (all answer on Linux), never 127.0.0.0 or broadcast-like."""
    return [f"127.{1 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}" for i in range(n)]


@pytest.fixture
async def pinger() -> Any:
    if not CAN_PING:
        pytest.skip("no ICMP socket: neither CAP_NET_RAW nor ping_group_range")
    async with Pinger() as p:
        yield p


def drop_sends(monkeypatch: pytest.MonkeyPatch, p: Pinger) -> list[bytes]:
    """Make ``p`` drop every echo request (as a lossy network would); returns the captured packets."""
    captured: list[bytes] = []

    async def fake_sendto(fam: Any, packet: bytes, sockaddr: Any) -> OSError | None:
        captured.append(packet)
        return None

    monkeypatch.setattr(p, "_sendto", fake_sendto)
    return captured


# --------------------------------------------------------------------------- packet helpers for tests


def ipv4_header(src: str, dst: str, payload_len: int, *, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            ihl * 4 + payload_len,
            0,
            0,
            64,
            socket.IPPROTO_ICMP,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + options
    )


def ipv6_header(src: str, dst: str, payload_len: int) -> bytes:
    return struct.pack(
        "!IHBB16s16s",
        6 << 28,
        payload_len,
        socket.IPPROTO_ICMPV6,
        64,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
    )


def as_reply(request: bytes, v6: bool, *, token: bytes | None = None) -> bytes:
    """The echo reply a peer would send for ``request`` (optionally with another token)."""
    body = request[8:]
    if token is not None:
        body = token + body[len(token) :]
    reply = bytes([icmp.ICMP6_ECHO_REPLY if v6 else icmp.ICMP_ECHO_REPLY, 0]) + b"\0\0" + request[4:8] + body
    if not v6:
        reply = reply[:2] + struct.pack("!H", checksum(reply)) + reply[4:]
    return reply


def reference_checksum(data: bytes) -> int:
    """The textbook RFC 1071 loop, to check the fast implementation against."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --------------------------------------------------------------------------- pure functions


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (with end-around carry).
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)


@given(st.binary(max_size=300))
def test_checksum_matches_reference(data: bytes) -> None:
    assert checksum(data) == reference_checksum(data)


@given(st.binary(min_size=0, max_size=200))
def test_checksummed_packet_verifies_to_zero(data: bytes) -> None:
    packet = b"\x08\x00\x00\x00" + data + (b"\0" if len(data) % 2 else b"")
    packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
    assert checksum(packet) == 0


def test_build_echo_request_layout() -> None:
    token = bytes(range(1, 9))
    pkt = build_echo_request(False, 0x1234, 0xBEEF, token, 56, with_checksum=True)
    assert len(pkt) == 8 + 56
    assert pkt[0] == icmp.ICMP_ECHO_REQUEST and pkt[1] == 0
    assert struct.unpack("!HH", pkt[4:8]) == (0x1234, 0xBEEF)
    assert pkt[8:16] == token
    assert checksum(pkt) == 0
    pkt6 = build_echo_request(True, 7, 9, token, 8, with_checksum=False)
    assert pkt6 == bytes([icmp.ICMP6_ECHO_REQUEST, 0, 0, 0, 0, 7, 0, 9]) + token


def test_parse_echo_reply_raw_v4_with_ip_options() -> None:
    token = b"TOKEN123"
    reply = as_reply(build_echo_request(False, 4321, 17, token, 56, with_checksum=True), v6=False)
    # IHL 6 (one word of options): the parser must honour IHL, not assume 20 bytes.
    packet = ipv4_header("127.0.0.5", "127.0.0.1", len(reply), options=b"\x01\x01\x01\x00") + reply
    msg = parse_icmp(packet, v6=False, ip_header=True)
    assert msg is not None and msg.is_reply
    assert (msg.ident, msg.seq, msg.token) == (4321, 17, token)


def test_parse_echo_reply_without_ip_header() -> None:
    token = b"abcdefgh"
    for v6 in (False, True):
        reply = as_reply(build_echo_request(v6, 1, 65535, token, 8, with_checksum=not v6), v6=v6)
        msg = parse_icmp(reply, v6=v6, ip_header=False)
        assert msg is not None and msg.is_reply and (msg.seq, msg.token) == (65535, token)
    # A reply too short to carry our token parses, but with token None (so it can never match).
    msg = parse_icmp(bytes([0, 0, 0, 0, 0, 1, 0, 2]), v6=False, ip_header=False)
    assert msg is not None and msg.token is None


def _v4_unreachable(code: int, request: bytes, *, quote: int | None = None, inner_proto: int = 1) -> bytes:
    inner_ip = bytearray(ipv4_header("10.213.251.1", "10.213.250.1", len(request)))
    inner_ip[9] = inner_proto
    quoted = bytes(inner_ip) + request
    if quote is not None:
        quoted = quoted[: 20 + quote]
    icmp_msg = bytes([icmp.ICMP_DEST_UNREACH, code, 0, 0, 0, 0, 0, 0]) + quoted
    return ipv4_header("10.0.0.1", "10.213.251.1", len(icmp_msg)) + icmp_msg


def test_parse_dest_unreachable_v4() -> None:
    token = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    request = build_echo_request(False, 999, 42, token, 56, with_checksum=True)
    msg = parse_icmp(_v4_unreachable(1, request), v6=False, ip_header=True)
    assert msg is not None and not msg.is_reply
    assert (msg.ident, msg.seq, msg.token) == (999, 42, token)
    assert (msg.icmp_type, msg.icmp_code) == (3, 1)
    assert msg.target == socket.inet_aton("10.213.250.1")
    assert describe_icmp_error(False, msg.icmp_type, msg.icmp_code) == "host unreachable"

    # An RFC 792 router quotes only 8 bytes past the IP header: id/seq, no token.
    short = parse_icmp(_v4_unreachable(0, request, quote=8), v6=False, ip_header=True)
    assert short is not None and (short.seq, short.token) == (42, None)

    # Errors about something other than our echo requests are not ours.
    assert parse_icmp(_v4_unreachable(3, request, inner_proto=17), v6=False, ip_header=True) is None
    reply_quoted = as_reply(request, v6=False)
    assert parse_icmp(_v4_unreachable(1, reply_quoted), v6=False, ip_header=True) is None


def test_parse_dest_unreachable_and_time_exceeded_v6() -> None:
    token = b"tokentok"
    request = build_echo_request(True, 5, 6, token, 56, with_checksum=False)
    quoted = ipv6_header("fd00::1", "2001:db8::99", len(request)) + request
    for icmp_type, code, text in ((1, 3, "address unreachable"), (3, 0, "hop limit exceeded in transit")):
        msg = parse_icmp(bytes([icmp_type, code, 0, 0, 0, 0, 0, 0]) + quoted, v6=True, ip_header=False)
        assert msg is not None and not msg.is_reply
        assert (msg.ident, msg.seq, msg.token) == (5, 6, token)
        assert msg.target == socket.inet_pton(socket.AF_INET6, "2001:db8::99")
        assert describe_icmp_error(True, icmp_type, code) == text


def test_parse_ignores_other_icmp() -> None:
    request = build_echo_request(False, 1, 2, b"12345678", 8, with_checksum=True)
    # Our own echo request as seen on a raw socket (loopback), a redirect, and runt packets.
    assert (
        parse_icmp(ipv4_header("127.0.0.1", "127.0.0.1", len(request)) + request, v6=False, ip_header=True)
        is None
    )
    assert parse_icmp(bytes([5, 1]) + b"\0" * 30, v6=False, ip_header=False) is None
    assert parse_icmp(b"\x45\x00", v6=False, ip_header=True) is None
    assert parse_icmp(b"", v6=True, ip_header=False) is None
    assert parse_icmp(bytes([135, 0]) + b"\0" * 30, v6=True, ip_header=False) is None  # neighbour solicit


@settings(max_examples=300)
@given(st.binary(max_size=200), st.booleans(), st.booleans())
def test_parse_never_raises(data: bytes, v6: bool, ip_header: bool) -> None:
    parse_icmp(data, v6=v6, ip_header=ip_header and not v6)


# --------------------------------------------------------------------------- Pinger on loopback


@needs_ping
async def test_single_ping_loopback(pinger: Pinger) -> None:
    reply = await pinger.ping("127.0.0.1", 2.0)
    assert reply.ok and not reply.unreachable
    assert reply.rtt is not None and 0 <= reply.rtt < 0.1
    assert reply.detail.startswith("rtt ") and reply.detail.endswith(" ms")
    assert (pinger.sent, pinger.received, pinger.in_flight) == (1, 1, 0)
    assert pinger.mode_v4 in ("dgram", "raw")


@needs_ping
async def test_ipv4_mapped_literal_goes_over_ipv4(pinger: Pinger) -> None:
    assert (await pinger.ping("::ffff:127.0.0.1", 2.0)).ok
    assert pinger.mode_v6 is None


@needs_ping
@needs_v6
async def test_ipv6_loopback_opened_lazily(pinger: Pinger) -> None:
    assert pinger.mode_v6 is None
    reply = await pinger.ping("::1", 2.0)
    assert reply.ok and reply.rtt is not None and reply.rtt < 0.1
    assert pinger.mode_v6 in ("dgram", "raw")


@needs_ping
async def test_2000_concurrent_pings(pinger: Pinger) -> None:
    targets = loopback_addresses(2000)
    assert len(set(targets)) == 2000
    replies = await asyncio.gather(*(pinger.ping(a, 3.0) for a in targets))
    assert all(r.ok for r in replies), [r for r in replies if not r.ok][:3]
    assert pinger.in_flight == 0
    assert pinger._v4 is not None and pinger._v4.pending == {}
    assert pinger.received == 2000
    # RTT is the kernel's arrival time (or the reader callback's clock), never the time this
    # coroutine got to run again after 2000 others. Loopback RTT is microseconds.
    rtts = sorted(r.rtt for r in replies if r.rtt is not None)
    assert rtts[len(rtts) // 2] < 0.05


@needs_ping
async def test_burst_survives_small_receive_buffer() -> None:
    # The unprivileged case: SO_RCVBUF capped near rmem_max. 3000 back-to-back loopback replies
    # would overflow ~200 KB before the reader callback ever runs. The inline drain every
    # drain_every sends is what keeps all of them.
    async with Pinger(rcvbuf=100_000) as p:
        assert p._v4 is not None and p._v4.drain_every < 200
        replies = await asyncio.gather(*(p.ping(a, 3.0) for a in loopback_addresses(3000)))
        assert sum(r.ok for r in replies) == 3000
        assert p.in_flight == 0


@pytest.mark.skipif(not CAN_RAW, reason="raw ICMP sockets need root or CAP_NET_RAW")
async def test_forced_raw_mode() -> None:
    async with Pinger("raw") as p:
        assert p.mode_v4 == "raw"
        assert (await p.ping("127.3.2.1", 2.0)).ok
        if HAS_V6:
            assert (await p.ping("::1", 2.0)).ok and p.mode_v6 == "raw"


@pytest.mark.skipif(
    not CAN_DGRAM,
    reason="unprivileged ICMP is off in this namespace (net.ipv4.ping_group_range = "
    f"{' '.join(map(str, _ping_group_range()))}); test_netns_dgram_raw_and_icmp_errors covers dgram mode",
)
async def test_forced_dgram_mode() -> None:
    async with Pinger("dgram") as p:
        assert p.mode_v4 == "dgram"
        assert (await p.ping("127.3.2.1", 2.0)).ok
        if HAS_V6:
            assert (await p.ping("::1", 2.0)).ok and p.mode_v6 == "dgram"


@pytest.mark.skipif(CAN_DGRAM, reason="unprivileged ICMP is allowed here")
async def test_forced_dgram_mode_error_names_both_fixes() -> None:
    with pytest.raises(IcmpSocketError) as info:
        await Pinger("dgram").open()
    text = str(info.value)
    assert "ping_group_range" in text and "CAP_NET_RAW" in text and "sysctl.d" in text


@pytest.mark.skipif(not CAN_RAW, reason="needs two raw sockets")
async def test_raw_socket_ignores_other_processes_replies() -> None:
    # Every raw ICMP socket sees every ICMP packet on the host. The BPF filter on the identifier
    # keeps another pinger's replies out of the kernel queue, and the Python checks would count
    # any that got through as stray, never as ours.
    async with Pinger("raw") as a, Pinger("raw") as b:
        assert a._v4 is not None and b._v4 is not None and a._v4.ident != b._v4.ident
        replies = await asyncio.gather(*(b.ping(x, 2.0) for x in loopback_addresses(300)))
        assert all(r.ok for r in replies)
        await asyncio.sleep(0.05)
        assert a.received == 0 and a.in_flight == 0
        assert a.stray == 0  # filtered in the kernel, not even parsed


@needs_ping
async def test_forged_and_late_replies_are_ignored(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = drop_sends(monkeypatch, pinger)
    fam = pinger._v4
    assert fam is not None
    task = asyncio.create_task(pinger.ping("127.0.0.9", 5.0))
    while not captured:
        await asyncio.sleep(0)
    request = captured[0]
    seq = struct.unpack("!H", request[6:8])[0]
    real_token = request[8:16]

    def feed(icmp_bytes: bytes, src: str = "127.0.0.9") -> None:
        data = ipv4_header(src, "127.0.0.1", len(icmp_bytes)) + icmp_bytes if fam.ip_header else icmp_bytes
        pinger._dispatch(fam, data, (src, 0), time.perf_counter())

    # Right id and seq, wrong payload token: a stray (or forged) reply, not ours.
    feed(as_reply(request, v6=False, token=b"XXXXXXXX"))
    # An ICMP error naming our id/seq but quoting another destination: also not ours.
    bad_dst = bytearray(_v4_unreachable(1, request))
    bad_dst[20 + 8 + 16 : 20 + 8 + 20] = socket.inet_aton("10.9.9.9")
    feed(bytes(bad_dst), src="10.0.0.1")
    assert pinger.stray == 2 and not task.done() and pinger.in_flight == 1

    feed(as_reply(request, v6=False))
    reply = await task
    assert reply.ok and reply.rtt is not None
    assert request[8:16] == real_token and pinger.received == 1

    # A duplicate or late reply after the ping completed is stray too.
    feed(as_reply(request, v6=False))
    assert pinger.stray == 3 and pinger.in_flight == 0 and seq not in fam.pending


@needs_ping
async def test_icmp_error_fails_the_ping_at_once(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit level for raw mode; the netns test exercises real errors in both modes."""
    captured = drop_sends(monkeypatch, pinger)
    fam = pinger._v4
    assert fam is not None
    task = asyncio.create_task(pinger.ping("10.213.250.1", 5.0))  # never sent: sends are dropped
    while not captured:
        await asyncio.sleep(0)
    error = _v4_unreachable(1, captured[0])
    pinger._dispatch(fam, error if fam.ip_header else error[20:], ("10.0.0.1", 0), time.perf_counter())
    reply = await asyncio.wait_for(task, 1.0)
    assert reply == PingReply(False, None, "host unreachable (from 10.0.0.1)", True)
    assert pinger.errors == 1 and pinger.in_flight == 0


@needs_ping
async def test_timeouts_do_not_leak(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_sends(monkeypatch, pinger)
    start = time.monotonic()
    replies = await asyncio.gather(*(pinger.ping(a, 0.2) for a in loopback_addresses(1000)))
    elapsed = time.monotonic() - start
    assert all(r == PingReply(False, None, "no echo reply within 0.2s", False) for r in replies)
    assert 0.2 <= elapsed < 1.5
    assert pinger.in_flight == 0
    assert pinger._v4 is not None and pinger._v4.pending == {}


@needs_ping
async def test_cancelled_pings_do_not_leak(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_sends(monkeypatch, pinger)
    tasks = [asyncio.create_task(pinger.ping(a, 10.0)) for a in loopback_addresses(200)]
    await asyncio.sleep(0.01)
    assert pinger.in_flight == 200
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert pinger.in_flight == 0


@needs_ping
async def test_sequence_numbers_skip_in_flight_and_wrap(
    pinger: Pinger, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = drop_sends(monkeypatch, pinger)
    fam = pinger._v4
    assert fam is not None
    fam.next_seq = 0xFFFF
    first = asyncio.create_task(pinger.ping("127.0.0.1", 5.0))
    await asyncio.sleep(0)
    second = asyncio.create_task(pinger.ping("127.0.0.1", 5.0))
    await asyncio.sleep(0)
    fam.next_seq = 0xFFFF  # pretend we wrapped all the way round: 0xFFFF and 0 are both in flight
    third = asyncio.create_task(pinger.ping("127.0.0.1", 5.0))
    await asyncio.sleep(0)
    seqs = [struct.unpack("!H", p[6:8])[0] for p in captured]
    assert seqs == [0xFFFF, 0, 1]
    for t in (first, second, third):
        t.cancel()
    await asyncio.gather(first, second, third, return_exceptions=True)
    assert pinger.in_flight == 0


@needs_ping
async def test_hard_send_error_is_unreachable(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def no_route(sock: socket.socket, data: bytes, address: Any) -> int:
        raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))

    monkeypatch.setattr(loop, "sock_sendto", no_route)
    reply = await pinger.ping("127.0.0.1", 1.0)
    assert reply == PingReply(False, None, "No route to host (local send error)", True)
    assert pinger.in_flight == 0 and pinger.sent == 0


@needs_ping
async def test_enobufs_is_retried_not_failed(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real = loop.sock_sendto
    calls = 0

    async def full_queue_twice(sock: socket.socket, data: bytes, address: Any) -> int:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return await real(sock, data, address)

    monkeypatch.setattr(loop, "sock_sendto", full_queue_twice)
    reply = await pinger.ping("127.0.0.1", 2.0)
    assert reply.ok and calls == 3


@needs_ping
async def test_close_completes_pings_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Pinger()
    await p.open()
    drop_sends(monkeypatch, p)
    task = asyncio.create_task(p.ping("127.0.0.1", 10.0))
    await asyncio.sleep(0.01)
    p.close()
    reply = await asyncio.wait_for(task, 1.0)
    assert reply == PingReply(False, None, "pinger closed", False)
    with pytest.raises(RuntimeError):
        await p.ping("127.0.0.1", 1.0)


async def test_programming_errors_raise() -> None:
    p = Pinger()
    with pytest.raises(RuntimeError, match="not open"):
        await p.ping("127.0.0.1", 1.0)
    with pytest.raises(ValueError, match="not an IP address literal"):
        await p.ping("localhost", 1.0)
    with pytest.raises(ValueError):
        await p.ping("127.0.0.1", 1.0, payload=4)
    with pytest.raises(ValueError):
        Pinger("icmp")  # type: ignore[arg-type]


@needs_ping
async def test_zero_timeout_sends_nothing(pinger: Pinger) -> None:
    reply = await pinger.ping("127.0.0.1", 0)
    assert not reply.ok and not reply.unreachable and pinger.sent == 0


# --------------------------------------------------------------------------- privileges, in subprocesses

_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_python() -> str | None:
    """A Python >= 3.11 that uid nobody can execute (the venv's may live under a 0700 /root).

    watchtower.probes.icmp imports nothing outside the standard library, so the system
    interpreter will do.
    """
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            proc = subprocess.run(
                [*_NOBODY, candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                capture_output=True,
                timeout=30,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return candidate
    return None


NOBODY_PYTHON = _nobody_python() if IS_ROOT and NS_TOOLS else None

_OPEN_AND_PING = textwrap.dedent(
    """
    import asyncio, json, socket
    from watchtower.probes.icmp import Pinger, IcmpSocketError

    async def main():
        try:
            async with Pinger() as p:
                r = await p.ping("127.0.0.1", 2.0)
                r6 = await p.ping("::1", 2.0) if socket.has_ipv6 else None
                out = {"mode": p.mode_v4, "ok": r.ok, "ok6": r6 and r6.ok, "rcvbuf": p._v4.rcvbuf}
                print(json.dumps(out))
        except IcmpSocketError as exc:
            print(json.dumps({"error": str(exc)}))

    asyncio.run(main())
    """
)


def _run_as(prefix: list[str], code: str) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    proc = subprocess.run(
        [*prefix, NOBODY_PYTHON or sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not NOBODY_PYTHON, reason="needs root, setpriv and a Python that nobody can run")
def test_unprivileged_without_either_option_gets_a_clear_error() -> None:
    lo, hi = _ping_group_range()
    if lo <= 65534 <= hi:
        pytest.skip("ping_group_range admits nogroup here, so dgram mode would simply work")
    out = _run_as(_NOBODY, _OPEN_AND_PING)
    assert "error" in out, out
    for needle in ("CAP_NET_RAW", "ping_group_range", "AmbientCapabilities", "sysctl.d"):
        assert needle in out["error"]


@pytest.mark.skipif(not NOBODY_PYTHON, reason="needs root, setpriv and a Python that nobody can run")
def test_cap_net_raw_alone_is_enough() -> None:
    lo, hi = _ping_group_range()
    if lo <= 65534 <= hi:
        pytest.skip("ping_group_range admits nogroup here, so auto would pick dgram")
    out = _run_as([*_NOBODY, "--inh-caps=+net_raw", "--ambient-caps=+net_raw"], _OPEN_AND_PING)
    assert out["mode"] == "raw" and out["ok"], out
    # Without CAP_NET_ADMIN, SO_RCVBUFFORCE is refused and SO_RCVBUF is capped by rmem_max.
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    assert out["rcvbuf"] <= 2 * rmem_max


# --------------------------------------------------------------------------- real ICMP errors, in namespaces

# Runs in a fresh network namespace (unshare --net). It builds a throwaway "router" namespace
# behind a veth pair, then pings through it. Both namespaces die with their processes, so
# nothing needs cleaning up even if the test is killed.
_NETNS_SETUP = textwrap.dedent(
    """
    set -eu
    [ "$(ip -o link | wc -l)" = 1 ] || { echo "not a fresh network namespace" >&2; exit 99; }
    ip link set lo up
    # Per-namespace sysctls only; the host's values are untouched.
    echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range
    unshare --net sleep 120 &
    R=$!
    trap 'kill $R' EXIT
    sleep 0.2
    ip link add wta type veth peer name wtb netns $R
    ip addr add 10.213.251.1/30 dev wta
    ip -6 addr add fd00:213:251::1/64 dev wta nodad
    ip link set wta up
    ip route add 10.213.252.0/22 via 10.213.251.2
    ip route add unreachable 10.213.254.1/32
    ip -6 route add fd00:213::/32 via fd00:213:251::2
    nsenter -t $R -n sh -ec '
      ip link set lo up
      ip addr add 10.213.251.2/30 dev wtb
      ip -6 addr add fd00:213:251::2/64 dev wtb nodad
      ip link set wtb up
      echo 1 > /proc/sys/net/ipv4/ip_forward
      echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
      echo 0 > /proc/sys/net/ipv4/icmp_ratelimit
      echo 0 > /proc/sys/net/ipv6/icmp/ratelimit
      ip route add unreachable 10.213.252.1/32
      ip route add blackhole 10.213.253.1/32
      ip -6 route add unreachable fd00:213:252::1/128
      ip -6 route add blackhole fd00:213:252::2/128
    '
    "$PY" -c "$CHECK"
    # Unprivileged dgram mode as nobody, allowed by the (namespaced) ping_group_range alone.
    echo "65534 65534" > /proc/sys/net/ipv4/ping_group_range
    if [ -n "$PY_NOBODY" ]; then
      setpriv --reuid=65534 --regid=65534 --clear-groups "$PY_NOBODY" -c "$OPEN_AND_PING"
    else
      echo '{"skipped": "no Python that nobody can run"}'
    fi
    """
)

_NETNS_CHECK = textwrap.dedent(
    """
    import asyncio, json
    from watchtower.probes.icmp import Pinger

    TARGETS = ["127.0.0.1", "127.9.8.7", "::1", "10.213.252.1", "10.213.253.1", "10.213.254.1",
               "fd00:213:252::1", "fd00:213:252::2"]

    async def main():
        out = {}
        for mode in ("dgram", "raw"):
            async with Pinger(mode) as p:
                # Warm up neighbour discovery/ARP on the fresh link (IPv6 link-local DAD takes ~1s).
                for router in ("10.213.251.2", "fd00:213:251::2"):
                    for _ in range(5):
                        if (await p.ping(router, 1.0)).ok:
                            break
                replies = await asyncio.gather(*(p.ping(a, 1.0) for a in TARGETS))
                out[mode] = {a: [r.ok, r.unreachable, r.detail] for a, r in zip(TARGETS, replies)}
                out[mode]["modes"] = [p.mode_v4, p.mode_v6]
                out[mode]["in_flight"] = p.in_flight
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@pytest.mark.netns
@pytest.mark.skipif(not (IS_ROOT and NS_TOOLS), reason="needs root, unshare, nsenter, ip and setpriv")
def test_netns_dgram_raw_and_icmp_errors() -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PY": sys.executable,
        "PY_NOBODY": NOBODY_PYTHON or "",
        "CHECK": _NETNS_CHECK,
        "OPEN_AND_PING": _OPEN_AND_PING,
    }
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", _NETNS_SETUP],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd="/",
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot create network namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    results, as_nobody = json.loads(lines[-2]), json.loads(lines[-1])

    for mode in ("dgram", "raw"):
        r = results[mode]
        assert r["modes"] == [mode, mode] and r["in_flight"] == 0
        for ok_target in ("127.0.0.1", "127.9.8.7", "::1"):
            assert r[ok_target][0], (mode, ok_target, r[ok_target])
        # A router's ICMP error: fails at once, naming the router (error queue in dgram mode,
        # the quoted header on the raw socket).
        assert r["10.213.252.1"] == [False, True, "host unreachable (from 10.213.251.2)"], mode
        assert r["fd00:213:252::1"] == [False, True, "no route to destination (from fd00:213:251::2)"], mode
        # Silently dropped at the router: a plain timeout.
        assert r["10.213.253.1"] == [False, False, "no echo reply within 1.0s"], mode
        assert r["fd00:213:252::2"] == [False, False, "no echo reply within 1.0s"], mode
        # No route locally: a send error.
        assert r["10.213.254.1"] == [False, True, "No route to host (local send error)"], mode

    if "skipped" not in as_nobody:
        assert as_nobody["mode"] == "dgram" and as_nobody["ok"] and as_nobody["ok6"] in (True, None), (
            as_nobody
        )


# --------------------------------------------------------------------------- probe()


@needs_ping
async def test_probe_ip_literal(pinger: Pinger) -> None:
    result = await probe(IcmpPath(host="127.0.0.1"), ProbeContext(timeout=1.0, pinger=pinger))
    assert result.ok and result.failure is None
    assert result.latency is not None and result.latency < 0.1
    assert result.detail.startswith("rtt ") and result.detail.endswith(" ms")


@needs_ping
async def test_probe_resolves_localhost(pinger: Pinger) -> None:
    result = await probe(IcmpPath(host="localhost"), ProbeContext(timeout=2.0, pinger=pinger))
    assert result.ok, result
    assert "(127." in result.detail or "(::1)" in result.detail


@needs_ping
async def test_probe_unresolvable_name_is_bounded(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    # No real DNS query leaves this machine: the resolver is replaced by one that fails, then one
    # that hangs (a dead DNS server), and the probe must stay within its timeout either way.
    loop = asyncio.get_running_loop()

    async def nxdomain(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", nxdomain)
    result = await probe(IcmpPath(host="nas1.acme.test"), ProbeContext(timeout=2.0, pinger=pinger))
    assert not result.ok and result.failure is Failure.RESOLVE
    assert "nas1.acme.test" in result.detail

    async def hang(*args: object, **kwargs: object) -> list[object]:
        await asyncio.sleep(3600)
        return []

    monkeypatch.setattr(loop, "getaddrinfo", hang)
    start = time.monotonic()
    result = await probe(IcmpPath(host="nas1.acme.test"), ProbeContext(timeout=0.5, pinger=pinger))
    assert not result.ok and result.failure in (Failure.RESOLVE, Failure.TIMEOUT)
    assert time.monotonic() - start < 1.0


@needs_ping
async def test_probe_count_all_answered(pinger: Pinger) -> None:
    start = time.monotonic()
    result = await probe(IcmpPath(host="127.0.0.1", count=3), ProbeContext(timeout=1.0, pinger=pinger))
    assert result.ok and "lost" not in result.detail
    assert pinger.sent == 3
    assert 0.2 <= time.monotonic() - start < 0.6  # three requests 0.1 s apart


@needs_ping
async def test_probe_confirming_a_failure_asks_three_times(pinger: Pinger) -> None:
    ctx = ProbeContext(timeout=1.0, pinger=pinger, state={"confirming": True})
    result = await probe(IcmpPath(host="127.0.0.1"), ctx)
    assert result.ok and pinger.sent == 3  # one echo per round, three while confirming a failure
    result = await probe(IcmpPath(host="127.0.0.1"), ProbeContext(timeout=1.0, pinger=pinger))
    assert result.ok and pinger.sent == 4


@needs_ping
async def test_probe_timeout(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    drop_sends(monkeypatch, pinger)
    start = time.monotonic()
    result = await probe(IcmpPath(host="127.0.0.1"), ProbeContext(timeout=0.3, pinger=pinger))
    assert (result.ok, result.failure, result.detail) == (False, Failure.TIMEOUT, "no echo reply within 0.3s")
    assert 0.3 <= time.monotonic() - start < 0.6
    assert pinger.in_flight == 0


@needs_ping
async def test_probe_count_squeezed_into_short_timeout(
    pinger: Pinger, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = drop_sends(monkeypatch, pinger)
    start = time.monotonic()
    result = await probe(IcmpPath(host="127.0.0.1", count=10), ProbeContext(timeout=0.4, pinger=pinger))
    assert time.monotonic() - start < 0.7  # a hard bound, although 10 x 0.1 s would not fit
    assert len(captured) == 10  # the spacing shrank so that every request was still sent
    assert result.failure is Failure.TIMEOUT and result.detail == "no echo reply within 0.4s (10/10 lost)"


@needs_ping
async def test_probe_partial_loss_is_up(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pinger._sendto
    n = 0

    async def lose_two_of_three(fam: Any, packet: bytes, sockaddr: Any) -> OSError | None:
        nonlocal n
        n += 1
        return await real(fam, packet, sockaddr) if n == 2 else None

    monkeypatch.setattr(pinger, "_sendto", lose_two_of_three)
    result = await probe(IcmpPath(host="127.0.0.1", count=3), ProbeContext(timeout=0.5, pinger=pinger))
    assert result.ok and result.detail.endswith(", 2/3 lost"), result


@needs_ping
async def test_probe_unreachable(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def net_unreachable(sock: socket.socket, data: bytes, address: Any) -> int:
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    monkeypatch.setattr(loop, "sock_sendto", net_unreachable)
    result = await probe(IcmpPath(host="127.0.0.1"), ProbeContext(timeout=1.0, pinger=pinger))
    assert result.failure is Failure.UNREACHABLE
    assert result.detail == "Network is unreachable (local send error)"


async def test_probe_without_pinger_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        await probe(IcmpPath(host="127.0.0.1"), ProbeContext(timeout=1.0))


# --------------------------------------------------------------------------- batches (ping_batch)


async def run_batch(p: Pinger, addresses: list[str], timeout: float) -> tuple[list[PingReply], int]:
    """ping_batch, awaited for the test: the replies and how often the callback was called."""
    done = asyncio.Event()
    calls: list[list[PingReply]] = []

    def on_done(replies: list[PingReply]) -> None:
        calls.append(replies)
        done.set()

    p.ping_batch([icmp._parse_literal(a) for a in addresses], timeout, on_done)
    await asyncio.wait_for(done.wait(), timeout + 5)
    await asyncio.sleep(0.05)  # a second callback would come now
    return calls[0], len(calls)


@needs_ping
async def test_batch_of_2000_loopback_echoes_reports_once(pinger: Pinger) -> None:
    replies, calls = await run_batch(pinger, loopback_addresses(2000), 2.0)
    assert calls == 1 and len(replies) == 2000
    assert all(r.ok and r.rtt is not None and r.rtt < 1.0 for r in replies)
    assert pinger.in_flight == 0 and pinger.sent == 2000 and pinger.received == 2000
    # an empty batch still reports (once)
    assert await run_batch(pinger, [], 1.0) == ([], 1)


def drop_batch_sends(monkeypatch: pytest.MonkeyPatch, p: Pinger) -> list[bytes]:
    captured: list[bytes] = []
    monkeypatch.setattr(p, "_send_now", lambda sock, packet, sockaddr: captured.append(packet))
    return captured


@needs_ping
async def test_batch_reply_error_and_silence_in_order(
    pinger: Pinger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One echo answered, one failed by an ICMP error, one silent: each in its place, the batch ends
    at its deadline, and nothing stays in flight (a late reply is stray)."""
    captured = drop_batch_sends(monkeypatch, pinger)
    fam = pinger._v4
    assert fam is not None
    done = asyncio.Event()
    got: list[list[PingReply]] = []
    # the error below quotes an echo to 10.213.250.1: the second one
    targets = [icmp._parse_literal(a) for a in ("10.213.250.2", "10.213.250.1", "10.213.250.3")]

    def feed_reply(request: bytes, src: str) -> None:
        reply = as_reply(request, v6=False)
        data = ipv4_header(src, "127.0.0.1", len(reply)) + reply if fam.ip_header else reply
        pinger._dispatch(fam, data, (src, 0), time.perf_counter())

    start = time.monotonic()

    def on_done(replies: list[PingReply]) -> None:
        got.append(replies)
        done.set()

    pinger.ping_batch(targets, 0.3, on_done)
    assert len(captured) == 3 and pinger.in_flight == 3
    feed_reply(captured[0], "10.213.250.2")
    error = _v4_unreachable(1, captured[1])
    pinger._dispatch(fam, error if fam.ip_header else error[20:], ("10.0.0.1", 0), time.perf_counter())
    assert pinger.in_flight == 1 and not done.is_set()
    await asyncio.wait_for(done.wait(), 2)
    assert 0.25 < time.monotonic() - start < 1.5
    [(first, second, third)] = got
    assert first.ok and first.rtt is not None
    assert second == PingReply(False, None, "host unreachable (from 10.0.0.1)", True)
    assert third == PingReply(False, None, "no echo reply within 0.3s", False)
    assert pinger.in_flight == 0 and fam.pending == {}
    stray = pinger.stray
    feed_reply(captured[2], "10.213.250.3")
    assert pinger.stray == stray + 1 and len(got) == 1


@needs_ping
async def test_batch_full_send_buffer_resumes(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    """EAGAIN and ENOBUFS postpone the rest of the batch; every echo still goes out and is answered."""
    real = pinger._send_now
    refusals = [BlockingIOError(errno.EAGAIN, "again"), OSError(errno.ENOBUFS, "no buffers")]

    def flaky(sock: socket.socket, packet: bytes, sockaddr: Any) -> None:
        if refusals:
            raise refusals.pop(0)
        real(sock, packet, sockaddr)

    monkeypatch.setattr(pinger, "_send_now", flaky)
    replies, calls = await run_batch(pinger, loopback_addresses(50), 2.0)
    assert calls == 1 and all(r.ok for r in replies) and not refusals


@needs_ping
async def test_batch_hard_send_error_is_unreachable(pinger: Pinger, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_route(sock: socket.socket, packet: bytes, sockaddr: Any) -> None:
        raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))

    monkeypatch.setattr(pinger, "_send_now", no_route)
    start = time.monotonic()
    replies, calls = await run_batch(pinger, ["127.0.0.1", "127.0.0.2"], 5.0)
    assert calls == 1
    assert replies == [PingReply(False, None, "No route to host (local send error)", True)] * 2
    assert time.monotonic() - start < 1.0  # nothing in flight: reported at once, not at the deadline
    assert pinger.in_flight == 0 and pinger.sent == 0


@needs_ping
async def test_close_settles_a_batch_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Pinger() as p:
        drop_batch_sends(monkeypatch, p)
        got: list[list[PingReply]] = []
        p.ping_batch([icmp._parse_literal("10.213.250.1")], 10.0, got.append)
        p.close()
        assert got == [[PingReply(False, None, "pinger closed", False)]]


def test_batch_item_takes_only_single_echoes_to_literals() -> None:
    state: dict[str, Any] = {}
    assert icmp.batch_item(IcmpPath(host="10.0.0.1"), state) == (False, ("10.0.0.1", 0), bytes([10, 0, 0, 1]))
    assert state["icmp_literal"]  # parsed once per path
    assert icmp.batch_item(IcmpPath(host="[::1]"), {})[0] is True  # type: ignore[index]
    assert icmp.batch_item(IcmpPath(host="gw.example"), {}) is None  # a name: resolved by probe()
    assert icmp.batch_item(IcmpPath(host="10.0.0.1", count=3), {}) is None
    assert icmp.batch_item(IcmpPath(host="10.0.0.1"), {"confirming": True}) is None
