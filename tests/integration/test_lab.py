"""The namespace lab really behaves like the site it simulates (needs root, ``ip netns``, fping).

One small site (prefix ``wtt``, 10.213.20.0/24 prod, 10.213.98.0/24 mgmt, 10.213.128.0/20 bulk) is
built once per module and always torn down.  Its hypervisor has a simulated BMC (ipmi_sim at
10.213.98.111) when ``ipmi_sim``/``sdrcomp``/``ipmitool`` are installed; without them the site is
built without it and the BMC tests skip.  Every check waits on a condition with a deadline:
after a fault or a repair the network needs a moment (ARP, neighbour states), and a fixed sleep
would either be flaky or slow.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from watchtower.lab import DEMO, SITES, Lab, LabHost, LabSpec, LabUsageError, SpecError, bulk_site, lab_main
from watchtower.lab import bmc as labbmc
from watchtower.lab.site import BMC_TOOLS, _pid_alive

FPING = shutil.which("fping")
BMC_MISSING = [t for t in BMC_TOOLS if shutil.which(t) is None]

_SPEC_WITH_BMC = LabSpec(
    prefix="wtt",
    prod_net="10.213.20.0/24",
    mgmt_net="10.213.98.0/24",
    hosts=(
        LabHost("sw1", "network", ("10.213.20.2",)),
        LabHost(
            "hv1",
            "hypervisor",
            ("10.213.20.11",),
            mgmt_address="10.213.98.11",
            http_ports=(8006,),
            bmc_address="10.213.98.111",
        ),
        LabHost(
            "vm1",
            "vm",
            ("10.213.20.21",),
            parent="hv1",
            tcp_ports=(389,),
            dns_names={"vm1.test.lab": "10.213.20.21", "nas1.test.lab": "10.213.20.5"},
        ),
        LabHost("nas1", "storage", ("10.213.20.5",), tcp_ports=(3260,), http_ports=(5000,)),
        LabHost("bulk1", "bulk", ("10.213.21.2/30",), tcp_ports=(7000,), bulk_prefix="10.213.128.0/20"),
    ),
)
# without the simulator, the same site minus the BMC: everything but the BMC tests still runs
TEST_SPEC = (
    _SPEC_WITH_BMC
    if not BMC_MISSING
    else replace(_SPEC_WITH_BMC, hosts=tuple(replace(h, bmc_address=None) for h in _SPEC_WITH_BMC.hosts))
)
HV, HV_MGMT, VM, NAS, SW = "10.213.20.11", "10.213.98.11", "10.213.20.21", "10.213.20.5", "10.213.20.2"
HV_BMC = "10.213.98.111"
PROD = [SW, HV, VM, NAS]


def _netns_usable() -> str | None:
    """Reason to skip, or None when this machine can run the lab."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "iproute2 missing"
    if FPING is None:
        return "fping missing"
    try:
        subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "ip netns unavailable"
    return None


_SKIP = _netns_usable()


def netns(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark a test as needing network namespaces and skip it cleanly where they are unavailable."""
    return pytest.mark.netns(pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")(fn))


needs_bmc = pytest.mark.skipif(
    bool(BMC_MISSING),
    reason=f"simulated BMC needs {', '.join(BMC_MISSING)} (apt install openipmi ipmitool)",
)


# ---------------------------------------------------------------------- probes
Rtts = dict[str, list[float | None]]


def fping_rtts(addrs: list[str], count: int = 1, timeout_ms: int = 500, period_ms: int = 10) -> Rtts:
    """Per-address RTTs in ms (None = lost) from ``fping -C``."""
    assert FPING is not None
    cmd = [FPING, "-q", "-C", str(count), "-t", str(timeout_ms), "-p", str(period_ms), "-i", "1", *addrs]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode in (0, 1), f"{cmd}: {r.stderr}"
    out: Rtts = {}
    for line in r.stderr.splitlines():
        if " : " in line:
            addr, vals = line.split(" : ", 1)
            out[addr.strip()] = [None if v == "-" else float(v) for v in vals.split()]
    return out


def alive(addr: str, timeout_ms: int = 400) -> bool:
    return fping_rtts([addr], timeout_ms=timeout_ms)[addr][0] is not None


def tcp_ok(addr: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(addr: str, port: int) -> str:
    with socket.create_connection((addr, port), timeout=2) as s:
        s.sendall(b"GET /anything HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode()


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``cond()``; returns the seconds it took, fails the test at the deadline."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def ipmitool(*args: str) -> subprocess.CompletedProcess[str]:
    """ipmitool against hv1's BMC as the monitor does it (demo user, RMCP+, password via env)."""
    argv = labbmc.ipmitool_argv(HV_BMC, *args)
    return subprocess.run(argv, env=labbmc.ipmitool_env(), capture_output=True, text=True, timeout=15)


def chassis_power() -> str | None:
    """hv1's chassis power as its BMC reports it ("on"/"off"), None when the BMC does not answer."""
    r = ipmitool("chassis", "power", "status")
    if r.returncode != 0:
        return None
    return r.stdout.strip().rsplit(" ", 1)[-1]


def sel_list() -> list[str]:
    r = ipmitool("sel", "list")
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if "|" in line]


