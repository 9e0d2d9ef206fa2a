#!/usr/bin/env python3
"""Probe cost at scale: the real daemon probing N paths (ICMP + TCP) on namespace hosts that answer
for a whole prefix, at the default 5 s interval, next to fping as the floor and blackbox_exporter
driven by Prometheus at the same interval and timeout.

    .venv/bin/python bench/bench_scale.py              # N = 100, 1,000, 5,000, 10,000; 120 s each
    .venv/bin/python bench/bench_scale.py --quick      # CI smoke: N = 100 for 10 s, no write
    .venv/bin/python bench/bench_scale.py --sizes 1000 --duration 20 --no-blackbox --no-write

Prints a table and (unless --no-write) rewrites bench/RESULTS.md. Traffic goes only to the
10.213.192.0/18 prefix inside namespaces this script creates and removes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import TimedSmtpSink, command_line, machine, random_phase, write_section  # noqa: E402

from watchtower.lab import Lab, bulk_site  # noqa: E402
from watchtower.lab.sinks import MAIL_TO, mailto_url  # noqa: E402

TCP_PORT = 7000
HTTP_PORT = 8080
DNS_NAME = "www.bench.test"
# The MSP-like site mix (--mix), per 1,000 paths (issue 18): the management probes talk to real
# peers on 127.0.0.1 (bench/peers.py), the rest to the bulk namespace hosts.
MIX_PER_1000 = {"icmp": 700, "tcp": 150, "http": 50, "dns": 20, "snmp": 50, "ipmi": 20, "redfish": 10}
IPMI_PATHS_PER_SIM = 5
# --mix's last row: the management probes at the intervals an admin would give them
SLOW_INTERVALS = {"snmp": "30s", "ipmi": "60s", "redfish": "60s"}
# fping's CPU for one sweep of 10,000 addresses is ~0.1-0.2 s: three sweeps gave 0.0072 to 0.0199
# ms per ping on the same machine, so the floor is taken over more of them.
FPING_ROUNDS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process. System time includes the simulated hosts' kernel
    work (a veth transmit runs the peer namespace's receive path in the sender's context)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_all(pid: int) -> float:
    """User + system CPU seconds of a process and of its children it has waited for (ipmitool)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def prom_histogram(body: bytes, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram in a /metrics body, by upper bound."""
    out: dict[float, float] = {}
    prefix = f"{name}_bucket{{".encode()
    for line in body.splitlines():
        if line.startswith(prefix):
            le = line.split(b'le="', 1)[1].split(b'"', 1)[0]
            out[float("inf") if le == b"+Inf" else float(le)] = float(line.rsplit(b" ", 1)[1])
    return out


def max_bucket(before: dict[float, float], after: dict[float, float]) -> float:
    """Upper bound of the highest bucket that gained observations between two scrapes."""
    bounds = sorted(after)
    highest = 0.0
    prev = 0.0
    for b in bounds:
        gained = (after[b] - before.get(b, 0.0)) - prev
        if gained > 0:
            highest = b
        prev = after[b] - before.get(b, 0.0)
    return highest


def longest_stall(
    path: Path, t0: float, t1: float, slow: list[tuple[float, str, float]] | None = None
) -> tuple[float, int, float, str]:
    """(longest stall in s, stalls > 100 ms, longest GC pass in s, its generation) the stall meter
    logged within [t0, t1]; ``slow`` collects the slow callbacks it named (``--attribute``)."""
    worst, over, gc_worst, gc_gen = 0.0, 0, 0.0, "-"
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split()
            at = float(fields[0])
            if not t0 <= at <= t1:
                continue
            if len(fields) == 5 and fields[1] == "slow":  # "<at> slow <seconds> <what> <cpu seconds>"
                if slow is not None:
                    slow.append((float(fields[2]), fields[3], float(fields[4])))
                continue
            if len(fields) == 3:  # "<at> gc<generation> <seconds>"
                if float(fields[2]) > gc_worst:
                    gc_worst, gc_gen = float(fields[2]), fields[1]
                continue
            late = float(fields[1])
            worst = max(worst, late)
            over += late > 0.1
    return worst, over, gc_worst, gc_gen


def summarize_slow(slow: list[tuple[float, str, float]]) -> list[tuple[str, int, float, float]]:
    """(callback, times over 20 ms, longest wall s, that pass's CPU s), longest first."""
    by_name: dict[str, tuple[int, float, float]] = {}
    for took, name, cpu in slow:
        count, longest, its_cpu = by_name.get(name, (0, 0.0, 0.0))
        if took > longest:
            longest, its_cpu = took, cpu
        by_name[name] = (count + 1, longest, its_cpu)
    return sorted(((n, c, m, u) for n, (c, m, u) in by_name.items()), key=lambda x: -x[2])


def make_config(
    path: Path,
    listen: int,
    icmp: list[str],
    tcp: list[str],
    state_dir: Path,
    victims: list[list[str]] | None = None,
    mail_port: int | None = None,
) -> None:
    """Targets of five paths (four ICMP, one TCP) each, every path to its own address; with
    ``victims``, one more target per entry (ICMP + TCP to its addresses) for the detection runs,
    and a mail channel to the sink at ``mail_port`` (config/demo.yaml's timings)."""
    targets: dict[str, Any] = {}
    per = 4
    for i in range(0, len(icmp), per):
        n = i // per
        paths: list[dict[str, Any]] = [{"icmp": a} for a in icmp[i : i + per]]
        if n < len(tcp):
            paths.append({"tcp": f"{tcp[n]}:{TCP_PORT}"})
        targets[f"t{n:05d}"] = {"role": "service", "paths": paths}
    for k, addresses in enumerate(victims or []):
        paths = [{"icmp": a} for a in addresses[:-1]] + [{"tcp": f"{addresses[-1]}:{TCP_PORT}"}]
        targets[f"victim{k}"] = {"role": "service", "paths": paths}
    data: dict[str, Any] = {
        "site": "bench",
        "listen": f"127.0.0.1:{listen}",
        "state_dir": str(state_dir),
        "defaults": {"interval": "5s", "retry_interval": "1s", "timeout": "1s", "fail_after": 2,
                     "recover_after": 2, "confirm_paths": 2},
        "targets": targets,
    }  # fmt: skip
    if mail_port is not None:
        data["notify"] = {
            "channels": [{"name": "mail-oncall", "url": mailto_url(mail_port), "tags": ["tier1"]}],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
        }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- a small, slow box


def throttle(pid: int, share: float, cpu: int = 0) -> str:
    """Pin every thread of ``pid`` to one core and cap it at ``share`` of that core: cgroup v2
    ``cpu.max`` where the cpu controller is on the unified hierarchy, else cgroup v1's CFS quota
    (systemd-run needs a running systemd). Returns how, for the table; raises OSError if neither."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True)
    period = 100_000
    quota = int(period * share)
    name = f"wt-bench-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
        group = v2 / name
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {period}")
        how = "cgroup v2 cpu.max"
    else:
        group = Path("/sys/fs/cgroup/cpu") / name
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        how = "cgroup v1 cpu.cfs_quota_us"
    for tid in os.listdir(f"/proc/{pid}/task"):
        (group / ("cgroup.threads" if how.startswith("cgroup v2") else "tasks")).write_text(tid)
    THROTTLE_GROUPS.append(group)
    return f"taskset -c {cpu} + {how} {quota}/{period}"


THROTTLE_GROUPS: list[Path] = []


def unthrottle() -> None:
    """Remove the groups (their process has exited by now)."""
    for group in THROTTLE_GROUPS:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    THROTTLE_GROUPS.clear()


def namespace_of(lab: Lab, address: str) -> str:
    import ipaddress

    for h in lab.spec.hosts:
        if h.bulk_prefix and ipaddress.ip_address(address) in ipaddress.ip_network(h.bulk_prefix):
            return f"{lab.spec.prefix}-{h.name}"
    raise ValueError(address)


def silence(lab: Lab, addresses: list[str], name: str) -> None:
    """Drop everything sent to ``addresses`` inside their bulk host (nft input hook): a dead box."""
    ns = namespace_of(lab, addresses[0])
    table = (
        f"table inet {name} {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n"
        f"    ip daddr {{ {', '.join(addresses)} }} drop\n  }}\n}}\n"
    )
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=table, text=True,
                   check=True, capture_output=True, timeout=10)  # fmt: skip


def detection_runs(lab: Lab, smtp: TimedSmtpSink, victims: list[list[str]]) -> list[float]:
    """Each victim silenced once, after a random 0-5 s phase: seconds from T0 to the mail that says
    the victim is DOWN (NaN if none within 30 s). Victims are never repaired, so no all-clear or
    flap damping is in play; each run is the victim's first outage."""
    times: list[float] = []
    for k, addresses in enumerate(victims):
        time.sleep(random_phase())
        t0 = time.monotonic()
        silence(lab, addresses, f"wtvictim{k}")
        deadline = t0 + 30
        got = None
        while got is None and time.monotonic() < deadline:
            got = smtp.first(MAIL_TO, t0, f"victim{k} DOWN")
            time.sleep(0.05)
        times.append(got[0] - t0 if got else float("nan"))
        print(f"  detection run {k + 1}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    for k, addresses in enumerate(victims):  # the next size's paths may use these addresses
        ns = namespace_of(lab, addresses[0])
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", f"wtvictim{k}"],
                       capture_output=True, timeout=10)  # fmt: skip
    return times


def fping_floor(addresses: list[str], rounds: int) -> dict[str, float]:
    """CPU and wall of fping sweeping the same ICMP addresses (-i 0: no pacing), one ping each."""
    if not shutil.which("fping"):
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(addresses) + "\n")
        listfile = f.name
    walls, alive = [], []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run(
            ["fping", "-c1", "-q", "-i", "0", "-t", "1000", "-f", listfile],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        walls.append(time.perf_counter() - start)
        alive.append(sum(1 for line in proc.stderr.splitlines() if "1/1/0%" in line))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(listfile)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "cpu_per_1000": cpu / (rounds * len(addresses)) * 1000,
        "wall": statistics.median(walls),
        "alive_min": min(alive),
        "peak_rss_mb": after.ru_maxrss / 1024,
    }


def py_spy(pid: int, out: Path, seconds: int) -> list[tuple[float, str]]:
    """Sample the daemon with py-spy (if installed next to this Python or on PATH) for ``seconds``,
    after the measurement window; the top leaf frames (self time, GIL-holding or not) by share."""
    exe = Path(sys.executable).parent / "py-spy"
    spy = str(exe) if exe.exists() else shutil.which("py-spy")
    if spy is None:
        return []
    subprocess.run(
        [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "50", "--nonblocking", "-f", "raw",
         "-o", str(out)],
        capture_output=True, timeout=seconds + 60,
    )  # fmt: skip
    if not out.exists():
        return []
    leaves: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        name = leaf.split(" (", 1)[0]
        where = leaf.split(" (", 1)[1].split(":", 1)[0].rsplit("/", 2) if " (" in leaf else [""]
        key = f"{name} ({'/'.join(where[-2:])})"
        leaves[key] = leaves.get(key, 0) + int(count)
        total += int(count)
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:12]
    return [(c / total * 100, k) for k, c in top] if total else []


