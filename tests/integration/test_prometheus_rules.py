"""config/prometheus: promtool accepts the rules, their unit tests pass, the scrape example is a valid
config, and every watchtower_* series the rules use is one the daemon exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from watchtower.config import load_config
from watchtower.engine.monitor import Monitor
from watchtower.web import metrics

PROM = Path(__file__).resolve().parents[2] / "config" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) missing")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", "watchtower-rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", "watchtower-rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_scrape_example_is_a_valid_config() -> None:
    done = promtool("check", "config", "scrape.example.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROM / "watchtower-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "watchtower-rules.test.yml").read_text())
    tested = {
        t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]
    }
    assert alerts == tested, f"without a firing test: {alerts - tested}"


async def test_rules_use_only_exported_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "s",
                "state_dir": str(tmp_path),
                "targets": {"t": {"role": "service", "paths": [{"tcp": "127.0.0.1:9"}]}},
            }
        )
    )
    monitor = Monitor(load_config(cfg))
    text = metrics.render(monitor.snapshot()).decode()
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", text, re.M))
    names = set()
    for name, kind in exported:
        names.add(name)
        if kind == "counter":
            names.add(name + "_total")
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    rules = (PROM / "watchtower-rules.yml").read_text()
    used = set(re.findall(r"\bwatchtower_[a-z_]+", rules))
    assert used - names == set()
    assert {"watchtower_channel_up", "watchtower_notifications_total", "watchtower_store_writable"} <= used
