"""An https path whose certificate (signed by a test CA) expires in 5 days: the http probe reports
the days left, a ``certificate`` warning opens (threshold 14 days), a metric carries the days, and
the warning goes to the warnings channel only within its hours, never to on-call at night."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from watchtower.certificates import evaluate, expiring, readings
from watchtower.config import Config, HttpPath, parse_config
from watchtower.engine.correlate import Scope
from watchtower.engine.escalation import due
from watchtower.engine.incidents import IncidentState, IncidentTracker
from watchtower.engine.paths import PathStatus
from watchtower.probes import ProbeContext
from watchtower.probes.http import CERT_EXPIRY_VALUE
from watchtower.probes.http import probe as http_probe
from watchtower.web import backups_api


def _ca_and_leaf(tmp: Path, leaf_days: int) -> tuple[Path, Path, Path]:
    """(ca.pem, leaf key, leaf cert chain) - a CA valid for years, a leaf for ``leaf_days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "watchtower test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "erp.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=leaf_days))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, key_path, cert_path = tmp / "ca.pem", tmp / "leaf.key", tmp / "leaf.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return ca_path, key_path, cert_path


@pytest.fixture
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    ca, key, cert = _ca_and_leaf(tmp_path, leaf_days=5)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ERP login")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, ca
    finally:
        await runner.cleanup()


def _config(tmp: Path, port: int, ca: Path, **warnings: object) -> Config:
    doc = {
        "site": "acme",
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"http": {"url": f"https://127.0.0.1:{port}/", "ca_file": str(ca)}}],
            }
        },
        "notify": {
            "channels": [
                {"name": "signal-oncall", "url": "json://127.0.0.1:9/", "tags": ["tier1"]},
                {"name": "mail-it", "url": "json://127.0.0.1:9/", "tags": ["tier4"]},
            ],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
            "warnings": {"notify": ["tier4"], **warnings},
        },
    }
    return parse_config(doc, tmp)


async def test_a_certificate_valid_for_5_days_raises_the_warning(
    tmp_path: Path, https_server: tuple[int, Path]
) -> None:
    port, ca = https_server
    config = _config(tmp_path, port, ca, hours="Mon-Fri 08:00-18:00", timezone="Europe/Berlin")
    (path,) = config.paths
    assert isinstance(path.spec, HttpPath)
    result = await http_probe(path.spec, ProbeContext(timeout=5.0))
    assert result.ok, result.detail
    days = dict(result.values)[CERT_EXPIRY_VALUE]
    assert 4.9 < days <= 5.0

    status = PathStatus(path)
    status.observe(result, time.time())
    found = readings([status])
    assert [(r.target, r.path) for r in found] == [("erp1", path.name)]
    (metric,) = backups_api.collectors(None, {path.key: status})
    assert metric.name == "watchtower_tls_cert_expiry_days"
    (sample,) = metric.samples
    assert sample.labels == {"target": "erp1", "path": path.name} and 4.9 < sample.value <= 5.0
    tracker = IncidentTracker()
    # a Tuesday 03:00 in Berlin: the warning opens, but nobody is told at night
    night = dt.datetime(2026, 12, 8, 3, 0, tzinfo=dt.UTC).timestamp() - 3600
    changes = evaluate(tracker, found, night)
    assert [c.kind for c in changes] == ["opened"]
    (incident,) = tracker.open_incidents()
    assert incident.scope is Scope.CERTIFICATE
    assert "expires in 4 days" in incident.evidence[0] and "erp1" in incident.evidence[0]
    assert due(incident, config, night, set(), set()) == []
    assert evaluate(tracker, found, night + 60) == []  # the same day count: nothing new
    # 09:00 the same Tuesday: one message, to the warnings channel only
    morning = night + 6 * 3600
    (step,) = due(incident, config, morning, set(), set())
    assert step.step == "warning" and step.channels == ("mail-it",)
    assert due(incident, config, morning + 60, {"warning"}, {"mail-it"}) == []

    # renewed: cleared, and the clearing goes out within hours too
    renewed = [type(found[0])(found[0].target, found[0].path, 89.0, 14.0)]
    assert [c.kind for c in evaluate(tracker, renewed, morning + 120)] == ["resolved"]
    incident = tracker.incidents[incident.id]  # a frozen value: the tracker holds the new one
    assert incident.state is IncidentState.RESOLVED
    (step,) = due(incident, config, morning + 120, {"warning"}, {"mail-it"})
    assert step.step == "resolve:0" and step.channels == ("mail-it",)


def test_threshold_and_zero_disable() -> None:
    from watchtower.certificates import CertReading

    assert expiring(CertReading("t", "p", 20.0, 14.0)) is None
    assert expiring(CertReading("t", "p", 5.0, 0.0)) is None
    assert "has expired" in (expiring(CertReading("t", "p", -1.0, 14.0)) or "")
    assert "less than a day" in (expiring(CertReading("t", "p", 0.5, 14.0)) or "")


def test_a_warning_cleared_before_anyone_was_told_sends_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, 443, Path("/etc/ssl/certs/ca-certificates.crt"), hours="Mon-Fri 08:00-18:00")
    tracker = IncidentTracker()
    sunday = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC).timestamp()
    tracker.raise_warning(Scope.CERTIFICATE, "erp1 x", "expires", ["expires"], sunday)
    (incident,) = tracker.open_incidents()
    assert due(incident, config, sunday, set(), set()) == []
    tracker.clear_warning(Scope.CERTIFICATE, "erp1 x", "renewed", sunday + 60)
    monday = sunday + 21 * 3600
    assert due(tracker.incidents[incident.id], config, monday, set(), set()) == []
