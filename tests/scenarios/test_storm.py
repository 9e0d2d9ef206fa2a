"""A failure storm: a switch and every host behind it stop answering at once, so every path times
out together. The daemon must stay responsive (/healthz and /metrics well under 1 s), its memory
bounded, and the correlator must say it with one incident, not one per target.

CI runs 1,000 paths; ``WATCHTOWER_FULL=1`` runs the issue's 5,000."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import free_port, stop_process

from watchtower.lab import Lab, bulk_site

pytestmark = pytest.mark.netns

PATHS = 5000 if os.environ.get("WATCHTOWER_FULL") else 1000
PER_TARGET = 2  # two independent paths each, so two-path confirmation applies


@pytest.fixture(scope="module")
def storm_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # Clear of the demo (10.213.0.0/20, 10.213.96.0/20), the benches (10.213.192.0/18) and the
    # other scenario sites.
    spec = bulk_site("wtm", 1, bulk_net="10.213.160.0/19", link_net="10.213.25.0/24")
    lab = Lab(spec, tmp_path_factory.mktemp("lab-wtm"))
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def timed_get(url: str) -> tuple[float, int, bytes]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read()
        return time.monotonic() - started, r.status, body


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_everything_times_out_at_once(storm_site: Lab, tmp_path: Path) -> None:
    addresses = storm_site.spec.bulk_addresses(PATHS)
    switch = storm_site.spec.host("bulk1").addresses[0].split("/")[0]
    targets: dict[str, Any] = {"sw": {"role": "network", "paths": [{"icmp": switch}]}}
    for n in range(PATHS // PER_TARGET):
        pair = addresses[n * PER_TARGET : (n + 1) * PER_TARGET]
        targets[f"vm{n:04d}"] = {"role": "vm", "depends_on": ["sw"], "paths": [{"icmp": a} for a in pair]}
    port = free_port()
    cfg = tmp_path / "storm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "storm",
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(tmp_path / "state"),
                "targets": targets,
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "watchtower", "run", "-c", str(cfg)], stdout=log, stderr=log
    )

    def state() -> dict[str, Any]:
        return dict(json.loads(timed_get(base + "/api/v1/state")[2]))

    def until(predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except OSError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    try:
        until(lambda: all(t["state"] == "up" for t in state()["targets"].values()), 60, "all up")
        before_mb = rss_mb(proc.pid)
        storm_site.break_host("bulk1", "loss", 100)  # the switch and everything behind it go silent
        started = time.monotonic()
        worst = {"healthz": 0.0, "metrics": 0.0}
        peak_mb = before_mb

        def settled() -> list[dict[str, Any]] | None:
            nonlocal peak_mb
            for name in worst:
                took, status, _ = timed_get(f"{base}/{name}")
                assert status == 200, name
                worst[name] = max(worst[name], took)
            peak_mb = max(peak_mb, rss_mb(proc.pid))
            incidents = json.loads(timed_get(base + "/api/v1/incidents")[2])
            doc = state()
            down = [n for n, t in doc["targets"].items() if t["state"] in ("down", "unreachable")]
            return incidents if len(down) == len(targets) else None

        incidents = until(settled, 90, "every target down or unreachable")
        detect = time.monotonic() - started
        # keep watching through a few more probe rounds of the failing storm
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            settled()
            time.sleep(0.5)
        incidents = json.loads(timed_get(base + "/api/v1/incidents")[2])
        print(
            f"\nstorm: {PATHS} paths down in {detect:.1f}s; worst /healthz {worst['healthz'] * 1000:.0f} ms,"
            f" /metrics {worst['metrics'] * 1000:.0f} ms; RSS {before_mb:.0f} -> peak {peak_mb:.0f} MB;"
            f" incidents {len(incidents)}"
        )
        assert worst["healthz"] < 1.0 and worst["metrics"] < 1.0, worst
        assert peak_mb < before_mb + 150, (before_mb, peak_mb)
        assert [(i["scope"], i["root"]) for i in incidents] == [("network", "sw")]
        assert len(incidents[0]["affected"]) == len(targets) - 1
    finally:
        storm_site.repair("bulk1")
        stop_process(proc)
        log.close()
