"""The simulated site's ground truth, and the probe results it produces.

A :class:`World` is built from a config: every target with its paths and addresses, what it
runs on, what it depends on. Faults change it (:meth:`World.apply`); probes ask it
(:meth:`World.probe`, the simulator's stand-in for :func:`watchtower.engine.runner.run_probe`);
the scorer asks it what was *really* broken at a moment (:meth:`World.truth`).

How packets travel, in this model:
- a **network device** (role ``network``) carries the paths of the targets that depend on it
  (transitively) whose address is in a /24 of one of the device's own addresses; when none of
  its addresses shares a /24 with a dependent's paths, it carries all of them. So in the demo the
  core switch carries 10.213.10.x (production) and not the management network 10.213.99.x;
- a **VM** answers only while its hypervisor runs (powered, OS alive, booted), the hypervisor's
  NIC in the VM's /24 is up, and its storage runs;
- a **BMC** sits on the management network: it answers while the chassis is off, and says so.

Recovery is staged the way it is on the way up: a switch answers ``forward_delay`` before its
ports forward, a hypervisor answers before its VMs have booted (``vm_delays``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from watchtower.config import VANTAGE, Config, ResolvedPath
from watchtower.probes import BmcReading, Failure, ProbeContext, ProbeResult, SelEntry
from watchtower.sim.vloop import VirtualTimeLoop

# A page may be decided a little after the fault it reports ended (the last confirming probe,
# the correlation pass, the hold): it is judged against the truth this far back.
JUDGE_WINDOW = 30.0
_VANTAGE_OK = ProbeResult.success(0.002)
HARD_LOSS = 0.95  # loss at or above this is an outage; below it, a page is not wrong, a miss is no miss
SOFT_LOSS = 0.2
PSU_TEXT = "Power Supply PS1: Failure detected"


@dataclass(frozen=True, slots=True)
class HostTruth:
    """One target's own condition (what a fault changed), frozen: the history keeps copies."""

    power: bool = True
    os_ok: bool = True
    nics_down: frozenset[str] = frozenset()  # addresses whose link is down
    loss: float = 0.0
    icmp_drop: bool = False  # a firewall drops pings; everything else is served (not an outage)
    bmc_ok: bool = True
    sel_critical_at: float | None = None
    booting_until: float = 0.0  # answers again from this time (after a repair)
    booting_own: bool = False  # the boot ends its own outage (True) or follows an upstream one
    forward_from: float = 0.0  # network device: forwards dependents' traffic from this time
    # network device: networks it no longer carries (its production side dark while its management
    # side answers), with the loss on each (1.0: nothing passes)
    ports: tuple[tuple[str, float], ...] = ()

    def hard(self, now: float) -> str | None:
        """The target's own outage at ``now``, in words, or None."""
        if not self.power:
            return "power off"
        if not self.os_ok:
            return "OS hung"
        if self.nics_down:
            return "link down " + ",".join(sorted(self.nics_down))
        if self.loss >= HARD_LOSS:
            return f"loss {self.loss:.0%}"
        dark = [net for net, loss in self.ports if loss >= HARD_LOSS]
        if dark:
            return "network " + ",".join(dark) + " dark"
        if now < self.booting_until and self.booting_own:
            return "booting"
        return None

    def soft(self) -> bool:
        return SOFT_LOSS <= self.loss < HARD_LOSS or any(
            SOFT_LOSS <= loss < HARD_LOSS for _, loss in self.ports
        )

    def port_loss(self, net: str | None) -> float:
        return next((loss for n, loss in self.ports if n == net), 0.0)


@dataclass(frozen=True, slots=True)
class Truth:
    """What was really the matter at one moment."""

    at: float
    monitor_cut: bool
    hosts: dict[str, HostTruth]

    def own(self, name: str) -> str | None:
        return self.hosts[name].hard(self.at)


# An upstream losing some packets (short of an outage) explains a target's failures: the page for them
# names the upstream, or nobody. A target broken itself behind it (dark on every path) is its own
# outage too, only found later (see score.LOSS_DARK).
LOSING = "losing packets"


