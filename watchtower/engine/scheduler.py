"""When each path runs: one timer heap for all paths, one asyncio task.

Why not one APScheduler job per path: APScheduler 3 costs ~0.36 ms of CPU per job run here
(trigger arithmetic, executor bookkeeping, events), so 10,000 paths at 5 s would spend ~70 % of a
core on scheduling alone, and its cadence is fixed per job while a path must switch between
``interval`` and ``retry_interval`` from one run to the next. A binary heap of due times costs
O(log n) per run (a few microseconds). APScheduler keeps the low-rate housekeeping jobs
(heartbeat, retention) where its cron/interval triggers are worth having; see ``daemon.py``.

Semantics:
- fixed rate: the next run is due ``cadence`` after the previous run was *due* (not after it
  ended), so a path keeps its phase; an overrun runs again at once instead of drifting;
- the first runs are spread over each path's interval by a stable hash of its key, so a start
  (or a reload) is no thundering herd and a path keeps its phase across reloads;
- at most ``max_concurrency`` probes are in flight; lag (start - due) is recorded per run;
- :meth:`run_now` pulls a path's next run forward (used to get a second witness quickly).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

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
        for i, bound in enumerate(self.buckets):
            if lag <= bound:
                self.counts[i] += 1
                break

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


@dataclass(slots=True)
class _Job:
    key: Hashable
    interval: float
    cadence: Callable[[], float]  # seconds until the next run, asked after each run
    run: Callable[[], Awaitable[None]]
    due: float = 0.0
    generation: int = 0
    running: bool = False
    removed: bool = False


def stable_phase(key: Hashable) -> float:
    """A fraction in [0, 1) that depends only on the key, so a path keeps its phase across reloads."""
    return zlib.crc32(repr(key).encode()) / 2**32


class Scheduler:
    def __init__(self, max_concurrency: int = 4096, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._heap: list[tuple[float, int, int, Hashable]] = []
        self._jobs: dict[Hashable, _Job] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.lag = LagStats()
        self.last_tick = clock()
        self.runs = 0
        self.in_flight = 0

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
    ) -> None:
        """Schedule ``run`` for ``key``; first run after ``first_in`` s (default: a stable phase)."""
        self.remove(key)
        job = _Job(key, interval, cadence, run)
        self._jobs[key] = job
        delay = stable_phase(key) * interval if first_in is None else first_in
        self._push(job, self._clock() + delay)

    def remove(self, key: Hashable) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            job.removed = True
            job.generation += 1

    def run_now(self, key: Hashable) -> bool:
        """Pull the next run of ``key`` forward to now (no-op while it runs). True if pulled."""
        job = self._jobs.get(key)
        if job is None or job.running:
            return False
        now = self._clock()
        if job.due > now:
            self._push(job, now)
        return True

    def _push(self, job: _Job, due: float) -> None:
        job.generation += 1
        job.due = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, job.generation, job.key))
        if self._heap[0][1] == self._seq:  # new earliest entry: the loop may be sleeping past it
            self._wake.set()

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Run until cancelled. Cancelling stops new runs and cancels the ones in flight."""
        try:
            while True:
                self.last_tick = now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    due, _, generation, key = heapq.heappop(self._heap)
                    job = self._jobs.get(key)
                    if job is None or job.generation != generation:
                        continue  # removed or rescheduled since it was pushed
                    self._start(job, due)
                # Sleep until the next due time, waking at least once a second so /healthz can tell
                # a live scheduler from a stuck one.
                timeout = min(1.0, self._heap[0][0] - now) if self._heap else 1.0
                self._wake.clear()
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, job: _Job, due: float) -> None:
        job.running = True
        task = asyncio.create_task(self._run_job(job, due), name=f"probe {job.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job: _Job, due: float) -> None:
        try:
            async with self._limit:
                self.lag.observe(max(0.0, self._clock() - due))
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
        if not job.removed:
            now = self._clock()
            nxt = due + job.cadence()
            self._push(job, nxt if nxt > now else now)
