#!/usr/bin/env python3
"""``watchtower run`` with an event-loop stall meter beside it (for bench_scale.py).

    python bench/stallmeter.py CONFIG STALLFILE

A task sleeps 20 ms at a time on the daemon's own loop; whenever it wakes more than 5 ms late it
appends ``<CLOCK_MONOTONIC> <seconds late>`` to STALLFILE (monotonic time is shared by all processes,
so the bench can cut the measurement window). A stall longer than the tick shows nearly in full; the
meter costs ~50 wakeups a second (well under 1 % of a core).

To say *why* the loop stalled, every garbage-collector pass longer than 5 ms is logged too, as
``<CLOCK_MONOTONIC at its end> gc<generation> <seconds>`` (``gc.callbacks``; a collection runs on
whichever thread allocates, and holds the GIL for its whole length).

With ``WT_STALL_CALLBACKS=1`` in the environment (bench_scale.py ``--attribute``), every event-loop
callback that runs longer than 20 ms is logged as ``<CLOCK_MONOTONIC at its end> slow <seconds>
<what> <cpu seconds>``: the coroutine of a task step (else the callback's name), and the loop
thread's CPU time in it (on a shared machine a pass can be preempted midway), so a stall has a
name. It wraps ``asyncio.events.Handle._run``: ~1 µs per callback, off by default so the CPU
figures stay clean.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watchtower.config import load_config  # noqa: E402
from watchtower.daemon import run_daemon, setup_logging  # noqa: E402

TICK = 0.02
REPORT_OVER = 0.005
SLOW_CALLBACK = 0.02


async def meter(path: Path) -> None:
    with path.open("a", buffering=1) as out:
        while True:
            start = time.monotonic()
            await asyncio.sleep(TICK)
            now = time.monotonic()
            late = now - start - TICK
            if late > REPORT_OVER:
                out.write(f"{now:.6f} {late:.6f}\n")


def log_gc(path: Path) -> None:
    out = path.open("a", buffering=1)
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            started[0] = now
        elif now - started[0] > REPORT_OVER:
            out.write(f"{now:.6f} gc{info['generation']} {now - started[0]:.6f}\n")

    gc.callbacks.append(callback)


def describe(callback: object) -> str:
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return str(getattr(coro, "__qualname__", owner.get_name()))
    return str(getattr(callback, "__qualname__", None) or repr(callback)).replace(" ", "_")


def log_slow_callbacks(path: Path) -> None:
    out = path.open("a", buffering=1)
    run = asyncio.events.Handle._run

    def timed(self: asyncio.events.Handle) -> None:
        start, cpu = time.monotonic(), time.thread_time()
        run(self)
        took = time.monotonic() - start
        if took > SLOW_CALLBACK:
            # wall and this thread's CPU: on a shared machine a pass can be preempted midway
            cpu = time.thread_time() - cpu
            what = describe(self._callback)  # type: ignore[attr-defined]
            out.write(f"{time.monotonic():.6f} slow {took:.6f} {what} {cpu:.6f}\n")

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


async def main(config: Path, stallfile: Path) -> None:
    cfg = load_config(config)
    log_gc(stallfile)
    if os.environ.get("WT_STALL_CALLBACKS") == "1":
        log_slow_callbacks(stallfile)
    task = asyncio.create_task(meter(stallfile))
    try:
        await run_daemon(cfg, config_path=str(config))
    finally:
        task.cancel()


if __name__ == "__main__":
    setup_logging("WARNING", "text")
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
