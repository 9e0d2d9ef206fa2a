"""Scoring one run against the ground truth: was every page right, one per outage, and none missed?

An **outage** is a stretch of time in which a target is broken itself (power off, OS hung, a link
down, 95 %+ loss, booting after its own repair) and not explained by anything above it (a broken
switch, hypervisor or NAS, a switch not yet forwarding, a VM still booting after its host came
back, the monitor cut off).

A **page** (a ``page`` or ``reopen`` message) is right when its root was broken itself and not
explained at some moment of the last :data:`~watchtower.sim.world.JUDGE_WINDOW` seconds, and its
cause does not contradict what the BMC's ground truth was then. Per outage, per channel, each
escalation step goes out at most once (two incidents for one outage would send it twice) and one
all-clear follows. An outage longer than the confirmation time must be paged (or fall inside an
incident of the same root that already paged).
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from watchtower.config import Config
from watchtower.engine.correlate import LOSSY_DARK, LOSSY_PROBES
from watchtower.engine.escalation import ALL_CLEAR_HOLD_MAX
from watchtower.engine.incidents import HOLD_MAX, RECOVERY_GRACE, RESTORE_SETTLE
from watchtower.sim.run import Recording, SentMessage
from watchtower.sim.world import HARD_LOSS, JUDGE_WINDOW, LOSING, World

PAGE_KINDS = ("page", "reopen")
STEP_KINDS = ("page", "escalation", "reopen")
RESOLUTION = 0.5  # seconds between samples of the ground truth


@dataclass(frozen=True, slots=True)
class Outage:
    target: str
    start: float
    end: float
    what: str
    soft: bool = False  # packet loss short of an outage: a page is not wrong, no page is no miss
    behind_loss: bool = False  # begun while something above it lost packets: found only once dark for long

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class Score:
    outages: int = 0
    must_page: int = 0
    behind_recovery: int = 0
    paged: int = 0
    missed: list[str] = field(default_factory=list)
    wrong_root: list[str] = field(default_factory=list)
    wrong_cause: list[str] = field(default_factory=list)
    extra_pages: list[str] = field(default_factory=list)
    extra_all_clears: list[str] = field(default_factory=list)
    missing_all_clears: list[str] = field(default_factory=list)
    pages: int = 0
    all_clears: int = 0
    time_to_page: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [
            *self.problems,
            *(f"missed: {x}" for x in self.missed),
            *(f"wrong root: {x}" for x in self.wrong_root),
            *(f"wrong cause: {x}" for x in self.wrong_cause),
            *(f"extra page: {x}" for x in self.extra_pages),
            *(f"extra all-clear: {x}" for x in self.extra_all_clears),
            *(f"no all-clear: {x}" for x in self.missing_all_clears),
        ]

    @property
    def ok(self) -> bool:
        return not self.failures


def outages(world: World, names: Iterable[str], end: float) -> list[Outage]:
    names = list(names)
    out: list[Outage] = []
    open_: dict[str, tuple[float, str]] = {}
    behind_loss: set[tuple[str, float]] = set()

    def close(name: str, at: float) -> None:
        start, what = open_.pop(name)
        soft = what.startswith("~")
        out.append(Outage(name, start, at, what.lstrip("~"), soft, (name, start) in behind_loss))

    steps = int(end / RESOLUTION) + 1
    # What is broken at a sample depends on the truth in force and, through the boot and
    # forwarding delays, on which of those moments have passed: a sample with the same of both as
    # the one before finds the same, and changes nothing.
    moments = sorted(
        {t for h in world.history for x in h.hosts.values() for t in (x.booting_until, x.forward_from)}
    )
    starts = [h.at for h in world.history]
    previous: tuple[int, int] | None = None
    for k in range(steps + 1):
        at = k * RESOLUTION
        seen = (bisect.bisect_right(starts, at), bisect.bisect_right(moments, at))
        if seen == previous and k < steps:
            continue
        previous = seen
        truth = world.truth(at)
        for name in names:
            own = truth.own(name) if k < steps else None
            if own is None and k < steps and truth.hosts[name].soft():
                own = f"~loss {truth.hosts[name].loss:.0%}"
            elif own is not None and own.startswith("link down") and world.site.roles[name] == "network":
                # A switch's own address dark while it forwards (the simulated switch's NIC is its
                # management port): from outside the same as one dropping pings, which is no
                # outage. Not demanded; a page for it is not wrong either.
                own = "~" + own
            why = world.explained(truth, name) if own is not None else None
            # broken itself behind an upstream that only loses packets: its own outage, found later
            lossy = why is not None and why.endswith(LOSING) and not own.startswith("~")  # type: ignore[union-attr]
            broken = own is not None and (why is None or lossy)
            if broken and name in open_ and open_[name][1].startswith("~") != (own or "").startswith("~"):
                close(name, at)  # loss turned into an outage (or back): a new stretch
            if broken and name not in open_:
                open_[name] = (at, own or "")
                if lossy:
                    behind_loss.add((name, at))
            elif not broken and name in open_:
                close(name, at)
    return sorted(out, key=lambda o: o.start)


def confirm_time(config: Config, target: str) -> float:
    """How long an outage must last before it has to be paged: a full interval before the first
    failed probe, the confirming retries, the hold while dependencies are unsettled, the tick."""
    paths = [p for p in config.paths if p.target == target]
    worst = max((p.interval + p.fail_after * (p.retry_interval + p.timeout) for p in paths), default=10.0)
    return worst + HOLD_MAX + 5.0


def lossy_wait(config: Config, target: str) -> float:
    """How long a target broken behind something losing packets must be dark before the engine
    may call it dead behind it: LOSSY_DARK, and LOSSY_PROBES lost in a row on its paths (a
    down path is probed once an interval)."""
    paths = [p for p in config.paths if p.target == target and not p.is_bmc]
    if not paths:
        return LOSSY_DARK
    rounds = -(-LOSSY_PROBES // len(paths))
    return max(LOSSY_DARK, rounds * max(p.interval + p.timeout for p in paths))


def _behind_recovery(world: World, o: Outage) -> bool:
    """The outage began while something above its target was broken (hidden behind that outage,
    it shows only when that comes back), or less than RESTORE_SETTLE after something above it
    stopped explaining it (a VM up for a moment after its host's restore, then dark again: from
    outside, the same VM still coming back)."""
    if o.start <= 0:
        return False
    k = 1
    while k * RESOLUTION <= RESTORE_SETTLE and o.start - k * RESOLUTION >= 0:
        if world.explained(world.truth(o.start - k * RESOLUTION), o.target) is not None:
            return True
        k += 1
    at = world.truth(o.start)
    return any(
        at.hosts[up].hard(o.start) is not None or o.start < at.hosts[up].forward_from
        for up in world.site.upstream[o.target]
    )


def _visible(world: World, o: Outage) -> float:
    """How long the outage showed as its own: while something above its target is down or not
    forwarding, its silence there looks like that outage (a link that died behind a switch that
    died next is found only where the switch does not hide it)."""
    seen = 0.0
    at = o.start
    while at < o.end:
        truth = world.truth(at)
        hidden = any(
            truth.hosts[up].hard(at) is not None or at < truth.hosts[up].forward_from
            for up in world.site.upstream[o.target]
        )
        seen += 0.0 if hidden else RESOLUTION
        at += RESOLUTION
    return seen


def _cause_ok(world: World, m: SentMessage) -> bool:
    """The page's cause holds for some moment of the window in which its root was broken."""
    if m.cause is None:
        return True
    for k in range(int(JUDGE_WINDOW / RESOLUTION) + 1):
        at = m.at - k * RESOLUTION
        if at < 0:
            break
        h = world.truth(at).hosts.get(m.root)
        if h is None:
            return True
        if m.cause == "power_off" and not h.power:
            return True
        if m.cause == "hardware_fault" and h.sel_critical_at is not None and at - h.sel_critical_at <= 3600:
            return True
        if (
            m.cause == "os_unresponsive"
            and h.power
            and (
                not h.os_ok
                or (at < h.booting_until and h.booting_own)
                # silent on every address its OS has, chassis on: what "not responding" means
                or h.loss >= HARD_LOSS
                or set(world.site.addresses[m.root]) <= h.nics_down
            )
        ):
            return True
        if m.cause == "bmc_unreachable" and not h.bmc_ok:
            return True
        if m.cause == "link_down" and h.nics_down and h.power and h.os_ok:
            return True
        if m.cause == "partition" and any(loss >= 1.0 for _, loss in h.ports):
            return True
        if m.cause not in (
            "power_off",
            "hardware_fault",
            "os_unresponsive",
            "bmc_unreachable",
            "link_down",
            "partition",
        ):
            return True  # a cause this scorer does not know: not judged
    return False


