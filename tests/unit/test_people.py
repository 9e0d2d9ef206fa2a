"""Contacts with availability windows, the on-call fallback, fall-through, `when:` conditions, check."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from watchtower.availability import parse_windows
from watchtower.config import Config, ConfigError, parse_config
from watchtower.engine.correlate import Cause, Scope
from watchtower.engine.escalation import due
from watchtower.engine.incidents import Incident
from watchtower.people import coverage_warnings, step_reach

BERLIN = ZoneInfo("Europe/Berlin")


def at(day: int, hh: int, mm: int = 0) -> float:
    """Monday 7 December 2026 is day 0, Berlin time."""
    return datetime(2026, 12, 7 + day, hh, mm, tzinfo=BERLIN).timestamp()


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "site": "acme",
        "targets": {
            "pve1": {"role": "hypervisor", "paths": [{"icmp": "10.213.10.11"}]},
            "erp1": {"role": "service", "paths": [{"icmp": "10.213.10.23"}]},
            "mail1": {"role": "service", "paths": [{"icmp": "10.213.10.24"}]},
            "files1": {"role": "service", "paths": [{"icmp": "10.213.10.25"}]},
        },
        "contacts": {
            "alice": {
                "name": "Alice Admin",
                "role": "admin",
                "phone": "+49 30 1234",
                "channels": ["signal-alice"],
                "available": "Mon-Fri 07:00-19:00",
                "timezone": "Europe/Berlin",
            },
            "bob": {
                "role": "on-call",
                "channels": ["sms-bob"],
                "available": "always",
                "on_call": True,
            },
            "carol": {
                "role": "management",
                "channels": ["mail-carol"],
                "available": "Mon-Fri 09:00-17:00",
                "timezone": "Europe/Berlin",
            },
            "ins": {"role": "insurer", "channels": ["mail-insurer"]},
        },
        "notify": {
            "channels": [
                {"name": "signal-alice", "url": "signal://127.0.0.1:1/+15550000001/+15550000002"},
                {"name": "sms-bob", "url": "smseagle://t@127.0.0.1:1/+15550004"},
                {
                    "name": "mail-carol",
                    "url": "mailto://127.0.0.1:1?to=carol@lab.test&from=w@lab.test",
                    "tags": ["management"],
                },
                {"name": "mail-insurer", "url": "mailto://127.0.0.1:1?to=ins@lab.test&from=w@lab.test"},
            ],
            "escalation": [
                {"after": "0s", "contacts": ["alice", "bob"]},
                {"after": "30m", "contacts": ["carol"]},
                {"after": "1h", "notify": ["mail-insurer"], "when": {"cause": ["security"]}},
                {
                    "after": "2h",
                    "contacts": ["ins"],
                    "when": {"scope": ["hypervisor"], "cause": ["hardware"]},
                },
            ],
        },
    }
    d.update(over)
    return d


def cfg(d: dict[str, Any] | None = None) -> Config:
    return parse_config(d or doc(), Path("/tmp"))


def incident(opened: float, scope: Scope = Scope.HYPERVISOR, root: str = "pve1", **kw: Any) -> Incident:
    return Incident(1, scope, root, opened, **kw)


def test_windows_parse_overnight_and_errors() -> None:
    w = parse_windows("Mon-Fri 19:00-07:00; Sun 22:00-24:00")
    assert w.covers(0 * 1440 + 20 * 60)  # Monday 20:00
    assert w.covers(1 * 1440 + 6 * 60)  # Tuesday 06:00 (Monday night)
    assert not w.covers(1 * 1440 + 8 * 60)
    assert w.covers(6 * 1440 + 23 * 60)
    assert w.covers(5 * 1440 + 3 * 60)  # Saturday 03:00: Friday night
    assert not w.covers(6 * 1440 + 3 * 60)  # Sunday 03:00
    for bad in ("Mon-Fri", "Funday 07:00-08:00", "Mon 25:00-26:00", "Mon 07:00-07:00"):
        with pytest.raises(ValueError):
            parse_windows(bad)


def test_office_hours_reach_the_office_contact_night_the_on_call_only() -> None:
    c = cfg()
    step = c.notify.escalation[0]
    day = step_reach(c, step, at(0, 10))
    assert day.contacts == ("alice",) and day.selectors == ("signal-alice",)
    night = step_reach(c, step, at(0, 3))
    assert night.contacts == ("bob",) and night.selectors == ("sms-bob",)
    # The same through the escalation policy: which channels the first page goes to.
    (first,) = [s for s in due(incident(at(0, 10)), c, at(0, 10), set(), set()) if s.step == "step0"]
    assert first.channels == ("signal-alice",) and "alice" in first.label
    (first,) = [s for s in due(incident(at(0, 3)), c, at(0, 3), set(), set()) if s.step == "step0"]
    assert first.channels == ("sms-bob",)


def test_nobody_available_falls_through_to_the_next_step_at_once() -> None:
    d = doc()
    d["contacts"]["bob"]["available"] = "Sat,Sun 00:00-24:00"  # the weekday on-call is missing
    d["notify"]["escalation"] = [
        {"after": "0s", "contacts": ["alice", "bob"]},
        {"after": "30m", "notify": ["management"]},
        {"after": "2h", "contacts": ["ins"]},
    ]
    c = cfg(d)
    opened = at(1, 3)  # Tuesday 03:00: alice off, bob only at weekends
    steps = due(incident(opened), c, opened, set(), set())
    assert [(s.step, s.channels) for s in steps] == [("step0", ()), ("step1", ("mail-carol",))]
    assert "next step at once" in steps[0].label and "nobody reachable" in steps[1].label
    # a minute later, after both fired, nothing more; the insurer step keeps its own delay
    later = due(incident(opened), c, opened + 60, {"step0", "step1"}, {"mail-carol"})
    assert [s.step for s in later if s.step.startswith("step")] == []
    # at 10:00 the same chain pages alice and waits 30 minutes for the second step
    day = due(incident(at(1, 10)), c, at(1, 10), set(), set())
    assert [(s.step, s.channels) for s in day] == [("step0", ("signal-alice",))]
    warnings = coverage_warnings(c)
    assert len(warnings) == 1 and warnings[0].startswith("notify.escalation[0]: nobody available")
    assert "Mon 18:00-Tue 06:00" in warnings[0]  # UTC: Berlin's 19:00 to 07:00
    assert "falls through to notify.escalation[1]" in warnings[0]


def test_when_security_reaches_the_insurer_hardware_does_not() -> None:
    c = cfg()
    t = at(0, 10)
    # three unrelated services down at once: the playbook's security rule
    svc = [Incident(k, Scope.SERVICE, r, t) for k, r in ((1, "erp1"), (2, "mail1"), (3, "files1"))]
    steps = {s.step: s for s in due(svc[0], c, t + 3600, {"step0", "step1"}, {"signal-alice"}, svc[1:])}
    assert "step2" in steps and steps["step2"].channels == ("mail-insurer",)
    alone = {s.step for s in due(svc[0], c, t + 3600, {"step0", "step1"}, {"signal-alice"})}
    assert "step2" not in alone
    hw = incident(t, cause=Cause.HARDWARE_FAULT)
    steps = {s.step: s for s in due(hw, c, t + 7200, {"step0", "step1"}, {"signal-alice"})}
    assert "step2" not in steps  # not security
    assert steps["step3"].channels == ("mail-insurer",)  # the hardware/hypervisor step
    os_hung = incident(t, cause=Cause.OS_UNRESPONSIVE)
    assert "step3" not in {s.step for s in due(os_hung, c, t + 7200, {"step0", "step1"}, {"signal-alice"})}


def test_check_rejects_unreachable_contacts_and_steps_nobody_can_receive() -> None:
    d = doc()
    d["contacts"]["dave"] = {"channels": []}
    d["contacts"]["eve"] = {"channels": ["sms-bob"], "available": "Mon 07:00-08:00", "timezone": "Mars/Base"}
    with pytest.raises(ConfigError) as err:
        cfg(d)
    text = "\n".join(err.value.problems)
    assert "contacts.dave.channels: needs at least 1 entry" in text
    assert "contacts.eve.timezone" in text and "Mars/Base" in text
    d = doc()
    d["contacts"]["alice"]["channels"] = ["signal-alcie"]
    d["contacts"]["carol"]["available"] = "never"
    d["notify"]["escalation"][0]["contacts"] = ["alice", "nobody"]
    with pytest.raises(ConfigError) as err:
        cfg(d)
    text = "\n".join(err.value.problems)
    assert (
        "contacts.alice.channels[0]: no channel has tag or name 'signal-alcie' (did you mean 'signal-alice'?)"
        in text
    )
    assert "notify.escalation[0].contacts[1]: no contact named 'nobody'" in text
    assert "notify.escalation[1].contacts: none of carol is ever available" in text


def test_check_command_warns_about_gaps(tmp_path: Path) -> None:
    d = doc()
    d["contacts"]["bob"]["available"] = "Mon-Fri 19:00-07:00"  # the weekend is uncovered
    d["contacts"]["bob"]["timezone"] = "Europe/Berlin"
    d["state_dir"] = str(tmp_path)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(d))
    out = subprocess.run(
        [sys.executable, "-m", "watchtower", "check", "-c", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (
        "warning: notify.escalation[0]: nobody available Sat 06:00-Mon 06:00 (UTC): falls through"
        in out.stderr
    )
    assert out.stdout.startswith("ok:")


class IdleSender:
    """Never asked to send here: the test reads what the alerting wrote to the outbox."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hung_threads = 0

    def close(self) -> None:
        pass


async def test_the_outbox_queues_the_page_for_whoever_is_available() -> None:
    """Through the alerting (decision + durable rows): 03:00 -> bob's SMS only, 10:00 -> alice's Signal."""
    from concurrent.futures import ThreadPoolExecutor

    from watchtower.engine.incidents import IncidentTracker
    from watchtower.notify.outbox import Alerting
    from watchtower.store import AsyncStore, Store

    c = cfg()
    for hour, expected in ((3, ["sms-bob"]), (10, ["signal-alice"])):
        now = at(2, hour)
        store = AsyncStore(Store(":memory:"), ThreadPoolExecutor(1))
        tracker = IncidentTracker()
        tracker.incidents[1] = incident(now)
        senders: dict[str, Any] = {ch.name: IdleSender(ch.name) for ch in c.notify.channels}

        def clock_now(now: float = now) -> float:
            return now

        alerting = Alerting(c, store, tracker, senders, clock_now=clock_now)
        await alerting.sync()
        rows = await store.call(store.store.notifications, 1)
        assert [(n.step, n.channel) for n in rows] == [("step0", ch) for ch in expected]
        await store.close()
