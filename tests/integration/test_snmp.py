"""The snmp probe against a real net-snmp ``snmpd`` on loopback, and against peers that misbehave.

The agent (config: tests/peers/snmp/snmpd.conf.in) runs once per session on a free 127.0.0.1 UDP
port with its own persistent dir, and is stopped by its PID. A ``pass_persist`` helper serves
.1.3.6.1.4.1.99998.* from a JSON file that tests rewrite to change values at run time (a RAID
going degraded); each test starts from the defaults. Needs the Debian package ``snmpd``; the
tests against misbehaving peers (garbage, silence, a closed port) run without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from watchtower.config import SnmpPath
from watchtower.probes import Failure, ProbeContext, ProbeResult, snmp

PEERS = Path(__file__).resolve().parents[1] / "peers" / "snmp"
SNMPD = shutil.which("snmpd") or ("/usr/sbin/snmpd" if os.access("/usr/sbin/snmpd", os.X_OK) else None)

BASE = "1.3.6.1.4.1.99998"
RAID = f"{BASE}.1.2.0"  # a NAS's "RAID status" scalar: 1 = normal, 2 = degraded, ...
RAID_TABLE = f"{BASE}.2.1"  # a status column with one row per array
DEFAULT_VALUES: dict[str, list[Any]] = {
    f"{BASE}.1.1.0": ["integer", 1],
    RAID: ["integer", 1],
    f"{RAID_TABLE}.1": ["integer", 1],
    f"{RAID_TABLE}.2": ["integer", 1],
    f"{BASE}.3.0": ["string", "System OK"],
    f"{BASE}.4.0": ["gauge", 42],
}
TIMEOUT = 2.0
SECRETS = ("authpass123", "privpass123", "wrong-community-x1", "wrong-auth-key-x2", "wrong-priv-key-x3")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agent:
    port: int
    values_file: Path
    log: Path
    ipv6: bool  # also listening on udp6 [::1]:port

    def set(self, oid: str, kind: str, value: Any) -> None:
        """Change what the agent serves for ``oid``; the next request sees it (pass_persist)."""
        values = json.loads(self.values_file.read_text())
        values[oid] = [kind, value]
        self.write(values)

    def write(self, values: dict[str, list[Any]]) -> None:
        tmp = self.values_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        os.replace(tmp, self.values_file)  # atomic: the helper never reads half a file


def _answers(port: int) -> bool:
    """Does something at 127.0.0.1:port answer an SNMPv3 discovery request within 0.2 s?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(snmp.discovery_request(4242), ("127.0.0.1", port))
        try:
            return bool(s.recv(4096))
        except OSError:
            return False


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _start_snmpd(state: Path) -> tuple[subprocess.Popen[bytes], Agent]:
    port = free_udp_port()
    agent = Agent(port, state / "values.json", state / "snmpd.log", _ipv6_loopback())
    agent.write(DEFAULT_VALUES)
    conf = (PEERS / "snmpd.conf.in").read_text()
    addresses = f"udp:127.0.0.1:{port}" + (f",udp6:[::1]:{port}" if agent.ipv6 else "")
    for key, value in {
        "@ADDRESSES@": addresses,
        "@PYTHON@": sys.executable,
        "@HELPER@": str(PEERS / "pass_persist.py"),
        "@VALUES@": str(agent.values_file),
    }.items():
        conf = conf.replace(key, value)
    (state / "snmpd.conf").write_text(conf)
    (state / "persist").mkdir(exist_ok=True)
    env = dict(os.environ, SNMP_PERSISTENT_DIR=str(state / "persist"), MIBS="")
    assert SNMPD is not None
    proc = subprocess.Popen(
        [SNMPD, "-f", "-Lf", str(agent.log), "-C", "-c", str(state / "snmpd.conf")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, agent


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def agent_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    if SNMPD is None:
        pytest.skip("needs net-snmp's snmpd (apt-get install snmpd)")
    # A free port can be taken between our probe and snmpd's bind: try a few.
    for attempt in range(3):
        state = tmp_path_factory.mktemp(f"snmpd{attempt}")
        proc, agent = _start_snmpd(state)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None and not _answers(agent.port):
            pass  # _answers waits up to 0.2 s itself
        if proc.poll() is None and _answers(agent.port):
            break
        _stop(proc)
        log = agent.log.read_text() if agent.log.exists() else ""
        if "Error opening specified endpoint" not in log:
            pytest.fail(f"snmpd did not come up on udp 127.0.0.1:{agent.port}:\n{log[-2000:]}")
    else:
        pytest.fail("snmpd could not bind a free port in 3 attempts")
    yield agent
    _stop(proc)


@pytest.fixture
async def agent(agent_session: Agent) -> AsyncIterator[Agent]:
    agent_session.write(DEFAULT_VALUES)
    yield agent_session
    agent_session.write(DEFAULT_VALUES)
    snmp.close_engines()  # this test's event loop ends here: close its sockets and timer tasks


def path(agent: Agent, **kw: Any) -> SnmpPath:
    kw.setdefault("community", "public")
    return SnmpPath(host="127.0.0.1", port=agent.port, **kw)


def v3(agent: Agent, **kw: Any) -> SnmpPath:
    kw.setdefault("username", "wtuser")
    kw.setdefault("auth_key", "authpass123")
    kw.setdefault("priv_key", "privpass123")
    return SnmpPath(host="127.0.0.1", port=agent.port, version="3", **kw)


async def run(spec: SnmpPath, timeout: float = TIMEOUT) -> tuple[ProbeResult, float]:
    start = time.perf_counter()
    result = await snmp.probe(spec, ProbeContext(timeout=timeout))
    elapsed = time.perf_counter() - start
    assert isinstance(result, ProbeResult)
    for secret in SECRETS:
        assert secret not in result.detail
    return result, elapsed


# --------------------------------------------------------------------------- the happy paths


async def test_v2c_get_ok(agent: Agent) -> None:
    result, _ = await run(
        path(
            agent,
            checks=[
                {"oid": "1.3.6.1.2.1.1.3.0", "label": "sysUpTime"},
                {"oid": "1.3.6.1.2.1.1.5.0", "equals": "wt-test-snmpd"},
                {"oid": f"{BASE}.3.0", "regex": "^System OK$"},
                {"oid": f"{BASE}.4.0", "min": 10, "max": 50, "label": "load"},
            ],
        )
    )
    assert result.ok, result.detail
    assert result.latency is not None and result.latency < TIMEOUT
    assert "wt-test-snmpd" in result.detail
    values = dict(result.values)
    assert values["load"] == 42.0
    assert values["sysUpTime"] > 0


async def test_v2c_over_ipv6(agent: Agent) -> None:
    if not agent.ipv6:
        pytest.skip("no IPv6 on loopback")
    result, _ = await run(SnmpPath(host="::1", port=agent.port, community="public", interfaces=["lo"]))
    assert result.ok, result.detail
    silent, _ = await run(SnmpPath(host="::1", port=agent.port, community="wrong-community-x1"), timeout=1.0)
    assert silent.failure is Failure.TIMEOUT and f"[::1]:{agent.port}" in silent.detail


async def test_default_check_is_sysuptime(agent: Agent) -> None:
    result, _ = await run(path(agent))
    assert result.ok, result.detail
    assert "sysUpTime" in dict(result.values)


async def test_v1_get_ok_and_nosuchname_names_the_oid(agent: Agent) -> None:
    ok, _ = await run(path(agent, version="1", checks=[{"oid": RAID, "in": [1]}]))
    assert ok.ok, ok.detail
    missing = f"{BASE}.9.9.0"
    bad, _ = await run(path(agent, version="1", checks=[{"oid": RAID, "in": [1]}, {"oid": missing}]))
    assert not bad.ok and bad.failure is Failure.CONTENT
    assert missing in bad.detail
    assert RAID not in bad.detail  # the good OID was asked again without the bad one and held


@pytest.mark.parametrize(
    "user, auth_protocol, auth_key, priv_protocol, priv_key",
    [
        ("wtuser", "SHA", "authpass123", "AES", "privpass123"),
        ("wtuser256", "SHA256", "authpass256", "AES256", "privpass256"),
        ("wtuser256c", "SHA512", "authpass512", "AES256C", "privpass512"),
    ],
)
async def test_v3_authpriv_ok(
    agent: Agent, user: str, auth_protocol: str, auth_key: str, priv_protocol: str, priv_key: str
) -> None:
    spec = v3(
        agent,
        username=user,
        auth_protocol=auth_protocol,
        auth_key=auth_key,
        priv_protocol=priv_protocol,
        priv_key=priv_key,
        checks=[{"oid": "1.3.6.1.2.1.1.5.0", "equals": "wt-test-snmpd"}],
        interfaces=["lo"],
    )
    first, _ = await run(spec)
    assert first.ok, first.detail
    second, _ = await run(spec)  # warm: engine ID known, keys localized
    assert second.ok, second.detail


async def test_raid_degraded_at_run_time_then_repaired(agent: Agent) -> None:
    spec = path(agent, checks=[{"oid": RAID, "in": [1], "label": "RAID"}])
    before, _ = await run(spec)
    assert before.ok, before.detail

    agent.set(RAID, "integer", 2)
    degraded, _ = await run(spec)
    assert not degraded.ok
    assert degraded.failure is Failure.CONTENT
    assert degraded.detail == "RAID = 2, expected one of 1"
    assert ("RAID", 2.0) in degraded.values

    agent.set(RAID, "integer", 1)
    repaired, _ = await run(spec)
    assert repaired.ok, repaired.detail


async def test_oid_value_without_label_names_the_oid(agent: Agent) -> None:
    agent.set(RAID, "integer", 2)
    result, _ = await run(path(agent, checks=[{"oid": RAID, "in": [1]}]))
    assert result.detail == f"{RAID} = 2, expected one of 1"


async def test_walked_status_column_names_the_bad_row(agent: Agent) -> None:
    spec = path(agent, checks=[{"oid": RAID_TABLE, "walk": True, "in": [1], "label": "raid"}])
    ok, _ = await run(spec)
    assert ok.ok and "raid: 2 ok" in ok.detail
    agent.set(f"{RAID_TABLE}.2", "integer", 11)
    bad, _ = await run(spec)
    assert not bad.ok and bad.detail == "raid.2 = 11, expected one of 1"
    assert dict(bad.values) == {"raid.1": 1.0, "raid.2": 11.0}
    empty, _ = await run(path(agent, checks=[{"oid": f"{BASE}.77", "walk": True}]))
    assert not empty.ok and "nothing under" in empty.detail


# --------------------------------------------------------------------------- credentials


async def test_wrong_v3_auth_key_fails_fast_with_reason(agent: Agent) -> None:
    result, elapsed = await run(v3(agent, auth_key="wrong-auth-key-x2"))
    assert not result.ok
    assert result.failure is Failure.ERROR
    assert "authentication failed" in result.detail and "auth_key" in result.detail
    assert elapsed < 0.5 * TIMEOUT  # a report from the agent, not a timeout


async def test_unknown_v3_user_fails_fast(agent: Agent) -> None:
    result, elapsed = await run(v3(agent, username="nobody"))
    assert result.failure is Failure.ERROR and "does not know this user" in result.detail
    assert elapsed < 0.5 * TIMEOUT


async def test_wrong_v3_priv_key_is_diagnosed(agent: Agent) -> None:
    # AES-CFB decrypts anything: the agent sees garbage, drops it silently (net-snmp sends no
    # decryptionError report), so this one is a timeout, with the diagnosis in the detail.
    result, elapsed = await run(v3(agent, priv_key="wrong-priv-key-x3"))
    assert result.failure is Failure.TIMEOUT
    assert "priv_key" in result.detail and "alive" in result.detail
    assert elapsed <= TIMEOUT + 0.2


async def test_v3_security_level_refused(agent: Agent) -> None:
    # wtuser is `rouser ... priv`: an authNoPriv request is refused by the agent's access rules
    result, elapsed = await run(v3(agent, priv_key=None))
    assert result.failure is Failure.ERROR and "authorizationError" in result.detail
    assert elapsed < 0.5 * TIMEOUT


async def test_wrong_community_times_out_within_the_timeout(agent: Agent) -> None:
    result, elapsed = await run(path(agent, community="wrong-community-x1"))
    assert not result.ok
    assert result.failure is Failure.TIMEOUT
    assert "community" in result.detail
    assert "alive" in result.detail  # the discovery request shows the agent itself is up
    assert elapsed <= TIMEOUT + 0.2


# --------------------------------------------------------------------------- missing objects


async def test_no_such_object_and_instance_name_the_oid(agent: Agent) -> None:
    no_object = "1.3.6.1.4.1.12345.1.0"
    no_instance = f"{BASE}.1.3.0"
    result, _ = await run(path(agent, checks=[{"oid": no_object}, {"oid": no_instance, "label": "psu2"}]))
    assert not result.ok and result.failure is Failure.CONTENT
    assert f"{no_object}: noSuchObject" in result.detail
    assert f"psu2 ({no_instance}): noSuchInstance" in result.detail


# --------------------------------------------------------------------------- tables


async def test_interfaces_lo_up_by_name_and_index(agent: Agent) -> None:
    result, _ = await run(path(agent, interfaces=["lo", 1]))
    assert result.ok, result.detail
    assert "lo up" in result.detail
    assert ("interface lo oper status", 1.0) in result.values


async def test_interfaces_unknown_name_fails_naming_it(agent: Agent) -> None:
    result, _ = await run(path(agent, interfaces=["lo", "wt-nonexistent0", 99999]))
    assert not result.ok and result.failure is Failure.CONTENT
    assert "'wt-nonexistent0' not found" in result.detail
    assert "ifIndex 99999" in result.detail
    assert "lo" not in result.detail.replace("lowerLayerDown", "")  # lo itself is fine


async def test_interface_down_names_it_and_its_status(agent: Agent) -> None:
    # ifTable mirrors this machine's interfaces: find one that is not up (with a walk check on
    # ifOperStatus), else skip. Then list it by index and by the name the probe reports.
    oper = "1.3.6.1.2.1.2.2.1.8"
    survey, _ = await run(path(agent, checks=[{"oid": oper, "walk": True, "in": [1]}]))
    down = re.search(rf"{re.escape(oper)}\.(\d+) = (\d+)", survey.detail)
    if survey.ok or down is None:
        pytest.skip("every interface of this machine is up")
    index, status = int(down.group(1)), int(down.group(2))
    by_index, _ = await run(path(agent, interfaces=[index]))
    assert not by_index.ok and by_index.failure is Failure.CONTENT
    named = re.search(rf"interface (.+?) \(ifIndex {index}\) is \w+\({status}\)", by_index.detail)
    assert named, by_index.detail
    by_name, _ = await run(path(agent, interfaces=[named.group(1)]))
    assert not by_name.ok and f"interface {named.group(1)} is" in by_name.detail
    assert (f"interface {named.group(1)} oper status", float(status)) in by_name.values


async def test_storage_used_percent(agent: Agent) -> None:
    ok, _ = await run(path(agent, storage=[{"descr": "/", "max_used": 100}]))
    if "not found in hrStorage" in ok.detail:
        pytest.skip(f"this machine's snmpd lists no '/' in hrStorage: {ok.detail}")
    assert ok.ok, ok.detail
    used = dict(ok.values)["storage / used %"]
    assert 0 < used <= 100

    full, _ = await run(path(agent, storage=[{"descr": "/", "max_used": 0}]))
    assert not full.ok and full.failure is Failure.CONTENT
    assert full.detail == f"storage / {used:g}% used, limit 0%"
    assert ("storage / used %", used) in full.values

    missing, _ = await run(path(agent, storage=[{"descr": "/wt-no-such-fs"}]))
    assert not missing.ok and "'/wt-no-such-fs' not found in hrStorage (have: /" in missing.detail


async def test_table_rows_are_remembered_and_rechecked(agent: Agent) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)  # one path's context: its state survives between runs
    spec = path(agent, interfaces=["lo"], storage=[{"descr": "/", "max_used": 100}])
    cold = await snmp.probe(spec, ctx)
    if "not found in hrStorage" in cold.detail:
        pytest.skip("this machine's snmpd lists no '/' in hrStorage")
    assert cold.ok and "(3 request(s)" in cold.detail  # walk ifDescr, walk hrStorageDescr, GET
    warm = await snmp.probe(spec, ctx)
    assert warm.ok and "(1 request(s)" in warm.detail  # the remembered rows, re-checked in the GET
    memo = ctx.state["snmp_index"]
    memo.interfaces["lo"] = (memo.interfaces["lo"][0], 4242)  # as if the agent renumbered its rows
    memo.storage["/"] = 4242
    moved = await snmp.probe(spec, ctx)
    assert moved.ok and "(4 request(s)" in moved.detail  # GET found other names there: walked again
    assert memo.storage["/"] != 4242 and memo.interfaces["lo"][1] != 4242


# --------------------------------------------------------------------------- misbehaving peers


class _Peer(asyncio.DatagramProtocol):
    """A UDP 'agent' answering every request with what ``reply`` makes of it (None: silence)."""

    def __init__(self, reply: Any):
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        answer = self.reply(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


async def udp_peer(reply: Any) -> tuple[asyncio.DatagramTransport, int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Peer(reply), local_addr=("127.0.0.1", 0)
    )
    return transport, int(transport.get_extra_info("sockname")[1])


@pytest.fixture
async def no_engines() -> AsyncIterator[None]:
    yield
    snmp.close_engines()


@pytest.mark.parametrize(
    "reply",
    [
        lambda data: random.Random(len(data)).randbytes(48),
        lambda data: b"\x30" + random.Random(7).randbytes(47),  # starts like a BER SEQUENCE
        lambda data: b"\x30\x03\x02\x01\x01",  # a v2c message header and nothing else
        lambda data: b"HTTP/1.0 400 Bad Request\r\n\r\n",
        lambda data: data[:1] + b"\xff" * (len(data) - 1),  # a mangled echo
    ],
    ids=["random", "ber-like", "header-only", "http", "mangled-echo"],
)
@pytest.mark.parametrize("version", ["2c", "3"])
async def test_garbage_answer_is_a_protocol_failure(
    no_engines: None, caplog: pytest.LogCaptureFixture, reply: Any, version: str
) -> None:
    transport, port = await udp_peer(reply)
    try:
        if version == "3":
            spec = SnmpPath(host="127.0.0.1", port=port, version="3", username="u", auth_key="authpass123")
        else:
            spec = SnmpPath(host="127.0.0.1", port=port, community="public")
        with caplog.at_level(logging.ERROR):
            result, elapsed = await run(spec)
    finally:
        transport.close()
    assert not result.ok
    assert result.failure is Failure.PROTOCOL, result.detail
    assert "not SNMP" in result.detail and f"127.0.0.1:{port}" in result.detail
    assert elapsed < 0.5 * TIMEOUT  # cut short on the first bad datagram, no waiting for a timeout
    # pysnmp never saw the garbage: no "Exception in callback" from the event loop
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


async def test_silent_peer_times_out_within_the_timeout(no_engines: None) -> None:
    transport, port = await udp_peer(lambda data: None)
    try:
        result, elapsed = await run(SnmpPath(host="127.0.0.1", port=port, community="public"), timeout=1.0)
    finally:
        transport.close()
    assert result.failure is Failure.TIMEOUT
    assert "within 1s" in result.detail and "community" in result.detail
    assert 0.7 <= elapsed <= 1.2


class _Relay(asyncio.DatagramProtocol):
    """Passes the first ``budget`` requests to the real agent and its answers back, then drops
    everything: an agent that stalls in the middle of a probe."""

    def __init__(self, agent_port: int, budget: int):
        self.agent = ("127.0.0.1", agent_port)
        self.budget = budget
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.budget <= 0 or self.transport is None:
            return
        self.budget -= 1
        task = asyncio.ensure_future(self._forward(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _forward(self, data: bytes, client: Any) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, self.agent)
            await loop.sock_sendall(s, data)
            answer = await asyncio.wait_for(loop.sock_recv(s, 65535), 1.0)
        if self.transport is not None:
            self.transport.sendto(answer, client)


async def test_agent_stalling_mid_probe_is_not_blamed_on_the_community(agent: Agent) -> None:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Relay(agent.port, budget=1), local_addr=("127.0.0.1", 0)
    )
    port = int(transport.get_extra_info("sockname")[1])
    try:
        # the ifDescr walk goes through, the GET after it does not
        result, elapsed = await run(
            SnmpPath(host="127.0.0.1", port=port, community="public", interfaces=["lo"])
        )
    finally:
        transport.close()
    assert result.failure is Failure.TIMEOUT
    assert "answered 1 of 2 requests" in result.detail and "community" not in result.detail
    assert elapsed <= TIMEOUT + 0.2


async def test_closed_port_is_refused(no_engines: None) -> None:
    port = free_udp_port()  # nothing listens there once the probe socket is closed
    result, elapsed = await run(SnmpPath(host="127.0.0.1", port=port, community="public"), timeout=1.0)
    # loopback answers with ICMP port unreachable, which the discovery's connected socket sees
    assert result.failure is Failure.REFUSED, result.detail
    assert elapsed <= 1.2


async def test_resolve_failure(no_engines: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(*args: Any, **kwargs: Any) -> Any:  # no DNS query leaves the machine
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    result, _ = await run(SnmpPath(host="nas1.example.invalid", community="public"))
    assert result.failure is Failure.RESOLVE
    assert result.detail == "cannot resolve nas1.example.invalid: Name or service not known"


# --------------------------------------------------------------------------- resources


async def test_engines_are_shared_and_reused(agent: Agent) -> None:
    specs = [path(agent), path(agent, checks=[{"oid": RAID}]), v3(agent), v3(agent, interfaces=["lo"])]
    for _ in range(3):
        results = await asyncio.gather(*(snmp.probe(s, ProbeContext(timeout=TIMEOUT)) for s in specs))
        assert all(r.ok for r in results), [r.detail for r in results]
    loop = id(asyncio.get_running_loop())
    mine = [key for key in snmp._ENGINES if key[0] == loop]
    assert len(mine) == 2  # one for the communities, one for the v3 credential set
    snmp.close_engines()
    assert not [key for key in snmp._ENGINES if key[0] == loop]


async def test_warm_probe_cost(agent: Agent) -> None:
    """Not a benchmark, a guard: a warm v2c probe must stay in the low milliseconds of CPU."""
    spec = path(agent, checks=[{"oid": RAID, "in": [1]}])
    await run(spec)  # warm up: engine, transport
    cpu, wall = time.process_time(), time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        result, _ = await run(spec)
        assert result.ok
    cpu_ms = (time.process_time() - cpu) / rounds * 1000
    wall_ms = (time.perf_counter() - wall) / rounds * 1000
    print(f"warm v2c probe: {wall_ms:.2f} ms wall, {cpu_ms:.2f} ms CPU")
    assert cpu_ms < 25


def test_discovery_request_is_valid_snmpv3() -> None:
    from pyasn1.codec.ber import decoder
    from pysnmp.proto.mpmod.rfc3412 import SNMPv3Message

    message, rest = decoder.decode(snmp.discovery_request(123456), asn1Spec=SNMPv3Message())
    assert rest == b""
    assert int(message["msgVersion"]) == 3
    assert int(message["msgGlobalData"]["msgID"]) == 123456
    assert bytes(message["msgGlobalData"]["msgFlags"]) == b"\x04"  # reportable, noAuthNoPriv
