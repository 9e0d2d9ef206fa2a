"""Config parsing: the example passes, broken configs fail with the key named and exit code 2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchtower.cli import main
from watchtower.config import ConfigError, json_schema, load_config, parse_config, parse_duration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "watchtower.example.yaml"
DEMO = REPO / "config" / "demo.yaml"
PARTITION = REPO / "config" / "partition.yaml"

BASE: dict[str, Any] = {
    "site": "t",
    "defaults": {"interval": "5s"},
    "vantage": [{"icmp": "127.0.0.1"}],
    "targets": {
        "sw": {"role": "network", "paths": [{"icmp": "10.0.0.2"}]},
        "hv": {
            "role": "hypervisor",
            "depends_on": ["sw"],
            "paths": [{"icmp": "10.0.10.11"}, {"tcp": "10.0.10.11:8006"}],
        },
        "nas": {"role": "storage", "paths": [{"icmp": "10.0.20.5"}]},
        "vm": {
            "role": "vm",
            "runs_on": "hv",
            "storage": ["nas"],
            "service": {"name": "ERP", "rto": "4h"},
            "paths": [{"icmp": "10.0.10.21"}, {"http": {"url": "http://10.0.10.21/"}}],
        },
    },
    "notify": {
        "channels": [
            {
                "name": "mail",
                "url": "mailto://127.0.0.1:2525?to=a@lab.test&from=w@lab.test",
                "tags": ["tier1"],
            }
        ],
        "escalation": [{"after": "0s", "notify": ["tier1"]}],
    },
}


def run_check(tmp_path: Path, data: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    try:
        code = main(["check", "-c", str(cfg)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def mutate(path: str, value: Any) -> dict[str, Any]:
    """A copy of BASE with the dotted ``path`` set to value (``[i]`` indexes lists); DELETE removes."""
    data = copy.deepcopy(BASE)
    node: Any = data
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


DELETE = object()


def test_example_and_demo_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for file in (EXAMPLE, DEMO, PARTITION):
        assert main(["check", "-c", str(file)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("ok: 8 targets, ")
    cfg = load_config(EXAMPLE)
    assert cfg.targets["pve1"].bmc is not None and cfg.targets["pve1"].bmc.ipmi is not None
    assert len(cfg.vantage_paths) == 2


def test_base_passes_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_check(tmp_path, BASE, capsys)
    assert (code, out.strip()) == (0, "ok: 4 targets, 6 paths")


BROKEN: list[tuple[str, Any, str]] = [
    # (mutation path, value, expected fragment of the message: it names the key)
    (
        "targets.hv.paths[0].icmp",
        {"host": "10.0.10.11", "timeout": "fast"},
        "targets.hv.paths[0].timeout: must be a duration",
    ),
    (
        "targets.hv.paths[0].icmp",
        {"host": "10.0.10.11", "timeout": 2},
        "targets.hv.paths[0].timeout: must be a duration",
    ),
    ("defaults.interval", "0s", "defaults.interval: must be longer than 0s"),
    ("defaults.fail_after", 0, "defaults.fail_after"),
    ("defaults.confirm_path", 2, "defaults.confirm_path: unknown key (did you mean 'confirm_paths'?)"),
    ("targets.hv.role", "hypervisr", "targets.hv.role: must be one of"),
    ("targets.hv.intervall", "5s", "targets.hv.intervall: unknown key (did you mean 'interval'?)"),
    ("targets.hv.depends_on", ["swx"], "targets.hv.depends_on[0]: no target named 'swx'"),
    ("targets.vm.runs_on", "nas", "targets.vm.runs_on: 'nas' has role storage, not hypervisor"),
    ("targets.vm.runs_on", "pve9", "targets.vm.runs_on: no target named 'pve9'"),
    ("targets.vm.storage", ["hv"], "targets.vm.storage[0]: 'hv' has role hypervisor, not storage"),
    ("targets.sw.depends_on", ["vm"], "dependency cycle"),
    ("targets.hv.paths[1]", {"tcp": "10.0.10.11"}, "targets.hv.paths[1]: tcp short form is HOST:PORT"),
    ("targets.hv.paths[1]", {"tcp": "10.0.10.11:99999"}, "targets.hv.paths[1]: port '99999'"),
    (
        "targets.hv.paths[1]",
        {"icmpp": "10.0.10.11"},
        "targets.hv.paths[1]: unknown path kind 'icmpp' (did you mean 'icmp'?)",
    ),
    (
        "targets.hv.paths[1]",
        {"icmp": "10.0.10.11", "tcp": "10.0.10.11:22"},
        "targets.hv.paths[1]: each path is one mapping",
    ),
    ("targets.hv.paths[1]", {"icmp": "not a host!"}, "targets.hv.paths[1].host: 'not a host!' is neither"),
    ("targets.hv.paths", [], "targets.hv.paths: needs at least 1 entry"),
    (
        "targets.hv.paths[1]",
        {"tcp": {"host": "10.0.10.11", "port": 22, "timeout": "10s"}},
        "targets.hv.paths[1].timeout: 10s is longer than its interval 5s",
    ),
    (
        "targets.vm.paths[1]",
        {"http": {"url": "ftp://10.0.10.21/"}},
        "targets.vm.paths[1].url: 'ftp://10.0.10.21/' must be",
    ),
    (
        "targets.vm.paths[1]",
        {"http": {"url": "http://10.0.10.21/", "expect_status": 999}},
        "targets.vm.paths[1].expect_status: 999 is not an HTTP status code",
    ),
    (
        "targets.vm.paths[1]",
        {"http": {"url": "http://10.0.10.21/", "expect_regex": "(unclosed"}},
        "targets.vm.paths[1].expect_regex: invalid regular expression",
    ),
    (
        "targets.vm.paths[1]",
        {"http": {"url": "http://u:pw@10.0.10.21/"}},
        "targets.vm.paths[1].url: put credentials",
    ),
    (
        "targets.vm.paths[1]",
        {"dns": {"server": "10.0.10.21"}},
        "targets.vm.paths[1].query: required key is missing",
    ),
    (
        "targets.vm.paths[1]",
        {"dns": {"server": "10.0.10.21", "query": "x", "type": "QQ"}},
        "targets.vm.paths[1].type: must be one of",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2"}},
        "targets.vm.paths[1].snmp: SNMP v2c needs community",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "community": "p", "checks": [{"oid": "sysUpTime"}]}},
        "targets.vm.paths[1].checks[0].oid: 'sysUpTime' is not a numeric OID",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "community": "p", "checks": [{"oid": "1.3.6.1", "in": [1], "max": 3}]}},
        "targets.vm.paths[1].checks[0]: use at most one of",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "community": "p", "community_file": "c"}},
        "targets.vm.paths[1].snmp: give either community or community_file",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "community_file": "missing-secret"}},
        "targets.vm.paths[1].community_file: file not found: missing-secret",
    ),
    ("targets.vm.service.rto", "soon", "targets.vm.service.rto: must be a duration"),
    (
        "targets.vm.bmc",
        {"ipmi": {"host": "10.0.99.1", "username": "u"}},
        "targets.vm.bmc.ipmi: IPMI needs password",
    ),
    ("targets.vm.bmc", {}, "targets.vm.bmc: bmc needs ipmi or redfish"),
    ("targets.vm.confirm_paths", 0, "targets.vm.confirm_paths"),
    ("targets.bad name", {"role": "vm", "paths": [{"icmp": "10.0.0.9"}]}, "targets.bad name"),
    ("site", DELETE, "site: required key is missing"),
    ("targets", {}, "targets: needs at least 1 entry"),
    ("listen", "localhost", "listen: must be HOST:PORT"),
    (
        "notify.escalation[0].notify",
        ["tier9"],
        "notify.escalation[0].notify[0]: no channel has tag or name 'tier9'",
    ),
    (
        "notify.escalation[0]",
        {"notify": ["tier1"]},
        "notify.escalation[0]: each step needs exactly one of after or rto_fraction",
    ),
    ("notify.escalation[0]", {"rto_fraction": 1.5, "notify": ["tier1"]}, "notify.escalation[0].rto_fraction"),
    (
        "notify.channels[0]",
        {"name": "mail", "tags": ["tier1"]},
        "notify.channels[0]: a channel needs url or url_file",
    ),
    ("notify.update_every", "often", "notify.update_every: must be a duration"),
    ("heartbeat", {"every": "1m"}, "heartbeat: heartbeat needs url or url_file"),
    ("vantage[0]", {"tcp": "192.0.2.1"}, "vantage[0]: tcp short form is HOST:PORT"),
    # issue 9: more of them, one per kind of mistake an admin makes
    (
        "targets.hv.paths[0].icmp",
        {"host": "10.0.10.11", "port": 7},
        "targets.hv.paths[0].icmp: icmp has no port",
    ),
    (
        "targets.hv.paths[1]",
        {"tcp": {"host": "10.0.10.11"}},
        "targets.hv.paths[1].port: required key is missing",
    ),
    ("targets.vm.paths[1]", {"snmp": {"host": "10.0.0.2", "version": "3"}}, "SNMP v3 needs username"),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "version": "3", "username": "u", "priv_key": "abcdefgh"}},
        "targets.vm.paths[1].snmp: SNMP v3 priv_key needs auth_key too",
    ),
    (
        "targets.vm.paths[1]",
        {"snmp": {"host": "10.0.0.2", "version": 4, "community": "c"}},
        "targets.vm.paths[1].version: must be one of 1, 2c or 3, got '4'",
    ),
    (
        "targets.vm.paths[1]",
        {"redfish": {"host": "10.0.99.1", "username": "u"}},
        "targets.vm.paths[1].redfish: Redfish needs password or password_file",
    ),
    (
        "targets.vm.paths[1]",
        {"nut": {"host": "10.0.0.9"}},
        "targets.vm.paths[1].ups: required key is missing",
    ),
    (
        "targets.vm.paths[1]",
        {"ipmi": {"host": "10.0.99.1", "username": "u", "password": "p", "cipher_suite": 99}},
        "targets.vm.paths[1].cipher_suite: input should be less than or equal to 17",
    ),
    (
        "targets.vm.paths[1]",
        {"ipmi": {"host": "10.0.99.1", "username": "u", "password": "p", "privilege": "root"}},
        "targets.vm.paths[1].privilege: must be one of user, operator or administrator, got 'root'",
    ),
    ("targets.vm.service", {"rto": "4h"}, "targets.vm.service.name: required key is missing"),
    ("targets.vm.service.restore_order", -1, "targets.vm.service.restore_order: input should be greater"),
    ("notify.channels[0].name", "bad name!", "notify.channels[0].name: string should match pattern"),
    ("notify.channels[0].format", "pager", "notify.channels[0].format: must be one of auto, long or sms"),
    ("notify.escalation[0].unless", "resolved", "notify.escalation[0].unless: must be one of acknowledged"),
    ("heartbeat", {"url": "http://127.0.0.1/hb", "every": "never"}, "heartbeat.every: must be a duration"),
    ("defaults.recover_after", -3, "defaults.recover_after: input should be greater than or equal to 1"),
    ("log_format", "xml", "log_format: must be one of text or json, got 'xml'"),
    ("retention", "forever", "retention: must be a duration"),
    (
        "targets.vm.paths[1]",
        {"dns": {"server": "10.0.10.21", "query": "x", "transport": "quic"}},
        "targets.vm.paths[1].transport: must be one of udp or tcp, got 'quic'",
    ),
    (
        "targets.vm.paths[1]",
        {"http": {"url": "http://10.0.10.21/", "method": "DELETE"}},
        "targets.vm.paths[1].method: must be one of GET, HEAD or POST, got 'DELETE'",
    ),
    ("alertmanager", {"url": "ftp://am:9093"}, "alertmanager: alertmanager url must start with http://"),
    (
        "alertmanager",
        {"url": "http://am:9093", "labels": {"site": "x"}},
        "alertmanager.labels: label 'site' is set by watchtower",
    ),
    ("traps", {"listen": "127.0.0.1:1162"}, "traps: a trap listener needs communities"),
    ("targets.vm.paths[1]", {"trap": {}}, "targets.vm.paths[1].source: required key is missing"),
    ("targets.sw.paths[0]", {"icmp": "10.0.0.2", "\n": 1}, "targets.sw.paths[0]"),  # a key no one can see
]


@pytest.mark.parametrize(("where", "value", "expected"), BROKEN)
def test_broken_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, value: Any, expected: str
) -> None:
    code, out, err = run_check(tmp_path, mutate(where, value), capsys)
    assert code == 2
    assert out == ""
    assert expected in err, err
    assert "Traceback" not in err


def test_at_least_50_broken_configs() -> None:
    assert len(BROKEN) >= 50


def test_duplicate_path_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = mutate("targets.hv.paths[1]", {"icmp": "10.0.10.11"})
    code, _, err = run_check(tmp_path, data, capsys)
    assert code == 2
    assert "targets.hv.paths[1].name: 'icmp 10.0.10.11' is already the name of paths[0]" in err


def test_yaml_errors_name_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_check(tmp_path, "site: a\ntargets:\n  sw: {role: network\n", capsys)
    assert code == 2 and "wt.yaml:" in err and "invalid YAML" in err
    code, _, err = run_check(tmp_path, "site: a\nsite: b\ntargets: {}\n", capsys)
    assert code == 2 and "duplicate key 'site'" in err and ":2:" in err
    code, _, err = run_check(tmp_path, "- just\n- a list\n", capsys)
    assert code == 2 and "(top level)" in err


def test_missing_file_is_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "-c", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    assert "no such file" in capsys.readouterr().err


def test_check_as_a_process_never_tracebacks(tmp_path: Path) -> None:
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(yaml.safe_dump(mutate("targets.hv.paths[0].icmp", {"host": "10.0.10.11", "timeout": "x"})))
    proc = subprocess.run(
        [sys.executable, "-m", "watchtower.cli", "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "targets.hv.paths[0].timeout: must be a duration like 2s, 500ms, 15m or 4h"


def test_short_forms_defaults_and_overrides(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["defaults"] = {"interval": "10s", "timeout": "1s", "fail_after": 3}
    data["targets"]["hv"]["interval"] = "4s"
    data["targets"]["hv"]["paths"] = [
        {"icmp": "10.0.10.11"},
        {"tcp": "[2001:db8::1]:8006"},
        {"icmp": {"host": "10.0.99.11", "interval": "2s", "name": "mgmt"}},
        {"http": "https://10.0.10.11:8006/"},
    ]
    cfg = parse_config(data, tmp_path)
    hv = {p.name: p for p in cfg.paths if p.target == "hv"}
    assert set(hv) == {"icmp 10.0.10.11", "tcp [2001:db8::1]:8006", "mgmt", "http https://10.0.10.11:8006/"}
    assert hv["icmp 10.0.10.11"].interval == 4.0  # target overrides defaults
    assert hv["mgmt"].interval == 2.0  # path overrides target
    assert hv["icmp 10.0.10.11"].fail_after == 3  # defaults fill the rest
    assert hv["http https://10.0.10.11:8006/"].timeout == 3.0  # http's floor beats defaults.timeout
    assert cfg.paths[0].interval == 10.0
    assert cfg.confirm_paths("hv") == 2


def test_frozen_models(tmp_path: Path) -> None:
    cfg = parse_config(copy.deepcopy(BASE), tmp_path)
    with pytest.raises(Exception, match="frozen"):
        cfg.site = "other"  # type: ignore[misc]


def test_secret_files_credentials_directory_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mail-url").write_text("mailto://from-credentials\n")
    (tmp_path / "mail-url").write_text("mailto://from-config-dir\n")
    (tmp_path / "token").write_text("tok\n")
    data = copy.deepcopy(BASE)
    data["api_token_file"] = "token"
    data["notify"]["channels"][0] = {"name": "mail", "url_file": "mail-url", "tags": ["tier1"]}
    cfg = parse_config(data, tmp_path)
    assert cfg.notify.channels[0].secret("url").get_secret_value() == "mailto://from-config-dir"  # type: ignore[union-attr]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = parse_config(data, tmp_path)
    assert cfg.notify.channels[0].secret("url").get_secret_value() == "mailto://from-credentials"  # type: ignore[union-attr]
    # the token is only next to the config: the fallback still finds it
    assert cfg.secret("api_token").get_secret_value() == "tok"  # type: ignore[union-attr]
    assert "from-credentials" not in repr(cfg) and "tok'" not in repr(cfg)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2), ("15m", 900), ("4h", 14400), ("1h30m", 5400), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 sec", "s", "-1s", "1x", "m5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)


def test_schema_is_json_and_yaml_shaped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    options = schema["$defs"]["Target"]["properties"]["paths"]["items"]["oneOf"]
    assert {next(iter(o["properties"])) for o in options} >= {"icmp", "tcp", "http", "dns", "snmp"}
    assert "kind" not in schema["$defs"]["IcmpPath"]["properties"]
    assert json_schema()["title"] == "watchtower configuration"


def test_config_error_lists_every_problem(tmp_path: Path) -> None:
    data = mutate("targets.hv.role", "nope")
    data["targets"]["vm"]["runs_on"] = "ghost"
    with pytest.raises(ConfigError) as exc:
        parse_config(data, tmp_path)
    assert any(p.startswith("targets.hv.role") for p in exc.value.problems)


def test_configuration_reference_is_current() -> None:
    from watchtower.docs import config_reference

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_reference(), "run: python -m watchtower.docs > docs/configuration.md"


# --------------------------------------------------------------------------- networks

NETWORKED = {
    **copy.deepcopy(BASE),
    "networks": {
        "prod": {"cidr": ["10.0.10.0/24", "10.0.20.0/24"], "via": ["sw"], "label": "production"},
        "core": {"cidr": "10.0.0.0/16"},  # less specific: what no other range holds
    },
}


def test_paths_are_placed_on_the_most_specific_network() -> None:
    data = copy.deepcopy(NETWORKED)
    data["targets"]["vm"]["paths"].append(
        {"tcp": {"host": "erp.acme.example", "port": 443, "network": "prod"}}
    )
    data["targets"]["vm"]["paths"].append({"tcp": "erp.acme.example:8443"})
    cfg = parse_config(data, Path("."))
    placed = {(p.target, p.name): p.network for p in cfg.paths}
    assert placed[("sw", "icmp 10.0.0.2")] == "core"
    assert placed[("hv", "icmp 10.0.10.11")] == "prod"
    assert placed[("nas", "icmp 10.0.20.5")] == "prod"
    assert placed[("vm", "tcp erp.acme.example:443")] == "prod"  # a name: only by `network:`
    assert placed[("vm", "tcp erp.acme.example:8443")] is None
    from watchtower.config import unplaced_paths
    from watchtower.engine.topology import Topology

    assert [p.name for p in unplaced_paths(cfg)] == ["tcp erp.acme.example:8443"]
    topo = Topology.from_config(cfg)
    assert topo.networks["prod"].title == "production network via sw"
    assert topo.nodes["nas"].parents == ("sw",)  # all its paths on prod, carried by sw


def test_bmc_paths_are_served_by_the_bmc() -> None:
    data = copy.deepcopy(NETWORKED)
    data["targets"]["hv"]["bmc"] = {"ipmi": {"host": "10.0.99.11", "username": "u", "password": "p"}}
    data["targets"]["hv"]["paths"].append({"icmp": {"host": "10.0.99.11", "name": "bmc ping"}})
    cfg = parse_config(data, Path("."))
    served = {p.name: p.by_bmc for p in (*cfg.paths, *cfg.bmc_paths) if p.target == "hv"}
    assert served == {
        "icmp 10.0.10.11": False,
        "tcp 10.0.10.11:8006": False,
        "bmc ping": True,
        "bmc ipmi 10.0.99.11": True,
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("networks", {"prod": {"cidr": ["10.0.10.300/24"]}}), "networks.prod.cidr"),
        (("networks", {"prod": {"cidr": []}}), "networks.prod.cidr: needs at least 1 entry"),
        (
            ("networks", {"prod": {"cidr": ["10.0.10.0/24"], "via": ["sw2"]}}),
            "networks.prod.via[0]: no target named 'sw2' (did you mean 'sw'?)",
        ),
        (("networks", {"prod": {"cidr": ["10.0.10.0/24"], "vai": ["sw"]}}), "networks.prod.vai"),
        (("networks", {"bad name!": {"cidr": ["10.0.10.0/24"]}}), "networks"),
    ],
)
def test_bad_networks_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, Any], expected: str
) -> None:
    data = copy.deepcopy(BASE)
    data[change[0]] = change[1]
    code, _, err = run_check(tmp_path, data, capsys)
    assert code == 2 and expected in err, err


def test_path_network_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(NETWORKED)
    data["targets"]["hv"]["paths"][0] = {"icmp": {"host": "10.0.10.11", "network": "prd"}}
    code, _, err = run_check(tmp_path, data, capsys)
    assert code == 2
    assert "targets.hv.paths[0].network: no network named 'prd' (did you mean 'prod'?)" in err


def test_check_explain_shows_networks_and_warns_about_unplaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy.deepcopy(NETWORKED)
    data["networks"].pop("core")
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(cfg), "--explain"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "ok: 4 targets, 6 paths"
    assert "  prod: 10.0.10.0/24, 10.0.20.0/24 via sw" in out
    assert any(line.split() == ["icmp", "10.0.10.11", "OS", "prod", "via", "sw"] for line in out.splitlines())
    assert any(line.split() == ["icmp", "10.0.0.2", "OS", "NO", "NETWORK"] for line in out.splitlines())
    assert "warning: targets.sw path 'icmp 10.0.0.2' (10.0.0.2) is on no network" in err
    # without networks: nothing to warn about, the inferred prefixes are shown
    cfg.write_text(yaml.safe_dump(BASE))
    assert main(["check", "-c", str(cfg), "--explain"]) == 0
    out, err = capsys.readouterr()
    assert "networks: none configured; inferred from address prefixes" in out
    assert any(line.split() == ["icmp", "10.0.10.11", "OS", "[10.0.10.0/24]"] for line in out.splitlines())
    assert err == ""


# --------------------------------------------------------------------------- issue 15: hostile configs

BOMB = "\n".join(
    [
        "a0: &a0 [x,x,x,x,x,x,x,x,x,x]",
        *(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)),
        "site: s",
        "targets:",
        "  h: {role: *a8, paths: [icmp: 10.0.0.1]}",
    ]
)


def test_alias_bomb_is_refused_fast_in_a_process(tmp_path: Path) -> None:
    """A 700-byte "billion laughs" (10^9 values once expanded) used to grow `check` to 2.2 GB."""
    assert len(BOMB) < 800
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    proc = subprocess.run(
        [sys.executable, "-m", "watchtower", "check", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "aliases expand to more than" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 300


def test_moderate_aliases_still_work(tmp_path: Path) -> None:
    text = (
        "x: &p [{icmp: 10.0.0.1}]\nsite: s\ntargets:\n"
        "  a: {role: hypervisor, paths: *p}\n  b: {role: hypervisor, paths: *p}\n"
    )
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:  # `x` is an unknown key: the aliases themselves are fine
        load_config(cfg)
    assert err.value.problems == ["x: unknown key"]


@pytest.mark.parametrize("text", ["[" * 50_000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200))])
def test_deep_nesting_is_a_clean_line_and_exit_2(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "watchtower", "check", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "nested more than 100 levels deep" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_huge_values_are_cut_in_messages(tmp_path: Path) -> None:
    data = mutate("log_format", "x" * 100_000)
    data["targets"]["sw"]["paths"] = [{"icmp": "y" * 100_000}]
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path)
    assert err.value.problems and all(len(p) < 300 for p in err.value.problems)


def test_config_file_size_cap(tmp_path: Path) -> None:
    cfg = tmp_path / "big.yaml"
    with cfg.open("wb") as f:
        f.truncate(33 * 1024 * 1024)  # sparse: no disk used
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.problems == [f"{cfg} is larger than 32768 KiB"]


def test_empty_api_token_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(mutate("api_token", ""), Path("."))
    assert err.value.problems == ["api_token: is empty; remove the key to run without a token, or set one"]
    with pytest.raises(ConfigError):
        parse_config(mutate("api_token", "   "), Path("."))


@pytest.mark.parametrize("host", ["10.0.1.333", "10.0.1", "1.2.3.4.5", "256.1.1.1"])
def test_ipv4_lookalikes_are_not_host_names(host: str) -> None:
    data = copy.deepcopy(BASE)
    data["targets"]["sw"]["paths"] = [{"icmp": host}]
    with pytest.raises(ConfigError) as err:
        parse_config(data, Path("."))
    assert err.value.problems == [f"targets.sw.paths[0].host: {host!r} is not a valid IPv4 address"]


def test_secret_files_are_regular_bounded_single_line(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_text("x" * (65 * 1024))
    two = tmp_path / "two"
    two.write_text("root:$6$abc:19000:0:99999:7:::\nuser:$6$def:19000:0:99999:7:::\n")
    one = tmp_path / "one"
    one.write_text("s3cret\n")
    link = tmp_path / "link"
    link.symlink_to(one)
    cases = {
        "/dev/zero": "is not a regular file",
        str(fifo): "is not a regular file",
        str(tmp_path): "IsADirectoryError",
        str(big): "is larger than 64 KiB",
        str(two): "holds more than one line",
    }
    for path, problem in cases.items():
        data = copy.deepcopy(BASE)
        data["notify"]["channels"][0] = {"name": "mail", "url_file": path, "tags": ["tier1"]}
        done: list[ConfigError] = []

        def parse(data: Any = data, done: list[ConfigError] = done) -> None:
            try:
                parse_config(data, tmp_path)
            except ConfigError as exc:
                done.append(exc)

        worker = threading.Thread(target=parse, daemon=True)
        worker.start()
        worker.join(30)  # a FIFO used to block here for ever
        assert done, f"{path}: no answer"
        assert problem in done[0].problems[0], done[0].problems
    data = copy.deepcopy(BASE)
    data["notify"]["channels"][0] = {"name": "mail", "url_file": str(link), "tags": ["tier1"]}
    cfg = parse_config(data, tmp_path)
    secret = cfg.notify.channels[0].secret("url")
    assert secret is not None and secret.get_secret_value() == "s3cret"
    # A file of communities is a list: many lines are its point.
    data = copy.deepcopy(BASE)
    communities = tmp_path / "communities"
    communities.write_text("public1\npublic2\n")
    data["traps"] = {"listen": "127.0.0.1:1162", "communities_file": str(communities)}
    assert len(parse_config(data, tmp_path).traps.community_list()) == 2  # type: ignore[union-attr]
