"""Data model of a lab site: which hosts exist, where they are wired, what they serve.

This module is deliberately stdlib-only and side-effect free: the responder helper process, the
tests and the benchmark all load the same :class:`LabSpec` (also round-tripped through JSON), so
the topology is described exactly once.  Everything that touches the system lives in
:mod:`watchtower.lab.site`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

ROLE_NETWORK = "network"
ROLE_HYPERVISOR = "hypervisor"
ROLE_STORAGE = "storage"
ROLE_VM = "vm"
ROLE_SERVER = "server"
ROLE_BULK = "bulk"
ROLES = frozenset({ROLE_NETWORK, ROLE_HYPERVISOR, ROLE_STORAGE, ROLE_VM, ROLE_SERVER, ROLE_BULK})

# Hard safety rule: a lab may only ever use addresses in this block, which exists nowhere but in
# the namespaces we create.  Validation enforces it so a typo cannot send traffic to a real network.
LAB_SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,3}$")
_HOST_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


class SpecError(ValueError):
    """A LabSpec is inconsistent (bad address, unknown parent, overlapping nets, ...)."""


@dataclass(frozen=True)
class LabHost:
    """One simulated machine.

    ``addresses`` are CIDRs (or bare IPs, which get the prod net's prefix length) on the host's
    uplink side: on ``br0`` for switches/hypervisors, on ``eth0`` for everything else.  For a
    bulk host the first address is the point-to-point link to the root namespace (explicit CIDR,
    e.g. ``10.213.63.2/30``) and ``bulk_prefix`` is put on ``lo`` so every address in it answers.

    ``bmc_address`` (on the mgmt net) gives the host a simulated BMC: a namespace of its own
    (``<prefix>-<host>-bmc``) with one NIC on the mgmt bridge and an ``ipmi_sim`` behind it.  It is
    a separate little computer on purpose: it keeps answering while the host's own NICs are down,
    and its chassis power follows the host's ``poweroff``/``psufail`` faults.
    """

    name: str
    role: str
    addresses: tuple[str, ...]
    mgmt_address: str | None = None
    parent: str | None = None
    tcp_ports: tuple[int, ...] = ()
    http_ports: tuple[int, ...] = ()
    dns_names: dict[str, str] = field(default_factory=dict, hash=False)
    bulk_prefix: str | None = None
    bmc_address: str | None = None

    @property
    def is_bulk(self) -> bool:
        """Bulk hosts hang directly off the root namespace instead of the prod network."""
        return self.bulk_prefix is not None

    @property
    def has_listeners(self) -> bool:
        """Whether the responder must open anything in this host's namespace."""
        return bool(self.tcp_ports or self.http_ports or self.dns_names)


@dataclass(frozen=True)
class Listener:
    """One socket the responder serves; used for readiness checks and status output."""

    host: str
    kind: str  # "tcp" | "http" | "dns"
    port: int


@dataclass(frozen=True)
class LabSpec:
    """A whole site.  ``prefix`` (<= 4 chars) names namespaces and root-side interfaces so that
    several labs (demo, tests, benchmark) can coexist and each can find and remove its leftovers.
    """

    prefix: str
    prod_net: str | None
    mgmt_net: str | None
    hosts: tuple[LabHost, ...]

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ lookups
    def host(self, name: str) -> LabHost:
        """Return the host called ``name``; SpecError names the known hosts otherwise."""
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts)
        raise SpecError(f"unknown host {name!r} (known: {known})")

    @property
    def switch(self) -> LabHost | None:
        """The (at most one) network-role host whose bridge IS the prod L2 network."""
        for h in self.hosts:
            if h.role == ROLE_NETWORK:
                return h
        return None

    def children(self, name: str) -> tuple[LabHost, ...]:
        """VMs (or other hosts) plugged into ``name``'s bridge."""
        return tuple(h for h in self.hosts if h.parent == name)

    def has_bridge(self, h: LabHost) -> bool:
        """Switches, hypervisors and any host with children carry their addresses on ``br0``."""
        return h.role in (ROLE_NETWORK, ROLE_HYPERVISOR) or bool(self.children(h.name))

    def ns_name(self, host: str) -> str:
        """Namespace name of a host (``wtd-pve1``)."""
        return f"{self.prefix}-{host}"

    def bmc_ns_name(self, host: str) -> str:
        """Namespace name of a host's BMC (``wtd-pve1-bmc``)."""
        return f"{self.prefix}-{host}-bmc"

    def bmc_hosts(self) -> tuple[LabHost, ...]:
        """Hosts that have a simulated BMC, in spec order."""
        return tuple(h for h in self.hosts if h.bmc_address is not None)

    def cidrs(self, h: LabHost) -> list[str]:
        """The host's uplink addresses with prefix lengths filled in."""
        out = []
        for a in h.addresses:
            if "/" in a or self.prod_net is None:
                out.append(str(ipaddress.IPv4Interface(a)))
            else:
                out.append(f"{a}/{ipaddress.IPv4Network(self.prod_net).prefixlen}")
        return out

    def ip(self, host: str) -> str:
        """Primary address (no prefix length) of a host: what a monitor would probe."""
        h = self.host(host)
        return str(ipaddress.IPv4Interface(self.cidrs(h)[0]).ip)

    def mgmt_cidr(self, h: LabHost) -> str | None:
        """Management address with prefix length, or None."""
        return self._on_mgmt(h.mgmt_address)

    def mgmt_ip(self, host: str) -> str | None:
        """Management address (no prefix length) of a host, or None if it has no OOB NIC."""
        c = self.mgmt_cidr(self.host(host))
        return None if c is None else str(ipaddress.IPv4Interface(c).ip)

    def bmc_cidr(self, h: LabHost) -> str | None:
        """BMC address with prefix length, or None."""
        return self._on_mgmt(h.bmc_address)

    def bmc_ip(self, host: str) -> str | None:
        """BMC address (no prefix length) of a host, or None if it has no BMC."""
        c = self.bmc_cidr(self.host(host))
        return None if c is None else str(ipaddress.IPv4Interface(c).ip)

    def _on_mgmt(self, address: str | None) -> str | None:
        if address is None:
            return None
        if "/" in address or self.mgmt_net is None:
            return str(ipaddress.IPv4Interface(address))
        return f"{address}/{ipaddress.IPv4Network(self.mgmt_net).prefixlen}"

    def prod_gateway(self) -> str | None:
        """Root namespace's address on the prod network (``.1``) with prefix length."""
        if self.prod_net is None:
            return None
        net = ipaddress.IPv4Network(self.prod_net)
        return f"{net.network_address + 1}/{net.prefixlen}"

    def mgmt_gateway(self) -> str | None:
        """Root namespace's address on the mgmt bridge (``.1``) with prefix length."""
        if self.mgmt_net is None:
            return None
        net = ipaddress.IPv4Network(self.mgmt_net)
        return f"{net.network_address + 1}/{net.prefixlen}"

    def bulk_link(self, h: LabHost) -> tuple[str, str]:
        """(root-side CIDR, host-side CIDR) of a bulk host's point-to-point veth."""
        host_if = ipaddress.IPv4Interface(self.cidrs(h)[0])
        root_ip = next(a for a in host_if.network.hosts() if a != host_if.ip)
        return f"{root_ip}/{host_if.network.prefixlen}", str(host_if)

    def bulk_lo_cidr(self, h: LabHost) -> str:
        """What goes on a bulk host's ``lo``: first address of the prefix, with its length."""
        assert h.bulk_prefix is not None
        net = ipaddress.IPv4Network(h.bulk_prefix)
        return f"{net.network_address + 1}/{net.prefixlen}"

    def listeners(self) -> list[Listener]:
        """Every TCP/HTTP/DNS socket the responder opens, in host order."""
        out: list[Listener] = []
        for h in self.hosts:
            out += [Listener(h.name, "tcp", p) for p in h.tcp_ports]
            out += [Listener(h.name, "http", p) for p in h.http_ports]
            if h.dns_names:
                out.append(Listener(h.name, "dns", 53))
        return out

    def networks(self) -> list[ipaddress.IPv4Network]:
        """Every network the lab puts into the root namespace's routing table."""
        nets = [ipaddress.IPv4Network(n) for n in (self.prod_net, self.mgmt_net) if n]
        for h in self.hosts:
            if h.is_bulk:
                assert h.bulk_prefix is not None
                nets.append(ipaddress.IPv4Interface(self.cidrs(h)[0]).network)
                nets.append(ipaddress.IPv4Network(h.bulk_prefix))
        return nets

    def safety_nets(self) -> list[ipaddress.IPv4Network]:
        """Covering /20s (or the net itself when larger) that get an ``unreachable`` route, so
        lab traffic can never leak to the default gateway even while a specific route is gone."""
        covers = {n.supernet(new_prefix=min(n.prefixlen, 20)) for n in self.networks()}
        return sorted(c for c in covers if not any(c != o and c.subnet_of(o) for o in covers))

    @property
    def route_metric(self) -> int:
        """Metric of this lab's safety routes.  It encodes the prefix (base 37, unique per prefix),
        so two labs with overlapping /20s can both install theirs and each removes only its own."""
        value = 0
        for ch in self.prefix:
            value = value * 37 + _PREFIX_ALPHABET.index(ch) + 1
        return 1_000_000 + value

    def bulk_addresses(self, count: int | None = None) -> list[str]:
        """Answering addresses of all bulk hosts, interleaved host by host (so a sweep spreads
        over the namespaces), at most ``count``."""
        iters: list[Iterator[ipaddress.IPv4Address]] = [
            ipaddress.IPv4Network(h.bulk_prefix).hosts() for h in self.hosts if h.bulk_prefix
        ]
        out: list[str] = []
        while iters and (count is None or len(out) < count):
            for it in list(iters):
                a = next(it, None)
                if a is None:
                    iters.remove(it)
                    continue
                out.append(str(a))
                if count is not None and len(out) >= count:
                    break
        return out

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        """Serialise for the responder helper process."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LabSpec:
        """Inverse of :meth:`to_json`."""
        d: dict[str, Any] = json.loads(text)
        hosts = tuple(
            LabHost(
                name=h["name"],
                role=h["role"],
                addresses=tuple(h["addresses"]),
                mgmt_address=h.get("mgmt_address"),
                parent=h.get("parent"),
                tcp_ports=tuple(h.get("tcp_ports", ())),
                http_ports=tuple(h.get("http_ports", ())),
                dns_names=dict(h.get("dns_names", {})),
                bulk_prefix=h.get("bulk_prefix"),
                bmc_address=h.get("bmc_address"),
            )
            for h in d["hosts"]
        )
        return cls(prefix=d["prefix"], prod_net=d.get("prod_net"), mgmt_net=d.get("mgmt_net"), hosts=hosts)

    # ------------------------------------------------------------------ validation
    def _cidr_or_error(self, h: LabHost, what: str) -> str | None:
        """``mgmt_cidr``/``bmc_cidr`` with a malformed address reported as a SpecError."""
        try:
            c = self.mgmt_cidr(h) if what == "mgmt" else self.bmc_cidr(h)
            return None if c is None else str(ipaddress.IPv4Interface(c))
        except ValueError as e:
            raise SpecError(f"host {h.name!r}: {what} address: {e}") from None

    def _validate(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise SpecError(f"prefix {self.prefix!r} must be 1-4 chars [a-z0-9], starting with a letter")
        prod = _lab_net(self.prod_net, "prod_net") if self.prod_net else None
        mgmt = _lab_net(self.mgmt_net, "mgmt_net") if self.mgmt_net else None
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise SpecError(f"duplicate host names in {names}")
        if sum(h.role == ROLE_NETWORK for h in self.hosts) > 1:
            raise SpecError("at most one host may have role 'network' (the switch)")
        by_name = {h.name: h for h in self.hosts}
        used: set[ipaddress.IPv4Address] = set()
        for n in (self.prod_gateway(), self.mgmt_gateway()):
            if n:
                used.add(ipaddress.IPv4Interface(n).ip)
        for h in self.hosts:
            where = f"host {h.name!r}"
            if not _HOST_RE.match(h.name):
                raise SpecError(f"{where}: name must match {_HOST_RE.pattern}")
            if h.role not in ROLES:
                raise SpecError(f"{where}: unknown role {h.role!r} (one of {sorted(ROLES)})")
            if not h.addresses:
                raise SpecError(f"{where}: needs at least one address")
            for port in (*h.tcp_ports, *h.http_ports):
                if not 1 <= port <= 65535:
                    raise SpecError(f"{where}: bad port {port}")
            if len(set(h.tcp_ports + h.http_ports)) != len(h.tcp_ports + h.http_ports):
                raise SpecError(f"{where}: a port is listed twice")
            for dn, rec in h.dns_names.items():
                _lab_ip(rec, f"{where} dns name {dn!r}")
            if h.parent is not None:
                parent = by_name.get(h.parent)
                if parent is None or parent.role != ROLE_HYPERVISOR:
                    raise SpecError(f"{where}: parent {h.parent!r} must be a hypervisor of this spec")
                if h.role in (ROLE_NETWORK, ROLE_HYPERVISOR) or h.is_bulk:
                    raise SpecError(f"{where}: a {h.role} cannot live inside another host")
            elif h.role == ROLE_VM:
                raise SpecError(f"{where}: a vm needs a parent hypervisor")
            try:
                ifaces = [ipaddress.IPv4Interface(c) for c in self.cidrs(h)]
            except ValueError as e:
                raise SpecError(f"{where}: {e}") from None
            if h.is_bulk != (h.role == ROLE_BULK):
                raise SpecError(f"{where}: role 'bulk' and bulk_prefix go together")
            if h.is_bulk:
                if "/" not in h.addresses[0] or ifaces[0].network.prefixlen > 30:
                    raise SpecError(f"{where}: bulk link address needs an explicit prefix length <= 30")
                _lab_net(str(ifaces[0].network), f"{where} link")
                _lab_net(str(h.bulk_prefix), f"{where} bulk_prefix")
            else:
                if prod is None:
                    raise SpecError(f"{where}: needs prod_net in the spec")
                for iface in ifaces:
                    if iface.network != prod:
                        raise SpecError(f"{where}: address {iface} is not in prod net {prod}")
            for iface in ifaces:
                if iface.ip in used:
                    raise SpecError(f"{where}: address {iface.ip} used twice (or is the root .1)")
                used.add(iface.ip)
            for what, m in (("mgmt", self._cidr_or_error(h, "mgmt")), ("bmc", self._cidr_or_error(h, "bmc"))):
                if m is None:
                    continue
                if mgmt is None:
                    raise SpecError(f"{where}: has {what}_address but the spec has no mgmt_net")
                mi = ipaddress.IPv4Interface(m)
                if mi.network != mgmt:
                    raise SpecError(f"{where}: {what} address {mi} is not in mgmt net {mgmt}")
                if mi.ip in used:
                    raise SpecError(f"{where}: address {mi.ip} used twice (or is the root .1)")
                used.add(mi.ip)
            if h.bmc_address is not None:
                if h.role in (ROLE_VM, ROLE_BULK):
                    raise SpecError(f"{where}: a {h.role} has no BMC (only physical machines do)")
                # `<prefix>-<host>-bmc` must not also be some host's own namespace
                if f"{h.name}-bmc" in by_name:
                    raise SpecError(f"{where}: host name {h.name}-bmc clashes with {h.name}'s BMC namespace")
        nets = self.networks()
        for k, n1 in enumerate(nets):
            for n2 in nets[k + 1 :]:
                if n1.overlaps(n2):
                    raise SpecError(f"networks {n1} and {n2} overlap")


def _lab_net(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as e:
        raise SpecError(f"{what}: {e}") from None
    if not net.subnet_of(LAB_SUPERNET):
        raise SpecError(f"{what}: {net} is outside the lab block {LAB_SUPERNET}")
    return net


def _lab_ip(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        a = ipaddress.IPv4Address(text)
    except ValueError as e:
        raise SpecError(f"{what}: {e}") from None
    if a not in LAB_SUPERNET:
        raise SpecError(f"{what}: {a} is outside the lab block {LAB_SUPERNET}")
    return a


# ---------------------------------------------------------------------- sites
DEMO = LabSpec(
    prefix="wtd",
    prod_net="10.213.10.0/24",
    mgmt_net="10.213.99.0/24",
    hosts=(
        LabHost("core-sw1", ROLE_NETWORK, ("10.213.10.2",)),
        LabHost(
            "pve1",
            ROLE_HYPERVISOR,
            ("10.213.10.11",),
            mgmt_address="10.213.99.11",
            http_ports=(8006,),
            bmc_address="10.213.99.111",
        ),
        LabHost(
            "pve2",
            ROLE_HYPERVISOR,
            ("10.213.10.12",),
            mgmt_address="10.213.99.12",
            http_ports=(8006,),
            bmc_address="10.213.99.112",
        ),
        LabHost("nas1", ROLE_STORAGE, ("10.213.10.5",), tcp_ports=(3260,), http_ports=(5000,)),
        LabHost(
            "dc1",
            ROLE_VM,
            ("10.213.10.21",),
            parent="pve1",
            tcp_ports=(389,),
            dns_names={
                "dc1.acme.local": "10.213.10.21",
                "mail1.acme.local": "10.213.10.22",
                "erp1.acme.local": "10.213.10.23",
                "files1.acme.local": "10.213.10.24",
            },
        ),
        LabHost("mail1", ROLE_VM, ("10.213.10.22",), parent="pve1", tcp_ports=(25,)),
        LabHost("erp1", ROLE_VM, ("10.213.10.23",), parent="pve2", http_ports=(8080,)),
        LabHost("files1", ROLE_VM, ("10.213.10.24",), parent="pve2", tcp_ports=(445,)),
        # "The internet" as seen over the monitoring box's own uplink: the demo's vantage target.
        LabHost("isp", ROLE_BULK, ("10.213.14.2/30",), tcp_ports=(53,), bulk_prefix="10.213.15.0/28"),
    ),
)
"""The demo site a shipped config file monitors.  Names and addresses are a contract."""


PARTITION = LabSpec(
    prefix="wtn",
    prod_net="10.213.112.0/24",
    mgmt_net="10.213.113.0/24",
    hosts=(
        # The core switch has a management address of its own (eth1 on the mgmt network), so it
        # keeps answering there while its production side drops everything (`break core-sw1 prodloss`).
        LabHost("core-sw1", ROLE_NETWORK, ("10.213.112.2",), mgmt_address="10.213.113.2"),
        LabHost(
            "pve1",
            ROLE_HYPERVISOR,
            ("10.213.112.11",),
            mgmt_address="10.213.113.11",
            http_ports=(8006,),
            bmc_address="10.213.113.111",
        ),
        LabHost(
            "pve2",
            ROLE_HYPERVISOR,
            ("10.213.112.12",),
            mgmt_address="10.213.113.12",
            http_ports=(8006,),
            bmc_address="10.213.113.112",
        ),
        LabHost(
            "nas1",
            ROLE_STORAGE,
            ("10.213.112.5",),
            mgmt_address="10.213.113.5",
            tcp_ports=(3260,),
            http_ports=(5000,),
        ),
        LabHost("dc1", ROLE_VM, ("10.213.112.21",), parent="pve1", tcp_ports=(389,)),
        LabHost("mail1", ROLE_VM, ("10.213.112.22",), parent="pve1", tcp_ports=(25,)),
        LabHost("erp1", ROLE_VM, ("10.213.112.23",), parent="pve2", http_ports=(8080,)),
        LabHost("files1", ROLE_VM, ("10.213.112.24",), parent="pve2", tcp_ports=(445,)),
        LabHost("isp", ROLE_BULK, ("10.213.114.2/30",), tcp_ports=(53,), bulk_prefix="10.213.115.0/28"),
    ),
)
"""The demo's shape with a management network every physical host (and the core switch) is on:
for partitions, where production fails while management answers. Clear of the demo's and the
tests' nets (10.213.112.0/22)."""


