"""Bad input, fuzzed: the config loader gives clean ``place: problem`` lines (a ConfigError), never
another exception; ``watchtower check`` exits 2 without a traceback; the parsers of probe answers
(ipmitool output, SEL records, RMCP, SNMP, NUT, Redfish JSON, DNS wire format) return their
result or raise their own documented error, never something else.

``WATCHTOWER_FULL=1`` multiplies the examples by 10. The counts of inputs tried are printed at the
end of the module (``-s``)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rrset
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchtower.config import PATH_KINDS, Config, ConfigError, load_config, parse_config
from watchtower.probes import ProbeResult, ipmi, nut, redfish, snmp
from watchtower.probes import dns as dns_probe

FULL = os.environ.get("WATCHTOWER_FULL") == "1"
N = 10 if FULL else 1
TRIED: Counter[str] = Counter()

BASE: dict[str, Any] = {
    "site": "fuzz",
    "vantage": [{"icmp": "127.0.0.1"}],
    "targets": {
        "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
        "hv": {
            "role": "hypervisor",
            "depends_on": ["sw"],
            "bmc": {"ipmi": {"host": "10.0.99.1", "username": "u", "password": "p"}},
            "paths": [{"icmp": "10.0.10.11"}, {"tcp": "10.0.10.11:8006"}],
        },
        "nas": {
            "role": "storage",
            "paths": [
                {"snmp": {"host": "10.0.20.5", "community": "c", "checks": [{"oid": "1.3.6.1.2.1.1.3.0"}]}}
            ],
        },
        "vm": {
            "role": "vm",
            "runs_on": "hv",
            "storage": ["nas"],
            "service": {"name": "ERP", "rto": "4h"},
            "paths": [
                {"http": {"url": "http://10.0.10.21/"}},
                {"dns": {"server": "10.0.10.21", "query": "a"}},
            ],
        },
    },
    "notify": {
        "channels": [{"name": "mail", "url": "mailto://127.0.0.1:2525?to=a@lab.test", "tags": ["tier1"]}],
        "escalation": [{"after": "0s", "notify": ["tier1"]}, {"after": "15m", "notify": ["tier1"]}],
        "update_every": "30m",
    },
    "heartbeat": {"url": "http://127.0.0.1:1/hb", "every": "1m"},
}

KEYS = [
    "site",
    "listen",
    "state_dir",
    "defaults",
    "vantage",
    "targets",
    "notify",
    "heartbeat",
    "interval",
    "retry_interval",
    "timeout",
    "fail_after",
    "recover_after",
    "confirm_paths",
    "role",
    "paths",
    "depends_on",
    "runs_on",
    "storage",
    "bmc",
    "service",
    "host",
    "port",
    "name",
    "url",
    "community",
    "checks",
    "oid",
    "in",
    "min",
    "max",
    "equals",
    "regex",
    "channels",
    "escalation",
    "after",
    "notify",
    "unless",
    "rto",
    "rto_fraction",
    "password",
    "password_file",
    "username",
    "version",
    "query",
    *PATH_KINDS,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "0s",
            "1ms",
            "5s",
            "99999d",
            "-1s",
            "1.5m",
            "10.0.0.1",
            "::1",
            "a:b:c",
            "x:99999",
            "127.0.0.1:0",
            "hypervisor",
            "vm",
            "acknowledged",
            "1.3.6.1",
            "../../etc/passwd",
            "\x00",
            "\u202e",
            "${HOME}",
            "*",
            "~",
            "http://[::1",
            "mailto://",
        ]
    ),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _places(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _places(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _places(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """BASE with a few random places replaced, deleted or given an extra key: reaches deep validators."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        places = [p for p in _places(data) if p]
        if not places:
            break
        place = draw(st.sampled_from(places))
        parent: Any = data
        for part in place[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[place[-1]]
        elif action == "add" and isinstance(parent[place[-1]], dict):
            parent[place[-1]][draw(keys)] = draw(values)
        else:
            parent[place[-1]] = draw(values)
    return data


def _assert_clean(exc: ConfigError) -> None:
    assert exc.problems, "a ConfigError without problems"
    for line in exc.problems:
        assert isinstance(line, str) and line.strip(), exc.problems
        place, sep, message = line.partition(": ")
        assert sep and place.strip() and message.strip(), f"no 'place: problem' shape: {line!r}"
        assert "Traceback" not in line and "pydantic" not in line.lower(), line
        assert "\n" not in line, line


def _parse(data: Any, tmp: Path) -> None:
    try:
        cfg = parse_config(data, tmp)
    except ConfigError as exc:
        _assert_clean(exc)
        TRIED["config rejected"] += 1
    else:
        assert isinstance(cfg, Config)
        TRIED["config accepted"] += 1


FUZZ = settings(max_examples=400 * N, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=mutated())
def test_mutated_configs_fail_cleanly(data: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    _parse(data, Path("/nonexistent-config-dir"))


@FUZZ
@given(data=values)
def test_random_structures_fail_cleanly(data: Any) -> None:
    _parse(data, Path("/nonexistent-config-dir"))


@settings(max_examples=150 * N, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.builds(lambda d: yaml.safe_dump(d), mutated()).map(lambda t: t.replace("  ", " ", 1)),
        st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    )
)
def test_random_yaml_text_fails_cleanly(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except ConfigError as exc:
        _assert_clean(exc)
    TRIED["yaml texts"] += 1


def test_check_as_a_process_on_generated_bad_files(tmp_path: Path) -> None:
    rng = random.Random(9)
    files: list[Path] = []
    while len(files) < 6:
        data = _random_mutation(rng)
        try:
            parse_config(data, tmp_path)
        except ConfigError:
            path = tmp_path / f"bad{len(files)}.yaml"
            path.write_text(yaml.safe_dump(data))
            files.append(path)
    files.append(tmp_path / "garbage.yaml")
    files[-1].write_bytes(b"\xff\xfe{{{: [\x00")
    for path in files:
        proc = subprocess.run(
            [sys.executable, "-m", "watchtower", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, (path.read_text(errors="replace"), proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.strip() and not proc.stdout
        TRIED["check processes"] += 1


def _random_mutation(rng: random.Random) -> Any:
    data = copy.deepcopy(BASE)
    places = [p for p in _places(data) if p]
    place = rng.choice(places)
    parent: Any = data
    for part in place[:-1]:
        parent = parent[part]
    parent[place[-1]] = rng.choice([None, -1, "5 sec", [], {"x": 1}, "10.0.0.300", True, "", 2**40])
    return data


# --------------------------------------------------------------------------- probe answer parsers

_EXEC_LINES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "Chassis Power is on",
            "Chassis Power is off",
            "Chassis Power is maybe",
            "SEL Information",
            "Entries : 5",
            "Entries : many",
            "Overflow : true",
            "12/31/99 23:59:59",
            "13/45/99 25:61:61",
            "00/00/00 00:00:00",
            "02/30/24 12:00:00 UTC",
        ]
    ),
    st.binary(max_size=20).map(lambda b: " ".join(f"{x:02x}" for x in b)),
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="|\n\r"), max_size=12), min_size=5, max_size=5
    ).map(" | ".join),
    st.tuples(
        st.text(max_size=8),
        st.integers(0, 300),
        st.sampled_from(["ok", "ucr", "lnr", "ns", "nc", "?"]),
        st.text(max_size=20),
    ).map(lambda t: f"{t[0]} | {t[1]:02x}h | {t[2]} | 7.1 | {t[3]}"),
)


