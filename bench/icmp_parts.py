#!/usr/bin/env python3
"""Where the CPU of one batched ICMP probe goes, without the network: the Python work per echo on
the send side (sequence, token, packet, bookkeeping), on the receive side (parse, match, result),
and in the engine (the scheduler's batch hook and re-arm, the monitor's record), each timed over
many echoes in this process. What is left of the daemon's CPU per probe (bench_scale.py) is the
kernel (sendto, recvmsg, the namespace's reply) and the event loop.

    .venv/bin/python bench/icmp_parts.py            # 20,000 echoes; prints a table, writes nothing

Needs an ICMP socket (root, CAP_NET_RAW or ping_group_range), which it opens and never sends on.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watchtower.config import parse_config  # noqa: E402
from watchtower.engine.monitor import Monitor  # noqa: E402
from watchtower.probes import ProbeContext, ProbeResult  # noqa: E402
from watchtower.probes.icmp import Pinger, PingReply, _parse_literal, checksum  # noqa: E402

N = 20_000


def as_reply(request: bytes) -> bytes:
    reply = b"\x00\x00\x00\x00" + request[4:]
    return reply[:2] + checksum(reply).to_bytes(2, "big") + reply[4:]


async def main() -> None:
    # never sent (the send is replaced), so any distinct addresses do
    addresses = [f"10.213.{(i // 250) % 250}.{i % 250 + 1}" for i in range(N)]
    targets = [_parse_literal(a) for a in addresses]
    rows: list[tuple[str, float]] = []
    async with Pinger() as pinger:
        captured: list[bytes] = []
        pinger._send_now = lambda sock, packet, sockaddr: captured.append(packet)  # type: ignore[method-assign]
        done: list[list[PingReply]] = []
        start = time.thread_time()
        pinger.ping_batch(targets, 60.0, done.append)
        rows.append(
            ("send side: sequence, token, packet, pending entry (no syscall)", time.thread_time() - start)
        )
        fam = pinger._v4
        assert fam is not None
        replies = [as_reply(p) for p in captured]
        if fam.ip_header:  # a raw IPv4 socket reads the IP header too
            replies = [b"\x45" + bytes(19) + r for r in replies]
        now = time.perf_counter()
        start = time.thread_time()
        for r, a in zip(replies, addresses, strict=True):
            pinger._dispatch(fam, r, (a, 0), now)
        rows.append(("receive side: parse, match, reply (no syscall)", time.thread_time() - start))
        assert done and len(done[0]) == N, "every echo answered"

    # the engine: what the scheduler and the monitor do per batched run
    cfg = parse_config(
        {"site": "s", "targets": {f"t{i}": {"role": "service", "paths": [{"icmp": a}]}
                                  for i, a in enumerate(addresses[:N])}},
        Path("."),
    )  # fmt: skip
    monitor = Monitor(cfg, shared=ProbeContext(timeout=0))
    statuses = list(monitor.statuses.values())
    hooks = [monitor.scheduler._jobs[s.path.key].batch for s in statuses]
    start = time.thread_time()
    for hook in hooks:
        assert hook is not None
        hook()
    rows.append(("scheduler: each run's batch hook (confirming? parsed address)", time.thread_time() - start))
    result = ProbeResult(True, 0.0004, None, "rtt 0.40 ms")
    start = time.thread_time()
    for s in statuses:
        monitor.record(s, result, 1.0)
    rows.append(("monitor: record one result (path state, streaks)", time.thread_time() - start))
    sched = monitor.scheduler
    sched._loop = asyncio.get_running_loop()
    jobs = [sched._jobs[s.path.key] for s in statuses]
    start = time.thread_time()
    for job in jobs:
        sched.lag.observe(0.001)
        sched._rearm(job, 100.0)
    rows.append(("scheduler: lag histogram and re-arm on the 10 ms grid", time.thread_time() - start))
    sched._loop = None
    for timer in sched._slot_timers.values():
        timer.cancel()

    total = sum(t for _, t in rows)
    print(f"| part ({N:,} echoes, this process's CPU) | µs per echo |\n|---|---|")
    for what, t in rows:
        print(f"| {what} | {t / N * 1e6:.1f} |")
    print(f"| **Python per echo, all parts** | **{total / N * 1e6:.1f}** |")


if __name__ == "__main__":
    asyncio.run(main())
