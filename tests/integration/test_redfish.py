"""The ``redfish`` probe against sushy-emulator (a real Redfish service) and a fake BMC, both behind TLS.

sushy-emulator (fake driver, see tests/peers/redfish) gives real power state, health, Thermal and
the slow power Reset; it has no SessionService, no LogServices and no Chassis Power, so a small
aiohttp fake BMC serves those on the standard Redfish paths, plus the ways a BMC misbehaves.
Both use a self-signed certificate made here and trusted through ``ca_file``. Waits poll a
condition under a deadline (the emulator applies a power change 1-11 s after the request).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import free_port, make_cert

from watchtower.config import RedfishSpec
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes import redfish as redfish_probe

PEERS = Path(__file__).resolve().parents[1] / "peers" / "redfish"
USER, PASSWORD = "admin", "s3cret-Pw"


def spec(port: int, ca_file: Path | None, **kw: Any) -> RedfishSpec:
    data: dict[str, Any] = {"host": "127.0.0.1", "port": port, "username": USER, "password": PASSWORD, **kw}
    if ca_file is not None:
        data["ca_file"] = str(ca_file)
    return RedfishSpec.model_validate(data, context={"config_dir": ca_file.parent if ca_file else Path.cwd()})


async def probe(path: RedfishSpec, state: dict[str, Any] | None = None, timeout: float = 5.0) -> ProbeResult:
    return await redfish_probe.probe(
        path, ProbeContext(timeout=timeout, state=state if state is not None else {})
    )


async def wait_probe(
    get: Callable[[], Awaitable[ProbeResult]], done: Callable[[ProbeResult], bool], timeout: float
) -> tuple[ProbeResult, float]:
    """Probe until ``done`` holds or the deadline passes; the last result and the time it took."""
    start = time.monotonic()
    while True:
        result = await get()
        if done(result) or time.monotonic() - start > timeout:
            return result, time.monotonic() - start
        await asyncio.sleep(0.25)


def iso(ago: dt.timedelta) -> str:
    return (dt.datetime.now(dt.UTC) - ago).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- the fake BMC


def sel_entry(ident: str, severity: str, message: str, ago: dt.timedelta) -> dict[str, Any]:
    return {
        "@odata.id": f"/redfish/v1/Managers/1/LogServices/SEL/Entries/{ident}",
        "Id": ident,
        "Name": "Log Entry",
        "EntryType": "SEL",
        "Severity": severity,
        "Message": message,
        "Created": iso(ago),
    }


@dataclass
class FakeBmc:
    """The parts of a BMC's Redfish tree sushy-emulator lacks, with knobs for the tests."""

    power: str = "On"
    health: str = "OK"
    temperatures: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "MemberId": "0",
                "Name": "CPU1 Temp",
                "ReadingCelsius": 48,
                "UpperThresholdNonCritical": 85,
                "UpperThresholdCritical": 90,
                "UpperThresholdFatal": 95,
                "Status": {"State": "Enabled", "Health": "OK"},
            },
            {
                "MemberId": "1",
                "Name": "Inlet Temp",
                "ReadingCelsius": 22,
                "UpperThresholdCritical": 42,
                "LowerThresholdCritical": 3,
                "Status": {"State": "Enabled", "Health": "OK"},
            },
        ]
    )
    sel: list[dict[str, Any]] = field(default_factory=list)
    event_log: list[dict[str, Any]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    logins: int = 0
    requests: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # path -> how it misbehaves
    slow: set[str] = field(default_factory=set)  # paths that do not answer until `release` is set
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def resources(self) -> dict[str, dict[str, Any]]:
        def coll(path: str, *members: str) -> dict[str, Any]:
            return {
                "@odata.id": path,
                "Members@odata.count": len(members),
                "Members": [{"@odata.id": m} for m in members],
            }

        def entries(path: str, items: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "@odata.id": path,
                "Name": "Log Entries",
                "Members@odata.count": len(items),
                "Members": items,
            }

        return {
            "/redfish/v1/Systems": coll("/redfish/v1/Systems", "/redfish/v1/Systems/1"),
            "/redfish/v1/Systems/1": {
                "@odata.id": "/redfish/v1/Systems/1",
                "Id": "1",
                "Name": "System",
                "PowerState": self.power,
                "Status": {"State": "Enabled", "Health": self.health, "HealthRollup": self.health},
                "LogServices": {"@odata.id": "/redfish/v1/Systems/1/LogServices"},
            },
            "/redfish/v1/Systems/1/LogServices": coll(
                "/redfish/v1/Systems/1/LogServices", "/redfish/v1/Systems/1/LogServices/EventLog"
            ),
            "/redfish/v1/Systems/1/LogServices/EventLog/Entries": entries(
                "/redfish/v1/Systems/1/LogServices/EventLog/Entries", self.event_log
            ),
            "/redfish/v1/Chassis": coll("/redfish/v1/Chassis", "/redfish/v1/Chassis/1"),
            "/redfish/v1/Chassis/1": {
                "@odata.id": "/redfish/v1/Chassis/1",
                "Id": "1",
                "Thermal": {"@odata.id": "/redfish/v1/Chassis/1/Thermal"},
                "Power": {"@odata.id": "/redfish/v1/Chassis/1/Power"},
            },
            "/redfish/v1/Chassis/1/Thermal": {
                "@odata.id": "/redfish/v1/Chassis/1/Thermal",
                "Temperatures": self.temperatures,
                "Fans": [
                    {
                        "Name": "Fan1",
                        "Reading": 5400,
                        "ReadingUnits": "RPM",
                        "LowerThresholdCritical": 600,
                        "Status": {"State": "Enabled", "Health": "OK"},
                    },
                    {"Name": "Fan2", "Status": {"State": "Absent"}},
                ],
            },
            "/redfish/v1/Chassis/1/Power": {
                "@odata.id": "/redfish/v1/Chassis/1/Power",
                "PowerControl": [{"Name": "System Power Control", "PowerConsumedWatts": 212}],
                "PowerSupplies": [
                    {"Name": "PS1", "LineInputVoltage": 230, "Status": {"State": "Enabled", "Health": "OK"}},
                    {
                        "Name": "PS2",
                        "LineInputVoltage": 0,
                        "Status": {"State": "Enabled", "Health": "Critical"},
                    },
                ],
                "Voltages": [],
            },
            "/redfish/v1/Managers": coll("/redfish/v1/Managers", "/redfish/v1/Managers/1"),
            "/redfish/v1/Managers/1/LogServices": coll(
                "/redfish/v1/Managers/1/LogServices", "/redfish/v1/Managers/1/LogServices/SEL"
            ),
            "/redfish/v1/Managers/1/LogServices/SEL/Entries": entries(
                "/redfish/v1/Managers/1/LogServices/SEL/Entries", self.sel
            ),
        }

    def app(self) -> web.Application:
        def error(status: int, message: str) -> web.Response:
            return web.json_response(
                {"error": {"code": "Base.1.0.GeneralError", "message": message}}, status=status
            )

        async def login(request: web.Request) -> web.Response:
            body = await request.json()
            if body.get("UserName") != USER or body.get("Password") != PASSWORD:
                return error(401, "invalid credentials")
            token = secrets.token_hex(16)
            self.tokens.add(token)
            self.logins += 1
            return web.json_response(
                {"Id": str(self.logins), "UserName": USER},
                status=201,
                headers={
                    "X-Auth-Token": token,
                    "Location": f"/redfish/v1/SessionService/Sessions/{self.logins}",
                },
            )

        async def get(request: web.Request) -> web.StreamResponse:
            path = request.path.rstrip("/")
            self.requests.append(path)
            basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if (
                request.headers.get("X-Auth-Token") not in self.tokens
                and request.headers.get("Authorization") != basic
            ):
                return error(401, "unauthorized")
            if path in self.slow:
                await self.release.wait()
            how = self.broken.get(path)
            if how is not None:
                return await misbehave(request, how)
            doc = self.resources().get(path)
            return web.json_response(doc) if doc is not None else error(404, "not found")

        async def misbehave(request: web.Request, how: str) -> web.StreamResponse:
            pad = "x" * (1024 * 1024)
            if how == "invalid-json":
                return web.Response(text='{"Members": [', content_type="application/json")
            if how == "html":
                return web.Response(text="<html><body>Login</body></html>", content_type="text/html")
            if how == "big":  # valid JSON, 1 MB, with Content-Length
                return web.json_response({"Members": [], "Pad": pad})
            if how == "big-chunked":  # the same without Content-Length
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                await resp.write(b'{"Members": [], "Pad": "')
                for _ in range(16):
                    await resp.write(b"x" * 65536)
                await resp.write(b'"}')
                return resp
            if how == "array":
                return web.json_response([1, 2, 3])
            if how == "members-not-list":
                return web.json_response({"Members": "all of them"})
            if how == "foreign-member":
                return web.json_response(
                    {"Members": [{"@odata.id": "https://198.51.100.7/redfish/v1/Systems/1"}]}
                )
            if how == "power-not-string":
                return web.json_response({"Id": "1", "PowerState": 1})
            if how == "deep":
                return web.Response(text="[" * 100000, content_type="application/json")
            if how == "500":
                return error(500, "internal error")
            raise AssertionError(how)

        app = web.Application()
        app.router.add_post("/redfish/v1/SessionService/Sessions", login)
        app.router.add_get("/{tail:.*}", get)
        return app


@dataclass
class Bmc:
    fake: FakeBmc
    port: int
    cert: Path


@pytest.fixture
async def bmc(tmp_path: Path) -> AsyncIterator[Bmc]:
    key, cert = make_cert(tmp_path, "fakebmc")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    fake = FakeBmc()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield Bmc(fake, port, cert)
    finally:
        fake.release.set()  # let hung handlers finish, or cleanup() waits for them for 60 s
        await runner.cleanup()


# --------------------------------------------------------------------------- fake BMC: auth, TLS


async def test_session_login_kept_and_renewed_after_401(bmc: Bmc) -> None:
    path, state = spec(bmc.port, bmc.cert), dict[str, Any]()
    first = await probe(path, state)
    assert first.ok, first
    assert bmc.fake.logins == 1
    second = await probe(path, state)
    assert second.ok and bmc.fake.logins == 1, "the session token is kept across runs"
    bmc.fake.tokens.clear()  # the BMC rebooted / the session timed out: every request gets 401
    third = await probe(path, state)
    assert third.ok, third
    assert bmc.fake.logins == 2, "exactly one new login after the 401s"
    assert all(PASSWORD not in repr(r) for r in (first, second, third))
    assert all(token not in repr(state) for token in bmc.fake.tokens), "the token is not shown in state"


async def test_basic_auth(bmc: Bmc) -> None:
    result = await probe(spec(bmc.port, bmc.cert, auth="basic"))
    assert result.ok, result
    assert bmc.fake.logins == 0


@pytest.mark.parametrize("auth", ["session", "basic"])
async def test_wrong_password_is_error_without_the_secret(bmc: Bmc, auth: str) -> None:
    wrong = "not-the-pw-" + secrets.token_hex(4)
    result = await probe(spec(bmc.port, bmc.cert, auth=auth, password=wrong))
    assert not result.ok and result.failure is Failure.ERROR, result
    assert "401" in result.detail and "'admin'" in result.detail
    assert wrong not in result.detail


async def test_server_without_session_service_says_try_basic(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path, "nosessions")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def no_token(request: web.Request) -> web.Response:
        return web.json_response({}, status=201)  # "logged in", but no X-Auth-Token

    for handler, failure, words in (
        (None, Failure.STATUS, "try auth: basic"),
        (no_token, Failure.PROTOCOL, "no X-Auth-Token"),
    ):
        app = web.Application()
        if handler is not None:
            app.router.add_post("/redfish/v1/SessionService/Sessions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
        try:
            result = await probe(spec(port, cert))
        finally:
            await runner.cleanup()
        assert result.failure is failure and words in result.detail, result


async def test_tls_wrong_certificate_and_insecure_opt_out(bmc: Bmc, tmp_path: Path) -> None:
    _, other = make_cert(tmp_path, "other")
    result = await probe(spec(bmc.port, other))
    assert not result.ok and result.failure is Failure.TLS, result
    assert "certificate" in result.detail
    no_ca = await probe(spec(bmc.port, None))  # system trust store: a self-signed cert is refused
    assert no_ca.failure is Failure.TLS, no_ca
    assert bmc.fake.logins == 0, "no credentials were sent to an unverified peer"
    insecure = await probe(spec(bmc.port, None, insecure=True))
    assert insecure.ok, insecure


async def test_unreachable_peers() -> None:
    refused = await probe(spec(free_port(), None, insecure=True))
    assert refused.failure is Failure.REFUSED, refused

    # Accepts TCP, never speaks (a hung BMC web server): TIMEOUT within the probe's timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        result = await probe(spec(silent.getsockname()[1], None, insecure=True), timeout=0.5)
    assert result.failure is Failure.TIMEOUT, result
    assert time.monotonic() - start < 1.0


# --------------------------------------------------------------------------- fake BMC: what it says


async def test_power_health_sensors_and_cost(bmc: Bmc) -> None:
    result = await probe(spec(bmc.port, bmc.cert))
    assert result.ok and result.bmc is not None, result
    assert result.bmc.power_on is True and result.bmc.health == "OK"
    sensors = {s.name: s for s in result.bmc.sensors}
    assert sensors["CPU1 Temp"].value == 48.0 and sensors["CPU1 Temp"].state == "ok"
    assert sensors["CPU1 Temp"].unit == "degrees C"
    assert sensors["Fan1"].unit == "RPM" and sensors["Fan1"].state == "ok"
    assert "Fan2" not in sensors, "absent slots are not sensors"
    assert sensors["PS2"].state == "critical" and sensors["PS2"].value == 0.0  # lost input feed
    assert sensors["System Power Control consumed"].value == 212.0
    assert result.detail.startswith("power On (1 system); health OK; 1 sensor critical: PS2 0 Volts"), result
    # Cost: Systems + System, Chassis + Chassis/1 + Thermal + Power, Managers + LogServices + SEL,
    # Systems/1/LogServices + EventLog entries.
    assert len(bmc.fake.requests) == 11, bmc.fake.requests


async def test_temperature_over_critical_threshold(bmc: Bmc) -> None:
    bmc.fake.temperatures[0]["ReadingCelsius"] = 91  # Health still "OK": the threshold decides
    bmc.fake.temperatures[1]["ReadingCelsius"] = 2  # under the lower critical threshold
    result = await probe(spec(bmc.port, bmc.cert))
    assert result.ok and result.bmc is not None, "a hot CPU explains, it does not make the BMC unreachable"
    sensors = {s.name: s for s in result.bmc.sensors}
    assert sensors["CPU1 Temp"].state == "critical" and sensors["CPU1 Temp"].value == 91.0
    assert sensors["Inlet Temp"].state == "critical"
    assert "3 sensors critical: " in result.detail and "CPU1 Temp 91 degrees C" in result.detail, (
        result.detail
    )
    bmc.fake.temperatures[0]["ReadingCelsius"] = 86
    warm = await probe(spec(bmc.port, bmc.cert))
    assert warm.bmc is not None and {s.name: s.state for s in warm.bmc.sensors}["CPU1 Temp"] == "warning"


async def test_power_off_and_critical_health(bmc: Bmc) -> None:
    bmc.fake.health = "Critical"
    on = await probe(spec(bmc.port, bmc.cert))
    assert on.ok and on.bmc is not None and on.bmc.health == "Critical", on
    assert "health Critical" in on.detail
    bmc.fake.power = "Off"
    off = await probe(spec(bmc.port, bmc.cert))
    assert not off.ok and off.failure is Failure.CONTENT, off
    assert off.detail.startswith("power is Off; health Critical"), off.detail
    assert off.bmc is not None and off.bmc.power_on is False and off.bmc.health == "Critical"
    bmc.fake.power = "PoweringOn"
    booting = await probe(spec(bmc.port, bmc.cert))
    assert booting.failure is Failure.CONTENT and booting.bmc is not None and booting.bmc.power_on is None


async def test_sel_entries_reported_once(bmc: Bmc) -> None:
    fake = bmc.fake
    fake.sel += [
        sel_entry("1", "Critical", "Memory ECC uncorrectable error (old)", dt.timedelta(days=3)),
        sel_entry("2", "OK", "Log area reset/cleared", dt.timedelta(hours=2)),
        sel_entry("3", "Critical", "Power Supply PS2: Failure detected", dt.timedelta(minutes=5)),
    ]
    fake.event_log.append(
        {
            "Id": "17",
            "Severity": "Warning",
            "Message": "Fan1 speed low",
            "Created": iso(dt.timedelta(hours=1)),
        }
    )
    path, state = spec(bmc.port, bmc.cert), dict[str, Any]()

    first = await probe(path, state)
    assert first.bmc is not None
    # First look: only recent critical entries (an outage in progress), not the history.
    assert [(e.record_id, e.severity, e.text) for e in first.bmc.new_events] == [
        ("3", "critical", "Power Supply PS2: Failure detected")
    ]
    assert "new critical event: Power Supply PS2: Failure detected" in first.detail

    again = await probe(path, state)
    assert again.bmc is not None and again.bmc.new_events == (), "reported once, not again"

    fake.sel.append(sel_entry("4", "Critical", "CPU1 Temp: upper critical going high", dt.timedelta(0)))
    fake.event_log.append(
        {"Id": "18", "Severity": "OK", "Message": "Fan1 speed normal", "Created": iso(dt.timedelta(0))}
    )
    later = await probe(path, state)
    assert later.bmc is not None
    got = {(e.record_id, e.severity, e.text) for e in later.bmc.new_events}
    assert got == {
        ("4", "critical", "CPU1 Temp: upper critical going high"),
        ("18", "info", "Fan1 speed normal"),
    }
    assert "(+1 more)" in later.detail

    # The log is cleared and numbering starts again at 1: a new entry "1" is still new.
    fake.sel[:] = [sel_entry("1", "Warning", "Chassis intrusion", dt.timedelta(0))]
    cleared = await probe(path, state)
    assert cleared.bmc is not None
    assert [(e.record_id, e.text) for e in cleared.bmc.new_events] == [("1", "Chassis intrusion")]
    final = await probe(path, state)
    assert final.bmc is not None and final.bmc.new_events == ()


# --------------------------------------------------------------------------- fake BMC: garbage


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("invalid-json", "not JSON"),
        ("html", "not JSON"),
        ("deep", "not JSON"),
        ("big", "answer of"),
        ("big-chunked", "larger than 512 KiB"),
        ("array", "expected an object"),
        ("members-not-list", "no Members list"),
        ("foreign-member", "usable @odata.id"),
    ],
)
async def test_garbage_systems_is_protocol_failure(bmc: Bmc, how: str, words: str) -> None:
    bmc.fake.broken["/redfish/v1/Systems"] = how
    result = await probe(spec(bmc.port, bmc.cert))
    assert not result.ok and result.failure is Failure.PROTOCOL, result
    assert words in result.detail and "/redfish/v1/Systems" in result.detail, result.detail