# --------------------------------------------------------------------------- the site mix (--mix)


def mix_paths(kind: str, count: int, addresses: list[str], peers: dict[str, Any]) -> list[dict[str, Any]]:
    """``count`` paths of ``kind``, each to its own address (bulk kinds) or peer (management)."""
    if kind == "icmp":
        return [{"icmp": a} for a in addresses[:count]]
    if kind == "tcp":
        return [{"tcp": f"{a}:{TCP_PORT}"} for a in addresses[:count]]
    if kind == "http":
        return [{"http": {"url": f"http://{a}:{HTTP_PORT}/", "expect_body": "ok"}} for a in addresses[:count]]
    if kind == "dns":
        # the lab's DNS server answers from the host's own address: ask that one (a reply from
        # another address than the one asked is rejected, rightly), one name per path
        servers = peers["dns_servers"]
        return [
            {"dns": {"server": servers[i % len(servers)], "query": DNS_NAME, "name": f"dns {i}"}}
            for i in range(count)
        ]
    if kind == "snmp":
        port = peers["snmp"].port
        return [
            {"snmp": {"host": "127.0.0.1", "port": port, "community": "public", "name": f"snmp {i}",
                      "checks": [{"oid": "1.3.6.1.2.1.1.3.0", "label": "sysUpTime"}]}}
            for i in range(count)
        ]  # fmt: skip
    if kind == "ipmi":
        sims = peers["ipmi"]
        return [
            {"ipmi": {"host": "127.0.0.1", "port": sims[i % len(sims)].port, "username": "wtadmin",
                      "password": "wtpass1", "name": f"ipmi {i}", "timeout": "5s"}}
            for i in range(count)
        ]  # fmt: skip
    if kind == "redfish":
        fish = peers["redfish"]
        return [
            {"redfish": {"host": "127.0.0.1", "port": fish.port, "username": "admin",
                         "password": "bench-Pw-1", "auth": "basic", "ca_file": fish.extra["ca_file"],
                         "name": f"redfish {i}", "timeout": "5s"}}
            for i in range(count)
        ]  # fmt: skip
    raise ValueError(kind)


