"""One simulated run: the real engine against a :class:`~watchtower.sim.world.World` on virtual time.

What runs is what the daemon runs: the scheduler's timers, the monitor and its path states, the
pure correlation, the incident tracker, the pure escalation policy and the alerting with its
SQLite outbox (in memory, on an inline executor). Only the edges are replaced: probes ask the
world instead of the network, senders record instead of delivering (and fail while the monitor is
cut off, as a real gateway would be out of reach), the clock is the loop's virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from dataclasses import dataclass, field

from watchtower import clock
from watchtower.config import Config
from watchtower.engine.monitor import Monitor
from watchtower.notify.outbox import Alerting
from watchtower.notify.sender import DeliveryResult
from watchtower.probes import ProbeContext
from watchtower.sim.faults import FaultEvent
from watchtower.sim.vloop import InlineExecutor, VirtualTimeLoop
from watchtower.sim.world import World
from watchtower.store import AsyncStore, Store

EPOCH = 1_800_000_000.0  # virtual time 0, as UTC epoch seconds (a fixed date: runs are reproducible)
TAIL = 600.0  # seconds of run after the last event: all-clears, escalations and grace periods settle


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message the alerting decided (queued in the outbox), with the incident as it was then."""

    at: float  # virtual seconds
    incident: int
    step: str
    kind: str
    channel: str
    scope: str
    root: str
    cause: str | None
    title: str


@dataclass(slots=True)
class Recording:
    messages: list[SentMessage] = field(default_factory=list)
    # (virtual second, roots of open incidents that paged someone) sampled once a second
    paged_open: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    duration: float = 0.0
    problems: list[str] = field(default_factory=list)  # the run itself went wrong (an exception)


class RecordingSender:
    """Stands in for :class:`watchtower.notify.sender.ChannelSender`: accepts every message at
    once, except while the monitor is cut off from the world (the gateway is out of reach)."""

    def __init__(self, name: str, world: World):
        self.name = name
        self.world = world

    async def send(self, title: str, body: str) -> DeliveryResult:
        await asyncio.sleep(0.2)
        if self.world.monitor_cut:
            return DeliveryResult(False, "gateway unreachable (monitor cut off)", 0.2)
        return DeliveryResult(True, None, 0.2)

    def close(self) -> None:
        return None

    def hung_threads(self) -> int:
        return 0


def simulate(config: Config, events: list[FaultEvent], seed: int) -> tuple[World, Recording]:
    """Run the engine against ``events`` (world randomness from ``seed``); deterministic."""
    world = World.from_config(config, seed)
    recording = Recording()
    loop = VirtualTimeLoop(EPOCH)
    # The engine logs every state change at INFO; thousands of runs would drown the terminal.
    previous_level = logging.getLogger("watchtower").level
    logging.getLogger("watchtower").setLevel(logging.ERROR)
    # The engine draws from the process's shared generator too (the jitter of a retried delivery):
    # seeded for the run, so a run with a failed send is the same run every time.
    previous_random = random.getstate()
    random.seed(f"watchtower sim {seed}")
    try:
        # EPOCH + loop.time(), as the loop keeps it (read for every probe result)
        with clock.use(functools.partial(getattr, loop, "wall")):
            loop.run_until_complete(_run(config, events, world, recording))
    finally:
        random.setstate(previous_random)
        logging.getLogger("watchtower").setLevel(previous_level)
        loop.close()
    return world, recording


async def _run(config: Config, events: list[FaultEvent], world: World, rec: Recording) -> None:
    loop = asyncio.get_running_loop()
    monitor = Monitor(config, shared=ProbeContext(timeout=0), probe=world.probe_runner(loop))
    store = AsyncStore(Store(":memory:"), InlineExecutor())  # type: ignore[arg-type]
    senders = {c.name: RecordingSender(c.name, world) for c in config.notify.channels}
    alerting = Alerting(
        config,
        store,
        monitor.tracker,
        senders,  # type: ignore[arg-type]
        clock_now=clock.now,
        changed=monitor.incidents_changed,
    )
    await alerting.restore()
    seen: set[tuple[int, str, str]] = set()
    sync = alerting.sync

    async def recording_sync() -> None:
        await sync()
        now = loop.time()
        for incident_id, notes in alerting.sent_log.items():
            for n in notes:
                key = (n.incident, n.step, n.channel)
                if key in seen:
                    continue
                seen.add(key)
                inc = monitor.tracker.get(incident_id)
                rec.messages.append(
                    SentMessage(
                        now, n.incident, n.step, n.kind, n.channel,
                        str(inc.scope) if inc else "?", inc.root if inc else "?",
                        str(inc.cause) if inc and inc.cause else None, n.title,
                    )
                )  # fmt: skip

    alerting.sync = recording_sync  # type: ignore[method-assign]

    def fire(event: FaultEvent) -> None:
        now = loop.time()
        if event.action == "ack":
            for incident in monitor.tracker.open_incidents():
                if incident.root == event.target:
                    with contextlib.suppress(KeyError):
                        monitor.acknowledge(incident.id, "sim")
            return
        world.apply(now, event.action, event.target, event.args)

    for event in events:
        loop.call_at(event.at, fire, event)
    end = max((e.at for e in events), default=0.0) + TAIL
    rec.duration = end

    async def sample() -> None:
        while True:
            paged = frozenset(i.root for i in monitor.tracker.open_incidents() if alerting.notified.get(i.id))
            rec.paged_open.append((loop.time(), paged))
            await asyncio.sleep(1.0)

    async def stop_at_end() -> None:
        await asyncio.sleep(end)
        raise _Done

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(monitor.run())
            tg.create_task(alerting.run())
            tg.create_task(sample())
            tg.create_task(stop_at_end())
    except* _Done:
        pass
    except* Exception as group:
        rec.problems += [f"{type(e).__name__}: {e}" for e in group.exceptions]


class _Done(Exception):
    """The run reached its end."""