def _root_ok(world: World, m: SentMessage) -> bool:
    for k in range(int(JUDGE_WINDOW / RESOLUTION) + 1):
        at = m.at - k * RESOLUTION
        if at < 0:
            break
        truth = world.truth(at)
        if m.scope == "monitor":
            if truth.monitor_cut:
                return True
            continue
        h = truth.hosts.get(m.root)
        if h is None:
            # A network named by its key (`networks:` name or inferred prefix): right while a device
            # does not carry it.
            if any(net == m.root for d in truth.hosts.values() for net, _ in d.ports):
                return True
            continue
        why = world.explained(truth, m.root)
        if (h.hard(at) or h.soft()) and why is None:
            return True
        if h.hard(at) and why is not None and why.endswith(LOSING):
            return True  # broken itself; the loss above it does not stop the packets
        if world.unseen_boot(m.root, at):
            return True  # rebooting after an outage above it that no probe could see
    return False


def score(config: Config, world: World, rec: Recording) -> Score:
    s = Score(problems=list(rec.problems))
    found = outages(world, config.targets, rec.duration)
    s.outages = sum(1 for o in found if not o.soft)
    by_target: dict[str, list[Outage]] = {}
    for o in found:
        by_target.setdefault(o.target, []).append(o)

    def outage_for(root: str, at: float) -> Outage | None:
        """The outage a message at ``at`` about ``root`` reports: the latest one begun by then."""
        best: Outage | None = None
        for o in by_target.get(root, ()):
            if o.start <= at:
                best = o
        return best

    def ended_before(root: str, at: float) -> Outage | None:
        """The outage an all-clear at ``at`` reports: the latest one over by then, or a packet
        loss still going on (paged when it was worse, cleared when it eased: not wrong)."""
        best: Outage | None = None
        for o in by_target.get(root, ()):
            if o.end <= at or (o.soft and o.start <= at < o.end):
                best = o
        return best

    step_count: Counter[tuple[object, str, str]] = Counter()
    clear_count: Counter[tuple[object, str]] = Counter()
    paged_outages: dict[Outage, float] = {}
    paged_channels: dict[Outage, set[str]] = {}
    cleared: dict[Outage, set[str]] = {}
    paged_in: dict[Outage, int] = {}  # the incident whose page reported it
    for m in rec.messages:
        if m.kind in PAGE_KINDS:
            s.pages += 1
        if m.kind in STEP_KINDS and m.scope != "monitor":
            label = f"{m.kind} {m.scope} {m.root}" + (f" ({m.cause})" if m.cause else "") + f" at {m.at:.1f}s"
            if m.kind in PAGE_KINDS and not _root_ok(world, m):
                s.wrong_root.append(label)
                continue
            if m.kind in PAGE_KINDS and not _cause_ok(world, m):
                s.wrong_cause.append(label)
            found_o = outage_for(m.root, m.at)
            key: object = found_o if found_o is not None else (m.root, m.incident)
            step = "reopen" if m.kind == "reopen" else m.step
            step = "step0" if step == "reopen" else step  # a reopen is the outage's first page again
            step_count[(key, m.channel, step)] += 1
            if step_count[(key, m.channel, step)] == 2:
                s.extra_pages.append(f"{label} on {m.channel}: a second {step} for one outage")
            if found_o is not None and m.kind in PAGE_KINDS:
                paged_outages.setdefault(found_o, m.at)
                paged_channels.setdefault(found_o, set()).add(m.channel)
                paged_in.setdefault(found_o, m.incident)
        elif m.kind == "resolve" and m.scope != "monitor":
            s.all_clears += 1
            cleared_o = ended_before(m.root, m.at)
            key = cleared_o if cleared_o is not None else (m.root, m.incident)
            clear_count[(key, m.channel)] += 1
            if clear_count[(key, m.channel)] == 2:
                s.extra_all_clears.append(f"all-clear {m.root} at {m.at:.1f}s on {m.channel}: a second one")
            if cleared_o is not None:
                cleared.setdefault(cleared_o, set()).add(m.channel)
            # an incident re-rooted since its page (a VM off, then its host) clears what it paged
            for o, incident in paged_in.items():
                if incident == m.incident and o.end <= m.at:
                    cleared.setdefault(o, set()).add(m.channel)
    for o in found:
        wait = lossy_wait(config, o.target) if o.behind_loss else 0.0
        if o.soft or o.length < confirm_time(config, o.target) + wait:
            continue
        if o.length < RECOVERY_GRACE + confirm_time(config, o.target) and (
            _behind_recovery(world, o) or _visible(world, o) < confirm_time(config, o.target)
        ):
            # It showed only when what it depends on came back: from outside, indistinguishable from
            # a VM still booting after its host, so it is claimed by that restore for the grace.
            # Or it showed for less than the confirmation time between outages above it.
            s.behind_recovery += 1
            continue
        s.must_page += 1
        if o in paged_outages:
            s.paged += 1
            s.time_to_page.append(paged_outages[o] - o.start)
            continue
        covered = any(o.target in roots for at, roots in rec.paged_open if o.start <= at <= o.end)
        if covered:
            s.paged += 1
            continue
        s.missed.append(f"{o.target} {o.what} from {o.start:.1f}s to {o.end:.1f}s ({o.length:.0f}s)")
    settle = ALL_CLEAR_HOLD_MAX + 120.0 + 60.0
    if config.notify.on_resolve:
        for o, channels in paged_channels.items():
            if o.end + settle > rec.duration:
                continue
            later = [x for x in by_target.get(o.target, ()) if x.start > o.start]
            if later and later[0].start - o.end < settle:
                continue  # failed again before its all-clear was due: that outage's all-clear counts
            missing = channels - cleared.get(o, set())
            if missing:
                names = ", ".join(sorted(missing))
                back = f"{o.target} ({o.what}) back at {o.end:.1f}s"
                s.missing_all_clears.append(f"{back}: no all-clear on {names}")
    return s