def none_alive(addrs: list[str]) -> Callable[[], bool]:
    return lambda: all(v[0] is None for v in fping_rtts(addrs, timeout_ms=300).values())


def all_alive(addrs: list[str]) -> Callable[[], bool]:
    return lambda: all(v[0] is not None for v in fping_rtts(addrs, timeout_ms=300).values())


# ---------------------------------------------------------------------- pure spec tests
def test_demo_spec_is_the_contract() -> None:
    ips = {h.name: DEMO.ip(h.name) for h in DEMO.hosts}
    assert ips == {
        "core-sw1": "10.213.10.2",
        "pve1": "10.213.10.11",
        "pve2": "10.213.10.12",
        "nas1": "10.213.10.5",
        "dc1": "10.213.10.21",
        "mail1": "10.213.10.22",
        "erp1": "10.213.10.23",
        "files1": "10.213.10.24",
        "isp": "10.213.14.2",
    }
    assert DEMO.mgmt_ip("pve1") == "10.213.99.11" and DEMO.mgmt_ip("pve2") == "10.213.99.12"
    bmcs = {h.name: DEMO.bmc_ip(h.name) for h in DEMO.bmc_hosts()}
    assert bmcs == {"pve1": "10.213.99.111", "pve2": "10.213.99.112"}  # config/demo.yaml's bmc: blocks
    assert DEMO.bmc_ns_name("pve1") == "wtd-pve1-bmc"
    assert DEMO.host("dc1").parent == "pve1" and DEMO.host("erp1").parent == "pve2"
    assert DEMO.host("dc1").dns_names["files1.acme.local"] == "10.213.10.24"
    assert LabSpec.from_json(DEMO.to_json()) == DEMO
    assert SITES["demo"] is DEMO


