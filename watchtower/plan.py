"""The recovery plan, where people are: two A4 pages (HTML, PDF) and a vCard of the contacts.

The plan that matters is the one on the phones and on paper the day the server with the wiki on it
is dead. ``watchtower plan export`` writes it from the config (restore order with owners, contacts
and availability, first steps per scenario from the playbook, service tags and vendor numbers,
where the backups are and how old they were at export); ``plan.distribute`` sends it as an
attachment through the channels that take attachments (mail, Signal), once per period.

Self-contained: one HTML file with its styles inline and a print stylesheet (two A4 pages); the
PDF is that page printed by headless Chromium (``chromium --headless --print-to-pdf``), an
optional system dependency: without it the PDF is refused with a clear message, HTML and vCard
still work. No secret goes in: repository URLs lose their user info, passwords stay in files.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watchtower.backups.watch import BackupStatus
from watchtower.config import Config
from watchtower.durations import coarse
from watchtower.web.page import CATEGORIES, category_of, templates

# international (+49 ...) or national (0171 ...) numbers; a contract number like 1234-5678 is not one
PHONE = re.compile(r"(?:\+|(?<!\d)0)\d[\d ()/.-]{4,}\d")

# First steps per scenario, from the playbook (shared/spec/PLAYBOOK.md phases 1-3), as the
# alerts give them (watchtower/notify/messages.py `_steps`).
SCENARIOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Any outage, first 15 minutes",
        (
            "Confirm over a second, independent path (ping, web UI) before acting",
            "Scope it: hypervisor, storage, network or one VM? The status page says which",
            "Start the incident log outside the affected systems (this sheet, a phone)",
            "No repair attempts before diagnosis; nobody reboots storage because it helped before",
        ),
    ),
    (
        "Hypervisor down",
        (
            "Check its BMC / remote console before touching it",
            "Do not hard-power-off if avoidable (write caches)",
            "Chassis off: check PSU, PDU, UPS; hung OS: photograph the console before any reset",
            "Hardware: collect the SEL, open a vendor case with the service tag (below)",
        ),
    ),
    (
        "Storage down",
        (
            "RAID: read first, swap no disk before the order is clear",
            "VMs on it may have I/O errors or read-only disks: do not repair them yet",
            "Collect SMART and storage logs, open a vendor case with the service tag",
        ),
    ),
    (
        "Network / switch down",
        (
            "What is behind it is unreachable, not necessarily down: fix the path first",
            "Check power, link LEDs, which ports are down; the uplink to the monitor",
        ),
    ),
    (
        "Many unrelated services at once (security incident?)",
        (
            "Isolate: switch port, VLAN, cable; disable Wi-Fi at the site",
            "Do NOT restore from backups yet: they may bring compromised data back",
            "Consider forensic images before repairs; call the cyber insurer / police",
        ),
    ),
    (
        "Restoring",
        (
            "Restore in the order of page 1: DNS/DHCP/NTP, directory, storage, mail, line-of-business, rest",
            "Status update every 30-60 minutes; keep a restore log (what came back from where, when)",
            "Smoke-test each system (log in, a few typical actions) before people are let back on",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Contact:
    name: str
    role: str
    phones: tuple[str, ...]
    availability: str = ""


def _no_userinfo(location: str) -> str:
    """A repository location fit for paper: ``rest:https://user:pw@host/x`` loses ``user:pw@``."""
    return re.sub(r"//[^/@\s]*@", "//", location)


def _location(backup: Any) -> str:
    src = backup.spec.source
    if src.kind in ("restic", "borg"):
        return f"{src.kind} {_no_userinfo(src.repository)}"
    if src.kind == "pbs":
        return f"PBS {urlsplit(src.url).hostname} datastore {src.datastore} {src.backup_type}/{src.backup_id}"
    return "pushed by the backup job"


def contacts(config: Config) -> list[Contact]:
    """Who to call: ``config.contacts`` when the config has them (issue 17), else the service
    owners and the vendor contacts, phone numbers picked out of the text."""
    given = getattr(config, "contacts", None)
    out: list[Contact] = []
    if given:
        rows = given.items() if isinstance(given, dict) else ((getattr(c, "name", "?"), c) for c in given)
        for name, c in rows:
            phones = tuple(str(p) for p in (getattr(c, "phones", None) or [getattr(c, "phone", "")]) if p)
            out.append(
                Contact(
                    str(name), str(getattr(c, "role", "") or ""), phones, str(getattr(c, "hours", "") or "")
                )
            )
        return out
    seen = set()
    for tname, t in config.targets.items():
        if t.service is not None and t.service.owner and t.service.owner not in seen:
            seen.add(t.service.owner)
            out.append(_from_text(t.service.owner, f"owner of {t.service.name}"))
        if t.vendor_contact and t.vendor_contact not in seen:
            seen.add(t.vendor_contact)
            out.append(_from_text(t.vendor_contact, f"vendor support ({tname})"))
    return out


def _from_text(text: str, role: str) -> Contact:
    phones = tuple(m.group(0).strip() for m in PHONE.finditer(text))
    name = re.sub(r"\s+([,;])", r"\1", " ".join(PHONE.sub("", text).split())).strip(" ,;:-") or role
    return Contact(name, role, phones)


