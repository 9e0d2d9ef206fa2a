#!/usr/bin/env python3
"""Probe cost at scale: the real daemon probing N paths (ICMP + TCP) on namespace hosts that answer
for a whole prefix, at the default 5 s interval, next to fping as the floor.

    .venv/bin/python bench/bench_scale.py                    # N = 1,000 and 10,000, 60 s each
    .venv/bin/python bench/bench_scale.py --sizes 1000 --duration 20 --no-write

Prints a table and (unless --no-write) rewrites bench/RESULTS.md. Traffic goes only to the
10.213.192.0/18 prefix inside namespaces this script creates and removes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from watchtower.lab import Lab, bulk_site  # noqa: E402

TCP_PORT = 7000
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


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def make_config(path: Path, listen: int, icmp: list[str], tcp: list[str], state_dir: Path) -> None:
    """Targets of five paths (four ICMP, one TCP) each, every path to its own address."""
    targets: dict[str, Any] = {}
    per = 4
    for i in range(0, len(icmp), per):
        n = i // per
        paths: list[dict[str, Any]] = [{"icmp": a} for a in icmp[i : i + per]]
        if n < len(tcp):
            paths.append({"tcp": f"{tcp[n]}:{TCP_PORT}"})
        targets[f"t{n:05d}"] = {"role": "service", "paths": paths}
    data = {
        "site": "bench",
        "listen": f"127.0.0.1:{listen}",
        "state_dir": str(state_dir),
        "defaults": {"interval": "5s", "retry_interval": "1s", "timeout": "1s"},
        "targets": targets,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


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


def run_size(lab: Lab, n: int, duration: float, workdir: Path) -> dict[str, Any]:
    n_tcp = n // 5
    n_icmp = n - n_tcp
    addresses = lab.spec.bulk_addresses(n_icmp + n_tcp)
    icmp, tcp = addresses[:n_icmp], addresses[n_icmp:]
    listen = free_port()
    cfg = workdir / f"bench-{n}.yaml"
    make_config(cfg, listen, icmp, tcp, workdir / "state")
    log = open(workdir / f"daemon-{n}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "watchtower.cli", "run", "-c", str(cfg), "--log-level", "WARNING"],
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
                raise RuntimeError(f"daemon did not come up; see {workdir}/daemon-{n}.log")
            time.sleep(0.2)
        time.sleep(12)  # warm-up: first round spread over 5 s, then the fast retry cadence settles
        state0 = json.loads(get(f"{base}/api/v1/state"))
        (user0, sys0), t0 = proc_cpu(proc.pid), time.monotonic()
        time.sleep(duration)
        (user1, sys1), t1 = proc_cpu(proc.pid), time.monotonic()
        cpu0, cpu1 = user0 + sys0, user1 + sys1
        state1 = json.loads(get(f"{base}/api/v1/state"))
        renders = []
        for _ in range(5):
            start = time.perf_counter()
            body = get(f"{base}/metrics")
            renders.append(time.perf_counter() - start)
        runs = state1["scheduler"]["runs"] - state0["scheduler"]["runs"]
        not_up = sum(1 for t in state1["targets"].values() for p in t["paths"] if p["state"] != "up")
        return {
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
            "peak_rss_mb": proc_hwm_mb(proc.pid),
            "metrics_ms": statistics.median(renders) * 1000,
            "metrics_series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
            "not_up": not_up,
            "fping": fping_floor(icmp, rounds=3),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown CPU",
    )  # fmt: skip
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| paths (icmp+tcp) | probes/s | CPU % of a core (system share) | CPU s / 1000 probes "
        "| lag p50 / p99 ms | peak RSS MB | /metrics ms (series) | paths not up "
        "| fping: CPU s / 1000 pings, sweep wall s |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        f = r["fping"]
        fp = f"{f['cpu_per_1000']:.4f}, {f['wall']:.2f} s ({f['alive_min']} alive)" if f else "fping missing"
        lines.append(
            f"| {r['n']:,} ({r['icmp']:,}+{r['tcp']:,}) | {r['probes_per_s']:.0f} "
            f"| {r['cpu_pct']:.1f} ({r['sys_share']:.0f} % sys) "
            f"| {r['cpu_per_1000']:.3f} | {r['lag_p50_ms']:.2f} / {r['lag_p99_ms']:.2f} "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {r['metrics_ms']:.0f} ({r['metrics_series']:,}) | {r['not_up']} | {fp} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    spec = bulk_site("wtb", 2, tcp_ports=(TCP_PORT,))
    results = []
    with tempfile.TemporaryDirectory(prefix="wt-bench-") as tmp:
        lab = Lab(spec, Path(tmp) / "lab")
        lab.up()
        try:
            for n in args.sizes:
                print(f"running N={n} for {args.duration:.0f}s ...", file=sys.stderr, flush=True)
                results.append(run_size(lab, n, args.duration, Path(tmp)))
        finally:
            lab.down()
    out = table(results)
    print(out)
    if not args.no_write:
        write_results(out, args)
    return 0


def write_results(out: str, args: argparse.Namespace) -> None:
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = "## Probe cost at scale (bench/bench_scale.py)"
    section = "\n".join(
        [
            marker,
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
            f"Command: `.venv/bin/python bench/bench_scale.py --sizes {' '.join(map(str, args.sizes))} "
            f"--duration {args.duration:.0f}`",
            "",
            "The real daemon (`watchtower run`, default 5 s interval, 1 s timeout) probes N paths on two",
            "namespace hosts that answer for a whole /19 each: 80 % ICMP, 20 % TCP connects, every path",
            f"to its own address. Figures over {args.duration:.0f} s after a 12 s warm-up; CPU is the",
            "daemon's user+system time from /proc; lag is probe start minus due time (last 20,000 runs);",
            "`/metrics` is the median of 5 uncompressed scrapes; fping sweeps the same ICMP addresses with",
            "`-i 0`.",
            "",
            out,
            "",
        ]
    )
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
