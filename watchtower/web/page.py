"""The status page: the plan that stays reachable when the file server holding the plan is down.

Server-rendered (Jinja2, autoescaped), no JavaScript, refreshes itself. Reads only what the
web app hands it (the state document, incident documents, the config), so it renders the same
in a unit test as in the daemon. Sections, in the order a stressed person needs them:

1. the **banner**: the verdict in words (what is down since when, what the BMC says, how much is
   affected, how much of the tightest RTO is left), or that the monitor itself is blind;
2. **open incidents** with an acknowledge form;
3. the **restore board**: the services the open incidents took down, in restore order (the
   config's ``service.restore_order`` first, else the playbook's dependency order guessed from
   role and names), each with its live state, RTO left and runbook;
4. the targets by role with their paths;
5. **contacts**: the escalation matrix (channel *names*; their URLs are secrets) and the
   runbook, vendor contact and service tag of every target in an open incident.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, get_args

import jinja2

from watchtower.config import NOTE_KINDS, Config, RestoreCategory, Target
from watchtower.durations import coarse
from watchtower.engine.correlate import WARNING_SCOPES
from watchtower.engine.escalation import channels_for, outage_start, rto_clock
from watchtower.engine.incidents import Incident

ROLE_ORDER = ("network", "hypervisor", "storage", "vm", "service")
ROLE_TITLES = {"network": "Network", "hypervisor": "Hypervisors", "storage": "Storage", "vm": "VMs",
               "service": "Services"}  # fmt: skip
SCOPE_ORDER = ("monitor", "network", "hypervisor", "storage", "vm", "service", "backup", "certificate")
WARNING_SCOPE_NAMES = frozenset(str(s) for s in WARNING_SCOPES)
_SEVERITY = {"down": 0, "unreachable": 1, "degraded": 2, "unknown": 3, "up": 4}

CAUSE_WORDS = {
    "power_off": "BMC: power off",
    "hardware_fault": "BMC: hardware fault",
    "os_unresponsive": "BMC: power on, OS not answering",
    "bmc_unreachable": "BMC unreachable",
}
_ROLE_NOUN = {
    "network": ("network device", "network devices"),
    "hypervisor": ("hypervisor", "hypervisors"),
    "storage": ("storage system", "storage systems"),
    "vm": ("VM", "VMs"),
    "service": ("service", "services"),
}

# The playbook's restore order (phase 3). Without a configured restore_order, a service's place
# is guessed from its target's role and from words in its service and target names.
CATEGORIES: tuple[str, ...] = get_args(RestoreCategory)
_CATEGORY_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infrastructure", ("dns", "dhcp", "ntp")),
    ("directory", ("ad", "dc", "directory", "ldap", "domain")),
    ("storage", ("file", "nas", "share", "storage")),
    ("mail", ("mail", "exchange", "smtp")),
    ("line-of-business", ("erp", "crm", "sql", "db", "lob")),
)
# Words this short only count as a whole word ("ad" is not in "read", "db" not in "mariadb"...);
# longer ones also inside one ("fileserver", "dnsmasq", "postgresql").
_WHOLE_WORD = 3


def category_of(target_name: str, target: Target) -> str:
    """The restore category of a target's service: as configured, else from its role and its names."""
    if target.service is not None and target.service.category is not None:
        return target.service.category
    if target.role == "storage":
        return "storage"
    names = [target.service.name] if target.service is not None else []
    for text in (*names, target_name):
        words = re.findall(r"[a-z]+", text.lower())
        for category, keys in _CATEGORY_WORDS:
            for key in keys:
                if any(w == key or (len(key) >= _WHOLE_WORD and key in w) for w in words):
                    return category
    return "secondary"


span = coarse  # 1h12m, 45m, 30s: as a person reads it on a phone


def _parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def clock(ts: float | None, now: float) -> str:
    """02:14 UTC, with the date when it is not today."""
    if ts is None:
        return "?"
    at = datetime.fromtimestamp(ts, UTC)
    today = datetime.fromtimestamp(now, UTC).date()
    return at.strftime("%H:%M UTC") if at.date() == today else at.strftime("%Y-%m-%d %H:%M UTC")


