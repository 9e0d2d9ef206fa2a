"""A simulated small-business site built from network namespaces, for the demo and the tests.

Physical picture (so failures propagate the way they do in a real rack):

* the **switch** (role ``network``) is a namespace whose bridge ``br0`` IS the prod L2 network; the
  root namespace (where the monitor runs) reaches it over one veth, ``<prefix>-up`` <-> ``eth0``,
  and owns the prod net's ``.1``.  Powering the switch off therefore cuts off all of prod;
* **hypervisors** have their own ``br0`` (prod address) whose uplink ``eth0`` plugs into the switch;
  their VMs plug into that ``br0``, i.e. live *behind* the hypervisor.  ``eth1`` goes to the
  out-of-band mgmt bridge ``<prefix>-mgmt`` in the root namespace (mgmt net ``.1``);
* other hosts (NAS, servers) plug ``eth0`` into the switch; VMs plug ``eth0`` into their parent;
* **bulk** hosts get a /30 veth straight from the root namespace plus a whole prefix on ``lo`` (the
  kernel then answers for every address, like 127/8) and a root route ``PREFIX via <eth0>``.

Namespaces get no default route, and the root namespace gets ``unreachable`` safety routes covering
every lab net, so lab traffic can never leak to a real gateway.  Every namespace, root-side link and
route carries the spec's prefix (or its metric), which is how ``up()``/``down()`` find leftovers.

A host with a ``bmc_address`` also gets a **BMC**: its own namespace ``<prefix>-<host>-bmc`` with
one NIC on the mgmt bridge and one OpenIPMI ``ipmi_sim`` (:mod:`watchtower.lab.bmc`) answering
RMCP+ on ``BMC_ADDRESS:623``.  Being a separate little computer, it keeps answering while the host's
own NICs are down, and its chassis power follows the host's ``poweroff``/``psufail`` faults.

One helper process (:mod:`watchtower.lab.responder`) serves every TCP/HTTP/DNS listener in all
namespaces.  Faults are injected per host with :meth:`Lab.break_host` and undone with
:meth:`Lab.repair`; this kernel has no ``sch_netem``, so loss is an nft netdev drop and delay is an
iptables NFQUEUE on inbound echo-requests released by :mod:`watchtower.lab.nfqdelay`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import watchtower
from watchtower.lab import bmc
from watchtower.lab.spec import (
    DEMO,
    LAB_SUPERNET,
    ROLE_BULK,
    ROLE_HYPERVISOR,
    ROLE_NETWORK,
    ROLE_SERVER,
    ROLE_STORAGE,
    ROLE_VM,
    ROLES,
    SITES,
    LabHost,
    LabSpec,
    Listener,
    SpecError,
    bulk_site,
)

__all__ = [
    "BREAK_MODES",
    "DEMO",
    "LAB_SUPERNET",
    "ROLES",
    "ROLE_BULK",
    "ROLE_HYPERVISOR",
    "ROLE_NETWORK",
    "ROLE_SERVER",
    "ROLE_STORAGE",
    "ROLE_VM",
    "SITES",
    "Lab",
    "LabError",
    "LabHost",
    "LabSpec",
    "LabUsageError",
    "Listener",
    "SpecError",
    "bulk_site",
    "default_run_dir",
    "require_privileges",
]

BREAK_MODES = (
    "poweroff",
    "linkdown",
    "mgmtdown",
    "loss",
    "icmpdrop",
    "delay",
    "hang",
    "psufail",
    "bmcdown",
    "prodloss",
)
"""Fault kinds :meth:`Lab.break_host` understands; :meth:`Lab.repair` undoes all of them."""

BMC_MODES = ("psufail", "bmcdown")
"""Modes that only make sense for a host with a BMC (``bmc_address``)."""
_NO_ARG_MODES = ("poweroff", "linkdown", "mgmtdown", "icmpdrop", "hang", "psufail", "bmcdown", "prodloss")
BMC_TOOLS = ("ipmi_sim", "sdrcomp", "ipmitool")  # Debian: openipmi (first two), ipmitool

NFQUEUE_NUM = 7  # NFQUEUE numbers are per network namespace, so one fixed number is enough
CMD_TIMEOUT = 20.0
RESPONDER_MARKER = "watchtower.lab.responder"
NFQDELAY_MARKER = "watchtower.lab.nfqdelay"
IPMI_SIM_MARKER = "ipmi_sim"  # a process named ipmi_sim inside one of *our* namespaces is ours

# Per-namespace knobs (each verified to be per-netns: non-netns sysctls are not even visible inside
# a child namespace, so `sysctl -w` there cannot touch the machine).  Rate limits off and deep
# accept queues so a bulk host survives 10,000 concurrent pings/connects; IPv6 off because the lab
# is IPv4-only and RS/DAD/MLD chatter on the bridges is just noise.
_NS_SYSCTLS = (
    "net.ipv4.icmp_ratelimit=0",
    "net.ipv4.icmp_msgs_per_sec=1000000",
    "net.ipv4.icmp_msgs_burst=1000000",
    "net.core.somaxconn=65535",
    "net.ipv4.tcp_max_syn_backlog=65535",
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
)


class LabError(RuntimeError):
    """Something about the lab failed; the message names the command or the condition."""


class LabUsageError(LabError):
    """The caller asked for something invalid (bad mode/argument, lab not up): not a system fault."""


def default_run_dir(prefix: str) -> Path:
    """Fixed per-prefix state dir (PID files, logs), so a later run can find leftovers' PIDs."""
    return Path("/run/watchtower-lab") / prefix


