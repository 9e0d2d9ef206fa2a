"""When each path runs: one timer on the event loop per path, no scheduler loop of our own.

Why not one APScheduler job per path: APScheduler 3 costs ~0.36 ms of CPU per job run here
(trigger arithmetic, executor bookkeeping, events), so 10,000 paths at 5 s would spend ~70 % of a
core on scheduling alone, and its cadence is fixed per job while a path must switch between
``interval`` and ``retry_interval`` from one run to the next. asyncio's own timer heap
(``loop.call_at``) costs a few microseconds per run. APScheduler keeps the low-rate housekeeping
jobs (heartbeat, later retention) where its triggers are worth having; see ``daemon.py``.

Semantics:
- fixed rate: the next run is due ``cadence`` after the previous run was *due* (not after it
  ended), so a path keeps its phase; an overrun runs again at once instead of drifting;
- the first runs are spread over each path's interval by a stable hash of its key, so a start
  (or a reload) is no thundering herd and a path keeps its phase across reloads;
- at most ``max_concurrency`` probes are in flight; lag (start - due) is recorded per run;
- :meth:`run_now` pulls a path's next run forward (used to get a second witness quickly);
- a ticker marks ``last_tick`` every second, so /healthz can tell a live loop from a stuck one.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("watchtower.scheduler")

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class LagStats:
    """A cumulative histogram (for Prometheus) plus a window of recent samples (for quantiles)."""

    buckets: tuple[float, ...] = LAG_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LAG_BUCKETS))
    total: int = 0
    sum: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=20000))

    def observe(self, lag: float) -> None:
        self.total += 1
        self.sum += lag
        self.recent.append(lag)
        buckets = self.buckets
        i = bisect.bisect_left(buckets, lag)  # the first bound >= lag
        if i < len(buckets) and lag <= buckets[i]:  # (a NaN lag is in no bucket)
            self.counts[i] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", self.total))
        return out

    def quantile(self, q: float) -> float | None:
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# A batch-capable job's hook, asked each time the job is due: ``(start, item)`` to run this time
# in a batch with every other co-due job that returned the same ``start``, or None to run alone
# through ``run``. ``start(items, done)`` begins the batch without awaiting and calls ``done()``
# once, when every item's result has been recorded.
BatchStart = Callable[[list[Any], Callable[[], None]], None]
BatchHook = Callable[[], tuple[BatchStart, Any] | None]
# A job that runs without a task (the simulator's probes, answered by callbacks on virtual time):
# called where the task's first step would run, with ``done`` to call once the run has been
# recorded. It makes the same loop calls in the same order as the task would, minus the task.
DirectStart = Callable[[Callable[[], None]], None]


@dataclass(slots=True)
class _Job:
    key: Hashable
    interval: float
    cadence: Callable[[], float]  # seconds until the next run, asked after each run
    run: Callable[[], Awaitable[None]]
    first_in: float
    batch: BatchHook | None = None
    direct: DirectStart | None = None
    due: float = 0.0
    slot: int | None = None  # the grid slot whose bucket holds this job while it is armed
    running: bool = False
    removed: bool = False
    rerun: bool = False  # run_now() while running: run again as soon as this run ends
    direct_run: int = 0  # the direct run in flight (its number), 0 when none


def run_finished() -> None:
    """Queued where a finished run's task would have queued its completion callback: it does
    nothing, but a loop iteration with a callback ready does not advance the clock, so without it
    the simulator's virtual clock could jump where a task-based run's did not (a loop may treat
    it as exactly that, see ``watchtower.sim.vloop``)."""
    return None


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` that runs on its first call only: a run's completion callback may be called again
    (a batch's deadline and its last reply, a guard after a crash) and must count once."""
    called = False

    def once() -> None:
        nonlocal called
        if not called:
            called = True
            fn()

    return once


def stable_phase(key: Hashable) -> float:
    """A fraction in [0, 1) that depends only on the key, so a path keeps its phase across reloads."""
    return zlib.crc32(repr(key).encode()) / 2**32


