"""Shared pieces of the benchmarks: the machine line, RESULTS.md sections, waiting for the shared demo
site, watchtower as a subprocess, and the Prometheus stack (blackbox_exporter + Prometheus +
Alertmanager, Debian packages) probing the same addresses and posting to a local webhook.

Network safety: everything listens on 127.0.0.1; probes go only to the lab's 10.213.x.x namespaces.
Every process started here is stopped by its PID (``Proc.stop``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from watchtower.lab import DEMO, Lab  # noqa: E402
from watchtower.lab.sinks import HttpSink, SmtpSink, mailto_url, signal_url, smseagle_url  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BLACKBOX = shutil.which("prometheus-blackbox-exporter")
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def get_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(get(url, timeout))


def poll(cond: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown CPU",
    )  # fmt: skip
    return f"`nproc` {os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def stats(values: list[float]) -> tuple[float, float, float]:
    """(median, p90, max); p90 by nearest rank."""
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered) + 0.5) - 1))]
    return statistics.median(ordered), p90, ordered[-1]


def write_section(marker: str, lines: list[str]) -> None:
    """Replace (or append) the ``## ...`` section starting with ``marker`` in bench/RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "\n".join([marker, "", *lines, "", ""])  # a blank line before the next heading
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"`.venv/bin/python bench/{Path(sys.argv[0]).name}{' ' + args if args else ''}`"


# --------------------------------------------------------------------------- the shared demo site


def wait_lab_free(max_wait: float = 900.0, prefix: str = "wtd-", check_ci: bool = True) -> None:
    """Lab namespaces are global on this machine: wait until no ``prefix`` namespace exists and (with
    ``check_ci``) no pytest of a CI clone runs; bounded, raises if it stays busy."""
    deadline = time.monotonic() + max_wait
    while True:
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        busy_ns = any(line.startswith(prefix) for line in ns.splitlines())
        ci = subprocess.run(["pgrep", "-f", "/tmp/ci-clone/.*pytest"], capture_output=True, timeout=10)
        if not busy_ns and not (check_ci and ci.returncode == 0):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the lab stays in use ({prefix} namespaces or a CI pytest); try later")
        log(f"lab in use ({prefix} namespaces or a CI pytest); waiting ...")
        time.sleep(10)


def open_demo_lab(use_running: bool, max_wait: float) -> Lab:
    """The demo site: our own (after waiting for it to be free), or, with ``use_running``, the one
    already up (the smoke test's session fixture), which is then left up for its owner."""
    lab = Lab(DEMO)
    if use_running:
        if not lab.is_up():
            raise RuntimeError("--use-running-lab: the demo site is not up")
        return lab
    wait_lab_free(max_wait)
    lab.up()
    return lab


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    logfile: Path

    @classmethod
    def start(cls, name: str, argv: list[str], logfile: Path, cwd: Path | None = None) -> Proc:
        fh = logfile.open("wb")
        try:
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
        finally:
            fh.close()
        return cls(name, popen, logfile)

    @classmethod
    def stamped(cls, name: str, argv: list[str], logfile: Path, cwd: Path | None = None) -> Proc:
        """Like ``start``, each output line prefixed with ``time.monotonic()`` at its arrival."""
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
        out = popen.stdout
        assert out is not None

        def copy() -> None:
            with logfile.open("w") as fh:
                for raw in out:
                    fh.write(f"{time.monotonic():.3f} {raw.decode(errors='replace')}")
                    fh.flush()

        threading.Thread(target=copy, name=f"{name}-log", daemon=True).start()
        return cls(name, popen, logfile)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        """user + system CPU seconds (0 once it exited)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def hwm_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# --------------------------------------------------------------------------- watchtower


class Watchtower:
    """``watchtower run`` on a config (a subprocess, so the bench's own threads do not share its loop)."""

    def __init__(
        self, data: dict[str, Any], workdir: Path, name: str = "watchtower", log_level: str = "WARNING",
        stamped: bool = False,
    ):  # fmt: skip
        """``stamped``: every log line of the daemon is prefixed with the bench's ``time.monotonic()``
        when it arrived (the daemon's own timestamps have whole seconds), so a run's log lines up
        with its T0."""
        self.port = free_port()
        data = dict(data, listen=f"127.0.0.1:{self.port}")
        self.cfg = workdir / f"{name}.yaml"
        self.cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [sys.executable, "-m", "watchtower.cli", "run", "-c", str(self.cfg), "--log-level", log_level]
        self.logfile = workdir / f"{name}.log"
        if stamped:
            self.proc = Proc.stamped(name, argv, self.logfile, cwd=REPO)
        else:
            self.proc = Proc.start(name, argv, self.logfile, cwd=REPO)
        self.base = f"http://127.0.0.1:{self.port}"

    def state(self) -> Any:
        return get_json(f"{self.base}/api/v1/state")

    def incidents(self, all_: bool = False) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = get_json(f"{self.base}/api/v1/incidents{'?all=1' if all_ else ''}")
        return result

    def all_up(self) -> bool:
        doc = self.state()
        return doc["vantage"] == "up" and all(t["state"] == "up" for t in doc["targets"].values())

    def settled(self) -> bool:
        """Every target up and no open incident."""
        return self.all_up() and not self.incidents()

    def wait_settled(self, timeout: float = 120.0) -> None:
        def ok() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"watchtower exited:\n{self.proc.tail()}")
            return self.settled()

        poll(ok, timeout, "watchtower: every target up, no open incident", every=0.5)

    def stop(self) -> None:
        self.proc.stop()