async def test_garbage_system_member(bmc: Bmc) -> None:
    bmc.fake.broken["/redfish/v1/Systems/1"] = "power-not-string"
    result = await probe(spec(bmc.port, bmc.cert))
    assert result.failure is Failure.PROTOCOL and "PowerState" in result.detail, result
    bmc.fake.broken["/redfish/v1/Systems/1"] = "500"
    result = await probe(spec(bmc.port, bmc.cert))
    assert result.failure is Failure.STATUS and "HTTP 500" in result.detail, result


async def test_broken_or_slow_extras_are_notes_not_failures(bmc: Bmc) -> None:
    bmc.fake.broken["/redfish/v1/Chassis/1/Thermal"] = "big"
    bmc.fake.broken["/redfish/v1/Managers/1/LogServices/SEL/Entries"] = "invalid-json"
    result = await probe(spec(bmc.port, bmc.cert))
    assert result.ok and result.bmc is not None, result
    assert "/redfish/v1/Chassis/1/Thermal: answer of" in result.detail
    assert "/redfish/v1/Managers/1/LogServices/SEL/Entries: not JSON" in result.detail
    assert {s.name for s in result.bmc.sensors} >= {"PS1", "PS2"}, "Power was still read"

    bmc.fake.slow.add("/redfish/v1/Chassis/1/Power")
    start = time.monotonic()
    late = await probe(spec(bmc.port, bmc.cert), timeout=1.0)
    took = time.monotonic() - start
    assert late.ok and "not read within the deadline" in late.detail, late
    assert 0.9 < took < 1.5, took

    bmc.fake.slow.add("/redfish/v1/Systems/1")
    start = time.monotonic()
    hung = await probe(spec(bmc.port, bmc.cert), timeout=1.0)
    assert hung.failure is Failure.TIMEOUT, hung
    assert time.monotonic() - start < 1.5