def require_privileges() -> None:
    """Fail early with a one-line reason instead of a traceback from deep inside ``ip``."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces, veths and routes)")
    if shutil.which("ip") is None:
        raise LabError("'ip' (iproute2) not found in PATH")


def run(
    cmd: list[str],
    *,
    input: str | None = None,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; failures become LabError naming the command and its stderr."""
    try:
        return subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=check, env=env
        )
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or e.stdout or "").strip().replace("\n", " | ")
        raise LabError(f"command failed (exit {e.returncode}): {shlex.join(cmd)}: {detail}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"command timed out after {timeout:g}s: {shlex.join(cmd)}") from None
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]}") from None


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``cond`` until true or the deadline passes (then LabError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _ifname(base: str, name: str, index: int) -> str:
    """Readable interface name when it fits the kernel's 15 chars, index-based otherwise."""
    cand = f"{base}{name}"
    return cand if len(cand) <= 15 else f"{base}{index}"


@dataclass(frozen=True)
class _Wire:
    """One veth: ``ifname`` inside the host's namespace, ``peer`` in ``peer_ns`` (None = root)."""

    host: str
    ifname: str
    peer_ns: str | None
    peer: str
    peer_master: str | None = None
    peer_cidr: str | None = None


class Lab:
    """Build, break, repair and tear down one :class:`LabSpec` on this machine (needs root)."""

    def __init__(self, spec: LabSpec, run_dir: Path | str | None = None) -> None:
        self.spec = spec
        # absolute: helper command lines carry paths under it, and teardown recognises them by those
        self.run_dir = (Path(run_dir) if run_dir is not None else default_run_dir(spec.prefix)).absolute()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, Path] = {}

    # ------------------------------------------------------------------ naming
    def ns(self, host: str) -> str:
        """Namespace name of ``host`` (validates the host exists)."""
        return self.spec.ns_name(self.spec.host(host).name)

    def ip(self, host: str) -> str:
        """Primary (prod or bulk-link) address of ``host``."""
        return self.spec.ip(host)

    def mgmt_ip(self, host: str) -> str | None:
        """Out-of-band mgmt address of ``host``, if it has an ``eth1``."""
        return self.spec.mgmt_ip(host)

    def bmc_ip(self, host: str) -> str | None:
        """Address of ``host``'s simulated BMC, if it has one."""
        return self.spec.bmc_ip(host)

    def bmc_ns(self, host: str) -> str:
        """Namespace of ``host``'s BMC (it exists only if the host has a ``bmc_address``)."""
        return self.spec.bmc_ns_name(self.spec.host(host).name)

    def bmc_files(self, host: str) -> bmc.BmcFiles:
        """Config, state and power file of ``host``'s BMC (rebuilt on every ``up()``)."""
        return bmc.BmcFiles(self.run_dir / f"bmc-{host}")

    def _bmc_pidfile(self, host: str) -> Path:
        return self.run_dir / f"bmc-{host}.pid"

    def _bmc_link(self, h: LabHost) -> str:
        """Root-side end of the BMC's veth (a port of the mgmt bridge)."""
        return _ifname(f"{self.spec.prefix}-bmc-", h.name, self.spec.hosts.index(h))

    @property
    def uplink(self) -> str:
        """Root-side end of the veth to the switch."""
        return f"{self.spec.prefix}-up"

    @property
    def mgmt_bridge(self) -> str:
        """Root-namespace bridge of the OOB mgmt network."""
        return f"{self.spec.prefix}-mgmt"

    @property
    def prod_bridge(self) -> str:
        """Root-namespace prod bridge, used only when the spec has no switch."""
        return f"{self.spec.prefix}-prod"

    def _wires(self) -> list[_Wire]:
        s, p = self.spec, self.spec.prefix
        sw = s.switch
        wires: list[_Wire] = []
        for idx, h in enumerate(s.hosts):
            if h.role == ROLE_NETWORK:
                wires.append(_Wire(h.name, "eth0", None, self.uplink, peer_cidr=s.prod_gateway()))
            elif h.is_bulk:
                root_cidr, _ = s.bulk_link(h)
                wires.append(
                    _Wire(h.name, "eth0", None, _ifname(f"{p}-b-", h.name, idx), peer_cidr=root_cidr)
                )
            elif h.parent is not None:
                wires.append(_Wire(h.name, "eth0", s.ns_name(h.parent), _ifname("v-", h.name, idx), "br0"))
            elif sw is not None:
                wires.append(_Wire(h.name, "eth0", s.ns_name(sw.name), _ifname("p-", h.name, idx), "br0"))
            else:
                peer = _ifname(f"{p}-p-", h.name, idx)
                wires.append(_Wire(h.name, "eth0", None, peer, self.prod_bridge))
            if h.mgmt_address is not None:
                peer = _ifname(f"{p}-m-", h.name, idx)
                wires.append(_Wire(h.name, "eth1", None, peer, self.mgmt_bridge))
        return wires

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self, timeout: float = 30.0) -> None:
        """Build the site from scratch (tearing down leftovers of this prefix first) and return
        once every host is reachable and every listener answers.  On failure nothing is left."""
        require_privileges()
        self._check_bmc_tools()
        deadline = time.monotonic() + timeout
        with self._locked():
            self._teardown()
            self._check_no_overlap()
            try:
                self._build()
                self._start_responder()
                admin_passwords = self._start_bmcs()
                self._wait_ready(deadline)
                self._set_bmc_clocks(admin_passwords)
            except BaseException:
                self._teardown()
                raise

    def down(self) -> None:
        """Remove everything this prefix created: helpers (by PID), namespaces, links, routes.
        Idempotent and safe to call on a half-built or already-removed lab."""
        require_privileges()
        with self._locked():
            self._teardown()

    def is_up(self) -> bool:
        """All namespaces of the spec (hosts and BMCs) exist (says nothing about injected faults)."""
        present = set(_list_netns())
        wanted = [self.spec.ns_name(h.name) for h in self.spec.hosts]
        wanted += [self.spec.bmc_ns_name(h.name) for h in self.spec.bmc_hosts()]
        return all(ns in present for ns in wanted)

    def _check_bmc_tools(self) -> None:
        """Fail before touching anything when the spec has BMCs but the simulator is missing."""
        hosts = [h.name for h in self.spec.bmc_hosts()]
        missing = [t for t in BMC_TOOLS if shutil.which(t) is None]
        if hosts and missing:
            raise LabError(
                f"{', '.join(hosts)} {'has a BMC' if len(hosts) == 1 else 'have BMCs'}, which needs "
                f"{', '.join(missing)} (Debian: apt install openipmi ipmitool)"
            )

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        s = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for net in s.safety_nets():  # safety nets first, so nothing can leak while we build
            run(["ip", "route", "add", "unreachable", str(net), "metric", str(s.route_metric)])
        if any(h.mgmt_address or h.bmc_address for h in s.hosts):
            self._root_bridge(self.mgmt_bridge, s.mgmt_gateway())
        if s.switch is None and any(not h.is_bulk and h.parent is None for h in s.hosts):
            self._root_bridge(self.prod_bridge, s.prod_gateway())
        for h in s.hosts:
            ns = s.ns_name(h.name)
            run(["ip", "netns", "add", ns])
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_NS_SYSCTLS])
            run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
            if s.has_bridge(h):
                run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        for w in self._wires():
            h = s.host(w.host)
            hns = s.ns_name(h.name)
            pns = ["-n", w.peer_ns] if w.peer_ns else []
            run(["ip", *pns, "link", "add", w.peer, "type", "veth", "peer", "name", w.ifname, "netns", hns])
            master = ["master", w.peer_master] if w.peer_master else []
            run(["ip", *pns, "link", "set", "dev", w.peer, *master, "up"])
            if w.peer_cidr:
                run(["ip", *pns, "addr", "add", w.peer_cidr, "dev", w.peer])
            own_master = ["master", "br0"] if w.ifname == "eth0" and s.has_bridge(h) else []
            run(["ip", "-n", hns, "link", "set", "dev", w.ifname, *own_master, "up"])
        for h in s.hosts:
            ns = s.ns_name(h.name)
            dev = "br0" if s.has_bridge(h) else "eth0"
            for cidr in s.cidrs(h):
                run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            mgmt = s.mgmt_cidr(h)
            if mgmt:
                run(["ip", "-n", ns, "addr", "add", mgmt, "dev", "eth1"])
            if h.bulk_prefix:
                run(["ip", "-n", ns, "addr", "add", s.bulk_lo_cidr(h), "dev", "lo"])
            if s.has_bridge(h):
                run(["ip", "-n", ns, "link", "set", "dev", "br0", "up"])
        for w in self._wires():
            h = s.host(w.host)
            if h.bulk_prefix:
                run(["ip", "route", "add", h.bulk_prefix, "via", s.ip(h.name), "dev", w.peer])
        for h in s.bmc_hosts():
            self._build_bmc(h)

    def _build_bmc(self, h: LabHost) -> None:
        """The BMC's own namespace: ``lo`` (its console lives there) and ``eth0`` on the mgmt bridge,
        so none of the host's links (or their faults) stand between it and the monitor."""
        s = self.spec
        ns, peer, cidr = s.bmc_ns_name(h.name), self._bmc_link(h), s.bmc_cidr(h)
        assert cidr is not None
        run(["ip", "netns", "add", ns])
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_NS_SYSCTLS])
        run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        run(["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", "dev", peer, "master", self.mgmt_bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "dev", "eth0", "up"])

    def _check_no_overlap(self) -> None:
        """Refuse to build over another lab's (or anything else's) routes: a more specific foreign
        route inside one of our nets would silently steal part of our traffic."""
        ours = self.spec.networks()
        for r in _json(["ip", "-j", "-4", "route", "show", "table", "all"]):
            dst = str(r.get("dst", ""))
            if r.get("table") == "local" or dst in ("", "default"):
                continue
            try:
                net = ipaddress.IPv4Network(dst, strict=False)
            except ValueError:
                continue
            for n in ours:
                if net.overlaps(n) and net.prefixlen >= n.prefixlen:
                    dev = f" dev {r['dev']}" if r.get("dev") else ""
                    raise LabUsageError(
                        f"lab net {n} overlaps existing route {r.get('type', '')} {dst}{dev} (another lab?)"
                    )

    def _root_bridge(self, name: str, cidr: str | None) -> None:
        run(["ip", "link", "add", name, "type", "bridge"])
        if cidr:
            run(["ip", "addr", "add", cidr, "dev", name])
        run(["ip", "link", "set", "dev", name, "up"])

    # ------------------------------------------------------------------ helpers (processes)
    def _spawn(self, cmd: list[str], log: Path, *, restore_signals: bool = True) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # the helpers run as `python -m watchtower.lab.X`; make the package importable from any cwd
        pkg_root = str(Path(watchtower.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        with open(log, "wb") as fh:  # one log per helper start: small, and only this run's story
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd="/",
                restore_signals=restore_signals,
            )
        self._children[proc.pid] = proc
        self._logs[proc.pid] = log
        return proc

    def _start_responder(self) -> None:
        if not self.spec.listeners():
            return
        spec_file = self.run_dir / "spec.json"
        spec_file.write_text(self.spec.to_json())
        ready = self.run_dir / "responder.ready"
        ready.unlink(missing_ok=True)
        log = self.run_dir / "responder.log"
        cmd = [
            sys.executable,
            "-m",
            RESPONDER_MARKER,
            "--spec-json",
            str(spec_file),
            "--ready-file",
            str(ready),
        ]
        proc = self._spawn(cmd, log)
        (self.run_dir / "responder.pid").write_text(f"{proc.pid}\n")

        def ready_or_dead() -> bool:
            if proc.poll() is not None:
                raise LabError(f"responder exited with {proc.returncode}: {_tail(log)}")
            return ready.exists()

        wait_for(ready_or_dead, 15.0, f"the responder to bind its sockets (log: {log})")

    def _start_bmcs(self) -> dict[str, str]:
        """One ``ipmi_sim`` per BMC, in the BMC's namespace, from fresh files (a fresh SEL, power
        ON).  Returns each BMC's random admin password, needed once to set its SEL clock."""
        passwords: dict[str, str] = {}
        for h in self.spec.bmc_hosts():
            files = self.bmc_files(h.name)
            shutil.rmtree(files.directory, ignore_errors=True)
            address = self.spec.bmc_ip(h.name)
            assert address is not None
            passwords[h.name] = bmc.new_admin_password()
            files.write(h.name, address, passwords[h.name])
            run(["sdrcomp", "-o", str(files.compiled_sdrs), str(files.sdrs)])
            cmd = [
                "ip", "netns", "exec", self.spec.bmc_ns_name(h.name),
                "ipmi_sim", "-c", str(files.lan_conf), "-f", str(files.emu), "-s", str(files.state), "-n",
            ]  # fmt: skip
            # restore_signals=False keeps SIGPIPE ignored: ipmi_sim does not ignore it itself, and a
            # console client that hangs up early would otherwise kill it.  `ip netns exec` execs in
            # place, so this PID is ipmi_sim's.
            proc = self._spawn(cmd, self.run_dir / f"bmc-{h.name}.log", restore_signals=False)
            self._bmc_pidfile(h.name).write_text(f"{proc.pid}\n")
        return passwords

    def _set_bmc_clocks(self, admin_passwords: dict[str, str]) -> None:
        """ipmi_sim's SEL clock starts at the machine's uptime; set it to now so SEL records carry
        real dates (the IPMI probe ages first-look records by that clock)."""
        for name, password in admin_passwords.items():
            address = self.spec.bmc_ip(name)
            assert address is not None
            argv = bmc.ipmitool_argv(address, "sel", "time", "set", "now", admin=True)
            run(argv, env=bmc.ipmitool_env(password), timeout=10.0)

    def bmc_console(self, host: str, *commands: str) -> list[str]:
        """Drive ``host``'s simulated BMC from the hardware side (ipmi_sim_cmd(5)); one reply per
        command.  LabError when its console does not answer or rejects a command."""
        h = self.spec.host(host)
        if h.bmc_address is None:
            raise LabUsageError(f"{host} has no BMC")
        try:
            return bmc.console(self.spec.bmc_ns_name(h.name), commands)
        except (OSError, bmc.ConsoleError) as e:
            raise LabError(f"BMC of {host}: {e} (log: {self.run_dir / f'bmc-{host}.log'})") from None

    def _stop_pid(self, pid: int, marker: str, *, gentle: bool = True) -> None:
        """SIGTERM (then SIGKILL) one helper, only if its command line is really ours.  Not
        ``gentle``: SIGKILL right away, for helpers with nothing to flush that are slow to stop."""
        if not _cmdline(pid).count(marker):
            return
        child = self._children.pop(pid, None)
        self._logs.pop(pid, None)
        steps = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)) if gentle else ((signal.SIGKILL, 3.0),)
        for sig, grace in steps:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(grace)
                    return
            else:
                with contextlib.suppress(LabError):
                    wait_for(lambda: not _pid_alive(pid), grace, f"pid {pid} to exit")
                    return
        raise LabError(f"helper pid {pid} ({marker}) did not exit after SIGKILL")

    def _stop_pidfile(self, pidfile: Path, marker: str, *, gentle: bool = True) -> None:
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pidfile.unlink(missing_ok=True)
            return
        self._stop_pid(pid, marker, gentle=gentle)
        pidfile.unlink(missing_ok=True)

    # ------------------------------------------------------------------ readiness
    def _wait_ready(self, deadline: float) -> None:
        s = self.spec
        checks: dict[str, Callable[[], bool]] = {}
        for h in s.hosts:
            checks[f"{h.name} {s.ip(h.name)} reachable"] = _reach_check(s.ip(h.name))
            mip = s.mgmt_ip(h.name)
            if mip:
                checks[f"{h.name} mgmt {mip} reachable"] = _reach_check(mip)
        for li in s.listeners():
            ip = s.ip(li.host)
            checks[f"{li.host} {li.kind} {ip}:{li.port}"] = _listener_check(li.kind, ip, li.port)
        for h in s.bmc_hosts():
            bip = s.bmc_ip(h.name)
            assert bip is not None
            checks[f"{h.name} BMC {bip}:{bmc.IPMI_PORT} (ipmitool chassis power status)"] = _bmc_check(bip)
        pending = dict(checks)
        while pending:
            for name, check in list(pending.items()):
                if check():
                    del pending[name]
            if not pending:
                break
            for pid, proc in self._children.items():
                if proc.poll() is not None:
                    log = self._logs.get(pid, self.run_dir / "responder.log")
                    raise LabError(f"helper pid {pid} died (exit {proc.returncode}): {log}: {_tail(log)}")
            if time.monotonic() >= deadline:
                raise LabError("lab not ready before the deadline; still failing: " + ", ".join(pending))
            time.sleep(0.05)

    # ------------------------------------------------------------------ teardown
    def _teardown(self) -> None:
        p = self.spec.prefix
        self._stop_pidfile(self.run_dir / "responder.pid", RESPONDER_MARKER)
        for pf in sorted(self.run_dir.glob("nfq-*.pid")) if self.run_dir.is_dir() else []:
            self._stop_pidfile(pf, NFQDELAY_MARKER)
        # ipmi_sim takes ~1.5 s to honour SIGTERM and keeps nothing we want (its state dir is
        # rebuilt on every up()), so it gets SIGKILL.  Its marker is its own lan.conf path.
        for pf in sorted(self.run_dir.glob("bmc-*.pid")) if self.run_dir.is_dir() else []:
            self._stop_pidfile(pf, str(self.run_dir / pf.stem / "lan.conf"), gentle=False)
        mine = [n for n in _list_netns() if n.startswith(f"{p}-")]
        for ns in mine:  # helpers still inside our namespaces (e.g. from a lost run dir)
            out = run(["ip", "netns", "pids", ns], check=False).stdout
            for pid in (int(tok) for tok in out.split() if tok.isdigit()):
                if Path(_cmdline(pid).split("\0")[0]).name == IPMI_SIM_MARKER:
                    self._stop_pid(pid, IPMI_SIM_MARKER, gentle=False)
                else:
                    self._stop_pid(pid, NFQDELAY_MARKER)
        # Root-side links first: deleting one end of a veth removes the pair synchronously, while
        # namespace destruction is asynchronous and could briefly leave root-side peers behind.
        for link in _root_links():
            if link.startswith(f"{p}-"):
                run(["ip", "link", "del", "dev", link], check=False)
        for ns in mine:
            run(["ip", "netns", "del", ns], check=False)
        metric = self.spec.route_metric
        for r in _json(["ip", "-j", "route", "show", "type", "unreachable"]):
            if r.get("metric") == metric and r.get("dst"):
                run(["ip", "route", "del", "unreachable", str(r["dst"]), "metric", str(metric)], check=False)
        leftovers = [n for n in _list_netns() if n.startswith(f"{p}-")]
        leftovers += [n for n in _root_links() if n.startswith(f"{p}-")]
        if leftovers:
            raise LabError(f"could not remove {', '.join(leftovers)}")
        if self.run_dir.is_dir():
            for name in ("spec.json", "responder.ready"):
                (self.run_dir / name).unlink(missing_ok=True)
            for f in self.run_dir.glob("nfq-*.ready"):
                f.unlink(missing_ok=True)
            for d in self.run_dir.glob("bmc-*"):  # BMC config/state; their logs stay, like the others'
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def _locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise lab operations of one prefix (CLI, tests, demo) with a flock in run_dir."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as fh:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LabError(f"another lab operation holds {self.run_dir / '.lock'}") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ faults
    def break_host(self, host: str, mode: str, arg: int | str | None = None) -> None:
        """Inject a fault into ``host``.  Modes:

        * ``poweroff`` - every link of the host down (a hypervisor takes its VMs along, the switch
          takes all of prod along);
        * ``linkdown`` - ``eth0`` only (a hypervisor's mgmt NIC keeps answering);
        * ``mgmtdown`` - ``eth1`` only: the management NIC dies, production keeps running;
        * ``loss [pct]`` - nft netdev ingress drop on ``eth0`` (default 100 %; for a hypervisor
          this also hits its VMs, whose traffic enters through that NIC);
        * ``icmpdrop`` - drop echo-requests addressed to the host (TCP keeps working);
        * ``delay [ms]`` - hold echo-requests addressed to the host for ``ms`` (default 2000);
        * ``hang`` - the OS hangs: every NIC drops everything it receives (nft netdev ingress; ARP
          too), links stay up, the chassis stays ON and nothing is logged (a hypervisor's VMs
          hang with it);
        * ``psufail`` - BMC only: a critical SEL record "Power Supply PS1 Status: Failure detected"
          (and the PS1 sensor's failure bit), then chassis OFF and every link down;
        * ``bmcdown`` - BMC only: the BMC's NIC goes down (BMC unreachable, host unaffected).
        * ``prodloss`` - the production side drops everything it receives (every NIC but the
          management NIC ``eth1``, ARP too): a core switch that stops forwarding production while
          its management address, and every host's management NIC, keep answering.

        For a host with a BMC, ``poweroff`` also switches the simulated chassis OFF (before the
        links go down, so a monitor never sees "down, chassis on" for a power loss).

        ``icmpdrop``/``delay`` act on the host's own INPUT path, so they do not affect VMs behind
        a hypervisor or hosts behind the switch.
        """
        h = self.spec.host(host)
        value = _mode_arg(mode, arg)
        if mode in BMC_MODES and h.bmc_address is None:
            raise LabUsageError(f"mode {mode} needs a BMC, and {host} has none (no bmc_address)")
        require_privileges()
        ns = self.spec.ns_name(h.name)
        with self._locked():
            if ns not in _list_netns():
                raise LabUsageError(f"namespace {ns} does not exist: is the lab up?")
            if mode in ("poweroff", "psufail"):
                if h.bmc_address is not None:
                    if mode == "psufail":  # the BMC logs the failure as the power drops
                        self._psu_failed(h, True)
                    self.bmc_files(h.name).set_power(False)
                for link in _ns_links(ns):
                    if link["ifname"] != "lo":
                        run(["ip", "-n", ns, "link", "set", "dev", link["ifname"], "down"])
            elif mode == "hang":
                self._hang(ns)
            elif mode == "prodloss":
                self._hang(ns, spare=("eth1",), table="wtprod")
            elif mode == "bmcdown":
                run(["ip", "-n", self.spec.bmc_ns_name(h.name), "link", "set", "dev", "eth0", "down"])
            elif mode == "linkdown":
                run(["ip", "-n", ns, "link", "set", "dev", "eth0", "down"])
            elif mode == "mgmtdown":
                if h.mgmt_address is None:
                    raise LabUsageError(f"{host} has no management NIC")
                run(["ip", "-n", ns, "link", "set", "dev", "eth1", "down"])
            elif mode == "loss":
                match = "" if value >= 100 else f"numgen random mod 100 < {value} "
                script = (
                    "table netdev wtloss\ndelete table netdev wtloss\n"
                    "table netdev wtloss {\n"
                    '  chain ingress { type filter hook ingress device "eth0" priority 0; policy accept;\n'
                    f"    meta protocol ip {match}drop\n  }}\n}}\n"
                )
                run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)
            elif mode == "icmpdrop":
                script = (
                    "table inet wtfilter\ndelete table inet wtfilter\n"
                    "table inet wtfilter {\n"
                    "  chain input { type filter hook input priority 0; policy accept;\n"
                    "    icmp type echo-request drop\n  }\n}\n"
                )
                run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)
            elif mode == "delay":
                self._clear_delay(h)
                self._start_delay(h, value)

    def cut_monitor(self) -> None:
        """The monitoring box loses its own connectivity: every root-side link of the lab goes
        down (the uplink to the switch, the mgmt bridge and its ports, the links to bulk hosts
        such as the demo's ``isp``). What watchtower then sees is the 'monitor is cut off' case."""
        require_privileges()
        with self._locked():
            for link in _root_links():
                if link.startswith(f"{self.spec.prefix}-"):
                    run(["ip", "link", "set", "dev", link, "down"])

    def restore_monitor(self) -> None:
        """Undo :meth:`cut_monitor`: links up again, and the routes to bulk prefixes (the kernel
        flushes routes through a link that goes down) put back."""
        require_privileges()
        with self._locked():
            links = [link for link in _root_links() if link.startswith(f"{self.spec.prefix}-")]
            bridges = {self.mgmt_bridge, self.prod_bridge}
            for link in sorted(links, key=lambda name: name not in bridges):
                run(["ip", "link", "set", "dev", link, "up"])
            for w in self._wires():
                h = self.spec.host(w.host)
                if h.bulk_prefix:
                    run(["ip", "route", "replace", h.bulk_prefix, "via", self.spec.ip(h.name), "dev", w.peer])

    def repair(self, host: str) -> None:
        """Undo every fault on ``host``: links up, nft tables and NFQUEUE rule gone, delay helper
        stopped (it releases held packets on exit rather than dropping them).  A BMC gets its NIC
        back, its PSU sensor healthy and the chassis ON *before* the host's links come up (power
        first, then the OS); its SEL keeps the failure record, as a real BMC's would."""
        h = self.spec.host(host)
        require_privileges()
        ns = self.spec.ns_name(h.name)
        with self._locked():
            if ns not in _list_netns():
                raise LabUsageError(f"namespace {ns} does not exist: is the lab up?")
            self._clear_delay(h)
            if h.bmc_address is not None:
                bns = self.spec.bmc_ns_name(h.name)
                run(["ip", "-n", bns, "link", "set", "dev", "eth0", "up"])
                if self.bmc_files(h.name).psu_failed:
                    self._psu_failed(h, False)
                self.bmc_files(h.name).set_power(True)
            tables = run(["ip", "netns", "exec", ns, "nft", "list", "tables"]).stdout
            for fam, name in (
                ("netdev", "wtloss"),
                ("inet", "wtfilter"),
                ("netdev", "wthang"),
                ("netdev", "wtprod"),
            ):
                if f"table {fam} {name}" in tables:
                    run(["ip", "netns", "exec", ns, "nft", "delete", "table", fam, name])
            for link in _ns_links(ns):
                if "UP" not in link.get("flags", []):
                    run(["ip", "-n", ns, "link", "set", "dev", link["ifname"], "up"])

    def _hang(self, ns: str, spare: tuple[str, ...] = (), table: str = "wthang") -> None:
        """Every NIC of the namespace (but ``spare``) drops all it receives.  Ingress (netdev)
        rather than INPUT, so ARP dies too and bridged VM traffic with it: a hung hypervisor
        forwards nothing.  ``br0`` is left out: its ports (eth0, the VMs' veths) already see every
        frame first."""
        devices = [li["ifname"] for li in _ns_links(ns) if li["ifname"] not in ("lo", "br0", *spare)]
        chains = "".join(
            f'  chain in{i} {{ type filter hook ingress device "{dev}" priority 0; policy drop; }}\n'
            for i, dev in enumerate(devices)
        )
        script = f"table netdev {table}\ndelete table netdev {table}\ntable netdev {table} {{\n{chains}}}\n"
        run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)

    def _psu_failed(self, h: LabHost, failed: bool) -> None:
        """Fail (SEL record + sensor bit) or replace (sensor bit only) the BMC's power supply."""
        if failed:
            self.bmc_console(h.name, bmc.PSU_FAILED_BIT, bmc.PSU_FAILURE_SEL)
        else:
            self.bmc_console(h.name, bmc.PSU_OK_BIT)
        self.bmc_files(h.name).mark_psu_failed(failed)

    _NFQ_RULE = (
        "INPUT",
        "-p",
        "icmp",
        "--icmp-type",
        "echo-request",
        "-j",
        "NFQUEUE",
        "--queue-num",
        str(NFQUEUE_NUM),
    )

    def _start_delay(self, h: LabHost, ms: int) -> None:
        ns = self.spec.ns_name(h.name)
        ready = self.run_dir / f"nfq-{h.name}.ready"
        ready.unlink(missing_ok=True)
        log = self.run_dir / f"nfq-{h.name}.log"
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            NFQDELAY_MARKER,
            str(NFQUEUE_NUM),
            f"{ms / 1000:.3f}",
            "--ready-file",
            str(ready),
        ]
        proc = self._spawn(cmd, log)  # `ip netns exec` execs in place, so this PID is the helper's
        (self.run_dir / f"nfq-{h.name}.pid").write_text(f"{proc.pid}\n")

        def ready_or_dead() -> bool:
            if proc.poll() is not None:
                raise LabError(f"nfqdelay for {h.name} exited with {proc.returncode}: {_tail(log)}")
            return ready.exists()

        # the rule goes in only once the queue is bound: an unbound NFQUEUE drops everything
        wait_for(ready_or_dead, 10.0, f"nfqdelay for {h.name} to bind queue {NFQUEUE_NUM}")
        run(["ip", "netns", "exec", ns, "iptables", "-w", "5", "-A", *self._NFQ_RULE])

    def _clear_delay(self, h: LabHost) -> None:
        ns = self.spec.ns_name(h.name)
        if shutil.which("iptables"):
            for _ in range(10):  # -D removes one copy per call
                r = run(
                    ["ip", "netns", "exec", ns, "iptables", "-w", "5", "-D", *self._NFQ_RULE], check=False
                )
                if r.returncode != 0:
                    break
        self._stop_pidfile(self.run_dir / f"nfq-{h.name}.pid", NFQDELAY_MARKER)
        (self.run_dir / f"nfq-{h.name}.ready").unlink(missing_ok=True)

    # ------------------------------------------------------------------ status
    def status(self) -> str:
        """Human-readable state: per host its namespace, addresses, link states and active faults."""
        require_privileges()
        s = self.spec
        present = set(_list_netns())
        n_up = sum(s.ns_name(h.name) in present for h in s.hosts)
        state = "up" if n_up == len(s.hosts) else "down" if n_up == 0 else f"partial ({n_up}/{len(s.hosts)})"
        lines = [f"lab {s.prefix}: {state}   prod {s.prod_net or '-'}   mgmt {s.mgmt_net or '-'}"]
        rpid = _read_pid(self.run_dir / "responder.pid")
        if rpid and _pid_alive(rpid) and RESPONDER_MARKER in _cmdline(rpid):
            lines.append(f"responder: pid {rpid}, {len(s.listeners())} listeners")
        elif s.listeners():
            lines.append("responder: not running")
        if n_up == 0:
            return "\n".join(lines)
        for h in s.hosts:
            ns = s.ns_name(h.name)
            addr = s.ip(h.name)
            mip = s.mgmt_ip(h.name)
            where = (
                f"{addr}" + (f" mgmt {mip}" if mip else "") + (f" +{h.bulk_prefix}" if h.bulk_prefix else "")
            )
            if ns not in present:
                lines.append(f"  {h.name:<10} {h.role:<10} {where:<32} MISSING namespace {ns}")
                continue
            links = " ".join(
                f"{li['ifname']}:{'up' if 'UP' in li.get('flags', []) else 'DOWN'}"
                for li in _ns_links(ns)
                if li["ifname"] in ("eth0", "eth1", "br0")
            )
            faults = self._faults(h)
            lines.append(f"  {h.name:<10} {h.role:<10} {where:<32} {links:<28} {', '.join(faults) or 'ok'}")
            if h.bmc_address is not None:
                lines.append(self._bmc_status(h, present))
        return "\n".join(lines)

    def _bmc_status(self, h: LabHost, present: set[str]) -> str:
        """One status line for a host's BMC: address, its NIC, the simulator, chassis and faults."""
        bns = self.spec.bmc_ns_name(h.name)
        name, where = f"{h.name}-bmc", f"{self.spec.bmc_ip(h.name)}:{bmc.IPMI_PORT}"
        if bns not in present:
            return f"  {name:<10} {'bmc':<10} {where:<32} MISSING namespace {bns}"
        up = any("UP" in li.get("flags", []) for li in _ns_links(bns) if li["ifname"] == "eth0")
        files = self.bmc_files(h.name)
        pid = _read_pid(self._bmc_pidfile(h.name))
        sim_ok = pid is not None and _pid_alive(pid) and IPMI_SIM_MARKER in _cmdline(pid)
        power = {True: "chassis on", False: "chassis off", None: "chassis ?"}[files.power_on()]
        notes = [power, f"ipmi_sim pid {pid}" if sim_ok else "ipmi_sim NOT RUNNING"]
        notes += ["psufail"] if files.psu_failed else []
        notes += [] if up else ["bmcdown"]
        link = f"eth0:{'up' if up else 'DOWN'}"
        return f"  {name:<10} {'bmc':<10} {where:<32} {link:<28} {', '.join(notes)}"

    def _faults(self, h: LabHost) -> list[str]:
        ns = self.spec.ns_name(h.name)
        out: list[str] = []
        links = {li["ifname"]: li for li in _ns_links(ns)}
        if all("UP" not in li.get("flags", []) for n, li in links.items() if n != "lo"):
            out.append("poweroff")
        elif "eth0" in links and "UP" not in links["eth0"].get("flags", []):
            out.append("linkdown")
        ruleset = run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], check=False).stdout
        if "table netdev wtloss" in ruleset:
            m = re.search(r"mod 100 < (\d+)", ruleset)
            out.append(f"loss {m.group(1) if m else 100}%")
        if "table inet wtfilter" in ruleset:
            out.append("icmpdrop")
        if "table netdev wthang" in ruleset:
            out.append("hang")
        if "table netdev wtprod" in ruleset:
            out.append("prodloss")
        pid = _read_pid(self.run_dir / f"nfq-{h.name}.pid")
        if pid and _pid_alive(pid):
            args = _cmdline(pid).split("\0")
            try:
                secs = float(args[args.index(NFQDELAY_MARKER) + 2])
                out.append(f"delay {secs * 1000:.0f}ms (pid {pid})")
            except (ValueError, IndexError):
                out.append(f"delay (pid {pid})")
        return out