@settings(max_examples=500 * N, deadline=None)
@given(lines=st.lists(_EXEC_LINES, max_size=12))
def test_ipmitool_output_parsing_never_raises(lines: list[str]) -> None:
    out = ipmi.parse_exec_output("\n".join(lines))
    _ = (out.sel_entries, out.sel_overflow, out.power)
    try:
        records = out.records()
    except ValueError:
        records = []
    for record in records:
        entry = ipmi.sel_entry(record, {})
        assert entry.severity in ("info", "warning", "critical")
    TRIED["ipmitool outputs"] += 1


@settings(max_examples=500 * N, deadline=None)
@given(data=st.one_of(st.binary(min_size=18, max_size=18), st.binary(max_size=40)))
def test_sel_records_decode_or_raise_value_error(data: bytes) -> None:
    try:
        record = ipmi.decode_get_sel_entry(data)
    except ValueError:
        assert len(data) != 18
        return
    entry = ipmi.sel_entry(record, {record.sensor_number: "x"})
    assert entry.text and entry.severity in ("info", "warning", "critical")
    assert isinstance(ipmi.is_auth_caps_response(data), bool)
    TRIED["SEL records"] += 1


@settings(max_examples=300 * N, deadline=None)
@given(line=st.text(max_size=120))
def test_sdr_lines_parse_or_give_none(line: str) -> None:
    parsed = ipmi.parse_sdr_line(line)
    assert parsed is None or parsed[1].state in ("ok", "warning", "critical", "unknown")
    assert ipmi.discrete_state_severity(line) in ("info", "warning", "critical")
    TRIED["SDR lines"] += 1


