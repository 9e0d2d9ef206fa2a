"""What `check` catches that users get wrong: channel URLs apprise refuses, a default timeout longer
than the interval, indentation slips, and a JSON Schema whose defaults are valid values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from watchtower.cli import main
from watchtower.config import json_schema

REPO = Path(__file__).resolve().parents[2]

BASE = """\
site: t
targets:
  erp1:
    role: service
    paths:
      - tcp: 10.0.0.5:443
      - icmp: 10.0.0.5
  dc1:
    role: vm
    paths:
      - icmp: 10.0.0.6
"""


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(text)
    try:
        code = main(["check", "-c", str(cfg)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_check_rejects_a_url_apprise_refuses_naming_the_channel_not_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mail-url").write_text("mail://monitor:Hunter2pw@smtp.acme.test?to=oncall@acme.test\n")
    text = BASE + (
        "notify:\n  channels:\n"
        "    - {name: mail-oncall, url_file: mail-url, tags: [tier1]}\n"
        "    - {name: signal-oncall, url: 'signal://127.0.0.1:8080/+1555/+15550000002', tags: [tier1]}\n"
        "    - {name: mail-ok, url: 'mailto://127.0.0.1:25?to=a@acme.test&from=w@acme.test', tags: [tier1]}\n"
    )
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("notify.channels[0].url_file: channel 'mail-oncall': apprise does not accept")
    assert "did you mean mailto://" in lines[0]
    assert lines[1].startswith("notify.channels[1].url: channel 'signal-oncall': apprise does not accept")
    for secret in ("Hunter2pw", "monitor", "smtp.acme.test", "oncall@acme.test", "127.0.0.1:8080", "+1555"):
        assert secret not in err


def test_a_too_long_default_timeout_is_reported_once_at_defaults_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = check(tmp_path, "defaults: {timeout: 10s}\n" + BASE, capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "defaults.timeout: 10s is longer than its interval 5s (used by 3 paths, e.g. targets.erp1.paths[0])"
    ]
    text = BASE.replace("    role: vm\n", "    role: vm\n    timeout: 7s\n")
    code, _, err = check(tmp_path, text, capsys)
    assert err.strip().splitlines() == ["targets.dc1.timeout: 7s is longer than its interval 5s"]


def test_indentation_slips_get_a_hint_and_no_model_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    too_deep = BASE.replace("    paths:\n      - tcp", "     paths:\n      - tcp", 1)
    code, _, err = check(tmp_path, too_deep, capsys)
    assert code == 2
    assert "invalid YAML: mapping values are not allowed here (check the indentation" in err
    dedented = BASE.replace(
        "  dc1:\n    role: vm\n    paths:\n      - icmp", "  dc1:\n  role: vm\n  paths:\n    - icmp"
    )
    code, _, err = check(tmp_path, dedented, capsys)
    assert code == 2
    assert "targets.dc1: must be a mapping of settings, got nothing (check the indentation" in err
    assert "Target" not in err and "instance" not in err and "dictionary" not in err


def _defaults(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if "default" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _defaults(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _defaults(value, f"{path}[{i}]")
    return found


def test_every_default_in_the_schema_is_valid_under_its_own_schema() -> None:
    schema = json_schema()
    defaults = _defaults(schema)
    assert len(defaults) > 40
    durations = 0
    jsonschema.Draft202012Validator.check_schema(schema)
    for _, prop in defaults:
        sub = {k: v for k, v in prop.items() if k != "default"}
        sub["$defs"] = schema["$defs"]
        jsonschema.Draft202012Validator(sub).validate(prop["default"])  # raises naming the key
        durations += isinstance(prop["default"], str) and prop["default"][-1:] in "smhd"
    assert durations >= 13  # "5s", not 5.0
    # and the example config validates against the schema as a whole
    example = yaml.safe_load((REPO / "config" / "watchtower.example.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(example)


def test_schema_into_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.run(
        f"{sys.executable} -m watchtower.cli schema | head -n 3",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.stdout.splitlines()[0] == "{"
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_finds_secrets_in_the_credentials_dir_and_daemon_commands_need_only_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from watchtower.config import ConfigError, load_client_config, load_config

    creds, unit_creds, etc = tmp_path / "credentials", tmp_path / "unit", tmp_path / "etc"
    for d in (creds, unit_creds, etc):
        d.mkdir()
    (creds / "api-token").write_text("root-shell-token\n")
    (unit_creds / "api-token").write_text("unit-token\n")
    cfg = etc / "watchtower.yaml"
    cfg.write_text(
        "api_token_file: api-token\n" + BASE
        + "    bmc: {ipmi: {host: 10.0.99.6, username: m, password_file: bmc-dc1}}\n"
    )  # fmt: skip
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("WATCHTOWER_CREDENTIALS", str(creds))
    # the BMC password is not there: the full config names it and where it looked ...
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert f"file not found: bmc-dc1 (looked in {creds} and {etc})" in exc.value.problems[0]
    # ... but ack/status/incidents need only the token, found in the credentials dir
    client = load_client_config(cfg)
    token = client.secret("api_token")
    assert token is not None and token.get_secret_value() == "root-shell-token"
    (creds / "bmc-dc1").write_text("pw\n")
    full = load_config(cfg)
    assert full.secret("api_token") is not None
    # under the unit, systemd's $CREDENTIALS_DIRECTORY comes first
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(unit_creds))
    token = load_client_config(cfg).secret("api_token")
    assert token is not None and token.get_secret_value() == "unit-token"


def test_every_command_says_its_exit_codes_and_every_argument_has_help() -> None:
    import argparse

    from watchtower.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"mute", "unmute", "ack", "check"} <= set(sub.choices)
    for name, command in sub.choices.items():
        assert command.epilog and command.epilog.startswith("exit codes: 0"), name
        for action in command._actions:
            assert action.help, f"{name} {action.dest} has no help text"
    assert "cut-monitor" in sub.choices["lab"].format_help()
    assert "restore-monitor" in sub.choices["lab"].format_help()


async def test_a_reload_with_a_url_apprise_refuses_keeps_the_running_config(tmp_path: Path) -> None:
    from contextlib import AsyncExitStack

    from watchtower.config import load_config
    from watchtower.daemon import reload_config
    from watchtower.engine.monitor import Monitor

    good = BASE + (
        "notify:\n  channels:\n"
        "    - {name: mail-ok, url: 'mailto://127.0.0.1:25?to=a@acme.test&from=w@acme.test', tags: [t]}\n"
    )
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(good)
    monitor = Monitor(load_config(cfg))
    cfg.write_text(good.replace("mailto://", "mail://"))
    async with AsyncExitStack() as stack:
        assert not await reload_config(str(cfg), monitor, stack)
    url = monitor.config.notify.channels[0].secret("url")
    assert url is not None and url.get_secret_value().startswith("mailto://")
    assert not monitor.reloaded_ok