@functools.cache
def _net24(address: str) -> str | None:
    try:
        return str(ipaddress.ip_network(f"{address}/24", strict=False))
    except ValueError:
        return None


# ProbeResult(True, latency) without the frozen dataclass's __init__ (a Python call and six
# object.__setattr__ calls, half the cost of answering a probe): the slots are set directly.
_SUCCESS_FIELDS = ("ok", "latency", "failure", "detail", "bmc", "values")
_SET_SUCCESS = tuple(ProbeResult.__dict__[f].__set__ for f in _SUCCESS_FIELDS)
_SUCCESS_KNOWN = tuple(f.name for f in fields(ProbeResult)) == _SUCCESS_FIELDS and all(
    f.default == d for f, d in zip(fields(ProbeResult)[2:], (None, "", None, ()), strict=True)
)


def _success(latency: float) -> ProbeResult:
    if not _SUCCESS_KNOWN:  # the fields changed: the constructor (slower, always right)
        return ProbeResult(True, latency)
    result = object.__new__(ProbeResult)
    set_ok, set_latency, set_failure, set_detail, set_bmc, set_values = _SET_SUCCESS
    set_ok(result, True)
    set_latency(result, latency)
    set_failure(result, None)
    set_detail(result, "")
    set_bmc(result, None)
    set_values(result, ())
    return result


def path_address(path: ResolvedPath) -> str:
    spec: Any = path.spec
    for attr in ("host", "server"):
        value = getattr(spec, attr, None)
        if isinstance(value, str):
            return value
    return str(spec.address).split(":")[0]


@dataclass(slots=True)
class Site:
    """The static shape of the site, from the config."""

    roles: Mapping[str, str]
    runs_on: dict[str, str | None]
    storage: dict[str, tuple[str, ...]]
    depends_on: dict[str, tuple[str, ...]]
    addresses: dict[str, tuple[str, ...]]  # target -> addresses of its (non-BMC) paths
    carriers: dict[tuple[str, str], tuple[str, ...]]  # (target, address) -> network devices on the way
    upstream: dict[str, tuple[str, ...]]  # everything a target needs, transitively
    net_of: dict[str, str | None]  # address -> its network (a `networks:` name, else its /24)

    @classmethod
    def from_config(cls, config: Config) -> Site:
        roles = {n: t.role for n, t in config.targets.items()}
        runs_on = {n: t.runs_on for n, t in config.targets.items()}
        storage = {n: tuple(t.storage) for n, t in config.targets.items()}
        depends_on = {n: tuple(t.depends_on) for n, t in config.targets.items()}
        addresses: dict[str, list[str]] = {n: [] for n in config.targets}
        for p in config.paths:
            a = path_address(p)
            if a not in addresses[p.target]:
                addresses[p.target].append(a)

        def up(name: str) -> list[str]:
            out: list[str] = []
            todo = [name]
            while todo:
                cur = todo.pop(0)
                deps = (*((runs_on[cur],) if runs_on.get(cur) else ()), *depends_on[cur], *storage[cur])
                for d in deps:
                    if d is not None and d not in out and d != name:
                        out.append(d)
                        todo.append(d)
            return out

        net_of: dict[str, str | None] = {}
        for p in config.paths:
            a = path_address(p)
            net_of[a] = config.network_of(p.spec) if config.networks else _net24(a)
        carriers: dict[tuple[str, str], tuple[str, ...]] = {}
        if config.networks:
            # Configured networks: a path depends on the devices that carry its network.
            for name, addrs in addresses.items():
                for a in addrs:
                    entry = config.networks.get(net_of.get(a) or "")
                    carriers[(name, a)] = tuple(d for d in (entry.via if entry else ()) if d != name)
        # What a target needs: its runs_on/depends_on/storage chain and the devices on its paths.
        upstream = {
            n: tuple(dict.fromkeys((*up(n), *(d for a in addresses[n] for d in carriers.get((n, a), ())))))
            for n in config.targets
        }
        for name, addrs in addresses.items():
            if config.networks:
                break
            # The network path: the devices above it along runs_on/depends_on (not storage).
            chain: list[str] = []
            todo = [name]
            while todo:
                cur = todo.pop(0)
                for d in (*((runs_on[cur],) if runs_on.get(cur) else ()), *depends_on[cur]):
                    if d not in chain:
                        chain.append(d)
                        todo.append(d)
            devices = [d for d in chain if roles[d] == "network"]
            for a in addrs:
                prefix = _net24(a)
                on_way = []
                for d in devices:
                    own_nets = {_net24(x) for x in addresses[d]}
                    dependents_nets = {_net24(x) for x in addrs}
                    if prefix in own_nets or not (own_nets & dependents_nets):
                        on_way.append(d)
                carriers[(name, a)] = tuple(on_way)
        return cls(
            roles,
            runs_on,
            storage,
            depends_on,
            {n: tuple(a) for n, a in addresses.items()},
            carriers,
            upstream,
            net_of,
        )


