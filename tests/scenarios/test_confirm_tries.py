"""Confirming a failure: one lost SYN or datagram must not count as the path's second failure.

The peers are real: a namespace host whose firewall drops exactly the first SYN (an nft quota),
and a DNS server on loopback that ignores the first query. The same probe without
``confirming`` fails on the same loss, which shows the loss is real and the retry is what helps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import dns.message
import dns.rrset
import pytest

from watchtower.config import DnsPath, ResolvedPath, TcpPath
from watchtower.engine.runner import run_probe
from watchtower.lab import Lab, bulk_site
from watchtower.lab.site import run
from watchtower.probes import Failure, ProbeContext

PORT = 9100


@pytest.fixture(scope="module")
def syn_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    spec = bulk_site("wtc", 1, bulk_net="10.213.152.0/24", link_net="10.213.26.0/24", tcp_ports=(PORT,))
    lab = Lab(spec, tmp_path_factory.mktemp("lab-wtc"))
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def drop_first_syn(lab: Lab) -> None:
    """(Re)arm a rule that drops the first SYN to PORT and lets every later one through: an nft
    quota of 100 bytes is used up by one 60-byte SYN."""
    script = (
        "table inet wtsyn\ndelete table inet wtsyn\n"
        "table inet wtsyn {\n"
        "  chain input { type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {PORT} tcp flags & (syn | ack) == syn quota until 100 bytes counter drop\n  }}\n}}\n"
    )
    run(["ip", "netns", "exec", lab.ns("bulk1"), "nft", "-f", "-"], input=script)


def resolved(spec: TcpPath | DnsPath, timeout: float = 1.0) -> ResolvedPath:
    return ResolvedPath("t", "p", spec, 5.0, 1.0, timeout, 2, 2)


@pytest.mark.netns
async def test_lost_syn_fails_a_plain_probe_and_not_a_confirming_one(syn_host: Lab) -> None:
    path = resolved(TcpPath(host=syn_host.ip("bulk1").split("/")[0], port=PORT))
    shared = ProbeContext(timeout=0)
    drop_first_syn(syn_host)
    plain = await run_probe(path, shared, {})
    assert not plain.ok and plain.failure is Failure.TIMEOUT, plain

    drop_first_syn(syn_host)
    start = time.monotonic()
    confirming = await run_probe(path, shared, {"confirming": True})
    took = time.monotonic() - start
    assert confirming.ok, confirming
    assert "try 2 of 3" in confirming.detail
    assert took < 1.0  # the second SYN went out after a third of the timeout, not after 1 s
    ruleset = run(["ip", "netns", "exec", syn_host.ns("bulk1"), "nft", "list", "table", "inet", "wtsyn"])
    assert "packets 1 " in ruleset.stdout  # exactly one SYN was dropped: the loss was real


@pytest.mark.netns
async def test_refused_is_final_and_silence_ends_by_the_deadline(syn_host: Lab) -> None:
    host = syn_host.ip("bulk1").split("/")[0]
    start = time.monotonic()
    refused = await run_probe(
        resolved(TcpPath(host=host, port=PORT + 1)), ProbeContext(timeout=0), {"confirming": True}
    )
    assert refused.failure is Failure.REFUSED and time.monotonic() - start < 0.5, refused

    script = (
        "table inet wtsyn\ndelete table inet wtsyn\n"
        "table inet wtsyn {\n  chain input { type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {PORT} drop\n  }}\n}}\n"
    )
    run(["ip", "netns", "exec", syn_host.ns("bulk1"), "nft", "-f", "-"], input=script)
    try:
        start = time.monotonic()
        silent = await run_probe(
            resolved(TcpPath(host=host, port=PORT), 0.9), ProbeContext(timeout=0), {"confirming": True}
        )
        took = time.monotonic() - start
    finally:
        run(["ip", "netns", "exec", syn_host.ns("bulk1"), "nft", "delete", "table", "inet", "wtsyn"])
    assert silent.failure is Failure.TIMEOUT and "(3 tries)" in silent.detail, silent
    # All three tries end by the one 0.9 s deadline (each with its own full timeout, the last would
    # end at 1.5 s, and the runner's hard bound would cut it at 1.4 s as "probe overran").
    assert 0.85 < took < 1.3


class ForgetfulDns(asyncio.DatagramProtocol):
    """Answers A queries, but ignores the first ``ignore`` it gets."""

    def __init__(self, ignore: int) -> None:
        self.ignore, self.seen = ignore, 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        if self.seen <= self.ignore:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        name = query.question[0].name.to_text()
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "10.213.152.7"))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def test_lost_dns_datagram_is_retried_while_confirming() -> None:
    server = ForgetfulDns(ignore=1)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        spec = DnsPath(server="127.0.0.1", port=port, query="erp.example.test")
        plain = await run_probe(resolved(spec, 0.6), ProbeContext(timeout=0), {})
        assert not plain.ok and plain.failure is Failure.TIMEOUT, plain
        server.seen = 0
        confirming = await run_probe(resolved(spec, 0.6), ProbeContext(timeout=0), {"confirming": True})
        assert confirming.ok and "try 2 of 3" in confirming.detail, confirming
        assert server.seen == 2
    finally:
        transport.close()
