"""The recovery plan export: self-contained HTML with a print stylesheet, a two-page A4 PDF printed
by headless Chromium (rendered back to PNG with pdftoppm and checked for ink on both pages), a
vCard the phones import; and `watchtower readiness` / `restore-test record` from the command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchtower.backups.watch import BackupStatus
from watchtower.config import load_config
from watchtower.plan import contacts, plan_document, render_html, render_pdf, render_vcard

REPO = Path(__file__).resolve().parents[2]
NOW = time.time()


def _site(tmp: Path, complete: bool = False) -> Path:
    (tmp / "pw").write_text("restic-password-9876")
    (tmp / "state").mkdir(exist_ok=True)
    erp: dict[str, Any] = {
        "name": "ERP",
        "rto": "4h",
        "rpo": "1h",
        "owner": "Anna Schmidt +49 171 2345678",
        "backups": [
            {
                "name": "erp-restic",
                "restic": {
                    "repository": "rest:https://backup:s3cr3t@backup.example:8000/erp",
                    "password_file": "pw",
                },
                "kept_at": "safe in the CEO's office, envelope 3",
            }
        ],
    }
    if complete:
        erp["backups"] = [
            {"name": "erp-push", "push": {"token": "tok-12345678"}, "kept_at": "password manager"}
        ]
        erp["restore_tests"] = [
            {"date": time.strftime("%Y-%m-%d", time.gmtime(NOW - 30 * 86400)), "duration": "2h"}
        ]
    doc = {
        "site": "acme-hq",
        "state_dir": str(tmp / "state"),
        "targets": {
            "pve1": {
                "role": "hypervisor",
                "paths": [{"icmp": "10.213.16.11"}],
                "service_tag": "CZJ1234ABC",
                "vendor_contact": "HPE support +49 7031 450 7000, contract 1234-5678",
                "warranty_until": "2029-06-30",
            },
            "erp1": {"role": "vm", "runs_on": "pve1", "paths": [{"icmp": "10.213.16.23"}], "service": erp},
        },
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _backups() -> dict[str, BackupStatus]:
    return {
        "erp-restic": BackupStatus(
            "erp-restic", "erp1", "ERP", "restic", NOW, True, "", NOW - 5 * 3600, None, 12
        )
    }


def test_html_is_self_contained_and_says_what_matters(tmp_path: Path) -> None:
    config = load_config(_site(tmp_path))
    html = render_html(config, _backups(), NOW)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "loads something from elsewhere"
    assert "<script" not in html
    assert "@page { size: A4" in html and "@media print" in html
    needles = ("ERP", "Anna Schmidt", "+49 171 2345678", "CZJ1234ABC", "+49 7031 450 7000", "5h old",
               "safe in the CEO&#39;s office, envelope 3", "Hypervisor down",
               "Restore in the order")  # fmt: skip
    for needle in needles:
        assert needle in html, needle
    assert "s3cr3t" not in html and "backup:" not in html and "restic-password" not in html
    assert "rest:https://backup.example:8000/erp" in html
    doc = plan_document(config, _backups(), NOW)
    assert [s["service"] for s in doc["services"]] == ["ERP"]


def test_vcard_has_one_card_per_contact_with_a_phone(tmp_path: Path) -> None:
    config = load_config(_site(tmp_path))
    card = render_vcard(config)
    assert card.count("BEGIN:VCARD") == 2 and card.count("END:VCARD") == 2
    assert "VERSION:3.0\r\n" in card
    assert "FN:Anna Schmidt\r\n" in card and "TEL;TYPE=VOICE:+49 171 2345678\r\n" in card
    # commas are escaped (RFC 2426), the contract number is not taken for a phone
    assert "FN:HPE support\\, contract 1234-5678\r\n" in card
    assert "TEL;TYPE=VOICE:+49 7031 450 7000\r\n" in card and "TEL;TYPE=VOICE:1234" not in card
    assert [c.phones for c in contacts(config)] == [("+49 171 2345678",), ("+49 7031 450 7000",)]


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("pdftoppm") is None,
                    reason="needs chromium and poppler-utils (scripts/bootstrap.sh --tests)")  # fmt: skip
def test_pdf_is_two_a4_pages_with_ink_on_both(tmp_path: Path) -> None:
    config = load_config(_site(tmp_path))
    pdf = render_pdf(render_html(config, _backups(), NOW))
    assert pdf.startswith(b"%PDF")
    (tmp_path / "plan.pdf").write_bytes(pdf)
    info = subprocess.run(["pdfinfo", str(tmp_path / "plan.pdf")], capture_output=True, text=True, check=True)
    assert re.search(r"Pages:\s+2\n", info.stdout), info.stdout
    assert "(A4)" in info.stdout
    # rendered back to pixels (binary PGM: "P5 W H 255" then one byte a pixel) to look for ink
    pdf_path, prefix = str(tmp_path / "plan.pdf"), str(tmp_path / "page")
    subprocess.run(["pdftoppm", "-r", "50", "-gray", pdf_path, prefix], check=True)
    pages = sorted(tmp_path.glob("page-*.pgm"))
    assert len(pages) == 2
    for page in pages:
        magic, width, height, _, pixels = page.read_bytes().split(maxsplit=4)
        assert magic == b"P5" and int(width) < int(height)  # portrait
        dark = sum(1 for px in pixels if px < 128)
        assert dark > 500, f"{page.name} is (nearly) blank"  # a blank page has none
    text = subprocess.run(
        ["pdftotext", str(tmp_path / "plan.pdf"), "-"], capture_output=True, text=True
    ).stdout
    assert "Recovery plan" in text and "First steps" in text and "CZJ1234ABC" in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchtower", *args], capture_output=True, text=True, timeout=120
    )


def test_readiness_on_the_example_config_names_every_missing_item_and_exits_1() -> None:
    out = _cli("readiness", "-c", str(REPO / "config" / "watchtower.example.yaml"), "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["level"] == "red" and 0 <= report["score"] < 100
    for service in report["services"]:
        names = {i["name"]: i["level"] for i in service["items"]}
        assert names["backup"] == "red" and names["restore_test"] == "red"
        assert names["contacts"] == "amber"
    text = _cli("readiness", "-c", str(REPO / "config" / "watchtower.example.yaml")).stdout
    assert "no backup configured" in text and "never restore-tested" in text and "RED" in text


def test_readiness_complete_site_exits_0_after_a_push_and_restore_test(tmp_path: Path) -> None:
    cfg = _site(tmp_path, complete=True)
    out = _cli("readiness", "-c", str(cfg))
    assert out.returncode == 1 and "erp-push has not reported yet" in out.stdout
    # the job pushed an hour ago (the daemon's file), and a restore test is recorded from the CLI
    (tmp_path / "state" / "backup-pushes.json").write_text(
        json.dumps({"erp-push": {"newest": time.time() - 1800, "read_at": time.time() - 1800, "count": 1}})
    )
    rec = _cli("restore-test", "record", "erp1", "-c", str(cfg), "--duration", "1h30m", "--note", "drill")
    assert rec.returncode == 0, rec.stderr
    assert "recorded: ERP restored" in rec.stdout
    bad = _cli("restore-test", "record", "erp1", "-c", str(cfg), "--duration", "soon")
    assert bad.returncode == 2 and "duration" in bad.stderr
    unknown = _cli("restore-test", "record", "nope", "-c", str(cfg))
    assert unknown.returncode == 2 and "erp1" in unknown.stderr
    out = _cli("readiness", "-c", str(cfg), "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout
    (erp,) = report["services"]
    items = {i["name"]: i for i in erp["items"]}
    assert items["restore_test"]["level"] == "green" and "1h30m" in items["restore_test"]["text"]
    assert items["backup"]["level"] == "green"
    assert items["contacts"]["level"] == "amber"  # no contacts section yet: not configured, not red