@dataclass(slots=True)
class Totals:
    runs: int = 0
    failing: list[int] = field(default_factory=list)
    outages: int = 0
    must_page: int = 0
    behind_recovery: int = 0
    paged: int = 0
    missed: int = 0
    wrong_root: int = 0
    wrong_cause: int = 0
    extra_pages: int = 0
    extra_all_clears: int = 0
    missing_all_clears: int = 0
    pages: int = 0
    all_clears: int = 0
    problems: int = 0
    time_to_page: list[float] = field(default_factory=list)
    cpu: float = 0.0  # seconds of CPU the runs took (not a result: it depends on the machine)

    def add(self, seed: int, s: Score) -> None:
        self.runs += 1
        if not s.ok:
            self.failing.append(seed)
        self.outages += s.outages
        self.must_page += s.must_page
        self.behind_recovery += s.behind_recovery
        self.paged += s.paged
        self.missed += len(s.missed)
        self.wrong_root += len(s.wrong_root)
        self.wrong_cause += len(s.wrong_cause)
        self.extra_pages += len(s.extra_pages)
        self.extra_all_clears += len(s.extra_all_clears)
        self.missing_all_clears += len(s.missing_all_clears)
        self.pages += s.pages
        self.all_clears += s.all_clears
        self.problems += len(s.problems)
        self.time_to_page += s.time_to_page

    def rows(self) -> list[tuple[str, str]]:
        ttp = sorted(self.time_to_page)
        median = f"{statistics.median(ttp):.1f} s" if ttp else "-"
        p95 = f"{ttp[min(len(ttp) - 1, int(0.95 * len(ttp)))]:.1f} s" if ttp else "-"
        return [
            ("runs (seeds)", str(self.runs)),
            ("runs with any failure", str(len(self.failing))),
            ("outages (ground truth)", str(self.outages)),
            ("outages longer than confirmation", str(self.must_page)),
            (
                "  (not counted: shown only by a restore, or between upstream outages)",
                str(self.behind_recovery),
            ),
            ("  paged", str(self.paged)),
            ("  missed", str(self.missed)),
            ("pages sent (page + failed again, per channel)", str(self.pages)),
            ("  naming a host that was not broken", str(self.wrong_root)),
            ("  with a cause contradicting the BMC truth", str(self.wrong_cause)),
            ("  second page of one outage on one channel-step", str(self.extra_pages)),
            ("all-clears sent", str(self.all_clears)),
            ("  second all-clear of one outage", str(self.extra_all_clears)),
            ("  paged outages without all-clear", str(self.missing_all_clears)),
            ("time to page, median / p95", f"{median} / {p95}"),
            ("engine errors", str(self.problems)),
        ]