# --------------------------------------------------------------------------- sushy-emulator


def find_emulator() -> Path | None:
    """$WATCHTOWER_SUSHY_EMULATOR when set (only it: set it to a missing path to skip), else PATH, else
    the venv the lab notes use."""
    explicit = os.environ.get("WATCHTOWER_SUSHY_EMULATOR")
    candidates = (
        [explicit] if explicit else [shutil.which("sushy-emulator"), "/tmp/sushy-venv/bin/sushy-emulator"]
    )
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


EMULATOR = find_emulator()
needs_emulator = pytest.mark.skipif(
    EMULATOR is None,
    reason="sushy-emulator not found (pip install sushy-tools into a venv; set WATCHTOWER_SUSHY_EMULATOR)",
)
NODE = "27946b59-9e44-4fa7-8e91-f3527a1ef094"  # the fake system in emulator.conf.in


def bcrypt_line(python: Path) -> str:
    """An htpasswd line; sushy-tools accepts only bcrypt, which its own venv has (ours need not)."""
    code = "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())"
    out = subprocess.run([str(python), "-c", code, PASSWORD], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"cannot make a bcrypt hash with {python}: {out.stderr.strip()[-200:]}")
    return f"{USER}:{out.stdout.strip()}\n"


@dataclass
class Emulator:
    port: int
    cert: Path

    async def reset(self, reset_type: str) -> None:
        tls = ssl.create_default_context(cafile=str(self.cert))
        url = f"https://127.0.0.1:{self.port}/redfish/v1/Systems/{NODE}/Actions/ComputerSystem.Reset"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url,
                json={"ResetType": reset_type},
                headers={
                    "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                },
                ssl=tls,
            ) as response,
        ):
            assert response.status in (200, 202, 204), await response.text()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    assert EMULATOR is not None
    key, cert = make_cert(tmp_path, "sushy")
    python = EMULATOR.parent / "python"
    (tmp_path / "htpasswd").write_text(bcrypt_line(python if python.exists() else Path(sys.executable)))
    port = free_port()
    text = (PEERS / "emulator.conf.in").read_text()
    for name, value in {
        "PORT": port,
        "CERT": cert,
        "KEY": key,
        "AUTH_FILE": tmp_path / "htpasswd",
        "STATE_DIR": tmp_path / "state",
    }.items():
        text = text.replace(f"@{name}@", str(value))
    (tmp_path / "emulator.conf").write_text(text)
    log = tmp_path / "emulator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(EMULATOR), "--config", str(tmp_path / "emulator.conf")], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30.0
        tls = ssl.create_default_context(cafile=str(cert))
        while True:
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
                    tls.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sushy-emulator did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
        yield Emulator(port, cert)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@needs_emulator
