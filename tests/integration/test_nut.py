"""The ``nut`` probe against a real NUT ``upsd`` + ``dummy-ups`` pair, and against peers that are not NUT.

The peer (configs in tests/peers/nut) runs on a free loopback port with every file in a temp dir;
the test simulates a power cut by rewriting the driver's ``.dev`` file. Everything that waits for
the peer polls a condition under a deadline: the driver notices a changed file within ~1 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from support import free_port

from watchtower.config import NutPath
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes import nut as nut_probe

PEERS = Path(__file__).resolve().parents[1] / "peers" / "nut"
NUT_DIR = Path(os.environ.get("WATCHTOWER_NUT_DIR", "/lib/nut"))
DRIVER, UPSD = NUT_DIR / "dummy-ups", NUT_DIR / "upsd"
UPS = "labups"

needs_nut = pytest.mark.skipif(
    not (os.access(DRIVER, os.X_OK) and os.access(UPSD, os.X_OK)),
    reason=f"NUT dummy-ups/upsd not in {NUT_DIR} (apt-get install nut-server, or set WATCHTOWER_NUT_DIR)",
)


def render(template: str, dest: Path, **values: object) -> None:
    text = (PEERS / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key.upper()}@", str(value))
    dest.write_text(text)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class NutPeer:
    """dummy-ups + upsd on 127.0.0.1:<free port>, all state in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.etc, self.state = root / "etc", root / "state"
        self.dev = self.etc / f"{UPS}.dev"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._mtime = time.time()

    def set_ups(self, status: str, charge: int = 100, runtime: int = 3600) -> None:
        render("labups.dev.in", self.dev, status=status, charge=charge, runtime=runtime)
        # dummy-ups re-reads the file when its mtime changes; two writes within the same second
        # could look unchanged at second resolution, so move the mtime on by whole seconds.
        self._mtime += 2
        os.utime(self.dev, (self._mtime, self._mtime))

    def start(self) -> None:
        self.etc.mkdir(parents=True)
        self.state.mkdir(mode=0o770)
        (self.etc / "nut.conf").write_text((PEERS / "nut.conf").read_text())
        render("ups.conf.in", self.etc / "ups.conf", ups=UPS, dev_file=self.dev)
        render("upsd.conf.in", self.etc / "upsd.conf", port=self.port)
        (self.etc / "upsd.users").write_text((PEERS / "upsd.users").read_text())
        for name in ("upsd.conf", "upsd.users"):
            (self.etc / name).chmod(0o600)  # upsd warns about world-readable credentials
        self.set_ups("OL")
        env = dict(
            os.environ,
            NUT_CONFPATH=str(self.etc),
            NUT_STATEPATH=str(self.state),
            NUT_ALTPIDPATH=str(self.state),
        )
        # As root both would drop to user "nut", which cannot read a temp dir of root's: stay root.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.spawn([str(DRIVER), "-a", UPS, "-F", "-x", "mode=dummy-once", *user], env, "driver.log")
        # Start upsd once the driver's socket exists, so its first connect succeeds (else it retries later).
        socket_file = self.state / f"dummy-ups-{UPS}"
        deadline = time.monotonic() + 10.0
        while not socket_file.exists() and self.procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.spawn([str(UPSD), "-F", *user], env, "upsd.log")
        self.wait_status("OL", 15.0)

    def spawn(self, argv: list[str], env: dict[str, str], log: str) -> None:
        with open(self.root / log, "wb") as out:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))

    def query(self, line: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
            s.sendall(line.encode() + b"\n")
            return s.makefile("rb").readline().decode().strip()

    def wait_status(self, status: str, timeout: float) -> None:
        """Until upsd reports ``status`` (at start-up it says WAIT, then the driver's value)."""
        deadline = time.monotonic() + timeout
        answer = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                answer = self.query(f"GET VAR {UPS} ups.status")
            except OSError as exc:
                answer = repr(exc)
            if answer == f'VAR {UPS} ups.status "{status}"':
                return
            time.sleep(0.05)
        logs = "\n".join(
            (self.root / n).read_text(errors="replace")[-2000:] for n in ("driver.log", "upsd.log")
        )
        self.stop()
        pytest.fail(f"NUT peer never reported {status!r} (last answer {answer!r}); logs:\n{logs}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


@pytest.fixture(scope="module")
def nut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NutPeer]:
    peer = NutPeer(tmp_path_factory.mktemp("nut"))
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def ol(nut: NutPeer) -> NutPeer:
    """The shared peer, back to mains power whatever the previous test did."""
    nut.set_ups("OL")
    nut.wait_status("OL", 10.0)
    return nut


def spec(port: int, ups: str = UPS, **kw: object) -> NutPath:
    return NutPath.model_validate({"host": "127.0.0.1", "port": port, "ups": ups, **kw})


async def probe(path: NutPath, timeout: float = 2.0) -> ProbeResult:
    return await nut_probe.probe(path, ProbeContext(timeout=timeout))


async def wait_probe(
    get: Callable[[], Awaitable[ProbeResult]], done: Callable[[ProbeResult], bool], timeout: float
) -> tuple[ProbeResult, float]:
    """Probe until ``done`` holds or the deadline passes; the last result and the time it took."""
    start = time.monotonic()
    while True:
        result = await get()
        if done(result) or time.monotonic() - start > timeout:
            return result, time.monotonic() - start
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- real upsd


@needs_nut
async def test_online_ups_is_ok_with_values(ol: NutPeer) -> None:
    result = await probe(spec(ol.port))
    assert result.ok, result
    assert result.failure is None
    assert result.detail.startswith("online (OL)"), result.detail
    assert "charge 100%" in result.detail and "runtime 1h00m" in result.detail
    values = dict(result.values)
    assert values["battery.charge"] == 100.0
    assert values["battery.runtime"] == 3600.0
    assert values["input.voltage"] == 230.0
    assert values["ups.load"] == 23.0
    assert result.latency is not None and result.latency < 0.5


@needs_nut
async def test_credentials_are_sent_and_accepted(ol: NutPeer) -> None:
    result = await probe(spec(ol.port, username="wtmon", password="wtmonpass"))
    assert result.ok, result


@needs_nut
async def test_power_cut_on_battery_then_low_battery(ol: NutPeer) -> None:
    path = spec(ol.port)
    ol.set_ups("OB DISCHRG", charge=85, runtime=1200)
    result, took = await wait_probe(lambda: probe(path), lambda r: not r.ok, 10.0)
    assert not result.ok and result.failure is Failure.CONTENT, result
    assert result.detail == "on battery, charge 85%, runtime 20m", result.detail
    assert dict(result.values)["battery.charge"] == 85.0
    assert dict(result.values)["battery.runtime"] == 1200.0
    assert took < 5.0

    ol.set_ups("OB LB", charge=8, runtime=120)
    result, _ = await wait_probe(lambda: probe(path), lambda r: "low battery" in r.detail, 10.0)
    assert not result.ok and result.failure is Failure.CONTENT, result
    assert result.detail == "low battery, on battery, charge 8%, runtime 2m", result.detail

    ol.set_ups("OL CHRG", charge=40, runtime=900)
    result, _ = await wait_probe(lambda: probe(path), lambda r: r.ok, 10.0)
    assert result.ok and "charge 40%" in result.detail, result


@needs_nut
async def test_online_with_replace_battery_is_ok_but_said(ol: NutPeer) -> None:
    ol.set_ups("OL RB")
    result, _ = await wait_probe(lambda: probe(spec(ol.port)), lambda r: "RB" in r.detail, 10.0)
    assert result.ok and "replace battery" in result.detail, result


@needs_nut
async def test_unknown_ups_is_error_with_server_message(nut: NutPeer) -> None:
    result = await probe(spec(nut.port, ups="nosuchups"))
    assert not result.ok and result.failure is Failure.ERROR, result
    assert "ERR UNKNOWN-UPS" in result.detail and "nosuchups" in result.detail


@needs_nut
async def test_driver_gone_is_error(tmp_path: Path) -> None:
    peer = NutPeer(tmp_path)
    try:
        peer.start()
        stop(peer.procs[0])  # the driver: upsd keeps answering, without data
        result, _ = await wait_probe(lambda: probe(spec(peer.port)), lambda r: not r.ok, 5.0)
    finally:
        peer.stop()
    assert result.failure is Failure.ERROR and "DRIVER-NOT-CONNECTED" in result.detail, result


# --------------------------------------------------------------------------- peers that are not NUT


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[[Handler], Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start TCP servers on free loopback ports (closed after the test); returns their ports."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answering(*lines: bytes, close: bool = True) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for line in lines:
            writer.write(line)
        await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()  # hold the connection open until the client goes

    return handler


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ((b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",), "unexpected answer to LIST VAR"),
        ((b"HTTP/1.1 400 Bad Request\r\n\r\n",), "unexpected answer to LIST VAR"),
        ((b"\x16\x03\x01\x02\x00\x01\xff\xfe\n",), "not text"),
        ((b"x" * 10000,), "longer than"),
        ((b"BEGIN LIST VAR labups\n", b"VAR labups ups.status OL\n"), "malformed LIST VAR line"),
        ((b"BEGIN LIST VAR labups\n", b'VAR other ups.status "OL"\n'), "malformed LIST VAR line"),
        ((b"BEGIN LIST VAR labups\n", b'VAR labups ups.status "OL"\n'), "connection closed"),
        ((), "connection closed"),
    ],
)
async def test_garbage_is_protocol_failure(serve: Serve, lines: tuple[bytes, ...], expected: str) -> None:
    port = await serve(answering(*lines))
    result = await probe(spec(port))
    assert not result.ok and result.failure is Failure.PROTOCOL, result
    assert expected in result.detail, result.detail


async def test_endless_variable_list_is_capped(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"BEGIN LIST VAR labups\n")
        for i in range(5000):
            writer.write(f'VAR labups x.{i} "1"\n'.encode())
        await writer.drain()
        await reader.read()

    result = await probe(spec(await serve(handler)))
    assert result.failure is Failure.PROTOCOL and "more than" in result.detail, result


async def test_silent_peer_times_out_within_timeout(serve: Serve) -> None:
    port = await serve(answering(close=False))
    start = time.monotonic()
    result = await probe(spec(port), timeout=0.5)
    assert result.failure is Failure.TIMEOUT, result
    assert time.monotonic() - start < 1.0


async def test_closed_port_is_refused() -> None:
    result = await probe(spec(free_port()))
    assert result.failure is Failure.REFUSED, result


async def test_odd_status_values_from_a_fake_upsd(serve: Serve) -> None:
    """Status words the dummy driver cannot easily show, served by a fake upsd."""

    def fake(status: str) -> Handler:
        return answering(
            b"BEGIN LIST VAR labups\n",
            f'VAR labups ups.status "{status}"\n'.encode(),
            b'VAR labups battery.charge "unknown"\n',
            b'VAR labups ups.model "Smart-UPS \\"1500\\""\n',
            b"END LIST VAR labups\n",
        )

    off = await probe(spec(await serve(fake("OFF"))))
    assert off.failure is Failure.CONTENT and off.detail == "status OFF, UPS output off", off
    fsd = await probe(spec(await serve(fake("OL FSD"))))
    assert fsd.failure is Failure.CONTENT and "forced shutdown" in fsd.detail, fsd
    empty = await probe(spec(await serve(fake(""))))
    assert empty.failure is Failure.CONTENT and "no ups.status" in empty.detail, empty
    assert off.values == ()  # "unknown" is not a number