def is_link(text: str | None) -> bool:
    """Only http(s) URLs become links: a ``javascript:`` runbook stays text."""
    return bool(text) and re.match(r"https?://[^\s]+$", text or "", re.IGNORECASE) is not None


def page_incident(document: dict[str, Any], incident: Incident, config: Config | None) -> dict[str, Any]:
    """An incident document plus what the page derives from the live objects: the RTO clock,
    the outage's start and when each affected target came back."""
    out = dict(document)
    out["outage_start"] = outage_start(incident)
    clock_ = rto_clock(incident, config) if config is not None else None
    out["rto"] = (
        None
        if clock_ is None
        else {
            "service": clock_.service,
            "target": clock_.target,
            "rto": clock_.rto,
            "started_at": clock_.started_at,
        }
    )
    back: dict[str, float] = {}
    for event in incident.timeline:
        if event.kind == "back":
            name = event.text.removesuffix(" is back")
            back.setdefault(name, event.at)
    out["back_at"] = back
    return out


def _affected_words(affected: Iterable[str], roles: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for name in affected:
        role = roles.get(name, "service")
        counts[role] = counts.get(role, 0) + 1
    parts = []
    for role in ROLE_ORDER:
        n = counts.get(role, 0)
        if n:
            one, many = _ROLE_NOUN[role]
            parts.append(f"{n} {one if n == 1 else many}")
    return f"{' + '.join(parts)} affected" if parts else ""


def _rto_words(rto: dict[str, Any] | None, now: float) -> str:
    if rto is None:
        return ""
    left = rto["started_at"] + rto["rto"] - now
    if left >= 0:
        return f"RTO clock {rto['service']} {span(left)} left"
    return f"RTO {rto['service']} exceeded by {span(-left)}"


def banner_for(doc: dict[str, Any], incidents: list[dict[str, Any]], now: float) -> tuple[str, str]:
    """(text, colour) of the banner: the verdict in one line."""
    roles = {name: t["role"] for name, t in doc["targets"].items()}
    if doc["vantage"] == "down":
        blind = next((i for i in incidents if i["scope"] == "monitor"), None)
        since = f" since {clock(_parse_iso(blind['opened_at']), now)}" if blind else ""
        return (
            f"watchtower is cut off{since}: its own uplink is down, target states are not trustworthy",
            "#5f6368",
        )
    warnings = [i for i in incidents if i["scope"] in WARNING_SCOPE_NAMES]
    incidents = [i for i in incidents if i["scope"] not in WARNING_SCOPE_NAMES]
    if incidents:
        first = incidents[0]
        start = first.get("outage_start") or _parse_iso(first.get("first_failure_at") or first["opened_at"])
        parts = [f"{first['scope']} {first['root']} down since {clock(start, now)}"]
        if first.get("cause"):
            parts.append(CAUSE_WORDS.get(first["cause"], str(first["cause"])))
        parts.append(_affected_words(first["affected"], roles))
        parts.append(_rto_words(first.get("rto"), now))
        text = ", ".join(p for p in parts if p)
        if len(incidents) > 1:
            more = len(incidents) - 1
            text += f" (+{more} more incident{'s' if more > 1 else ''})"
        if first["state"] == "acknowledged" and first.get("acknowledged_by"):
            text += f" · acknowledged by {first['acknowledged_by']}"
        return text, "#b3261e"
    targets = [{"name": name, **t} for name, t in doc["targets"].items()]
    bad = sorted((t for t in targets if t["state"] in ("down", "unreachable", "degraded")),
                 key=lambda t: _SEVERITY[t["state"]])  # fmt: skip
    if bad:
        worst = bad[0]
        others = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return (
            f"{worst['role']} {worst['name']} {worst['state']}{others}",
            "#b3261e" if worst["state"] != "degraded" else "#b06000",
        )
    if warnings:  # a stale backup or an expiring certificate: not an outage, not red
        first_text = (warnings[0].get("evidence") or [warnings[0]["root"]])[0]
        extra = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
        return f"all targets up; warning: {first_text}{extra}", "#b06000"
    return "all targets up", "#137333"


def restore_board(
    doc: dict[str, Any],
    incidents: list[dict[str, Any]],
    config: Config,
    now: float,
    restore_points: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The services the open incidents took down, in the order they should come back.
    ``restore_points``: target -> what a restore loses now (the backup watch's newest points)."""
    rows: dict[str, dict[str, Any]] = {}
    for incident in incidents:
        if incident["scope"] == "monitor" or incident["scope"] in WARNING_SCOPE_NAMES:
            continue
        start = incident.get("outage_start") or _parse_iso(
            incident.get("first_failure_at") or incident["opened_at"]
        )
        for name in (incident["root"], *incident["affected"]):
            target = config.targets.get(name)
            if target is None or target.service is None or name in rows:
                continue
            service = target.service
            category = category_of(name, target)
            rank = CATEGORIES.index(category) + 1  # the playbook's step number
            state = doc["targets"].get(name, {}).get("state", "unknown")
            back_at = incident.get("back_at", {}).get(name)
            row: dict[str, Any] = {
                "service": service.name,
                "target": name,
                "category": category,
                "order": service.restore_order,
                "key": (
                    service.restore_order if service.restore_order is not None else rank,
                    rank,
                    service.name.lower(),
                    name,
                ),
                "state": state,
                "state_text": state,
                "rto_text": "no RTO set",
                "rto_class": "unknown",
                "rpo": span(service.rpo) if service.rpo is not None else None,
                "runbook": target.runbook,
                "runbook_link": is_link(target.runbook),
                "restore_point": (restore_points or {}).get(name),
            }
            if state == "up":
                row["state_text"] = "back, smoke probes pass" + (
                    f" since {clock(back_at, now)}" if back_at is not None else ""
                )
            if service.rto is not None and start is not None:
                deadline = start + service.rto
                if state == "up":
                    took = (back_at if back_at is not None else now) - start
                    met = took <= service.rto
                    row["rto_text"] = (
                        f"RTO {span(service.rto)}: met, back after {span(took)}" if met
                        else f"RTO {span(service.rto)}: missed by {span(took - service.rto)}"
                    )  # fmt: skip
                    row["rto_class"] = "up" if met else "down"
                elif now <= deadline:
                    row["rto_text"] = f"RTO {span(service.rto)}: {span(deadline - now)} left"
                    row["rto_class"] = "degraded" if deadline - now < service.rto / 4 else "up"
                else:
                    row["rto_text"] = f"RTO {span(service.rto)}: exceeded by {span(now - deadline)}"
                    row["rto_class"] = "down"
            rows[name] = row
    board = sorted(rows.values(), key=lambda r: r["key"])
    for n, row in enumerate(board, 1):
        row["position"] = n
    return board


def contacts(
    config: Config, incidents: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(escalation steps, targets with runbook/vendor details) — channel names only, never URLs."""
    policy = config.notify
    steps = []
    for n, step in enumerate(policy.escalation, 1):
        if step.after is not None:
            when = "at once" if step.after == 0 else f"after {span(step.after)}"
        else:
            assert step.rto_fraction is not None
            when = f"at {step.rto_fraction:.0%} of the smallest RTO"
        if step.unless:
            when += f", unless {step.unless}"
        if step.when is not None:
            only = [*step.when.scope, *step.when.cause]
            when += f", only for {' / '.join(only)}"
        people = [f"{c} (on call)" if c in config.contacts and config.contacts[c].on_call else c
                  for c in step.contacts]  # fmt: skip
        reach = [*step.notify, *step.contacts]
        for c in step.contacts:
            if c in config.contacts:
                reach += config.contacts[c].channels
        steps.append(
            {
                "n": n,
                "when": when,
                "tags": [*step.notify, *people],
                "channels": list(channels_for(policy, reach)),
            }
        )
    seen: list[str] = []
    for incident in incidents:
        for name in (incident["root"], *incident["affected"]):
            if name not in seen and name in config.targets:
                seen.append(name)
    details = []
    for name in seen:
        t = config.targets[name]
        if t.runbook or t.vendor_contact or t.service_tag or t.description:
            details.append({
                "name": name,
                "role": t.role,
                "description": t.description,
                "service_tag": t.service_tag,
                "vendor_contact": t.vendor_contact,
                "vendor_link": is_link(t.vendor_contact),
                "runbook": t.runbook,
                "runbook_link": is_link(t.runbook),
            })  # fmt: skip
    return steps, details


@functools.cache
def templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("watchtower.web", "templates"),
        autoescape=True,  # target, service and path names come from the config: render them as text
        undefined=jinja2.StrictUndefined,
    )


def render_status_page(
    doc: dict[str, Any],
    incidents: list[dict[str, Any]] | None = None,
    *,
    config: Config | None = None,
    now: float | None = None,
    logout: bool = False,
    restore_points: Mapping[str, str] | None = None,
    readiness: Mapping[str, Any] | None = None,
    mutes: dict[str, Any] | None = None,
    people: list[dict[str, Any]] | None = None,
    drill: dict[str, Any] | None = None,
) -> str:
    """The server-rendered status page: works without JavaScript, refreshes itself.

    ``incidents`` are open incident documents, best passed through :func:`page_incident` (RTO
    clock, restore times); ``config`` adds the restore board and contacts; ``logout`` a
    logout button (the page was opened with a login cookie); ``people`` the contacts with their
    drill results (:func:`people_rows`), ``drill`` the latest drill's document.
    """
    now = time.time() if now is None else now
    targets = [{"name": name, **t} for name, t in doc["targets"].items()]
    incidents = sorted(
        incidents or [],
        key=lambda i: (SCOPE_ORDER.index(i["scope"]) if i["scope"] in SCOPE_ORDER else 99, i["id"]),
    )
    banner, color = banner_for(doc, incidents, now)
    counts: dict[str, int] = {}
    for t in targets:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    groups = [(role, [t for t in targets if t["role"] == role]) for role in ROLE_ORDER]
    for i in incidents:
        i.setdefault("evidence", [])
        for key, empty in (("staff", None), ("checklist", []), ("notes", [])):
            i.setdefault(key, empty)
        i["since_text"] = clock(i.get("outage_start") or _parse_iso(i.get("opened_at")), now)
        acked_at = clock(_parse_iso(i.get("acknowledged_at")), now)
        i["ack_text"] = (
            f"acknowledged by {i.get('acknowledged_by')} at {acked_at}"
            if i["state"] == "acknowledged"
            else ""
        )
        i["rto_text"] = _rto_words(i.get("rto"), now)
    board = restore_board(doc, incidents, config, now, restore_points) if config is not None else []
    steps, details = contacts(config, incidents) if config is not None else ([], [])
    return (
        templates()
        .get_template("status.html")
        .render(
            site=doc["site"],
            banner=banner,
            banner_short=banner.split(",")[0].split(":")[0],
            banner_color=color,
            vantage=doc["vantage"],
            counts=", ".join(
                f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: _SEVERITY.get(kv[0], 9))
            ),
            groups=[(role, ts) for role, ts in groups if ts],
            generated=(doc["generated_at"] or "")[:19].replace("T", " "),
            role_titles=ROLE_TITLES,
            incidents=incidents,
            board=board,
            has_config=config is not None,
            steps=steps,
            details=details,
            logout=logout,
            readiness=readiness,
            mutes=mutes,
            people=people or [],
            note_kinds=NOTE_KINDS,
            drill=drill,
        )
    )


def render_login_page(site: str, error: str | None = None) -> str:
    return templates().get_template("login.html").render(site=site, error=error)


def people_rows(
    config: Config, verification: Sequence[Any], drill: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Contacts as the page shows them: how to reach them, and what the last drill said."""
    latest = {c["contact"]: c for c in drill["contacts"]} if drill else {}
    rows = []
    for v in verification:
        contact = config.contacts.get(v.contact)
        if contact is None:
            continue
        in_drill = latest.get(v.contact)
        result = v.last_result
        if in_drill is not None and drill is not None and drill["state"] == "running":
            result = "drill running: " + (
                "confirmed" if in_drill["confirmed_at"] else "waiting for confirmation"
            )
        rows.append(
            {
                "name": contact.name or v.contact,
                "role": contact.role or "",
                "phone": contact.phone,
                "available": contact.available,
                "timezone": contact.timezone,
                "on_call": contact.on_call,
                "channels": contact.channels,
                "drill_result": result,
                "last_verified": _stamp(v.last_verified),
                "overdue": v.overdue,
            }
        )
    return rows


def _stamp(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