def test_spec_validation_rejects_mistakes() -> None:
    def spec(*hosts: LabHost, prefix: str = "wtq", prod: str = "10.213.30.0/24") -> LabSpec:
        return LabSpec(prefix, prod, None, hosts)

    with pytest.raises(SpecError, match="prefix"):
        spec(prefix="toolong")
    with pytest.raises(SpecError, match="outside the lab block"):
        spec(prod="192.168.1.0/24")
    with pytest.raises(SpecError, match="needs a parent"):
        spec(LabHost("v", "vm", ("10.213.30.9",)))
    with pytest.raises(SpecError, match="not in prod net"):
        spec(LabHost("n", "storage", ("10.213.31.9",)))
    with pytest.raises(SpecError, match=r"root \.1"):
        spec(LabHost("n", "storage", ("10.213.30.1",)))
    with pytest.raises(SpecError, match="overlap"):
        spec(LabHost("b", "bulk", ("10.213.40.2/30",), bulk_prefix="10.213.30.0/23"))
    with pytest.raises(SpecError, match="unknown host"):
        DEMO.host("nope")

    def hv(**kw: Any) -> LabHost:
        return LabHost("hv", "hypervisor", ("10.213.30.11",), **kw)

    def mgmt_spec(*hosts: LabHost) -> LabSpec:
        return LabSpec("wtq", "10.213.30.0/24", "10.213.31.0/24", hosts)

    assert mgmt_spec(hv(bmc_address="10.213.31.111")).bmc_ip("hv") == "10.213.31.111"
    with pytest.raises(SpecError, match=r"bmc address \S+ is not in mgmt net"):
        mgmt_spec(hv(bmc_address="10.213.30.111"))
    with pytest.raises(SpecError, match="used twice"):
        mgmt_spec(hv(mgmt_address="10.213.31.11", bmc_address="10.213.31.11"))
    with pytest.raises(SpecError, match="no mgmt_net"):
        spec(hv(bmc_address="10.213.31.111"))
    with pytest.raises(SpecError, match="bmc address"):
        mgmt_spec(hv(bmc_address="10.213.31.300"))
    with pytest.raises(SpecError, match="a vm has no BMC"):
        mgmt_spec(hv(), LabHost("v", "vm", ("10.213.30.9",), parent="hv", bmc_address="10.213.31.9"))
    with pytest.raises(SpecError, match="clashes"):
        mgmt_spec(hv(bmc_address="10.213.31.111"), LabHost("hv-bmc", "server", ("10.213.30.12",)))


def test_bulk_site_and_metrics() -> None:
    spec = bulk_site("wtb", 2)
    assert [h.bulk_prefix for h in spec.hosts] == ["10.213.192.0/19", "10.213.224.0/19"]
    addrs = spec.bulk_addresses(4)
    assert addrs == ["10.213.192.1", "10.213.224.1", "10.213.192.2", "10.213.224.2"]
    assert len(spec.bulk_addresses()) == 2 * 8190
    # coexistence: every lab uses its own route metric, and nets do not collide with the demo's
    assert len({s.route_metric for s in (DEMO, spec, TEST_SPEC)}) == 3
    for a in (DEMO, spec, TEST_SPEC):
        for b in (DEMO, spec, TEST_SPEC):
            if a is not b:
                assert not any(x.overlaps(y) for x in a.networks() for y in b.networks())


def test_cli_user_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_main(["break", "nope", "poweroff"]) == 2
    assert lab_main(["break", "pve1", "explode"]) == 2
    assert lab_main(["--site", "nope", "status"]) == 2
    assert lab_main(["break", "pve1", "linkdown", "5"]) in (2,)  # no arg for linkdown (or not root)
    assert lab_main(["break", "pve1", "hang", "5"]) == 2
    assert lab_main(["break", "nas1", "psufail"]) == 2  # no BMC (or not root)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("watchtower lab: error:") for line in err), err
    assert "unknown host 'nope'" in err[0]


def test_bmc_modes_need_a_bmc() -> None:
    lab = Lab(DEMO)
    for mode in ("psufail", "bmcdown"):  # refused before anything (even the root check) happens
        with pytest.raises(LabUsageError, match=f"mode {mode} needs a BMC, and nas1 has none"):
            lab.break_host("nas1", mode)
    with pytest.raises(LabUsageError, match="takes no argument"):
        lab.break_host("pve1", "hang", 1)


# ---------------------------------------------------------------------- namespace tests
@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # default run dir (/run/watchtower-lab/wtt): a crashed earlier run's helpers are found by PID
    lab = Lab(TEST_SPEC)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@netns
def test_healthy_site_answers(lab: Lab) -> None:
    rtts = fping_rtts([*PROD, HV_MGMT, "10.213.21.2"])
    assert all(v[0] is not None for v in rtts.values()), rtts
    assert tcp_ok(VM, 389) and tcp_ok(NAS, 3260)
    assert http_get(HV, 8006).startswith("HTTP/1.0 200 OK")
    assert http_get(HV_MGMT, 8006).endswith("\r\n\r\nhv1 ok\n")  # same listener, mgmt side
    resp = http_get(NAS, 5000)
    assert "Content-Type: text/plain" in resp and resp.endswith("nas1 ok\n")

    def query(name: str) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, "A"), VM, timeout=2)

    r = query("nas1.test.lab")
    assert r.rcode() == dns.rcode.NOERROR and [rr.to_text() for rr in r.answer[0]] == [NAS]
    assert query("nope.test.lab").rcode() == dns.rcode.NXDOMAIN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # garbage must not kill it
        for junk in (b"", b"\x00", b"\xff" * 40, os.urandom(300)):
            s.sendto(junk, (VM, 53))
    assert query("vm1.test.lab").answer[0][0].to_text() == VM