def plan_document(config: Config, backups: dict[str, BackupStatus], now: float) -> dict[str, Any]:
    """Everything the two pages show, as plain data (also what the tests look at)."""
    services: list[dict[str, Any]] = []
    for tname, t in config.targets.items():
        if t.service is None:
            continue
        svc = t.service
        category = category_of(tname, t)
        host = config.targets.get(t.runs_on) if t.runs_on else None
        rank = CATEGORIES.index(category) + 1  # the playbook's restore step
        order = svc.restore_order if svc.restore_order is not None else rank
        services.append(
            {
                "service": svc.name,
                "target": tname,
                "key": (order, CATEGORIES.index(category), svc.name.lower()),
                "category": category,
                "rto": coarse(svc.rto) if svc.rto else "not set",
                "rpo": coarse(svc.rpo) if svc.rpo else "not set",
                "owner": svc.owner or "",
                "runs_on": t.runs_on or "",
                "service_tag": t.service_tag or (host.service_tag if host else None) or "",
            }
        )  # fmt: skip
    services.sort(key=lambda s: (s["key"][0], s["key"][1], s["key"][2]))
    hardware = [
        {"target": n, "role": t.role, "service_tag": t.service_tag or "", "vendor": t.vendor_contact or "",
         "warranty": str(t.warranty_until or "")}
        for n, t in config.targets.items()
        if t.role in ("hypervisor", "storage", "network") and (t.service_tag or t.vendor_contact)
    ]  # fmt: skip
    backup_rows = []
    for b in config.backups:
        status = backups.get(b.name)
        newest = status.newest if status is not None else None
        age = f"{coarse(now - newest)} old" if newest is not None else "unknown"
        if status is not None and status.ok is False:
            age = f"unreadable at export ({status.detail[:80]})"
        backup_rows.append(
            {
                "service": b.service,
                "name": b.name,
                "where": _location(b),
                "kept_at": b.spec.kept_at or "not written down",
                "age": age,
                "rpo": coarse(b.max_age) if b.max_age else "-",
            }
        )
    channels = [{"name": c.name, "tags": ", ".join(c.tags)} for c in config.notify.channels]
    return {
        "site": config.site,
        "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now)),
        "services": services,
        "contacts": [_contact_dict(c) for c in contacts(config)],
        "scenarios": SCENARIOS,
        "hardware": hardware,
        "backups": backup_rows,
        "channels": channels,
        "status_url": config.notify.status_url or "",
    }


def _contact_dict(c: Contact) -> dict[str, Any]:
    return {"name": c.name, "role": c.role, "phones": c.phones, "availability": c.availability}


def render_html(config: Config, backups: dict[str, BackupStatus], now: float) -> str:
    doc = plan_document(config, backups, now)
    return templates().get_template("plan.html").render(**doc)


def _vcard_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace(",", "\\,").replace(";", "\\;")


def render_vcard(config: Config) -> str:
    """vCard 3.0 (RFC 2426), one card per contact with a phone number: what phones import."""
    cards = []
    for c in contacts(config):
        if not c.phones:
            continue
        lines = [
            "BEGIN:VCARD",
            "VERSION:3.0",
            f"FN:{_vcard_escape(c.name)}",
            f"N:{_vcard_escape(c.name)};;;;",
            f"ORG:{_vcard_escape(config.site)}",
            f"TITLE:{_vcard_escape(c.role)}",
            *(f"TEL;TYPE=VOICE:{_vcard_escape(p)}" for p in c.phones),
        ]
        if c.availability:
            lines.append(f"NOTE:{_vcard_escape('reachable ' + c.availability)}")
        lines.append("END:VCARD")
        cards.append("\r\n".join(lines))
    return "\r\n".join(cards) + ("\r\n" if cards else "")


class PdfUnavailable(Exception):
    """No headless Chromium to print with."""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render_pdf(html: str, timeout: float = 120.0) -> bytes:
    """Print the HTML with headless Chromium (blocking: call it in a thread)."""
    exe = chromium()
    if exe is None:
        raise PdfUnavailable(
            "PDF needs headless Chromium (Debian: apt-get install chromium); html and vcard work without it"
        )
    with tempfile.TemporaryDirectory(prefix="watchtower-plan-") as tmp:
        src, out = Path(tmp) / "plan.html", Path(tmp) / "plan.pdf"
        src.write_text(html, encoding="utf-8")
        argv = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
            f"--user-data-dir={tmp}/profile", f"--print-to-pdf={out}", src.as_uri(),
        ]  # fmt: skip
        try:
            subprocess.run(argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PdfUnavailable(f"chromium did not print within {timeout:g}s") from None
        if not out.is_file() or out.stat().st_size == 0:
            raise PdfUnavailable("chromium printed no PDF")
        return out.read_bytes()


async def export(config: Config, fmt: str, backups: dict[str, BackupStatus], now: float) -> bytes:
    if fmt == "vcard":
        return render_vcard(config).encode()
    html = render_html(config, backups, now)
    if fmt == "html":
        return html.encode()
    return await asyncio.to_thread(render_pdf, html)
