"""Helpers the tests share (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchtower.lab.sinks import free_port, wait_for

__all__ = ["Service", "free_port", "make_cert", "stop_process", "until", "wait_for"]


class Service:
    """A TCP service on 127.0.0.1 that a test can kill and bring back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def up(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None


def until(predicate: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    """The blocking twin of ``wait_for`` for tests that drive a subprocess: poll ``predicate``
    until it returns something truthy; on timeout fail with the tail of ``log`` (the daemon's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = f": {log.read_text()[-3000:]}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> bool:
    """SIGTERM a process the test started, by its PID; SIGKILL it if that does not work within
    ``timeout``. True when SIGTERM was enough."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return False


def make_cert(tmp: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, like those BMCs and hypervisors ship with:
    (key, cert). ``days`` < 0 gives one that expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.test")])
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if days < 0 else (
        now - dt.timedelta(days=1), now + dt.timedelta(days=days))  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp / f"{name}.key", tmp / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
