"""The trap receiver against net-snmp's ``snmptrap`` / ``snmpinform`` on loopback.

Each test gets its own receiver on a free high UDP port. Senders run as subprocesses with their
own SNMP_PERSISTENT_DIR and no MIBs (numeric OIDs only), so nothing outside tmp_path is touched.
Needs the Debian package ``snmp`` (the command-line tools).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from watchtower.config import TrapListener, TrapUser
from watchtower.probes.traps import (
    LINK_DOWN,
    LINK_UP,
    TrapBindError,
    TrapEvent,
    TrapReceiver,
    is_link_down,
    is_link_up,
)

SNMPTRAP, SNMPINFORM = shutil.which("snmptrap"), shutil.which("snmpinform")
needs_senders = pytest.mark.skipif(
    SNMPTRAP is None or SNMPINFORM is None,
    reason="needs net-snmp's snmptrap/snmpinform (apt-get install snmp)",
)

COMMUNITY = "trap-community-x7"
SENDER_ENGINE_ID = "8000000001020304"
V3 = ["-l", "authPriv", "-u", "wtuser", "-a", "SHA", "-A", "authpass123", "-x", "AES", "-X", "privpass123"]
IF_INDEX, IF_ADMIN, IF_OPER, IF_DESCR = (f"1.3.6.1.2.1.2.2.1.{c}" for c in (1, 7, 8, 2))
LINK_VARBINDS = [f"{IF_INDEX}.2", "i", "2", f"{IF_ADMIN}.2", "i", "1", f"{IF_OPER}.2", "i", "2"]
DEADLINE = 5.0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rig:
    receiver: TrapReceiver
    events: asyncio.Queue[TrapEvent]
    tmp: Path

    @property
    def target(self) -> str:
        host, port = self.receiver.address
        return f"{host}:{port}"

    async def send(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run snmptrap/snmpinform against the receiver; returns when the tool exits."""
        env = dict(
            os.environ, SNMP_PERSISTENT_DIR=str(self.tmp / "sender"), SNMPCONFPATH=str(self.tmp), MIBS=""
        )
        proc = await asyncio.create_subprocess_exec(
            tool, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
        return subprocess.CompletedProcess([tool, *args], proc.returncode or 0, out.decode(), "")

    async def trap(self, *args: str) -> None:
        assert SNMPTRAP is not None
        done = await self.send(SNMPTRAP, *args)
        assert done.returncode == 0, done.stdout

    async def next_event(self) -> TrapEvent:
        return await asyncio.wait_for(self.events.get(), DEADLINE)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition`` (a drop is only visible in counters) with a deadline."""
        deadline = time.monotonic() + DEADLINE
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)


def listener(port: int) -> TrapListener:
    return TrapListener(
        listen=f"127.0.0.1:{port}",
        communities=[COMMUNITY],
        users=[
            TrapUser(
                username="wtuser",
                auth_key="authpass123",
                priv_key="privpass123",
                engine_ids=[f"0x{SENDER_ENGINE_ID}"],
            )
        ],
    )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    events: asyncio.Queue[TrapEvent] = asyncio.Queue()
    receiver = TrapReceiver.from_config(listener(free_udp_port()), events.put_nowait)
    async with receiver:
        yield Rig(receiver, events, tmp_path)


def assert_no_secrets(event: TrapEvent) -> None:
    text = repr(event)
    for secret in (COMMUNITY, "authpass123", "privpass123"):
        assert secret not in text


# --------------------------------------------------------------------------- accepted


@needs_senders
async def test_v2c_link_down_then_up(rig: Rig) -> None:
    await rig.trap(
        "-v2c", "-c", COMMUNITY, rig.target, "", LINK_DOWN, *LINK_VARBINDS, f"{IF_DESCR}.2", "s", "eth1"
    )
    down = await rig.next_event()
    assert down.source == "127.0.0.1"
    assert down.version == "2c"
    assert down.trap_oid == LINK_DOWN
    assert down.value(f"{IF_INDEX}.2") == "2"
    assert down.value(f"{IF_OPER}.2") == "2"
    assert down.value(f"{IF_DESCR}.2") == "eth1"
    assert down.value("1.3.6.1.2.1.1.3.0") is not None  # sysUpTime.0 kept
    assert all(name != "1.3.6.1.6.3.1.1.4.1.0" for name, _ in down.varbinds)  # snmpTrapOID is trap_oid
    assert is_link_down(down) == (True, 2)
    assert is_link_up(down) == (False, None)
    assert time.time() - 10 < down.received_at <= time.time()
    assert_no_secrets(down)

    await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", LINK_UP, f"{IF_INDEX}.2", "i", "2")
    up = await rig.next_event()
    assert up.trap_oid == LINK_UP
    assert is_link_up(up) == (True, 2)
    assert is_link_down(up) == (False, None)
    assert rig.receiver.received == 2 and rig.receiver.dropped == 0


@needs_senders
async def test_v1_generic_link_down(rig: Rig) -> None:
    # enterprise, agent-addr, generic-trap 2 (linkDown), specific 0, uptime
    await rig.trap(
        "-v1", "-c", COMMUNITY, rig.target, "1.3.6.1.4.1.8072.3.2.10", "127.0.0.1", "2", "0", "",
        f"{IF_INDEX}.3", "i", "3",
    )  # fmt: skip
    event = await rig.next_event()
    assert event.version == "1"
    assert event.trap_oid == LINK_DOWN  # RFC 3584 translation of generic-trap 2
    assert is_link_down(event) == (True, 3)
    assert event.value("1.3.6.1.6.3.18.1.3.0") == "127.0.0.1"  # snmpTrapAddress.0, the agent-addr field
    assert event.value("1.3.6.1.6.3.18.1.4.0") is None  # snmpTrapCommunity.0 removed: it is the secret
    assert_no_secrets(event)


@needs_senders
async def test_v2c_inform_is_acknowledged(rig: Rig) -> None:
    assert SNMPINFORM is not None
    done = await rig.send(SNMPINFORM, "-v2c", "-c", COMMUNITY, "-t", "2", "-r", "0", rig.target, "", LINK_UP,
                          f"{IF_INDEX}.5", "i", "5")  # fmt: skip
    assert done.returncode == 0, done.stdout  # snmpinform exits 0 only once the ack arrived
    event = await rig.next_event()
    assert (event.version, event.trap_oid) == ("2c", LINK_UP)
    assert is_link_up(event) == (True, 5)


@needs_senders
async def test_v3_authpriv_trap_and_inform(rig: Rig) -> None:
    await rig.trap("-v3", "-e", f"0x{SENDER_ENGINE_ID}", *V3, rig.target, "", LINK_DOWN, *LINK_VARBINDS)
    trap = await rig.next_event()
    assert (trap.source, trap.version, trap.trap_oid) == ("127.0.0.1", "3", LINK_DOWN)
    assert is_link_down(trap) == (True, 2)

    assert SNMPINFORM is not None
    # an inform needs no configured engine ID: the sender discovers the receiver's
    done = await rig.send(SNMPINFORM, "-v3", *V3, "-t", "2", "-r", "0", rig.target, "", LINK_UP,
                          f"{IF_INDEX}.7", "i", "7")  # fmt: skip
    assert done.returncode == 0, done.stdout
    inform = await rig.next_event()
    assert (inform.version, inform.trap_oid) == ("3", LINK_UP)
    assert is_link_up(inform) == (True, 7)
    assert rig.receiver.dropped == 0


@needs_senders
async def test_enterprise_trap_passes_through(rig: Rig) -> None:
    oid = "1.3.6.1.4.1.6574.3.0.1"  # some vendor's "RAID degraded" notification
    await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", oid, "1.3.6.1.4.1.6574.3.1.1.3.1", "i", "11")
    event = await rig.next_event()
    assert event.trap_oid == oid
    assert event.value("1.3.6.1.4.1.6574.3.1.1.3.1") == "11"
    assert is_link_down(event) == (False, None) and is_link_up(event) == (False, None)


# --------------------------------------------------------------------------- dropped


@needs_senders
async def test_wrong_community_is_dropped_and_counted(rig: Rig) -> None:
    await rig.trap("-v2c", "-c", "not-the-community", rig.target, "", LINK_DOWN, *LINK_VARBINDS)
    await rig.trap("-v1", "-c", "not-the-community", rig.target, "1.3.6.1.4.1.1", "127.0.0.1", "2", "0", "")
    await rig.until(lambda: rig.receiver.drops["bad community"] == 2, "two bad-community drops")
    assert rig.receiver.drop_sources == {"127.0.0.1": "bad community"}
    # still listening, and nothing was delivered for the dropped ones
    await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", LINK_UP, f"{IF_INDEX}.2", "i", "2")
    event = await rig.next_event()
    assert event.trap_oid == LINK_UP
    assert rig.events.empty() and rig.receiver.received == 1 and rig.receiver.dropped == 2


@needs_senders
async def test_wrong_v3_credentials_are_dropped_and_counted(rig: Rig) -> None:
    wrong_key = [*V3[:7], "wrong-auth-key", *V3[8:]]
    await rig.trap("-v3", "-e", f"0x{SENDER_ENGINE_ID}", *wrong_key, rig.target, "", LINK_DOWN)
    await rig.until(lambda: rig.receiver.drops["wrong v3 auth key"] == 1, "a wrong-digest drop")
    await rig.trap("-v3", "-e", "0x8000000001020399", *V3, rig.target, "", LINK_DOWN)  # engine ID not listed
    await rig.until(
        lambda: rig.receiver.drops["unknown v3 user or sender engine ID"] == 1, "an unknown-engine-ID drop"
    )
    assert rig.receiver.received == 0 and rig.events.empty()


@needs_senders
async def test_garbage_is_dropped_and_counted(rig: Rig) -> None:
    host, port = rig.receiver.address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for junk in (b"\x00garbage", b"\x30\x03\x02\x01\x01", b"\x30" + bytes(range(60))):
            s.sendto(junk, (host, port))
    await rig.until(lambda: rig.receiver.drops["not SNMP"] == 3, "three not-SNMP drops")
    await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", LINK_UP)
    assert (await rig.next_event()).trap_oid == LINK_UP


@needs_senders
async def test_callback_error_does_not_stop_the_receiver(tmp_path: Path) -> None:
    seen: list[TrapEvent] = []

    def flaky(event: TrapEvent) -> None:
        seen.append(event)
        if len(seen) == 1:
            raise RuntimeError("bug in the consumer")

    async with TrapReceiver(
        flaky, host="127.0.0.1", port=free_udp_port(), communities=[COMMUNITY]
    ) as receiver:
        rig = Rig(receiver, asyncio.Queue(), tmp_path)
        await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", LINK_DOWN)
        await rig.trap("-v2c", "-c", COMMUNITY, rig.target, "", LINK_UP)
        await rig.until(lambda: len(seen) == 2, "two callbacks")
    assert receiver.callback_errors == 1 and receiver.received == 2


@needs_senders
async def test_ipv6_dual_stack_listener(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 on loopback")
    events: asyncio.Queue[TrapEvent] = asyncio.Queue()
    port = free_udp_port()
    async with TrapReceiver(events.put_nowait, host="::", port=port, communities=[COMMUNITY]) as receiver:
        rig = Rig(receiver, events, tmp_path)
        await rig.trap("-v2c", "-c", COMMUNITY, f"udp6:[::1]:{port}", "", LINK_DOWN, *LINK_VARBINDS)
        assert (await rig.next_event()).source == "::1"
        await rig.trap("-v2c", "-c", COMMUNITY, f"127.0.0.1:{port}", "", LINK_DOWN, *LINK_VARBINDS)
        assert (await rig.next_event()).source == "127.0.0.1"  # not ::ffff:127.0.0.1


# --------------------------------------------------------------------------- binding


async def test_occupied_port_fails_at_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        receiver = TrapReceiver(lambda event: None, host="127.0.0.1", port=port, communities=[COMMUNITY])
        with pytest.raises(TrapBindError) as caught:
            await receiver.start()
    assert isinstance(caught.value, OSError)
    assert caught.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(caught.value) and "already" in str(caught.value)
    receiver.close()  # harmless after a failed start


def test_port_162_without_capability_fails_clearly() -> None:
    """A real bind of 127.0.0.1:162 without CAP_NET_BIND_SERVICE (dropped with setpriv as root)."""
    try:
        unprivileged_from = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        unprivileged_from = 1024
    if unprivileged_from <= 162:
        pytest.skip("this kernel lets anyone bind port 162 (net.ipv4.ip_unprivileged_port_start)")
    code = (
        "import asyncio\n"
        "from watchtower.probes.traps import TrapReceiver\n"
        "r = TrapReceiver(print, host='127.0.0.1', port=162, communities=['x'])\n"
        "try:\n"
        "    asyncio.run(r.start())\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno, exc)\n"
        "else:\n"
        "    r.close(); print('bound')\n"
    )
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root, and no setpriv to drop CAP_NET_BIND_SERVICE")
        command = [
            setpriv,
            "--bounding-set",
            "-net_bind_service",
            "--inh-caps",
            "-net_bind_service",
            *command,
        ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2])
    assert out.stdout.startswith(f"TrapBindError {errno.EACCES} "), out.stdout + out.stderr
    assert "CAP_NET_BIND_SERVICE" in out.stdout and "127.0.0.1:162" in out.stdout


# --------------------------------------------------------------------------- helpers, config


def test_link_helpers_on_built_events() -> None:
    now = time.time()
    raw_v1 = TrapEvent("10.0.0.5", "2", ((f"{IF_INDEX}.4", "4"),), "1", now)  # a bare generic-trap number
    assert is_link_down(raw_v1) == (True, 4)
    v1_up = TrapEvent("10.0.0.5", "3", (), "1", now)
    assert is_link_up(v1_up) == (True, None)
    # no ifIndex varbind: the instance of ifOperStatus tells
    by_instance = TrapEvent("10.0.0.5", LINK_DOWN, ((f"{IF_OPER}.9", "2"),), "2c", now)
    assert is_link_down(by_instance) == (True, 9)
    assert is_link_down(TrapEvent("10.0.0.5", "1.3.6.1.6.3.1.1.5.1", (), "2c", now)) == (False, None)


def test_listener_config() -> None:
    cfg = TrapListener.model_validate({"communities": ["comm-one", "comm-two"]})
    assert cfg.host_port == ("0.0.0.0", 162)
    assert [c.get_secret_value() for c in cfg.community_list()] == ["comm-one", "comm-two"]
    assert "comm-" not in repr(cfg)
    with pytest.raises(ValueError, match="needs communities"):
        TrapListener.model_validate({"listen": "[::]:1162"})
    with pytest.raises(ValueError, match="not an snmpEngineID"):
        TrapUser.model_validate({"username": "u", "auth_key": "k", "engine_ids": ["xyz"]})
    user = TrapUser.model_validate({"username": "u", "auth_key": "k", "engine_ids": ["0x80:00:00:00:01:02"]})
    assert user.engine_ids == ["800000000102"]


def test_listener_communities_file(tmp_path: Path) -> None:
    (tmp_path / "communities").write_text("# one per line\ncomm-one\n\n  comm-two  \n")
    cfg = TrapListener.model_validate(
        {"listen": "[::]:1162", "communities_file": "communities"}, context={"config_dir": tmp_path}
    )
    assert cfg.host_port == ("::", 1162)
    assert [c.get_secret_value() for c in cfg.community_list()] == ["comm-one", "comm-two"]
    with pytest.raises(ValueError, match="either communities or communities_file"):
        TrapListener.model_validate(
            {"communities": ["x"], "communities_file": "communities"}, context={"config_dir": tmp_path}
        )