_VALID_SNMP = bytes.fromhex("302902010104067075626c6963a01c0204") + bytes(17)
_VALID_RMCP = bytes.fromhex("0600ff07000000000000000000001001c0011a0000")


@settings(max_examples=500 * N, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=40).map(lambda b: _VALID_SNMP[:20] + b),
        st.binary(max_size=40).map(lambda b: _VALID_RMCP + b),
    )
)
def test_snmp_and_rmcp_datagrams_are_judged_never_raise(data: bytes) -> None:
    assert isinstance(snmp.looks_like_snmp(data), bool)
    assert isinstance(ipmi.is_auth_caps_response(data), bool)
    TRIED["SNMP/RMCP datagrams"] += 1


@settings(max_examples=400 * N, deadline=None)
@given(
    values=st.dictionaries(
        st.one_of(
            st.sampled_from(["ups.status", "battery.charge", "battery.runtime", "ups.load", "input.voltage"]),
            st.text(max_size=10),
        ),
        st.one_of(
            st.text(max_size=20), st.sampled_from(["OL", "OB LB", "OL CHRG", "1e400", "nan", "-inf", "12"])
        ),
        max_size=6,
    )
)
def test_nut_answers_are_judged_never_raise(values: dict[str, str]) -> None:
    result = nut._judge(values, 0.01)
    assert isinstance(result, ProbeResult) and (result.ok or result.detail)
    nut._unescape("".join(values))
    TRIED["NUT variable sets"] += 1


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["On", "Off", "OK", "Critical", "/redfish/v1/x", "//evil/x"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "Id",
                    "Name",
                    "Status",
                    "Health",
                    "HealthRollup",
                    "State",
                    "PowerState",
                    "Members",
                    "@odata.id",
                    "Temperatures",
                    "Fans",
                    "PowerSupplies",
                    "Voltages",
                    "PowerControl",
                    "ReadingCelsius",
                    "Reading",
                    "UpperThresholdCritical",
                    "LowerThresholdFatal",
                    "LineInputVoltage",
                    "Message",
                    "Severity",
                    "Created",
                    "LogServices",
                ]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=15,
)


@settings(max_examples=500 * N, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=json_values, raw=st.binary(max_size=60))
def test_redfish_documents_parse_or_fail_as_the_probe_does(doc: Any, raw: bytes) -> None:
    for body in (raw, json.dumps(doc, default=str).encode()):
        try:
            parsed = redfish._parse_json(body, "/x")
        except redfish._PeerError:
            continue
        for parse in (
            lambda d: redfish._parse_system(d, "/x"),
            lambda d: redfish._thermal_sensors(d, "/x"),
            lambda d: redfish._power_sensors(d, "/x"),
            lambda d: redfish._members(d, "/x"),
            lambda d: redfish._link(d, "LogServices"),
            redfish._entry,
        ):
            with contextlib.suppress(redfish._PeerError):
                parse(parsed)
    TRIED["Redfish documents"] += 1


def _dns_answer() -> bytes:
    q = dns.message.make_query("dc1.lab.test", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("dc1.lab.test.", 60, "IN", "A", "10.0.0.1"))
    return r.to_wire()


_DNS = _dns_answer()


@settings(max_examples=500 * N, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_DNS) - 1), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.just(len(_DNS)), st.integers(0, len(_DNS))),
    tail=st.one_of(st.just(b""), st.binary(max_size=20)),
)
def test_dns_garbage_raises_only_what_the_probe_catches(
    edits: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    wire = bytearray(_DNS)
    for pos, byte in edits:
        wire[pos] = byte
    data = bytes(wire[:cut]) + tail
    try:
        message = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError, EOFError):  # what dns.py's probe turns into PROTOCOL
        TRIED["DNS answers (rejected)"] += 1
        return
    dns_probe._answer_values(message)
    TRIED["DNS answers (parsed)"] += 1


def test_zz_report_counts() -> None:
    print(f"\nfuzz inputs tried: {dict(TRIED)} total={sum(TRIED.values())}")
