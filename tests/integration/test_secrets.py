"""Secrets never leak: a unique string is planted in every secret field of the config (BMC
passwords of ipmi/redfish paths and bmc blocks, SNMP communities and v3 keys, trap communities and
user keys, NUT and HTTP passwords, apprise URLs with tokens and a mail password, the heartbeat and
Alertmanager URLs, the API token). ``watchtower run`` (log level DEBUG) then goes through a bad
day: every target points at a closed or failing loopback port, the SMS gateway answers 500, the
mail server refuses the login, the heartbeat receiver answers 500. None of the secrets may appear
in its log, ``/metrics``, ``/api/v1/*``, the status page, the report, the CLI's output (``check``,
``probe``, ``status``, ``incidents``, ``report``, ``notify-test``) or the alert texts received.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import secrets as pysecrets
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from sinks import HttpSink, SmtpSink, mailto_url, signal_url, smseagle_url
from support import free_port, stop_process, until

pytestmark = pytest.mark.slow

NAMES = (
    "api",
    "ipmi_path",
    "ipmi_bmc",
    "redfish_path",
    "redfish_bmc",
    "snmp_community",
    "snmp_auth",
    "snmp_priv",
    "trap_community",
    "trap_auth",
    "trap_priv",
    "nut",
    "http",
    "sms_token",
    "mail_password",
    "heartbeat",
    "alertmanager",
)


def planted() -> dict[str, str]:
    # Letters and digits only: the same in a URL, URL-encoded, in JSON and in HTML.
    return {name: f"Zq{name.replace('_', '')}{pysecrets.token_hex(6)}" for name in NAMES}


def closed_port() -> int:
    return free_port()


def site(
    tmp: Path,
    s: dict[str, str],
    signal_gw: HttpSink,
    sms_gw: HttpSink,
    smtp: SmtpSink,
    hb: HttpSink,
    web_gw: HttpSink,
) -> tuple[Path, str]:
    listen = f"127.0.0.1:{free_port()}"
    udp = free_port
    fast = {"timeout": "1500ms", "interval": "2s", "retry_interval": "500ms"}
    doc: dict[str, Any] = {
        "site": "secrets",
        "listen": listen,
        "state_dir": str(tmp / "state"),
        "api_token": s["api"],
        "defaults": {"interval": "1s", "retry_interval": "300ms", "timeout": "500ms", "fail_after": 1},
        "targets": {
            "pve1": {
                "role": "hypervisor",
                "bmc": {
                    "ipmi": {
                        "host": "127.0.0.1",
                        "port": udp(),
                        "username": "mon",
                        "password": s["ipmi_bmc"],
                        **fast,
                    }
                },
                "paths": [
                    {"tcp": f"127.0.0.1:{closed_port()}"},
                    {
                        "ipmi": {
                            "host": "127.0.0.1",
                            "port": udp(),
                            "username": "mon",
                            "password": s["ipmi_path"],
                            "name": "ipmi",
                            **fast,
                        }
                    },
                ],
            },
            "pve2": {
                "role": "hypervisor",
                "bmc": {
                    "redfish": {
                        "host": "127.0.0.1",
                        "port": web_gw.port,
                        "username": "mon",
                        "password": s["redfish_bmc"],
                        "insecure": True,
                        **fast,
                    }
                },
                "paths": [
                    {"tcp": f"127.0.0.1:{closed_port()}"},
                    {
                        "redfish": {
                            "host": "127.0.0.1",
                            "port": closed_port(),
                            "username": "mon",
                            "password": s["redfish_path"],
                            "auth": "basic",
                            "insecure": True,
                            "name": "redfish",
                            **fast,
                        }
                    },
                ],
            },
            "nas1": {
                "role": "storage",
                "paths": [
                    {
                        "snmp": {
                            "host": "127.0.0.1",
                            "port": udp(),
                            "community": s["snmp_community"],
                            "name": "snmp-v2c",
                            **fast,
                        }
                    },
                    {
                        "snmp": {
                            "host": "127.0.0.1",
                            "port": udp(),
                            "version": "3",
                            "username": "mon",
                            "auth_key": s["snmp_auth"],
                            "priv_key": s["snmp_priv"],
                            "name": "snmp-v3",
                            **fast,
                        }
                    },
                    {
                        "nut": {
                            "host": "127.0.0.1",
                            "port": closed_port(),
                            "ups": "ups1",
                            "username": "mon",
                            "password": s["nut"],
                            **fast,
                        }
                    },
                ],
            },
            "web1": {
                "role": "service",
                "service": {"name": "Web", "rto": "1h"},
                "paths": [
                    {
                        "http": {
                            "url": f"{web_gw.url}/health",
                            "username": "mon",
                            "password": s["http"],
                            **fast,
                        }
                    },
                    {"tcp": f"127.0.0.1:{closed_port()}"},
                ],
            },
        },
        "traps": {
            "listen": f"127.0.0.1:{udp()}",
            "communities": [s["trap_community"]],
            "users": [{"username": "trapper", "auth_key": s["trap_auth"], "priv_key": s["trap_priv"]}],
        },
        "notify": {
            "channels": [
                {"name": "signal", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
                {"name": "sms", "url": smseagle_url(sms_gw.port, token=s["sms_token"]), "tags": ["tier1"]},
                {"name": "mail", "url": mailto_url(smtp.port), "tags": ["tier1"]},
                {
                    "name": "mail-auth",  # the sink offers no AUTH: the login fails, with a reason
                    "url": f"mailto://mon:{s['mail_password']}@127.0.0.1:{smtp.port}?to=x@lab.test&from=w@lab.test",
                    "tags": ["tier1"],
                },
            ],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
            "channel_warn_after": "2s",
            "retry_max": "2s",
        },
        "heartbeat": {"url": f"{hb.url}/ping/{s['heartbeat']}", "every": "1s", "timeout": "1s"},
        "alertmanager": {"url": f"http://mon:{s['alertmanager']}@127.0.0.1:{closed_port()}", "every": "2s"},
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, f"http://{listen}"


def get(url: str, token: str | None = None, accept: str = "*/*") -> tuple[int, str]:
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError:
        return 0, ""


def leaks(text: str, s: dict[str, str]) -> list[str]:
    found = [name for name, value in s.items() if value in text]
    for name in ("http", "redfish_path"):  # basic auth: the base64 of user:password
        b64 = base64.b64encode(f"mon:{s[name]}".encode()).decode()
        if b64 in text:
            found.append(f"{name} (base64)")
    return found


def test_no_secret_leaks_through_any_output(tmp_path: Path) -> None:
    s = planted()
    signal_gw, sms_gw, hb = HttpSink().start(), HttpSink(mode="error500").start(), HttpSink(mode="error500")
    web_gw = HttpSink(mode="error500").start()
    hb.start()
    smtp = SmtpSink().start()
    cfg, base = site(tmp_path, s, signal_gw, sms_gw, smtp, hb, web_gw)
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    outputs: dict[str, str] = {}

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "watchtower", *args], capture_output=True, text=True, timeout=60, env=env
        )
        text = proc.stdout + proc.stderr
        assert "Traceback" not in text, (args, text)
        return text

    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg), "--log-level", "DEBUG"],
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        token = s["api"]

        def incidents() -> list[Any]:
            code, body = get(base + "/api/v1/incidents?all=1", token)
            return json.loads(body) if code == 200 else []

        def every_target_has_an_incident() -> bool:
            roots = {i["root"] for i in incidents()}
            return {"pve1", "pve2", "nas1", "web1"} <= roots

        until(every_target_has_an_incident, 40, "an incident per target", log)
        until(
            lambda: signal_gw.requests and sms_gw.requests and hb.requests and smtp.messages,
            30,
            "pages at the gateways and a heartbeat",
            log,
        )

        def failures_recorded() -> bool:
            notes = [n for i in incidents() for n in i["notifications"]]
            failed = {n["channel"] for n in notes if n["error"]}
            return {"sms", "mail-auth"} <= failed

        until(failures_recorded, 30, "the failing channels' reasons", log)
        # a channel failing longer than channel_warn_after: the warning names its error
        until(lambda: any("failing" in m.subject for m in smtp.messages), 30, "a channel warning", log)

        ids = [i["id"] for i in incidents()]
        for path in ("/metrics", "/healthz", "/api/v1/state", "/api/v1/incidents", "/api/v1/incidents?all=1"):
            code, body = get(base + path, token)
            assert code in (200, 503), (path, code)
            outputs[path] = body
        for n in ids:
            for path in (f"/api/v1/incidents/{n}", f"/api/v1/incidents/{n}/report"):
                code, body = get(base + path, token)
                assert code == 200, (path, code)
                outputs[path] = body
        code, page = get(base + "/", token, accept="text/html")
        assert code == 200 and "pve1" in page
        outputs["/"] = page
        code, login = get(base + "/login", accept="text/html")
        outputs["/login"] = login
        code, denied = get(base + "/api/v1/state", "wrong-" + token)
        assert code == 401
        outputs["401"] = denied

        c = str(cfg)
        outputs["check"] = cli("check", "-c", c)
        for target in ("pve1", "pve2", "nas1", "web1"):
            outputs[f"probe {target}"] = cli("probe", "-c", c, target, "--json")
            outputs[f"probe {target} table"] = cli("probe", "-c", c, target)
        outputs["status"] = cli("status", "-c", c, "--json")
        outputs["incidents"] = cli("incidents", "-c", c, "--all", "--json")
        for n in ids:
            outputs[f"report {n}"] = cli("report", "-c", c, str(n))
        outputs["notify-test"] = cli("notify-test", "-c", c)
        assert "ipmi" in outputs["probe pve1"] and "redfish" in outputs["probe pve2"]
    finally:
        stop_process(proc)
        for sink in (signal_gw, sms_gw, hb, web_gw):
            sink.stop()
        smtp.stop()

    outputs["log"] = log.read_text(errors="replace")
    assert "notification failed" in outputs["log"] and "heartbeat" in outputs["log"]
    for n, m in enumerate(smtp.messages):
        outputs[f"mail {n}"] = m.raw.decode("utf-8", "replace")
    for n, r in enumerate(signal_gw.requests):
        outputs[f"signal {n}"] = r.body.decode("utf-8", "replace") + json.dumps(r.headers)
    for n, r in enumerate(sms_gw.requests):  # the token is the SMS gateway's own: only the text counts
        outputs[f"sms {n}"] = json.dumps(r.json["params"]["message"]) if r.json else ""
    found = {where: leaks(text, s) for where, text in outputs.items()}
    found = {where: names for where, names in found.items() if names}
    assert not found, found
    # the planted strings did reach where they belong (the test would prove nothing otherwise)
    assert any(s["heartbeat"] in r.path for r in hb.requests)
    assert any(
        r.query.get("access_token") == s["sms_token"] or s["sms_token"] in r.body.decode()
        for r in sms_gw.requests
    )
    assert any(r.headers.get("Authorization") for r in web_gw.requests)
    print(
        f"secrets: {len(s)} planted, {len(outputs)} outputs checked, {sum(map(len, outputs.values()))} bytes"
    )


def test_debug_log_hides_webhook_path_tokens(tmp_path: Path) -> None:
    """A webhook's token in the URL path (json://, Discord, Slack, Telegram, ntfy...): urllib3
    logged ``"POST /hook/TOKEN HTTP/1.1" 200`` at DEBUG on every send (issue 15)."""
    token_ok, token_bad = f"Zqhook{pysecrets.token_hex(8)}", f"Zqhook{pysecrets.token_hex(8)}"
    sink, failing = HttpSink().start(), HttpSink(mode="error500").start()
    listen = f"127.0.0.1:{free_port()}"
    doc = {
        "site": "hooks",
        "listen": listen,
        "state_dir": str(tmp_path / "state"),
        "defaults": {"interval": "1s", "retry_interval": "300ms", "timeout": "500ms", "fail_after": 1},
        "targets": {"web1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{closed_port()}"}]}},
        "notify": {
            "channels": [
                {"name": "hook", "url": f"json://127.0.0.1:{sink.port}/hook/{token_ok}", "tags": ["t"]},
                {"name": "bad", "url": f"json://127.0.0.1:{failing.port}/hook/{token_bad}", "tags": ["t"]},
            ],
            "escalation": [{"after": "0s", "notify": ["t"]}],
            "retry_max": "1s",
        },
    }
    cfg = tmp_path / "watchtower.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watchtower", "run", "-c", str(cfg), "--log-level", "DEBUG"],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    try:
        until(lambda: any(r.path.endswith(token_ok) for r in sink.requests), 40, "the page at the hook", log)
        until(lambda: len(failing.requests) >= 2, 30, "two attempts at the failing hook", log)
        until(lambda: "notification sent" in log.read_text(), 10, "the sent line", log)
    finally:
        stop_process(proc)
        sink.stop()
        failing.stop()
    text = log.read_text(errors="replace")
    assert "DEBUG" in text and "notification failed" in text  # the log is at DEBUG and saw both
    assert token_ok not in text and token_bad not in text, [
        line for line in text.splitlines() if token_ok in line or token_bad in line
    ][:5]