class TimedSmtpSink(SmtpSink):
    """An SmtpSink that keeps (arrival monotonic, first recipient, subject) of every mail, taken in
    the sink's thread the moment the mail is accepted."""

    def __init__(self) -> None:
        super().__init__(on_message=self._arrived)
        self.arrivals: list[tuple[float, str, str]] = []

    def _arrived(self, message: Any) -> None:
        self.arrivals.append((time.monotonic(), message.rcpt_tos[0], message.subject))

    def first(self, rcpt: str, since: float, contains: str = "") -> tuple[float, str] | None:
        for at, to, subject in list(self.arrivals):
            if to == rcpt and at >= since and contains in subject:
                return at, subject
        return None


def demo_watchtower_config(
    smtp: SmtpSink, http: HttpSink, state_dir: Path, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config/demo.yaml as shipped (timings, confirm_paths, escalation), channels re-pointed at the
    sinks; the on-call mail is tier1 too, the provider and management mail keep their tiers."""
    data: dict[str, Any] = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    data["state_dir"] = str(state_dir)
    data["notify"]["channels"] = [
        {"name": "signal-oncall", "url": signal_url(http.port), "tags": ["tier1"]},
        {"name": "sms-oncall", "url": smseagle_url(http.port), "tags": ["tier1"]},
        {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
        {"name": "mail-provider", "url": mailto_url(smtp.port, to="provider@lab.test"), "tags": ["tier2"]},
        {"name": "mail-management", "url": mailto_url(smtp.port, to="md@lab.test"), "tags": ["tier4"]},
    ]
    for key, value in (overrides or {}).items():
        data[key] = value
    return data


# --------------------------------------------------------------------------- the Prometheus stack

# The demo's addresses as an admin would put them into blackbox_exporter: ICMP to every address,
# TCP where the demo has a TCP service. Labels carry the topology for the inhibit rules.
DEMO_PROBES: list[tuple[str, str, str]] = [
    # (host, module, target)
    ("core-sw1", "icmp", "10.213.10.2"),
    ("pve1", "icmp", "10.213.10.11"),
    ("pve1", "icmp", "10.213.99.11"),
    ("pve2", "icmp", "10.213.10.12"),
    ("pve2", "icmp", "10.213.99.12"),
    ("nas1", "icmp", "10.213.10.5"),
    ("nas1", "tcp_connect", "10.213.10.5:3260"),
    ("dc1", "icmp", "10.213.10.21"),
    ("dc1", "tcp_connect", "10.213.10.21:389"),
    ("mail1", "icmp", "10.213.10.22"),
    ("mail1", "tcp_connect", "10.213.10.22:25"),
    ("erp1", "icmp", "10.213.10.23"),
    ("files1", "icmp", "10.213.10.24"),
    ("files1", "tcp_connect", "10.213.10.24:445"),
]
DEMO_TOPOLOGY: dict[str, dict[str, str]] = {
    "core-sw1": {"role": "network"},
    "pve1": {"role": "hypervisor", "hv": "pve1"},
    "pve2": {"role": "hypervisor", "hv": "pve2"},
    "nas1": {"role": "storage", "storage": "nas1"},
    "dc1": {"role": "vm", "hv": "pve1", "storage": "nas1"},
    "mail1": {"role": "vm", "hv": "pve1", "storage": "nas1"},
    "erp1": {"role": "vm", "hv": "pve2", "storage": "nas1"},
    "files1": {"role": "vm", "hv": "pve2", "storage": "nas1"},
}
INHIBIT_RULES = [
    {"source_matchers": ['role="network"'], "target_matchers": ['role=~"hypervisor|storage|vm"'],
     "equal": ["switch"]},
    {"source_matchers": ['role="hypervisor"'], "target_matchers": ['role="vm"'], "equal": ["hv"]},
    {"source_matchers": ['role="storage"'], "target_matchers": ['role="vm"'], "equal": ["storage"]},
]  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """One Prometheus: scrape/evaluation interval, probe timeout and the rule's ``for``."""

    name: str
    scrape: str
    timeout: str | None  # None: Prometheus' default (10 s, capped at the interval)
    evaluation: str
    for_: str


DEBIAN = Timing("debian", "15s", None, "15s", "0m")
TUNED = Timing("tuned", "5s", "2s", "5s", "10s")


@dataclass(frozen=True)
class Route:
    """One Alertmanager fed by a :class:`Timing`'s Prometheus, posting to ``/hook/NAME``."""

    name: str
    timing: Timing
    group_by: tuple[str, ...]
    group_wait: str
    group_interval: str
    repeat_interval: str = "3h"
    inhibit: bool = False


DEBIAN_GROUP_BY = ("alertname", "cluster", "service")  # /etc/prometheus/alertmanager.yml as shipped


@dataclass
class PromStack:
    """blackbox_exporter (one, shared) + one Prometheus per timing + one Alertmanager per route."""

    routes: list[Route]
    hook: HttpSink | None
    workdir: Path
    probes: list[tuple[str, str, str]] = field(default_factory=lambda: list(DEMO_PROBES))
    alerting: bool = True
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> PromStack:
        for tool in (BLACKBOX, PROMETHEUS, ALERTMANAGER):
            if tool is None:
                raise RuntimeError(
                    "needs Debian's prometheus, prometheus-blackbox-exporter, prometheus-alertmanager"
                )
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_blackbox()
            for route in self.routes:
                self.ports[f"am-{route.name}"] = free_port()
                self.start_alertmanager(route)
            for timing in self.timings():
                self._start_prometheus(timing)
        except BaseException:
            self.stop()
            raise
        return self

    def start_scrapers(self, timings: list[Timing]) -> PromStack:
        """blackbox_exporter and one Prometheus per timing, no rules, no Alertmanager (probe cost)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_blackbox()
            for timing in timings:
                self._start_prometheus(timing)
        except BaseException:
            self.stop()
            raise
        return self

    def scraped(self, timing: Timing) -> float:
        """Scrapes (= probes) Prometheus has done so far, from its own /metrics."""
        port = self.ports[f"prom-{timing.name}"]
        total = 0.0
        for line in get(f"http://127.0.0.1:{port}/metrics", 10).decode().splitlines():
            if line.startswith("prometheus_target_interval_length_seconds_count"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def timings(self) -> list[Timing]:
        out: list[Timing] = []
        for route in self.routes:
            if route.timing not in out:
                out.append(route.timing)
        return out

    def _start_blackbox(self) -> None:
        port = self.ports["blackbox"] = free_port()
        conf = {
            "modules": {
                "icmp": {"prober": "icmp", "icmp": {"preferred_ip_protocol": "ip4"}},
                "tcp_connect": {"prober": "tcp", "tcp": {"preferred_ip_protocol": "ip4"}},
            }
        }
        path = self.workdir / "blackbox.yml"
        path.write_text(yaml.safe_dump(conf))
        assert BLACKBOX is not None
        self.procs["blackbox"] = Proc.start(
            "blackbox",
            [BLACKBOX, f"--config.file={path}", f"--web.listen-address=127.0.0.1:{port}"],
            self.workdir / "blackbox.log",
        )
        poll(lambda: get(f"http://127.0.0.1:{port}/-/healthy", 1), 30, "blackbox_exporter to be up")

    def start_alertmanager(self, route: Route) -> None:
        """(Re)start the route's Alertmanager with empty state, on the same port."""
        key = f"am-{route.name}"
        assert self.hook is not None
        if key in self.procs:
            self.procs[key].stop()
        port = self.ports[key]
        conf: dict[str, Any] = {
            "route": {
                "receiver": "hook",
                "group_by": list(route.group_by),
                "group_wait": route.group_wait,
                "group_interval": route.group_interval,
                "repeat_interval": route.repeat_interval,
            },
            "receivers": [
                {
                    "name": "hook",
                    "webhook_configs": [
                        {"url": f"{self.hook.url}/hook/{route.name}", "send_resolved": False}
                    ],
                }
            ],
        }
        if route.inhibit:
            conf["inhibit_rules"] = INHIBIT_RULES
        path = self.workdir / f"{key}.yml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        storage = self.workdir / f"{key}-data-{time.monotonic_ns()}"
        assert ALERTMANAGER is not None
        self.procs[key] = Proc.start(
            key,
            [ALERTMANAGER, f"--config.file={path}", f"--storage.path={storage}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            self.workdir / f"{key}.log",
        )  # fmt: skip
        poll(lambda: get(f"http://127.0.0.1:{port}/-/ready", 1), 30, f"{key} to be ready")

    def restart_alertmanagers(self) -> None:
        for route in self.routes:
            self.start_alertmanager(route)

    def _start_prometheus(self, timing: Timing) -> None:
        key = f"prom-{timing.name}"
        port = self.ports[key] = free_port()
        rules = {
            "groups": [
                {
                    "name": "bench",
                    "rules": [
                        {
                            "alert": "ProbeFailed",
                            "expr": "probe_success == 0",
                            "for": timing.for_,
                            "labels": {"severity": "critical"},
                            "annotations": {"summary": "{{ $labels.host }} {{ $labels.instance }} down"},
                        }
                    ],
                }
            ]
        }
        (self.workdir / f"{key}-rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        bb = f"127.0.0.1:{self.ports['blackbox']}"
        jobs = []
        for module in sorted({m for _, m, _ in self.probes}):
            groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
            for host, m, target in self.probes:
                if m != module:
                    continue
                labels = (
                    {"host": host, "switch": "core-sw1", **DEMO_TOPOLOGY.get(host, {})}
                    if self.alerting
                    else {}
                )
                groups.setdefault(tuple(sorted(labels.items())), []).append(target)
            statics = [{"targets": targets, "labels": dict(labels)} for labels, targets in groups.items()]
            job: dict[str, Any] = {
                "job_name": f"blackbox_{module}",
                "metrics_path": "/probe",
                "params": {"module": [module]},
                "static_configs": statics,
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_target"},
                    {"source_labels": ["__param_target"], "target_label": "instance"},
                    {"target_label": "__address__", "replacement": bb},
                ],
            }
            if timing.timeout is not None:
                job["scrape_timeout"] = timing.timeout
            jobs.append(job)
        ams = [f"127.0.0.1:{self.ports[f'am-{r.name}']}" for r in self.routes if r.timing == timing]
        conf: dict[str, Any] = {
            "global": {"scrape_interval": timing.scrape, "evaluation_interval": timing.evaluation},
            "scrape_configs": jobs,
        }
        if self.alerting:
            conf["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": ams}]}]}
            conf["rule_files"] = [str(self.workdir / f"{key}-rules.yml")]
        path = self.workdir / f"{key}.yml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        assert PROMETHEUS is not None
        self.procs[key] = Proc.start(
            key,
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={self.workdir / (key + '-data')}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            self.workdir / f"{key}.log",
        )  # fmt: skip
        poll(lambda: get(f"http://127.0.0.1:{port}/-/ready", 1), 60, f"{key} to be ready")

    def query(self, timing: Timing, expr: str) -> list[dict[str, Any]]:
        port = self.ports[f"prom-{timing.name}"]
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result: list[dict[str, Any]] = get_json(url)["data"]["result"]
        return result

    def active_alerts(self, timing: Timing) -> list[dict[str, Any]]:
        port = self.ports[f"prom-{timing.name}"]
        alerts: list[dict[str, Any]] = get_json(f"http://127.0.0.1:{port}/api/v1/alerts")["data"]["alerts"]
        return alerts

    def healthy(self) -> bool:
        """Every probe of every Prometheus succeeds and no alert is pending or firing."""
        for timing in self.timings():
            up = self.query(timing, "probe_success")
            if len(up) < len(self.probes) or any(r["value"][1] != "1" for r in up):
                return False
            if self.active_alerts(timing):
                return False
        return True

    def wait_healthy(self, timeout: float = 120.0) -> None:
        poll(self.healthy, timeout, "Prometheus: every probe up and no alert active", every=1.0)

    def cpu(self) -> dict[str, float]:
        return {name: p.cpu() for name, p in self.procs.items()}

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.procs.clear()


def hook_notifications(hook: HttpSink, route: str, since: float = 0.0) -> list[Any]:
    """Firing notifications Alertmanager posted for ``route`` at or after ``since`` (monotonic)."""
    return [
        r for r in list(hook.requests)
        if r.path == f"/hook/{route}" and r.at >= since and r.json and r.json.get("status") == "firing"
    ]  # fmt: skip


def random_phase(interval: float = 5.0) -> float:
    delay = random.uniform(0, interval)
    time.sleep(delay)
    return delay