@netns
def test_bulk_host_answers_every_address(lab: Lab) -> None:
    addrs = TEST_SPEC.bulk_addresses()
    assert len(addrs) == 4094
    assert FPING is not None
    r = subprocess.run(
        [FPING, "-q", "-i", "0", "-t", "1000", "-r", "1", *addrs], capture_output=True, timeout=30
    )
    assert r.returncode == 0, r.stderr[-500:]
    assert all(tcp_ok(a, 7000) for a in addrs[::409])  # listener bound to 0.0.0.0 covers the prefix


@netns
def test_hypervisor_poweroff_takes_its_vms(lab: Lab) -> None:
    lab.break_host("hv1", "poweroff")
    try:
        wait_until(none_alive([HV, HV_MGMT, VM]), 10, "hv1 (prod+mgmt) and vm1 to go silent")
        assert not tcp_ok(VM, 389) and not tcp_ok(HV_MGMT, 8006)
        assert alive(NAS) and alive(SW), "the rest of prod must stay up"
        assert "poweroff" in lab.status()
    finally:
        lab.repair("hv1")
    wait_until(all_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 to answer after repair")
    assert http_get(HV, 8006).endswith("hv1 ok\n")


@netns
def test_hypervisor_linkdown_keeps_mgmt(lab: Lab) -> None:
    lab.break_host("hv1", "linkdown")
    try:
        wait_until(none_alive([HV, VM]), 10, "hv1 prod and vm1 to go silent")
        assert alive(HV_MGMT)
        assert http_get(HV_MGMT, 8006).endswith("hv1 ok\n")  # OOB path still reaches the box
    finally:
        lab.repair("hv1")
    wait_until(all_alive([HV, VM]), 10, "hv1 prod and vm1 after repair")


@netns
def test_icmpdrop_keeps_tcp(lab: Lab) -> None:
    lab.break_host("nas1", "icmpdrop")
    try:
        wait_until(lambda: not alive(NAS), 5, "nas1 to stop answering ICMP")
        assert tcp_ok(NAS, 3260) and http_get(NAS, 5000).endswith("nas1 ok\n")
        assert "icmpdrop" in lab.status()
    finally:
        lab.repair("nas1")
    wait_until(lambda: alive(NAS), 5, "nas1 ICMP after repair")


@netns
def test_loss(lab: Lab) -> None:
    lab.break_host("nas1", "loss")  # default 100 %
    try:
        wait_until(lambda: not alive(NAS), 5, "nas1 to black-hole")
        assert not tcp_ok(NAS, 3260, timeout=0.3)
        lab.break_host("nas1", "loss", 50)  # replaces the 100 % table
        got = fping_rtts([NAS], count=40, timeout_ms=300, period_ms=10)[NAS]
        received = sum(v is not None for v in got)
        assert 5 <= received <= 35, got  # Bin(40, .5) leaves this range with p < 1e-6
        assert "loss 50%" in lab.status()
    finally:
        lab.repair("nas1")
    wait_until(lambda: alive(NAS), 5, "nas1 after repair")


@netns
def test_delay(lab: Lab) -> None:
    lab.break_host("vm1", "delay", 300)
    try:
        rtts = fping_rtts([VM], count=3, timeout_ms=2000, period_ms=50)[VM]
        assert all(v is not None and 300 <= v < 1000 for v in rtts), rtts
        assert tcp_ok(VM, 389), "delay only holds echo-requests"
    finally:
        lab.repair("vm1")
    rtts = fping_rtts([VM], count=2, timeout_ms=500)[VM]
    assert all(v is not None and v < 100 for v in rtts), rtts


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def raw_ping_burst(addrs: list[str], timeout: float) -> dict[str, float]:
    """Ping every address once, all at once, from one raw socket with a big receive buffer.

    fping's socket buffer overflows when a thousand delayed replies are released within a few
    milliseconds (the replies do reach the root namespace: IcmpInEchoReps counts them all), so
    this test measures the lab, not the client, with its own receiver.
    """
    ident = os.getpid() & 0xFFFF
    index = {a: i for i, a in enumerate(addrs)}
    sent: dict[str, float] = {}
    rtt: dict[str, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root)
        for a in addrs:
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, index[a])
            s.sendto(struct.pack("!BBHHH", 8, 0, _checksum(hdr), ident, index[a]), (a, 0))
            sent[a] = time.monotonic()
        deadline = time.monotonic() + timeout
        while len(rtt) < len(addrs) and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                pkt, (src, _) = s.recvfrom(2048)
            except TimeoutError:
                break
            ihl = (pkt[0] & 0x0F) * 4
            typ, _code, _ck, pid, seq = struct.unpack_from("!BBHHH", pkt, ihl)
            if typ == 0 and pid == ident and index.get(src) == seq and src not in rtt:
                rtt[src] = time.monotonic() - sent[src]
    return rtt