async def test_emulator_power_on_health_and_thermal(emulator: Emulator) -> None:
    result = await probe(spec(emulator.port, emulator.cert, auth="basic"))
    assert result.ok and result.bmc is not None, result
    assert result.bmc.power_on is True and result.bmc.health == "OK"
    assert result.detail.startswith("power On (1 system); health OK"), result.detail
    sensors = {s.name: s for s in result.bmc.sensors}
    assert sensors["CPU Temp"].value == 41.0 and sensors["CPU Temp"].state == "ok"
    assert sensors["BaseBoard System Fan"].unit == "RPM"
    assert result.bmc.new_events == ()  # the emulator has no LogServices: absent, not an error
    assert "not present" not in result.detail and "HTTP" not in result.detail


@needs_emulator
async def test_emulator_wrong_password(emulator: Emulator) -> None:
    result = await probe(spec(emulator.port, emulator.cert, auth="basic", password="wrong-pw-123"))
    assert result.failure is Failure.ERROR and "401" in result.detail, result
    assert "wrong-pw-123" not in result.detail


@needs_emulator
@pytest.mark.slow
async def test_emulator_power_off_then_on(emulator: Emulator) -> None:
    path = spec(emulator.port, emulator.cert, auth="basic")
    assert (await probe(path)).ok
    await emulator.reset("ForceOff")
    # The fake driver applies a power change a random 1-11 s after the request.
    off, _ = await wait_probe(lambda: probe(path), lambda r: not r.ok, 20.0)
    assert not off.ok and off.failure is Failure.CONTENT, off
    assert off.detail.startswith("power is Off"), off.detail
    assert off.bmc is not None and off.bmc.power_on is False
    await emulator.reset("On")
    on, _ = await wait_probe(lambda: probe(path), lambda r: r.ok, 20.0)
    assert on.ok and on.bmc is not None and on.bmc.power_on is True, on