def bulk_site(
    prefix: str = "wtb",
    n: int = 1,
    *,
    bulk_net: str = "10.213.192.0/18",
    link_net: str = "10.213.191.0/24",
    tcp_ports: tuple[int, ...] = (),
    http_ports: tuple[int, ...] = (),
    dns_names: dict[str, str] | None = None,
) -> LabSpec:
    """A benchmark site: ``n`` bulk hosts (``bulk1``..``bulkN``) that split ``bulk_net`` between
    them (the default /18 gives 16382 answering addresses), each on its own /30 veth carved from
    ``link_net``.  Use :meth:`LabSpec.bulk_addresses` to get target lists.  The defaults stay clear
    of the demo (10.213.0.0/20, 10.213.96.0/20) and of the tests, so all three can run at once.
    """
    if not 1 <= n <= 64:
        raise SpecError(f"bulk_site: n={n} must be between 1 and 64")
    net = ipaddress.IPv4Network(bulk_net)
    parts = list(net.subnets(prefixlen_diff=math.ceil(math.log2(n)) if n > 1 else 0))[:n]
    links = list(ipaddress.IPv4Network(link_net).subnets(new_prefix=30))
    if len(links) < n:
        raise SpecError(f"bulk_site: link_net {link_net} is too small for {n} /30 links")
    hosts = tuple(
        LabHost(
            f"bulk{i + 1}",
            ROLE_BULK,
            (f"{links[i].network_address + 2}/30",),
            tcp_ports=tcp_ports,
            http_ports=http_ports,
            dns_names=dict(dns_names or {}),
            bulk_prefix=str(parts[i]),
        )
        for i in range(n)
    )
    return LabSpec(prefix=prefix, prod_net=None, mgmt_net=None, hosts=hosts)


SITES: dict[str, LabSpec] = {"demo": DEMO, "bulk": bulk_site(), "partition": PARTITION}
"""Named sites the CLI (``watchtower lab --site NAME``) knows."""