@netns
def test_delay_holds_a_thousand_packets(lab: Lab) -> None:
    addrs = TEST_SPEC.bulk_addresses(1000)
    lab.break_host("bulk1", "delay", 300)
    try:
        rtt = raw_ping_burst(addrs, timeout=3.0)
        assert len(rtt) == 1000, f"{1000 - len(rtt)} of 1000 delayed pings lost"
        assert min(rtt.values()) >= 0.3
    finally:
        lab.repair("bulk1")
    log = Path(lab.run_dir, "nfq-bulk1.log").read_text()
    held = int(log.rsplit("at most ", 1)[1].split()[0])
    assert held >= 1000, log


@netns
def test_switch_poweroff_cuts_prod_not_mgmt(lab: Lab) -> None:
    lab.break_host("sw1", "poweroff")
    try:
        wait_until(none_alive(PROD), 10, "all of prod to go silent")
        assert alive(HV_MGMT) and alive("10.213.21.2"), "mgmt and bulk do not go through the switch"
    finally:
        lab.repair("sw1")
    wait_until(all_alive(PROD), 10, "prod after switch repair")


# ---------------------------------------------------------------------- simulated BMC
@netns
@needs_bmc
def test_bmc_is_a_machine_of_its_own(lab: Lab) -> None:
    assert chassis_power() == "on"
    sdr = ipmitool("sdr", "elist").stdout
    names = [line.split("|")[0].strip() for line in sdr.splitlines()]
    assert names == ["CPU Temp", "PS1 Status", "System Fan 1"], sdr
    assert "40 degrees C" in sdr and "5000 RPM" in sdr and "Failure" not in sdr
    assert [ln for ln in sel_list() if "Failure" in ln] == []
    # its own namespace, with the simulator (by the PID file) inside it
    pid = int(Path(lab.run_dir, "bmc-hv1.pid").read_text())
    pids = subprocess.run(["ip", "netns", "pids", "wtt-hv1-bmc"], capture_output=True, text=True, check=True)
    assert str(pid) in pids.stdout.split()
    # the simulator's console is on the BMC namespace's loopback only, not on the mgmt network
    assert not tcp_ok(HV_BMC, labbmc.CONSOLE_PORT)
    assert "chassis on" in lab.status()


