"""Who an escalation step reaches at a given moment: contacts, their windows, the on-call fallback.

Pure functions of the config and an instant; :mod:`watchtower.engine.escalation` calls
:func:`step_reach` and :func:`step_applies`, ``watchtower check`` calls
:func:`unreachable_steps` (errors) and :func:`coverage_warnings` (gaps), and the readiness
report calls :func:`verification`.

Rules:
- a step reaches its ``notify`` tags always, and of its ``contacts`` those whose ``available``
  window covers the moment; when none of the contacts without ``on_call`` is available, the
  ``on_call`` ones that are (out of hours -> the on-call person);
- a step that names only contacts and reaches none of them *falls through*: the next step that
  applies fires at that moment instead of waiting for its own delay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from watchtower.availability import WEEK, describe_minute, is_available
from watchtower.config import Config, EscalationStep
from watchtower.engine.correlate import Cause
from watchtower.engine.incidents import Incident


@dataclass(frozen=True, slots=True)
class Reach:
    contacts: tuple[str, ...]  # contacts reached, in the step's order
    selectors: tuple[str, ...]  # channel tags/names: the step's notify plus those contacts' channels
    nobody: bool  # the step names contacts only and none is available: fall through


def available(config: Config, name: str, at: float) -> bool:
    contact = config.contacts[name]
    return is_available(contact.available, contact.timezone, at)


def reached_contacts(config: Config, names: Sequence[str], at: float) -> tuple[str, ...]:
    known = [n for n in names if n in config.contacts]
    office = tuple(n for n in known if not config.contacts[n].on_call and available(config, n, at))
    if office:
        return office
    return tuple(n for n in known if config.contacts[n].on_call and available(config, n, at))


def step_reach(config: Config, step: EscalationStep, at: float) -> Reach:
    contacts = reached_contacts(config, step.contacts, at)
    selectors = [*step.notify]
    for name in contacts:
        selectors += config.contacts[name].channels
    nobody = bool(step.contacts) and not contacts and not step.notify
    return Reach(contacts, tuple(dict.fromkeys(selectors)), nobody)


def incident_causes(incident: Incident, others: Sequence[Incident]) -> set[str]:
    """What ``when.cause`` can match for this incident now."""
    # The playbook's rules live with the messages that quote them (messages imports escalation,
    # which imports this module: import at call time).
    from watchtower.notify.messages import hardware_suspected, security_suspected

    causes: set[str] = set()
    if incident.cause is not None:
        causes.add(Cause(incident.cause).value)
    if security_suspected(incident, others):
        causes.add("security")
    if hardware_suspected(incident):
        causes.add("hardware")
    return causes


def step_applies(step: EscalationStep, incident: Incident, others: Sequence[Incident]) -> bool:
    when = step.when
    if when is None:
        return True
    if when.scope and incident.scope.value not in when.scope:
        return False
    return not when.cause or bool(incident_causes(incident, others).intersection(when.cause))


# --------------------------------------------------------------------------- check

# A Monday 00:00 UTC: the week scanned for gaps (a DST change inside a week is not modelled).
_MONDAY = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
_SCAN = 15  # minutes between two looks


def _nobody_minutes(config: Config, step: EscalationStep) -> list[int]:
    return [m for m in range(0, WEEK, _SCAN) if step_reach(config, step, _MONDAY + m * 60).nobody]


def _spans(minutes: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in minutes:
        if spans and spans[-1][1] == m:
            spans[-1] = (spans[-1][0], m + _SCAN)
        else:
            spans.append((m, m + _SCAN))
    if len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == WEEK:  # Sunday night into Monday
        first = spans.pop(0)
        spans[-1] = (spans[-1][0], WEEK + first[1])
    return spans


def unreachable_steps(config: Config) -> list[str]:
    """Steps nobody can ever receive: they name only contacts, and none is ever available."""
    problems = []
    for i, step in enumerate(config.notify.escalation):
        if step.notify or any(c not in config.contacts for c in step.contacts):
            continue
        if len(_nobody_minutes(config, step)) * _SCAN >= WEEK:
            problems.append(
                f"notify.escalation[{i}].contacts: none of {', '.join(step.contacts)} is ever available "
                "(check their `available` windows)"
            )
    return problems


def coverage_warnings(config: Config) -> list[str]:
    """Hours of the week a step reaches nobody (UTC), and whether a later step catches them."""
    out = []
    steps = config.notify.escalation
    for i, step in enumerate(steps):
        minutes = _nobody_minutes(config, step)
        if not minutes or len(minutes) * _SCAN >= WEEK:
            continue
        spans = _spans(minutes)
        shown = ", ".join(f"{describe_minute(a)}-{describe_minute(b)}" for a, b in spans[:4])
        more = f" and {len(spans) - 4} more" if len(spans) > 4 else ""
        after = (
            f"falls through to notify.escalation[{i + 1}]"
            if i + 1 < len(steps)
            else "no later step: nobody is reached"
        )
        out.append(f"notify.escalation[{i}]: nobody available {shown}{more} (UTC): {after}")
    return out


# --------------------------------------------------------------------------- verification (drills)


@dataclass(frozen=True, slots=True)
class ContactVerification:
    contact: str
    last_verified: float | None  # last drill confirmation
    due_at: float | None  # last_verified + verify_every (None: never verified)
    overdue: bool
    last_result: str | None  # "reached in 2m14s via signal-alice" / "not confirmed in 15m: ..."


def verification(
    config: Config, confirmed: Mapping[str, float], results: Mapping[str, str], now: float
) -> list[ContactVerification]:
    """Per contact: when a drill last reached them and whether that is too long ago.

    ``confirmed``: contact -> last confirmation time; ``results``: contact -> the latest drill's
    sentence about them (:func:`watchtower.drill.verification_of` reads both from the store)."""
    out = []
    for name, contact in config.contacts.items():
        last = confirmed.get(name)
        due_at = None if last is None else last + contact.verify_every
        out.append(
            ContactVerification(name, last, due_at, due_at is None or now >= due_at, results.get(name))
        )
    return out