def make_mix_config(
    path: Path, listen: int, counts: dict[str, int], addresses: dict[str, list[str]], peers: dict[str, Any],
    state_dir: Path, slow_management: bool,
) -> None:  # fmt: skip
    targets: dict[str, Any] = {}
    for kind, count in counts.items():
        paths = mix_paths(kind, count, addresses.get(kind, []), peers)
        if slow_management and kind in SLOW_INTERVALS:
            for p in paths:
                p[kind]["interval"] = SLOW_INTERVALS[kind]
        per = 1 if kind in ("snmp", "ipmi", "redfish") else 5  # a BMC or switch is a target of its own
        for i in range(0, len(paths), per):
            targets[f"{kind}{i // per:05d}"] = {"role": "service", "paths": paths[i : i + per]}
    data = {
        "site": "bench",
        "listen": f"127.0.0.1:{listen}",
        "state_dir": str(state_dir),
        "defaults": {"interval": "5s", "retry_interval": "1s", "timeout": "1s"},
        "targets": targets,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_mix_row(
    lab: Lab, label: str, counts: dict[str, int], peers: dict[str, Any], duration: float, workdir: Path,
    slow_management: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One daemon with ``counts`` paths: CPU (its own and its child processes'), probes, lag."""
    bulk = lab.spec.bulk_addresses(sum(counts.get(k, 0) for k in ("icmp", "tcp", "http", "dns")))
    addresses: dict[str, list[str]] = {}
    at = 0
    for kind in ("icmp", "tcp", "http", "dns"):
        addresses[kind] = bulk[at : at + counts.get(kind, 0)]
        at += counts.get(kind, 0)
    listen = free_port()
    tag = label.replace(" ", "-").replace("/", "-")
    cfg = workdir / f"mix-{tag}.yaml"
    make_mix_config(cfg, listen, counts, addresses, peers, workdir / f"state-mix-{tag}", slow_management)
    log = open(workdir / f"daemon-mix-{tag}.log", "w")  # noqa: SIM115
    stallfile = workdir / f"stalls-mix-{tag}.txt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "stallmeter.py"), str(cfg), str(stallfile)],
        stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(f"{base}/healthz", 1) == b"ok\n":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"daemon did not come up; see {workdir}/daemon-mix-{tag}.log")
            time.sleep(0.2)
        # warm-up: every path's first run is spread over its interval
        time.sleep(
            max(12.0, *(float(v.rstrip("s")) + 5 for v in SLOW_INTERVALS.values()))
            if slow_management
            else 12.0
        )
        state0 = json.loads(get(f"{base}/api/v1/state"))
        cpu0, t0 = proc_cpu_all(proc.pid), time.monotonic()
        time.sleep(duration)
        cpu1, t1 = proc_cpu_all(proc.pid), time.monotonic()
        state1 = json.loads(get(f"{base}/api/v1/state"))
        stall, over, _gc, _gen = longest_stall(stallfile, t0, t1)
        runs = state1["scheduler"]["runs"] - state0["scheduler"]["runs"]
        paths = [p for t in state1["targets"].values() for p in t["paths"]]
        not_up = [p for p in paths if p["state"] != "up"]
        return {
            "label": label,
            "counts": counts,
            "paths": len(paths),
            "probes_per_s": runs / (t1 - t0),
            "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
            "cpu_per_1000": (cpu1 - cpu0) / runs * 1000 if runs else float("nan"),
            "lag_p99_ms": (state1["scheduler"]["lag_p99"] or 0) * 1000,
            "stall_ms": stall * 1000,
            "stalls_over_100ms": over,
            "rss_mb": proc_hwm_mb(proc.pid),
            "not_up": len(not_up),
            "not_up_example": not_up[0]["detail"] if not_up else "",
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_mix(
    lab: Lab, n: int, duration: float, workdir: Path, kinds: list[str] | None = None
) -> list[dict[str, Any]]:
    """Each kind alone (its CPU per 1,000 probes), then the whole mix at 5 s, then the whole mix
    with the management probes at 30 s / 60 s."""
    import peers as peer_procs

    counts = {k: round(v * n / 1000) for k, v in MIX_PER_1000.items()}
    started: list[Any] = []
    peers: dict[str, Any] = {
        "dns_servers": [h.addresses[0].split("/")[0] for h in lab.spec.hosts if h.bulk_prefix]
    }
    try:
        peers["snmp"] = peer_procs.start_snmpd(workdir / "snmpd")
        started.append(peers["snmp"])
        sims = max(1, counts["ipmi"] // IPMI_PATHS_PER_SIM)
        peers["ipmi"] = [peer_procs.start_ipmi_sim(workdir / f"ipmi{i}") for i in range(sims)]
        started.extend(peers["ipmi"])
        try:
            peers["redfish"] = peer_procs.start_sushy(workdir / "sushy")
            started.append(peers["redfish"])
        except RuntimeError as exc:
            print(f"mix: no redfish rows: {exc}", file=sys.stderr, flush=True)
            counts.pop("redfish")
        rows = []
        if kinds:
            return [
                run_mix_row(lab, k, {k: counts[k]}, peers, duration, workdir) for k in kinds if k in counts
            ]
        for kind, count in counts.items():
            print(f"mix: {kind} alone ({count} paths) for {duration:.0f}s ...", file=sys.stderr, flush=True)
            rows.append(run_mix_row(lab, kind, {kind: count}, peers, duration, workdir))
        print(f"mix: all {n} paths for {duration:.0f}s ...", file=sys.stderr, flush=True)
        rows.append(run_mix_row(lab, "all at 5 s", counts, peers, duration, workdir))
        rows.append(run_mix_row(lab, "all, management at 30 s / 60 s", counts, peers, duration, workdir,
                                slow_management=True))  # fmt: skip
        return rows
    finally:
        for peer in started:
            peer.stop()


def mix_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| kind (paths) | interval | probes/s | CPU % of a core (incl. child processes) "
        "| CPU s / 1000 probes | lag p99 ms | longest loop stall ms | peak RSS MB | paths not up |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        counts = r["counts"]
        if len(counts) == 1:
            kind = next(iter(counts))
            what, interval = f"{kind} ({counts[kind]:,})", "5 s"
        else:
            what = (
                f"{r['label'].split(',')[0]} ({sum(counts.values()):,}: "
                + ", ".join(f"{c} {k}" for k, c in counts.items())
                + ")"
            )
            interval = "5 s; snmp 30 s, ipmi/redfish 60 s" if "30 s" in r["label"] else "5 s"
        not_up = f"{r['not_up']}" + (f" ({r['not_up_example'][:60]})" if r["not_up"] else "")
        lines.append(
            f"| {what} | {interval} | {r['probes_per_s']:.1f} | {r['cpu_pct']:.2f} | {r['cpu_per_1000']:.3f} "
            f"| {r['lag_p99_ms']:.1f} | {r['stall_ms']:.0f} | {r['rss_mb']:.0f} | {not_up} |"
        )
    return "\n".join(lines)


def run_size(
    lab: Lab,
    n: int,
    duration: float,
    workdir: Path,
    tcp_share: float,
    blackbox: bool,
    profile: bool = False,
    attribute: bool = False,
    throttle_share: float | None = None,
    detect_runs: int = 0,
    smtp: TimedSmtpSink | None = None,
) -> dict[str, Any]:
    n_tcp = round(n * tcp_share)
    n_icmp = n - n_tcp
    hosts = sum(1 for h in lab.spec.hosts if h.bulk_prefix)
    addresses = lab.spec.bulk_addresses(n_icmp + n_tcp + 3 * detect_runs * hosts)
    icmp, tcp = addresses[:n_icmp], addresses[n_icmp : n_icmp + n_tcp]
    # bulk_addresses interleaves the hosts: each victim's three addresses from one host
    spare = [
        a for a in addresses[n_icmp + n_tcp :] if namespace_of(lab, a) == namespace_of(lab, addresses[0])
    ]
    victims = [spare[k * 3 : k * 3 + 3] for k in range(detect_runs)]
    listen = free_port()
    cfg = workdir / f"bench-{n}.yaml"
    make_config(
        cfg, listen, icmp, tcp, workdir / f"state-{n}", victims=victims,
        mail_port=smtp.port if smtp is not None and detect_runs else None,
    )  # fmt: skip
    log = open(workdir / f"daemon-{n}.log", "w")  # noqa: SIM115
    stallfile = workdir / f"stalls-{n}.txt"
    env = dict(os.environ, WT_STALL_CALLBACKS="1" if attribute else "0")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "stallmeter.py"), str(cfg), str(stallfile)],
        stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(f"{base}/healthz", 1) == b"ok\n":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"daemon did not come up; see {workdir}/daemon-{n}.log")
            time.sleep(0.2)
        how = throttle(proc.pid, throttle_share) if throttle_share else ""
        time.sleep(12)  # warm-up: first round spread over 5 s, then the fast retry cadence settles
        hist0 = prom_histogram(get(f"{base}/metrics"), "watchtower_scheduler_lag_seconds")
        state0 = json.loads(get(f"{base}/api/v1/state"))
        (user0, sys0), t0 = proc_cpu(proc.pid), time.monotonic()
        time.sleep(duration)
        (user1, sys1), t1 = proc_cpu(proc.pid), time.monotonic()
        cpu0, cpu1 = user0 + sys0, user1 + sys1
        state1 = json.loads(get(f"{base}/api/v1/state"))
        slow: list[tuple[float, str, float]] = []
        stall, stalls_over, gc_pause, gc_gen = longest_stall(stallfile, t0, t1, slow)
        renders = []
        for _ in range(5):
            start = time.perf_counter()
            body = get(f"{base}/metrics")
            renders.append(time.perf_counter() - start)
        if profile:
            result_profile = py_spy(proc.pid, workdir / f"profile-{n}.txt", 30)
        detect = detection_runs(lab, smtp, victims) if smtp is not None and victims else []
        lag_max = max_bucket(hist0, prom_histogram(body, "watchtower_scheduler_lag_seconds"))
        runs = state1["scheduler"]["runs"] - state0["scheduler"]["runs"]
        not_up = sum(1 for t in state1["targets"].values() for p in t["paths"] if p["state"] != "up")
        result: dict[str, Any] = {
            "n": n,
            "icmp": n_icmp,
            "tcp": n_tcp,
            "probes": runs,
            "probes_per_s": runs / (t1 - t0),
            "cpu_s": cpu1 - cpu0,
            "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
            "sys_share": (sys1 - sys0) / (cpu1 - cpu0) * 100 if cpu1 > cpu0 else 0.0,
            "cpu_per_1000": (cpu1 - cpu0) / runs * 1000 if runs else float("nan"),
            "lag_p50_ms": (state1["scheduler"]["lag_p50"] or 0) * 1000,
            "lag_p99_ms": (state1["scheduler"]["lag_p99"] or 0) * 1000,
            "lag_max_ms": lag_max * 1000,
            "stall_ms": stall * 1000,
            "stalls_over_100ms": stalls_over,
            "gc_ms": gc_pause * 1000,
            "gc_gen": gc_gen,
            "peak_rss_mb": proc_hwm_mb(proc.pid),
            "metrics_ms": renders[0] * 1000,
            "metrics_cached_ms": statistics.median(renders[1:]) * 1000,
            "metrics_series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
            "not_up": not_up,
            "fping": fping_floor(icmp, rounds=FPING_ROUNDS),
            "slow": summarize_slow(slow),
            "throttle": how,
            "detect": detect,
            "expected_per_s": n / 5.0,
        }
        if profile:
            result["profile"] = result_profile
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if blackbox:
        result["blackbox"] = blackbox_cost(icmp, tcp, duration, workdir / f"prom-{n}")
    return result


def blackbox_cost(icmp: list[str], tcp: list[str], duration: float, workdir: Path) -> dict[str, Any]:
    """Prometheus scraping blackbox_exporter for every address at watchtower's interval and timeout
    (5 s, 1 s): CPU of both processes over ``duration`` after a warm-up, their RSS, probes done."""
    from common import PromStack, Timing

    timing = Timing("scale", "5s", "1s", "5s", "0m")
    probes = [(f"h{i}", "icmp", a) for i, a in enumerate(icmp)]
    probes += [(f"t{i}", "tcp_connect", f"{a}:{TCP_PORT}") for i, a in enumerate(tcp)]
    stack = PromStack([], None, workdir, probes=probes, alerting=False)
    try:
        stack.start_scrapers([timing])
        time.sleep(12)
        q0 = stack.scraped(timing)
        cpu0, t0 = stack.cpu(), time.monotonic()
        time.sleep(duration)
        cpu1, t1 = stack.cpu(), time.monotonic()
        q1 = stack.scraped(timing)
        up = stack.query(timing, "count(probe_success == 1)")
        cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
        total = sum(cpu.values())
        probes_done = q1 - q0
        return {
            "cpu_pct": total / (t1 - t0) * 100,
            "cpu_split": {k: v / (t1 - t0) * 100 for k, v in cpu.items()},
            "cpu_per_1000": total / probes_done * 1000 if probes_done else float("nan"),
            "rss_mb": sum(p.rss_mb() for p in stack.procs.values()),
            "probes_per_s": probes_done / (t1 - t0),
            "up": int(float(up[0]["value"][1])) if up else 0,
        }
    finally:
        stack.stop()


def bb_cell(r: dict[str, Any]) -> str:
    b = r.get("blackbox")
    if not b:
        return "not run"
    split = b["cpu_split"]
    bb = split.get("blackbox", 0.0)
    prom = sum(v for k, v in split.items() if k.startswith("prom"))
    return (
        f"{b['cpu_pct']:.1f} ({bb:.1f} / {prom:.1f}), {b['cpu_per_1000']:.3f}, {b['rss_mb']:.0f}, "
        f"{b['up']:,} of {r['n']:,}"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| paths (icmp+tcp) | probes/s | CPU % of a core (system share) | CPU s / 1000 probes "
        "| lag p50 / p99 / max ms | longest loop stall ms (> 100 ms) | longest GC pass ms "
        "| peak RSS MB "
        "| /metrics ms: render / cached (series) | paths not up "
        "| fping: CPU s / 1000 pings, sweep wall s "
        "| blackbox + Prometheus: CPU % (bb / prom), CPU s / 1000 probes, RSS MB, up |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        f = r["fping"]
        fp = f"{f['cpu_per_1000']:.4f}, {f['wall']:.2f} s ({f['alive_min']} alive)" if f else "fping missing"
        lines.append(
            f"| {r['n']:,} ({r['icmp']:,}+{r['tcp']:,}) | {r['probes_per_s']:.0f} "
            f"| {r['cpu_pct']:.1f} ({r['sys_share']:.0f} % sys) "
            f"| {r['cpu_per_1000']:.3f} | {r['lag_p50_ms']:.2f} / {r['lag_p99_ms']:.2f} "
            f"/ <= {r['lag_max_ms']:.0f} | {r['stall_ms']:.0f} ({r['stalls_over_100ms']}) "
            f"| {r['gc_ms']:.0f} ({r['gc_gen']}) "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {r['metrics_ms']:.0f} / {r['metrics_cached_ms']:.0f} ({r['metrics_series']:,}) "
            f"| {r['not_up']} | {fp} | {bb_cell(r)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--tcp-share", type=float, default=0.2, help="share of TCP paths (default 0.2)")
    parser.add_argument("--no-blackbox", action="store_true", help="skip blackbox_exporter + Prometheus")
    parser.add_argument("--quick", action="store_true", help="CI smoke: N = 100 for 10 s, no write")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon 30 s after the largest N")
    parser.add_argument(
        "--attribute",
        action="store_true",
        help="name every loop callback over 20 ms (costs ~1 us per callback)",
    )
    parser.add_argument(
        "--throttle", type=float, metavar="SHARE",
        help="a small box: the daemon pinned to one core and capped at SHARE of it (e.g. 0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--detect", type=int, default=0, metavar="RUNS",
        help="after the window, silence RUNS extra targets one by one: seconds to the DOWN mail",
    )  # fmt: skip
    parser.add_argument(
        "--mix", action="store_true",
        help="the MSP-like site mix at the first --sizes N: each kind alone, then all together",
    )  # fmt: skip
    parser.add_argument("--mix-kinds", nargs="+", metavar="KIND", help="--mix: only these kinds, alone")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.duration, args.no_write = [100], 10.0, True
    if os.geteuid() != 0:
        print("bench_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    spec = bulk_site(
        "wtb", 2, tcp_ports=(TCP_PORT,), http_ports=(HTTP_PORT,) if args.mix else (),
        dns_names={DNS_NAME: "10.213.192.1"} if args.mix else None,
    )  # fmt: skip
    results = []
    smtp = TimedSmtpSink().start() if args.detect else None
    with tempfile.TemporaryDirectory(prefix="wt-bench-") as tmp:
        lab = Lab(spec, Path(tmp) / "lab")
        from common import wait_lab_free

        wait_lab_free(900, prefix="wtb-", check_ci=False)  # tests/integration/test_lab.py builds "wtb" too
        lab.up()
        try:
            if args.mix:
                rows = run_mix(lab, args.sizes[0], args.duration, Path(tmp), args.mix_kinds)
                lab.down()
                out = mix_table(rows)
                print(out)
                if not args.no_write:
                    write_mix(out, args)
                return 0
            for n in args.sizes:
                print(f"running N={n} for {args.duration:.0f}s ...", file=sys.stderr, flush=True)
                results.append(
                    run_size(
                        lab,
                        n,
                        args.duration,
                        Path(tmp),
                        args.tcp_share,
                        not args.no_blackbox,
                        profile=args.profile and n == max(args.sizes),
                        attribute=args.attribute,
                        throttle_share=args.throttle,
                        detect_runs=args.detect,
                        smtp=smtp,
                    )
                )
        finally:
            lab.down()
            unthrottle()
            if smtp is not None:
                smtp.stop()
    out = small_box_table(results) if args.throttle or args.detect else table(results)
    if args.profile and not any(r.get("profile") for r in results):
        out += "\n\n(--profile: no profile taken; py-spy was not found next to this Python or on PATH)"
    for r in results:
        if r.get("slow"):
            out += f"\n\nLoop callbacks over 20 ms at {r['n']:,} paths (--attribute): "
            out += ", ".join(
                f"`{name}` {count}x, longest {longest * 1000:.0f} ms ({cpu * 1000:.0f} ms CPU)"
                for name, count, longest, cpu in r["slow"][:8]
            )
    for r in results:
        if r.get("profile"):
            out += f"\n\npy-spy, {r['n']:,} paths, 30 s after the window, top leaf frames (share of samples):"
            out += "\n\n"
            out += "| share | frame |\n|---|---|\n"
            out += "\n".join(f"| {pct:.1f} % | `{frame}` |" for pct, frame in r["profile"])
    print(out)
    if not args.no_write:
        write_results(out, args)
    return 0


def write_mix(out: str, args: argparse.Namespace) -> None:
    per = ", ".join(f"{v} {k}" for k, v in MIX_PER_1000.items())
    write_section(
        "## The site mix: CPU per kind (bench/bench_scale.py --mix)",
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
            f"Command: {command_line()}",
            "",
            f"An MSP-like site per 1,000 paths: {per}. ICMP, TCP, HTTP and DNS go to the bulk namespace",
            "hosts (the lab responder: a TCP listener, an HTTP/1.0 server, a DNS server); SNMP gets go to",
            "one net-snmp `snmpd`, IPMI reads (ipmitool, a process per run) to `ipmi_sim` instances",
            f"({IPMI_PATHS_PER_SIM} paths each), Redfish reads to one `sushy-emulator` over TLS, started",
            "as the integration tests start them (bench/peers.py, templates in tests/peers/). Each kind",
            "runs alone in a fresh daemon first (its CPU per 1,000 probes), then the whole mix at the",
            "5 s default, then with the management probes at 30 s (SNMP) / 60 s (IPMI, Redfish).",
            f"Figures over {args.duration:.0f} s after a 12 s warm-up (65 s for the last row); CPU is the",
            "daemon's user+system",
            "time plus its waited-for children's (ipmitool) from /proc. The peers' own CPU is not counted.",
            "",
            out,
        ],
    )


def small_box_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| paths (icmp+tcp) | limit | probes/s (due) | CPU % of a core | lag p50 / p99 / max ms "
        "| longest loop stall ms (> 100 ms) | paths not up | detection to mail s: median / max (runs) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in results:
        d = [x for x in r["detect"] if x == x]
        detect = (
            f"{statistics.median(d):.1f} / {max(d):.1f} ({len(d)} of {len(r['detect'])})" if d else "not run"
        )
        lines.append(
            f"| {r['n']:,} ({r['icmp']:,}+{r['tcp']:,}) | {r['throttle'] or 'none'} "
            f"| {r['probes_per_s']:.0f} ({r['expected_per_s']:.0f}) | {r['cpu_pct']:.1f} "
            f"| {r['lag_p50_ms']:.2f} / {r['lag_p99_ms']:.2f} / <= {r['lag_max_ms']:.0f} "
            f"| {r['stall_ms']:.0f} ({r['stalls_over_100ms']}) | {r['not_up']} | {detect} |"
        )
    return "\n".join(lines)


def write_results(out: str, args: argparse.Namespace) -> None:
    if args.throttle or args.detect:
        write_section(
            "## A small box: one core, capped (bench/bench_scale.py --throttle)",
            [
                f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
                f"Command: {command_line()}",
                "",
                "The scale bench's site and daemon (80 % ICMP, 20 % TCP, 5 s interval, 1 s timeout,",
                "fail_after 2, confirm_paths 2, one mail channel to an SMTP sink in the bench), with the",
                "daemon pinned to one core (`taskset`) and capped by a CFS quota (the limit column; a",
                "fanless mini PC or an ARM board is 2-4x slower per core than this machine). probes/s",
                "against what the paths are due (N / 5 s) shows missed cadence. After the window, extra",
                "targets (2 ICMP + 1 TCP path each) are silenced one by one at a random 0-5 s phase (nft",
                "drop in their namespace): seconds from that moment to the DOWN mail at the sink.",
                "",
                out,
            ],
        )
        return
    write_section(
        "## Probe cost at scale (bench/bench_scale.py)",
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
            f"Command: {command_line()}",
            "",
            "The real daemon (`watchtower run`, default 5 s interval, 1 s timeout) probes N paths on two",
            "namespace hosts that answer for a whole /19 each: 80 % ICMP, 20 % TCP connects, every path",
            f"to its own address. Figures over {args.duration:.0f} s after a 12 s warm-up; CPU is the",
            "daemon's user+system time from /proc; lag is probe start minus due time (last 20,000 runs);",
            "`/metrics` is the first of 5 uncompressed scrapes after the window (a render) and the median",
            "of the other 4 (served from the cache); fping sweeps the same ICMP addresses with",
            f"`-i 0`, {FPING_ROUNDS} times. Lag max is the upper bound of the highest",
            "`watchtower_scheduler_lag_seconds` bucket that gained runs in the window. The loop stall",
            "is measured by bench/stallmeter.py, which runs the daemon with a 20 ms ticker on its loop",
            "and logs every wake-up more than 5 ms late, and",
            "every garbage-collector pass over 5 ms (generation in brackets; a pass holds the GIL). Then,",
            "with the daemon stopped, Debian's Prometheus scrapes blackbox_exporter for the same addresses",
            "(module icmp / tcp_connect, interval 5 s, scrape_timeout 1 s) for the same time; its CPU is",
            "both processes' (blackbox / prometheus), per scrape (= probe); RSS is both processes' RSS.",
            "",
            out,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