@netns
@needs_bmc
def test_poweroff_switches_the_chassis_off(lab: Lab) -> None:
    lab.break_host("hv1", "poweroff")
    try:
        assert chassis_power() == "off", "the BMC keeps answering while its host is off"
        wait_until(none_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 to go silent")
        assert "chassis off" in lab.status()
    finally:
        lab.repair("hv1")
    assert chassis_power() == "on"
    wait_until(all_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 after repair")


@netns
@needs_bmc
def test_psufail_logs_a_critical_sel_record(lab: Lab) -> None:
    before = sel_list()
    lab.break_host("hv1", "psufail")
    try:
        assert chassis_power() == "off"
        new = [ln for ln in sel_list() if ln not in before]
        assert len(new) == 1, new
        assert "Power Supply" in new[0] and "Failure detected" in new[0] and "Asserted" in new[0], new
        assert "Failure detected" in ipmitool("sdr", "elist").stdout  # the PS1 Status sensor too
        wait_until(none_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 to go silent")
        assert "psufail" in lab.status()
    finally:
        lab.repair("hv1")
    assert chassis_power() == "on"
    assert sel_list()[-1] == new[0], "repair keeps the SEL record, like a real BMC"
    assert "Failure detected" not in ipmitool("sdr", "elist").stdout  # PSU replaced
    wait_until(all_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 after repair")


@netns
@needs_bmc
def test_hang_silences_the_host_not_the_bmc(lab: Lab) -> None:
    before = sel_list()
    lab.break_host("hv1", "hang")
    try:
        wait_until(none_alive([HV, HV_MGMT, VM]), 10, "hung hv1 (prod, mgmt) and its vm1 to go silent")
        assert not tcp_ok(HV_MGMT, 8006, timeout=0.3)
        assert chassis_power() == "on" and sel_list() == before, "a hung OS: chassis on, nothing logged"
        assert "hang" in lab.status()
    finally:
        lab.repair("hv1")
    wait_until(all_alive([HV, HV_MGMT, VM]), 10, "hv1 and vm1 after repair")
    assert http_get(HV, 8006).endswith("hv1 ok\n")


@netns
@needs_bmc
def test_bmcdown_leaves_the_host_running(lab: Lab) -> None:
    lab.break_host("hv1", "bmcdown")
    try:
        wait_until(lambda: not alive(HV_BMC), 5, "the BMC to go silent")
        # not even an unauthenticated IPMI request gets an answer (ipmitool would take 2 s to say so)
        assert not labbmc.rmcp_answers(HV_BMC, timeout=0.5)
        assert all_alive([HV, HV_MGMT, VM])()
        assert "bmcdown" in lab.status()
    finally:
        lab.repair("hv1")
    wait_until(lambda: chassis_power() == "on", 10, "the BMC to answer after repair")


@netns
def test_overlapping_lab_is_refused(lab: Lab, tmp_path: Path) -> None:
    clash = LabSpec("wtx", "10.213.20.0/24", None, (LabHost("n", "storage", ("10.213.20.50",)),))
    other = Lab(clash, tmp_path)
    with pytest.raises(LabUsageError, match="overlaps existing route"):
        other.up()
    other.down()
    assert not [n for n in os.listdir("/run/netns") if n.startswith("wtx-")]
    assert alive(NAS), "the running lab is untouched"


@netns
def test_up_is_idempotent_and_down_leaves_nothing(lab: Lab) -> None:
    t0 = time.monotonic()
    lab.up()  # re-up over a running lab tears it down first
    print(f"re-up took {time.monotonic() - t0:.2f}s")
    assert all_alive([*PROD, HV_MGMT])()
    pids = [int(Path(lab.run_dir, "responder.pid").read_text())]
    if TEST_SPEC.bmc_hosts():
        assert chassis_power() == "on"  # up() returned only once the BMC answered
        bmc_pidfile = Path(lab.run_dir, "bmc-hv1.pid")
        pids.append(int(bmc_pidfile.read_text()))
        # as after a crash that lost the PID file: down() still finds ipmi_sim in the BMC namespace
        bmc_pidfile.unlink()
    Lab(TEST_SPEC).down()  # a fresh object, as after a crash of the process that ran up()
    lab.down()  # idempotent
    assert not any(_pid_alive(pid) for pid in pids)
    assert not [p for p in Path(lab.run_dir).glob("bmc-*") if p.is_dir()], "BMC state removed"
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "wtt-" not in netns_list
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert "wtt-" not in links
    routes = subprocess.run(
        ["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    )
    needles = ("10.213.20.", "10.213.21.", "10.213.98.", "10.213.128.", "wtt-", str(TEST_SPEC.route_metric))
    for needle in needles:
        assert needle not in routes.stdout, routes.stdout