# ---------------------------------------------------------------------- module helpers
def _mode_arg(mode: str, arg: int | str | None) -> int:
    """Validate a break mode and its argument before touching anything."""
    if mode not in BREAK_MODES:
        raise LabUsageError(f"unknown break mode {mode!r} (one of: {', '.join(BREAK_MODES)})")
    if mode in _NO_ARG_MODES:
        if arg is not None:
            raise LabUsageError(f"mode {mode} takes no argument")
        return 0
    default, lo, hi, unit = (100, 1, 100, "percent") if mode == "loss" else (2000, 1, 600_000, "ms")
    if arg is None:
        return default
    try:
        value = int(arg)
    except (TypeError, ValueError):
        raise LabUsageError(f"mode {mode}: argument must be an integer ({unit}), got {arg!r}") from None
    if not lo <= value <= hi:
        raise LabUsageError(f"mode {mode}: argument must be {lo}..{hi} {unit}, got {value}")
    return value


def _json(cmd: list[str]) -> list[dict[str, Any]]:
    out = run(cmd).stdout.strip()
    return json.loads(out) if out else []


def _list_netns() -> list[str]:
    # /run/netns is where `ip netns` keeps its names; reading it avoids a fork per call
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _root_links() -> list[str]:
    return [str(li["ifname"]) for li in _json(["ip", "-j", "link", "show"])]