@dataclass(slots=True)
class World:
    site: Site
    rng: random.Random
    hosts: dict[str, HostTruth]
    monitor_cut: bool = False
    history: list[Truth] = field(default_factory=list)
    sel_seq: int = 0
    sel: dict[str, list[SelEntry]] = field(default_factory=dict)
    # Every failed probe of a target's own paths (not its BMC's), by target: what the monitor saw.
    failed_probes: dict[str, list[float]] = field(default_factory=dict)
    # Each boot after an upstream outage: VM -> (booting until, the upstream, its outage's start, end)
    boots: dict[str, list[tuple[float, str, float, float]]] = field(default_factory=dict)
    _broken_since: dict[str, float] = field(default_factory=dict, repr=False)
    # What a probe finds, by (target, address), while the faults stay as they are and no boot or
    # forwarding delay is still running (from ``_steady_from`` on, the time no longer matters).
    _reach_cache: dict[tuple[str, str], tuple[bool, str, float]] = field(default_factory=dict, repr=False)
    _steady_from: float = field(default=0.0, repr=False)
    _failures: dict[tuple[float, str], ProbeResult] = field(default_factory=dict, repr=False)
    # Per path (by id, with the path itself so the id stays its own): its address, whether it pings,
    # whether it is a vantage or BMC path (answered otherwise), its key in the reachability cache.
    _where: dict[int, tuple[ResolvedPath, str, bool, bool, tuple[str, str]]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def from_config(cls, config: Config, seed: int) -> World:
        site = Site.from_config(config)
        world = cls(site, random.Random(seed), {n: HostTruth() for n in config.targets})
        world.record(0.0)
        return world

    # ------------------------------------------------------------------ ground truth
    def record(self, now: float) -> None:
        self.history.append(Truth(now, self.monitor_cut, dict(self.hosts)))
        self._reach_cache.clear()
        self._steady_from = max(
            (max(h.booting_until, h.forward_from) for h in self.hosts.values()), default=0.0
        )

    def truth(self, at: float) -> Truth:
        """The truth in force at ``at`` (the last change at or before it), evaluated at ``at``."""
        lo, hi = 0, len(self.history)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.history[mid].at <= at:
                lo = mid + 1
            else:
                hi = mid
        t = self.history[max(0, lo - 1)]
        return Truth(at, t.monitor_cut, t.hosts)

    def explained(self, truth: Truth, name: str) -> str | None:
        """Why ``name`` cannot be judged on its own at that moment (something above it is broken or
        still coming back), or None."""
        if truth.monitor_cut:
            return "monitor cut off"
        h = truth.hosts[name]
        if truth.at < h.booting_until and not h.booting_own:
            return "booting after an upstream outage"
        why = None
        lossy = None
        for up in self.site.upstream[name]:
            u = truth.hosts[up]
            if u.soft():
                lossy = lossy or f"{up} {LOSING}"
            elif u.hard(truth.at):
                why = f"{up} broken"
            elif self.site.roles[up] == "network" and truth.at < u.forward_from:
                why = f"{up} not forwarding yet"
        if why is None:
            return lossy
        # Something above it is broken, but that explains its silence only where it blocks the way:
        # a host dark on a network its switch cut, but also dark on the management network the
        # switch does not carry (its chassis off), is an outage of its own.
        for address in self.site.addresses[name]:
            if self._upstream_blocks(truth, name, address) is None:
                return lossy
        return why

    def _upstream_blocks(self, truth: Truth, target: str, address: str) -> str | None:
        """What above ``target`` stops a packet to ``address`` at that moment, or None."""
        net = self.site.net_of.get(address)
        for d in self.site.carriers.get((target, address), ()):
            dev = truth.hosts[d]
            if dev.hard(truth.at) and (not dev.power or not dev.os_ok or dev.loss >= HARD_LOSS):
                return f"{d} down"
            if truth.at < dev.forward_from:
                return f"{d} not forwarding"
            if dev.port_loss(net) >= HARD_LOSS:
                return f"{d}: {net} dark"
        host = self.site.runs_on.get(target)
        if host is not None:
            hv = truth.hosts[host]
            if hv.hard(truth.at) or any(_net24(a) == _net24(address) for a in hv.nics_down):
                return f"{host} down"
            if self._upstream_blocks(truth, host, next(iter(self.site.addresses[host]), address)) is not None:
                return f"{host} unreachable"
        for st in self.site.storage.get(target, ()):
            if truth.hosts[st].hard(truth.at):
                return f"storage {st} down"
        for dep in self.site.depends_on.get(target, ()):
            if truth.hosts[dep].hard(truth.at) and self.site.roles[dep] != "network":
                return f"{dep} down"
        return None

    # ------------------------------------------------------------------ faults
    def apply(self, now: float, action: str, target: str | None, args: dict[str, Any]) -> None:
        if action == "monitor_cut":
            self.monitor_cut = True
        elif action == "monitor_restore":
            self.monitor_cut = False
        else:
            assert target is not None
            h = self.hosts[target]
            if action == "power_off":
                h = replace(h, power=False)
            elif action == "psu_fail":
                h = replace(h, power=False, sel_critical_at=now)
                self.sel_seq += 1
                self.sel.setdefault(target, []).append(SelEntry(f"{self.sel_seq:04x}", PSU_TEXT, "critical"))
            elif action == "hang":
                h = replace(h, os_ok=False)
            elif action == "nic_down":
                addr = args.get("address") or self.site.addresses[target][0]
                h = replace(h, nics_down=h.nics_down | {addr})
            elif action == "loss":
                h = replace(h, loss=float(args.get("pct", 100)) / 100)
            elif action == "bmc_down":
                h = replace(h, bmc_ok=False)
            elif action in ("net_down", "net_loss"):
                net = args.get("network") or self.site.net_of.get(self.site.addresses[target][0])
                loss = 1.0 if action == "net_down" else float(args.get("pct", 100)) / 100
                h = replace(h, ports=(*((n, x) for n, x in h.ports if n != net), (str(net), loss)))
            elif action == "icmp_drop":
                h = replace(h, icmp_drop=True)
            elif action == "repair":
                h = self._repair(now, target, h, args)
            else:
                raise ValueError(f"unknown fault {action!r}")
            if h.hard(now) is None:
                self._broken_since.pop(target, None)
            else:
                self._broken_since.setdefault(target, now)
            self.hosts[target] = h
        self.record(now)

    def unseen_boot(self, name: str, at: float) -> bool:
        """``name`` is booting at ``at`` after an upstream outage that no probe of that upstream
        saw (a hypervisor power-cycled between two of its probes): from outside, nothing explains
        the VM's silence, and a page naming it is the best a monitor can do."""
        for until, upstream, start, end in self.boots.get(name, ()):
            if end <= at < until:
                seen = self.failed_probes.get(upstream, ())
                return not any(start <= t <= end + 1.0 for t in seen)
        return False

    def _repair(self, now: float, target: str, h: HostTruth, args: dict[str, Any]) -> HostTruth:
        was_down = h.hard(now) is not None
        # What runs on it reboots after a power loss or a hang (and a NAS's VMs after any outage of
        # their disks); a link that flapped does not reboot the VMs behind it.
        reboots = (not h.power or not h.os_ok) or (was_down and self.site.roles[target] == "storage")
        h = replace(
            h,
            power=True,
            os_ok=True,
            nics_down=frozenset(),
            loss=0.0,
            icmp_drop=False,
            ports=(),
            bmc_ok=True,
            booting_until=0.0,
            booting_own=False,
            # A switch back from an outage answers before its ports forward; one that only lost
            # packets never stopped forwarding.
            forward_from=now + float(args.get("forward_delay", 0.0)) if was_down else 0.0,
        )
        if reboots:
            # What ran on it (or on its disks) boots again, each after its own delay.
            delays = args.get("vm_delays", {})
            for name in self.site.roles:
                if target in self.site.upstream[name] and self.site.roles[name] == "vm":
                    delay = float(delays.get(name, args.get("vm_delay", 0.0)))
                    if delay > 0:
                        vm = self.hosts[name]
                        self.hosts[name] = replace(
                            vm, booting_until=max(vm.booting_until, now + delay), booting_own=False
                        )
                        since = self._broken_since.get(target, now)
                        self.boots.setdefault(name, []).append((now + delay, target, since, now))
        return h

    # ------------------------------------------------------------------ probing
    def _reach(self, now: float, target: str, address: str) -> tuple[bool, str, float]:
        """Whether a packet to ``address`` of ``target`` gets an answer, why not, and the loss on
        the way."""
        if now < self._steady_from:
            return self._reach_now(now, target, address)
        # Every "still booting / not forwarding yet" test is false from here on: the answer depends
        # on the faults only, which have not changed since the cache was cleared.
        key = (target, address)
        found = self._reach_cache.get(key)
        if found is None:
            found = self._reach_cache[key] = self._reach_now(now, target, address)
        return found

    def _reach_now(self, now: float, target: str, address: str) -> tuple[bool, str, float]:
        if self.monitor_cut:
            return False, "monitor cut off", 0.0
        loss = 0.0
        net = self.site.net_of.get(address)
        for d in self.site.carriers.get((target, address), ()):
            dev = self.hosts[d]
            if not dev.power or not dev.os_ok:
                return False, f"{d} down", 0.0
            if now < dev.forward_from:
                return False, f"{d} not forwarding yet", 0.0
            if dev.port_loss(net) >= 1.0:
                return False, f"{d}: network {net} dark", 0.0
            loss = 1 - (1 - loss) * (1 - dev.loss) * (1 - dev.port_loss(net))
        h = self.hosts[target]
        if h.port_loss(net) >= 1.0:
            return False, f"network {net} dark", 0.0
        loss = 1 - (1 - loss) * (1 - h.port_loss(net))
        if not h.power:
            return False, "power off", 0.0
        if not h.os_ok:
            return False, "OS hung", 0.0
        if address in h.nics_down:
            return False, "link down", 0.0
        if now < h.booting_until:
            return False, "booting", 0.0
        host = self.site.runs_on.get(target)
        if host is not None:
            hv = self.hosts[host]
            if not hv.power or not hv.os_ok or now < hv.booting_until:
                return False, f"{host} down", 0.0
            net = _net24(address)
            if any(_net24(a) == net for a in hv.nics_down):
                return False, f"{host} link down", 0.0
            loss = 1 - (1 - loss) * (1 - hv.loss)
        for s in self.site.storage.get(target, ()):
            if self.hosts[s].hard(now) is not None:  # off, hung, its link down: the VM's I/O hangs
                return False, f"storage {s} gone: I/O hung", 0.0
        loss = 1 - (1 - loss) * (1 - h.loss)
        return True, "", loss

    def answer(self, path: ResolvedPath, now: float, memory: dict[str, Any]) -> tuple[ProbeResult, float]:
        """The probe result for ``path`` at ``now`` and how long it takes to arrive."""
        where = self._where.get(id(path))
        if where is None or where[0] is not path:
            special = path.target == VANTAGE or path.is_bmc
            address = "" if special else path_address(path)
            key = (path.target, address)
            where = self._where[id(path)] = (path, address, path.kind == "icmp", special, key)
        target = path.target
        if where[3]:
            if target == VANTAGE:
                if self.monitor_cut:
                    return ProbeResult.fail(Failure.TIMEOUT, "no answer (monitor cut off)"), path.timeout
                return _VANTAGE_OK, 0.002
            return self._bmc(path, now, memory)
        # _reach, with its cache read here (one call less per probe)
        found = self._reach_cache.get(where[4]) if now >= self._steady_from else None
        ok, why, loss = found if found is not None else self._reach(now, target, where[1])
        if ok and where[2] and self.hosts[target].icmp_drop:
            ok, why = False, "pings dropped"
        if ok and loss > 0:
            # A confirming probe looks harder (icmp: three echoes; tcp/http/dns: three tries).
            tries = 3 if memory.get("confirming") else 1
            ok = any(self.rng.random() >= loss for _ in range(tries))
            why = f"lost ({loss:.0%} loss)"
        if ok:
            latency = 0.0005 + self.rng.random() * 0.002
            return _success(latency), latency
        if not self.monitor_cut:  # a probe that never left the monitor saw nothing of the target
            self.failed_probes.setdefault(target, []).append(now)
        failed = self._failures.get((path.timeout, why))
        if failed is None:  # the same few failures again and again: one (frozen) result each
            failed = ProbeResult.fail(Failure.TIMEOUT, f"no answer within {path.timeout:g}s ({why})")
            self._failures[(path.timeout, why)] = failed
        return failed, path.timeout

    def _bmc(self, path: ResolvedPath, now: float, memory: dict[str, Any]) -> tuple[ProbeResult, float]:
        h = self.hosts[path.target]
        if self.monitor_cut or not h.bmc_ok:
            return ProbeResult.fail(Failure.TIMEOUT, "BMC: no answer"), path.timeout
        seen = memory.get("sel_seen", 0)
        entries = self.sel.get(path.target, [])
        memory["sel_seen"] = len(entries)
        reading = BmcReading(power_on=h.power, health="OK" if h.sel_critical_at is None else "Critical",
                             new_events=tuple(entries[seen:]))  # fmt: skip
        latency = 0.05 + self.rng.random() * 0.05
        return ProbeResult(True, latency, None, "chassis on" if h.power else "chassis off", reading), latency

    def probe_runner(self, loop: asyncio.AbstractEventLoop | None = None) -> SimProbe:
        """A stand-in for :func:`watchtower.engine.runner.run_probe`, on the loop's virtual time
        (``loop``: the loop it will run on, when known)."""
        return SimProbe(self, loop)


class SimProbe:
    """The world as the monitor's probe. Awaited, it answers after the probe's time on the loop;
    :meth:`begin` does the same with callbacks instead of a task per probe (the monitor uses it
    when present): one timer for the answer's arrival and one callback in the next loop iteration,
    as the awaiting task's ``asyncio.sleep`` and wakeup would, so a run makes the same loop calls
    in the same order either way."""

    def __init__(self, world: World, loop: asyncio.AbstractEventLoop | None = None):
        self.world = world
        # The loop, when known and virtual: not asked of asyncio once per probe (on CPython 3.11
        # that is a getpid() system call each time).
        self._vloop = loop if isinstance(loop, VirtualTimeLoop) else None

    async def __call__(self, path: ResolvedPath, shared: ProbeContext, memory: dict[str, Any]) -> ProbeResult:
        loop = asyncio.get_running_loop()
        result, takes = self.world.answer(path, loop.time(), memory)
        await asyncio.sleep(takes)
        return result

    def begin(
        self,
        path: ResolvedPath,
        shared: ProbeContext,
        memory: dict[str, Any],
        deliver: Callable[[ProbeResult], None],
    ) -> None:
        vloop = self._vloop
        if vloop is not None:
            now = vloop._now
            result, takes = self.world.answer(path, now, memory)
            vloop.call_at_soon(now + takes, deliver, result)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        result, takes = self.world.answer(path, now, memory)
        if isinstance(loop, VirtualTimeLoop):
            loop.call_at_soon(now + takes, deliver, result)
        else:
            loop.call_at(now + takes, loop.call_soon, deliver, result)


def broken_roots(world: World, at: float, names: Iterable[str]) -> dict[str, str]:
    """Targets that are broken themselves at ``at`` and not explained by anything above them."""
    truth = world.truth(at)
    out = {}
    for name in names:
        own = truth.own(name)
        if own and world.explained(truth, name) is None:
            out[name] = own
    return out
