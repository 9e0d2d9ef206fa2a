"""Generates docs/configuration.md from the config models, so the reference cannot drift from the code.

python -m watchtower.docs > docs/configuration.md
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from watchtower import config as c

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("Top level", c.Config, ""),
    ("`defaults`", c.Defaults, "Every key may be overridden on a target (all its paths) and on one path "
     "(`confirm_paths` on a target only)."),
    ("Targets: `targets.NAME`", c.Target, "NAME: letters, digits, `.`, `_`, `-`. `runs_on` must name a "
     "`hypervisor` target, `storage` entries `storage` targets, `depends_on` any target; no cycles."),
    ("`targets.NAME.service`", c.Service, ""),
    ("Networks: `networks.NAME`", c.Network, "Each path is placed on the network whose `cidr` holds its "
     "address (the most specific one), or the one its `network:` names. When every path on a network "
     "fails while some of its hosts answer on another one, that is one `network` incident rooted at "
     "its first `via` device (cause `partition`), not one incident per host; one host dark on a network "
     "while its OS answers on another is that host's `link_down`. Without `networks:` this is inferred "
     "from address prefixes (/24, /64) and the alert says so. `watchtower check --explain` shows where "
     "each path landed."),
    ("`service.backups[]`", c.Backup, "Exactly one source; see docs/backups-readiness-plan.md."),
    ("Backup `restic`", c.ResticSource, ""),
    ("Backup `borg`", c.BorgSource, ""),
    ("Backup `pbs`", c.PbsSource, "Proxmox Backup Server, one backup group."),
    ("Backup `pve`", c.PveSource, "Proxmox VE: a guest's backups on one storage."),
    ("Backup `truenas`", c.TruenasSource, "TrueNAS 25.04+, JSON-RPC over wss."),
    ("Backup `push`", c.PushSource, "`POST /api/v1/backups/NAME[/fail]` with `Authorization: Bearer TOKEN`."),
    ("`service.restore_tests[]`", c.RestoreTest, "Also recorded with `watchtower restore-test record`."),
    ("`targets.NAME.bmc`", c.Bmc, "The host's out-of-band controller, consulted to explain an outage."),
    ("Path `icmp`", c.IcmpPath, "Short form: `- icmp: 10.0.0.2`."),
    ("Path `tcp`", c.TcpPath, "Short form: `- tcp: 10.0.0.5:3260` (IPv6: `[2001:db8::5]:3260`)."),
    ("Path `http`", c.HttpPath, "Short form: `- http: https://10.0.10.11:8006/`."),
    ("Path `dns`", c.DnsPath, ""),
    ("Path `snmp`", c.SnmpPath, ""),
    ("`snmp.storage[]`", c.SnmpStorage, "Used % of an hrStorage entry, found by its description."),
    ("`snmp.checks[]`", c.SnmpCheck, "At most one condition; without one, any value other than "
     "NoSuchObject/NoSuchInstance holds."),
    ("Path `ipmi` / `bmc.ipmi`", c.IpmiSpec, ""),
    ("Path `redfish` / `bmc.redfish`", c.RedfishSpec, ""),
    ("Path `nut`", c.NutPath, "A UPS through a NUT server: on battery is news while every host answers."),
    ("Path `trap`", c.TrapPath, "Passive, needs `traps:`. Short form: `- trap: 10.0.0.2` (all interfaces)."),
    ("`trap.events[]`", c.TrapRule, ""),
    ("`traps`", c.TrapListener, "The SNMP trap/inform receiver."),
    ("`traps.users[]`", c.TrapUser, ""),
    ("`notify`", c.Notify, ""),
    ("`notify.channels[]`", c.Channel, "An apprise URL: `signal://`, `smseagle://`, `mailto://`, `mailtos://`."),
    ("`notify.escalation[]`", c.EscalationStep, "Each step fires once per incident."),
    ("`notify.warnings`", c.Warnings, "Backup and certificate warnings: never paged through the escalation."),
    ("`plan`", c.Plan, "The recovery plan: `watchtower plan export`."),
    ("`plan.distribute`", c.PlanDistribution, "Sent as an attachment (mail, Signal) once per `every`."),
    ("`heartbeat`", c.Heartbeat, "Dead man's switch: pinged while watchtower is healthy."),
    ("`alertmanager`", c.Alertmanager, "Each open incident is one alert (labels "
     "`alertname=WatchtowerIncident`, `site`, `scope`, `root`, `cause`), re-posted every `every` and "
     "resolved with `endsAt`."),
    ("`maintenance[]`", c.MaintenanceWindow, "A recurring window: its targets are probed and their "
     "incidents recorded (\"in maintenance\"), but nobody is paged until it ends; an outage still "
     "there then pages as a normal incident. One-off mutes: `watchtower mute`."),
]  # fmt: skip

PATH_COMMON = ("interval", "retry_interval", "timeout", "fail_after", "recover_after", "name")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base = args[0]
        name = getattr(base, "__name__", str(base))
        metadata = " ".join(type(m).__name__ for m in args[1:])
        if "PlainSerializer" in metadata and base is float:
            return "duration"
        if name == "FileSecret":
            return "file path (secret)"
        return _type_name(base)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return f"mapping ({annotation.__name__})"
        names = {"str": "string", "int": "integer", "float": "number", "bool": "true/false",
                 "SecretStr": "string (secret)", "Path": "path"}  # fmt: skip
        return names.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "sysUpTime answers" if isinstance(value[0], c.SnmpCheck) else "…"
    if isinstance(value, float) and any(type(m).__name__ == "PlainSerializer" for m in field.metadata):
        return f"`{c.format_duration(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _rows(model: type[BaseModel]) -> list[str]:
    rows = []
    is_path = issubclass(model, c.PathBase)
    for name, field in model.model_fields.items():
        if name == "kind" or (is_path and name in PATH_COMMON and model is not c.IcmpPath):
            continue
        key = field.alias or name
        description = (field.description or "").replace("|", "\\|")
        annotation = field.annotation
        if "IcmpPath" in repr(annotation):
            type_name = "list of paths"
        elif annotation is c.FileSecret:  # a required *_file: pydantic unwrapped the Annotated
            type_name = "file path (secret)"
        elif field.metadata and any(type(m).__name__ == "PlainSerializer" for m in field.metadata):
            type_name = "duration"
        else:
            type_name = _type_name(annotation)
        if "Duration" in repr(annotation) or (type_name == "number" and "duration" in repr(field.metadata)):
            type_name = "duration"
        rows.append(f"| `{key}` | {type_name} | {_default(field)} | {description} |")
    return rows


def config_reference() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m watchtower.docs`; edit the models in watchtower/config.py instead -->",
        "",
        "watchtower reads one YAML file (`watchtower run -c FILE`, default `$WATCHTOWER_CONFIG`, then",
        "`/etc/watchtower/watchtower.yaml`). `watchtower check -c FILE` validates it and names every",
        "problem's place; `watchtower schema` prints the JSON Schema for editors (e.g. the YAML language",
        "server: `# yaml-language-server: $schema=watchtower.schema.json`).",
        "",
        "- **Durations** are strings: `500ms`, `5s`, `15m`, `4h`, `1h30m`. A bare number is refused.",
        "- **Secrets** may be inline (`password:`) or, better, a file (`password_file:`). A relative",
        "  `*_file` is looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) first, then next",
        "  to the config file. Secrets never reach logs, metrics, the API or alerts.",
        "- **Unknown keys are errors**, with a suggestion when a known key is close.",
        "- **Timings** of a path come from the path, else its target, else `defaults`. `timeout` has a",
        "  per-kind floor that `defaults.timeout` does not lower: "
        + ", ".join(f"{k} {c.format_duration(v)}" for k, v in c.KIND_TIMEOUT_FLOOR.items())
        + ". A timeout longer than the path's interval is an error.",
        "- **Paths** are written `- KIND: SPEC`. Every path takes `interval`, `retry_interval`, `timeout`,",
        "  `fail_after`, `recover_after` and `name` (shown in the `icmp` table). A path's name defaults",
        "  to `KIND HOST[:PORT]` (`http URL` for http) and must be unique within its target.",
        "  Default ports: " + ", ".join(f"{k} {v}" for k, v in c.DEFAULT_PORTS.items()) + ".",
        "",
    ]
    for title, model, note in SECTIONS:
        out += [f"## {title}", ""]
        if note:
            out += [note, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(model), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(config_reference())