class Scheduler:
    TICK = 1.0
    GRID = 0.01

    def __init__(self, max_concurrency: int = 4096):
        self._jobs: dict[Hashable, _Job] = {}
        # Armed jobs by grid slot, one loop timer per slot (not per job): at 10,000 paths a slot
        # holds ~20 runs, and the timer heap stays small.
        self._buckets: dict[int, list[_Job]] = {}
        self._slot_timers: dict[int, asyncio.TimerHandle] = {}
        self._limit = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lag = LagStats()
        self.last_tick = time.monotonic()
        # Set once run() has armed every job: the first round of probes is scheduled (READY=1).
        self.armed = asyncio.Event()
        self.runs = 0
        self.batched = 0  # runs that went out in a batch (of self.runs)
        self.in_flight = 0
        self._direct_runs = 0  # direct runs begun, numbering each

    def __len__(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------------ jobs
    def add(
        self,
        key: Hashable,
        interval: float,
        cadence: Callable[[], float],
        run: Callable[[], Awaitable[None]],
        first_in: float | None = None,
        batch: BatchHook | None = None,
        direct: DirectStart | None = None,
    ) -> None:
        """Schedule ``run`` for ``key``; first run after ``first_in`` s (default: a stable phase).
        With ``batch``, a due run may instead join a batch (see :data:`BatchHook`); with
        ``direct``, a run is that callback instead of a task running ``run`` (see
        :data:`DirectStart`)."""
        previous = self._jobs.get(key)
        self.remove(key)
        delay = stable_phase(key) * interval if first_in is None else first_in
        job = _Job(key, interval, cadence, run, delay, batch, direct)
        self._jobs[key] = job
        if self._loop is not None:
            if previous is not None and first_in is None:
                # Re-added (a reload): keep its place in time instead of a fresh phase, so a
                # reload neither delays nor bunches the next runs.
                due = min(previous.due, self._loop.time() + interval)
                self._arm(job, due if not previous.running else self._loop.time() + cadence())
            else:
                self._arm(job, self._loop.time() + delay)

    def remove(self, key: Hashable) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            job.removed = True
            job.slot = None

    def run_now(self, key: Hashable) -> bool:
        """Run ``key`` now, or right after its current run ends. False for an unknown key."""
        job = self._jobs.get(key)
        if job is None or self._loop is None:
            return False
        if job.running:
            job.rerun = True
        elif job.due > self._loop.time():
            self._arm(job, self._loop.time())
        return True

    def _arm(self, job: _Job, due: float) -> None:
        assert self._loop is not None
        job.due = due
        # Fire on a 10 ms grid: runs due within the same slot share one loop wakeup, which at
        # thousands of paths halves the CPU per probe (the wakeup, not the probe, dominates), and
        # co-due batch-capable runs (icmp, tcp) go out as one batch.
        grid = self.GRID
        slot = math.ceil(due / grid)
        job.slot = slot  # a job re-armed elsewhere keeps a stale entry here; _fire_slot skips it
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = [job]
            self._slot_timers[slot] = self._loop.call_at(slot * grid, self._fire_slot, slot)
        else:
            bucket.append(job)

    def _fire_slot(self, slot: int) -> None:
        self._slot_timers.pop(slot, None)
        if self._loop is None:  # stopped: run() cancels the timers, this guards a late one
            self._buckets.pop(slot, None)
            return
        batches: dict[BatchStart, list[tuple[_Job, Any]]] = {}
        # Direct runs begin where their tasks' first steps would run, in the next loop iteration;
        # consecutive ones share one callback (their tasks' steps would have run back to back).
        direct: list[tuple[_Job, float]] = []
        for job in self._buckets.pop(slot, ()):
            if job.slot != slot or job.removed:
                continue  # moved to another slot (run_now, reload) or removed since
            job.slot = None
            if job.batch is None and job.direct is not None:  # (the branch below, without its steps)
                job.running = True
                direct.append((job, job.due))
                continue
            try:
                ticket = job.batch() if job.batch is not None else None
            except Exception:  # a bug in a batch hook must not lose the slot's other runs
                log.exception("batch hook failed key=%s", job.key)
                ticket = None
            if ticket is None and job.direct is not None:
                job.running = True
                direct.append((job, job.due))
            elif ticket is None:
                if direct:
                    self._loop.call_soon(self._run_directs, direct)
                    direct = []
                self._fire(job)
            else:
                batches.setdefault(ticket[0], []).append((job, ticket[1]))
        if direct:
            self._loop.call_soon(self._run_directs, direct)
        for start, members in batches.items():
            self._start_batch(start, members)

    def _fire(self, job: _Job) -> None:
        job.running = True
        task = asyncio.create_task(self._run_job(job, job.due))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_batch(self, start: BatchStart, members: list[tuple[_Job, Any]]) -> None:
        """One batch: no task, no semaphore slot (a batch is one send loop and one timer; its
        size is bounded by what is due in one 10 ms slot), lag recorded per run."""
        assert self._loop is not None
        now = self._loop.time()
        jobs = [job for job, _ in members]
        for job in jobs:
            job.running = True
            self.lag.observe(max(0.0, now - job.due))
        self.in_flight += len(jobs)

        @_once
        def done() -> None:
            self.in_flight -= len(jobs)
            self.runs += len(jobs)
            self.batched += len(jobs)
            for job in jobs:
                job.running = False
                self._rearm(job, job.due)

        try:
            start([item for _, item in members], done)
        except Exception:  # the monitor's batch start never raises; this guards the scheduler
            log.exception("batch failed size=%d", len(jobs))
            done()

    async def _run_job(self, job: _Job, due: float) -> None:
        assert self._loop is not None
        try:
            async with self._limit:
                self.lag.observe(max(0.0, self._loop.time() - due))
                self.in_flight += 1
                try:
                    await job.run()
                except Exception:  # the runner never raises; this guards the scheduler itself
                    log.exception("job failed key=%s", job.key)
                finally:
                    self.in_flight -= 1
                    self.runs += 1
        finally:
            job.running = False
        self._rearm(job, due)

    def _run_directs(self, runs: list[tuple[_Job, float]]) -> None:
        """:meth:`_run_job` for each job with a :data:`DirectStart`, in order: no task, no
        semaphore slot (the simulator's runs are bounded by its site), lag recorded per run."""
        now = self._loop.time() if self._loop is not None else 0.0  # (one callback: the time stays)
        observe = self.lag.observe
        direct_done = self._direct_done
        partial = functools.partial
        for job, due in runs:
            if self._loop is None:  # stopped before it began, as a cancelled task never starts
                job.running = False
                continue
            lag = now - due
            observe(lag if lag > 0.0 else 0.0)
            self.in_flight += 1
            self._direct_runs += 1
            job.direct_run = run = self._direct_runs
            assert job.direct is not None
            try:
                job.direct(partial(direct_done, job, due, run))
            except Exception:  # the monitor's direct start never raises; this guards the scheduler
                log.exception("job failed key=%s", job.key)
                direct_done(job, due, run)

    def _direct_done(self, job: _Job, due: float, run: int) -> None:
        """A direct run's completion: counts on its first call only (a guard after a crash may
        call it again), never for another run of the job."""
        if job.direct_run != run:
            return
        job.direct_run = 0
        self.in_flight -= 1
        self.runs += 1
        job.running = False
        loop = self._loop
        if loop is None:
            return
        if not job.removed:  # _rearm, inlined (a million runs per simulated hour at msp200)
            now = loop.time()
            nxt = now if job.rerun else due + job.cadence()
            job.rerun = False
            self._arm(job, nxt if nxt > now else now)
        loop.call_soon(run_finished)

    @property
    def stopped(self) -> bool:
        """Not running (before :meth:`run`, or after it ended): a run finishing now records nothing."""
        return self._loop is None

    def _rearm(self, job: _Job, due: float) -> None:
        if job.removed or self._loop is None:
            return
        now = self._loop.time()
        nxt = now if job.rerun else due + job.cadence()
        job.rerun = False
        self._arm(job, nxt if nxt > now else now)

    # ------------------------------------------------------------------ life cycle
    async def run(self) -> None:
        """Arm every job and tick until cancelled; cancelling stops new runs and cancels the ones
        in flight."""
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        for job in self._jobs.values():
            self._arm(job, now + job.first_in)
        self.armed.set()
        try:
            while True:
                self.last_tick = time.monotonic()
                await asyncio.sleep(self.TICK)
        finally:
            for timer in self._slot_timers.values():
                timer.cancel()
            self._slot_timers.clear()
            self._buckets.clear()
            for job in self._jobs.values():
                job.slot = None
            self._loop = None
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