def _ns_links(ns: str) -> list[dict[str, Any]]:
    return _json(["ip", "-n", ns, "-j", "link", "show"])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaping it if it is our child)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _reach_check(ip: str) -> Callable[[], bool]:
    """Reachability without ICMP privileges: a TCP connect that is *refused* proves the path and
    ARP work (the host answered with RST); a timeout or EHOSTUNREACH means not yet."""

    def check() -> bool:
        try:
            with socket.create_connection((ip, 9), timeout=0.3):
                return True
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    return check


def _bmc_check(ip: str) -> Callable[[], bool]:
    """A BMC is ready when the monitor's own way in works: an RMCP+ session as the demo user that
    reports the chassis ON.  A one-packet RMCP ping first, so polling a not-yet-bound simulator
    costs 0.2 s per round instead of ipmitool's ~2 s timeout."""

    def check() -> bool:
        if not bmc.rmcp_answers(ip):
            return False
        try:
            r = subprocess.run(
                bmc.ipmitool_argv(ip, "chassis", "power", "status"),
                env=bmc.ipmitool_env(),
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0 and "Chassis Power is on" in r.stdout

    return check


def _listener_check(kind: str, ip: str, port: int) -> Callable[[], bool]:
    """A real request per listener kind, so ``up()`` returns only when each one answers."""

    def tcp() -> bool:
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return True
        except OSError:
            return False

    def http() -> bool:
        try:
            with socket.create_connection((ip, port), timeout=0.5) as sk:
                sk.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return sk.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def dns_query() -> bool:
        import dns.message
        import dns.query

        try:
            dns.query.udp(dns.message.make_query("ready.invalid.", "A"), ip, port=port, timeout=0.5)
            return True
        except Exception:  # timeout or a malformed answer: simply not ready yet
            return False

    return {"tcp": tcp, "http": http, "dns": dns_query}[kind]
