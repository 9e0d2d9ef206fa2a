"""Fault scripts: what happens to the simulated site, when. Written by hand (YAML) or drawn from a seed.

A script is a list of events, each at a time (seconds from the start of the run)::

    - {at: 60, fault: power_off, target: pve1}
    - {at: 75, ack: pve1}                        # whoever is on call acknowledges pve1's incident
    - {at: 200, repair: pve1, vm_delays: {dc1: 20, mail1: 35}}
    - {at: 400, fault: loss, target: core-sw1, pct: 100}
    - {at: 412, repair: core-sw1, forward_delay: 8}
    - {at: 500, fault: monitor_cut}
    - {at: 530, fault: monitor_restore}

Faults: ``power_off`` (the BMC says chassis off), ``psu_fail`` (power off and a critical SEL
entry), ``hang`` (power on, OS dead), ``nic_down`` (one link; ``address`` or the target's first),
``loss`` (``pct``), ``icmp_drop`` (pings dropped, services answer: no outage), ``bmc_down``,
``net_down`` / ``net_loss`` (``pct``) of a network device: it stops carrying one network
(``network``: a ``networks:`` name, else the /24 of its first address) while it answers on the
others, ``monitor_cut`` / ``monitor_restore``. ``repair`` undoes every
fault of a target; ``forward_delay`` (a switch answering before its ports forward) and
``vm_delays`` / ``vm_delay`` (VMs booting after their hypervisor or NAS) stage the recovery.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from watchtower.config import Config

FAULTS = (
    "power_off", "psu_fail", "hang", "nic_down", "loss", "icmp_drop", "bmc_down", "net_down", "net_loss",
    "monitor_cut", "monitor_restore",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FaultEvent:
    at: float
    action: str  # a fault, "repair" or "ack"
    target: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    group: int = 0  # a fault and the events that belong to it (its repair, its ack): minimised together

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": round(self.at, 2)}
        if self.action in ("repair", "ack"):
            out[self.action] = self.target
        else:
            out["fault"] = self.action
            if self.target is not None:
                out["target"] = self.target
        out.update(self.args)
        return out

    @classmethod
    def from_dict(cls, raw: Any, config: Config, where: str) -> FaultEvent:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be a mapping like {{at: 60, fault: power_off, target: pve1}}")
        data = dict(raw)
        try:
            at = float(data.pop("at"))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}.at: must be a number of seconds from the start") from None
        if "repair" in data or "ack" in data:
            action = "repair" if "repair" in data else "ack"
            target = data.pop(action)
        else:
            action = str(data.pop("fault", ""))
            if action not in FAULTS:
                raise ValueError(f"{where}.fault: must be one of {', '.join(FAULTS)}")
            target = data.pop("target", None)
        if action not in ("monitor_cut", "monitor_restore") and target not in config.targets:
            raise ValueError(f"{where}: target {target!r} is not a target of this config")
        return cls(at, action, target, data)


def load_script(raw: Any, config: Config) -> list[FaultEvent]:
    if not isinstance(raw, list):
        raise ValueError("a fault script is a list of events")
    events = [FaultEvent.from_dict(item, config, f"[{i}]") for i, item in enumerate(raw)]
    return sorted(events, key=lambda e: e.at)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_script(config: Config, seed: int, *, span: float = 1500.0) -> list[FaultEvent]:
    """A random sequence of overlapping faults, staged recoveries, repeats within the flap window,
    flapping, monitor cuts and acks. The same seed gives the same script."""
    rng = random.Random(seed)
    by_role: dict[str, list[str]] = {}
    for name, t in config.targets.items():
        by_role.setdefault(t.role, []).append(name)
    vms_of = {
        name: [v for v, t in config.targets.items() if t.runs_on == name or name in t.storage]
        for name in config.targets
    }
    events: list[FaultEvent] = []
    group = 0

    def repair_args(target: str) -> dict[str, Any]:
        args: dict[str, Any] = {}
        role = config.targets[target].role
        if role == "network" and rng.random() < 0.6:
            args["forward_delay"] = rng.choice([2.0, 5.0, 8.0, 15.0])
        if vms_of[target] and rng.random() < 0.7:
            args["vm_delays"] = {v: round(rng.uniform(3.0, 60.0), 1) for v in vms_of[target]}
        return args

    for _ in range(rng.randint(1, 4)):
        group += 1
        roll = rng.random()
        start = rng.uniform(30.0, span)
        length = _log_uniform(rng, 4.0, 700.0)
        if roll < 0.07:
            events.append(FaultEvent(start, "monitor_cut", group=group))
            events.append(FaultEvent(start + min(length, 300.0), "monitor_restore", group=group))
            continue
        role = rng.choices(
            ["hypervisor", "network", "storage", "vm", "service"], weights=[30, 22, 12, 28, 8]
        )[0]
        candidates = by_role.get(role) or list(config.targets)
        target = rng.choice(candidates)
        t = config.targets[target]
        if role == "hypervisor" or (t.bmc is not None and rng.random() < 0.8):
            fault = rng.choices(
                ["power_off", "psu_fail", "hang", "nic_down", "bmc_down"], [30, 20, 25, 15, 10]
            )[0]
        elif role == "network":
            fault = rng.choices(["hang", "loss", "net_down", "net_loss"], [35, 30, 25, 10])[0]
        else:
            fault = rng.choices(["power_off", "hang", "loss", "nic_down", "icmp_drop"], [30, 40, 15, 12, 3])[
                0
            ]
        args: dict[str, Any] = {}
        if fault in ("loss", "net_loss"):
            args["pct"] = rng.choice([30, 60, 100, 100, 100])
        if fault in ("net_down", "net_loss"):
            carried = sorted(n for n, net in config.networks.items() if target in net.via)
            if carried:
                args["network"] = rng.choice(carried)
            elif config.networks:
                fault = "hang"  # it carries no configured network: a device failure instead
        bursts = 1
        if rng.random() < 0.12:  # flapping: short outages in a row
            bursts, length = rng.randint(2, 5), rng.uniform(4.0, 25.0)
        elif rng.random() < 0.3:  # the same failure again, minutes later (inside the flap window)
            bursts = 2
        at = start
        for _b in range(bursts):
            if fault == "bmc_down":
                # the BMC dies with its host (a power cut of the whole chassis)
                events.append(FaultEvent(at, "bmc_down", target, group=group))
                events.append(FaultEvent(at + 0.5, "power_off", target, group=group))
            else:
                events.append(FaultEvent(at, fault, target, dict(args), group=group))
            if rng.random() < 0.3:
                events.append(FaultEvent(at + rng.uniform(20.0, 400.0), "ack", target, group=group))
            events.append(FaultEvent(at + length, "repair", target, repair_args(target), group=group))
            at += length + (rng.uniform(5.0, 40.0) if length < 30 else rng.uniform(30.0, 400.0))
    return sorted(events, key=lambda e: e.at)


def drop_group(events: list[FaultEvent], group: int) -> list[FaultEvent]:
    return [e for e in events if e.group != group]
