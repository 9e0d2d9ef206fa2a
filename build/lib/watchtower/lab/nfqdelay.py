"""Delay emulator: hold every packet of an NFQUEUE for N seconds, then accept it.

Usage (inside a namespace, started by ``Lab.break_host(h, "delay", ms)``)::

    ip netns exec NS python -m watchtower.lab.nfqdelay QUEUE SECONDS [--ready-file F]

Why this exists: this kernel has no ``sch_netem`` and no nft ``queue``, but it has the xtables
``NFQUEUE`` target.  The lab queues *inbound* echo-requests (never outbound replies: locally
generated packets held in a queue stay charged to the kernel's ICMP socket, which silently stops
replying after ~80 in flight).  Stdlib only, raw netlink (NETLINK_NETFILTER / nfnetlink_queue), so
it starts fast and needs no libnetfilter_queue.

It copes with thousands of queued packets: a large forced receive buffer, NETLINK_NO_ENOBUFS, a
large NFQA_CFG_QUEUE_MAXLEN, and verdicts scheduled with ``loop.call_later`` instead of sleeping.
On SIGTERM it accepts everything still held (a repair should not turn into packet loss), unbinds
and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import socket
import struct
import sys
from pathlib import Path

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1
NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLATTR = struct.Struct("=HH")  # len, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def nlattr(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _NLATTR.pack(_NLATTR.size + len(payload), atype) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def nfq_msg(msg: int, queue: int, attrs: list[bytes], flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """nlmsghdr + nfgenmsg (AF_UNSPEC, v0, queue number in network order) + attributes."""
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + b"".join(attrs)
    mtype = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def iter_messages(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Split a netlink datagram into (type, seq, payload) tuples."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > len(buf):
            break
        out.append((mtype, seq, buf[off + _NLMSGHDR.size : off + length]))
        off += _align(length)
    return out


def packet_id(payload: bytes) -> int | None:
    """Packet id from an NFQNL_MSG_PACKET payload (nfgenmsg + attributes)."""
    off = 4  # nfgenmsg
    while off + _NLATTR.size <= len(payload):
        alen, atype = _NLATTR.unpack_from(payload, off)
        if alen < _NLATTR.size:
            return None
        if atype & NLA_TYPE_MASK == NFQA_PACKET_HDR:
            return int(struct.unpack_from("!I", payload, off + _NLATTR.size)[0])
        off += _align(alen)
    return None


class NfqDelay:
    """Holds packets of one queue for ``delay`` seconds each."""

    PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET

    def __init__(self, queue: int, delay: float, rcvbuf: int, maxlen: int) -> None:
        self.queue = queue
        self.delay = delay
        self.maxlen = maxlen
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:  # beyond net.core.rmem_max needs CAP_NET_ADMIN, which we have as root
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.pending: dict[int, asyncio.TimerHandle | None] = {}
        self.early: list[int] = []  # packets seen while still configuring
        self.seq = 0
        self.held_max = 0

    def _request(self, attrs: list[bytes]) -> None:
        """Send a CONFIG message and wait for its ACK (raises OSError on a netlink error)."""
        self.seq += 1
        self.sock.settimeout(5.0)
        self.sock.send(nfq_msg(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self.seq))
        while True:
            for mtype, seq, payload in iter_messages(self.sock.recv(65536)):
                if mtype == self.PACKET_TYPE:
                    pid = packet_id(payload)
                    if pid is not None:
                        self.early.append(pid)
                elif mtype == NLMSG_ERROR and seq == self.seq:
                    code = struct.unpack_from("=i", payload, 0)[0]
                    if code != 0:
                        raise OSError(-code, f"nfnetlink config: {errno.errorcode.get(-code, -code)}")
                    return

    def configure(self) -> None:
        """Bind the queue, copy metadata only (we never look at payloads), raise the queue length."""
        self._request([nlattr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))])
        self._request(
            [
                nlattr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                nlattr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", self.maxlen)),
            ]
        )
        self.sock.setblocking(False)

    def verdict(self, pid: int) -> None:
        """Release one packet (NF_ACCEPT)."""
        self.pending.pop(pid, None)
        msg = nfq_msg(
            NFQNL_MSG_VERDICT, self.queue, [nlattr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))]
        )
        try:
            self.sock.send(msg)
        except BlockingIOError:
            asyncio.get_running_loop().call_later(0.001, self.verdict, pid)
        except OSError as e:  # e.g. ENOENT if the kernel already flushed it
            print(f"nfqdelay: verdict {pid}: {e}", file=sys.stderr)

    def hold(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        self.pending[pid] = loop.call_later(self.delay, self.verdict, pid)
        self.held_max = max(self.held_max, len(self.pending))

    def on_readable(self) -> None:
        """Drain the socket; bounded per call so the timers keep running under a flood."""
        for _ in range(2000):
            try:
                buf = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    print("nfqdelay: receive buffer overrun, some packets dropped", file=sys.stderr)
                    continue
                raise
            for mtype, _seq, payload in iter_messages(buf):
                if mtype == self.PACKET_TYPE:
                    pid = packet_id(payload)
                    if pid is not None:
                        self.hold(pid)

    def release_all(self) -> None:
        """Accept everything still held (used on shutdown)."""
        for pid, handle in list(self.pending.items()):
            if handle is not None:
                handle.cancel()
            self.verdict(pid)

    def unbind(self) -> None:
        msg = nfq_msg(
            NFQNL_MSG_CONFIG,
            self.queue,
            [nlattr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0))],
        )
        with contextlib.suppress(OSError):
            self.sock.send(msg)

    async def run(self, ready_file: Path | None) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for pid in self.early:
            self.hold(pid)
        loop.add_reader(self.sock.fileno(), self.on_readable)
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, "ready\n")
        await stop.wait()
        loop.remove_reader(self.sock.fileno())
        self.release_all()
        self.unbind()
        self.sock.close()
        print(
            f"nfqdelay: queue {self.queue} done, at most {self.held_max} packets held at once",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="python -m watchtower.lab.nfqdelay", description=__doc__.split("\n")[0])
    ap.add_argument("queue", type=int, help="NFQUEUE number (per network namespace)")
    ap.add_argument("seconds", type=float, help="how long to hold each packet")
    ap.add_argument("--ready-file", type=Path, help="written once the queue is bound")
    ap.add_argument("--rcvbuf", type=int, default=64 << 20, help="netlink receive buffer (bytes)")
    ap.add_argument("--maxlen", type=int, default=100_000, help="kernel queue length (packets)")
    args = ap.parse_args(argv)
    if not 0 <= args.queue <= 65535 or not 0 <= args.seconds <= 600:
        ap.error("queue must be 0..65535 and seconds 0..600")
    try:
        nfq = NfqDelay(args.queue, args.seconds, args.rcvbuf, args.maxlen)
        nfq.configure()
    except OSError as e:
        print(f"nfqdelay: cannot bind queue {args.queue}: {e}", file=sys.stderr)
        return 1
    asyncio.run(nfq.run(args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
