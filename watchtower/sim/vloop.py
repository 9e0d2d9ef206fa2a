"""An asyncio event loop on virtual time: when nothing is ready to run, time jumps to the next timer.

The engine's timers (the scheduler's per-path ``call_at``, ``asyncio.sleep``, ``wait_for``
deadlines, the alerting tick) all read ``loop.time()``. Here that is a number this loop owns: a
run of an hour of probing takes as long as the callbacks take to execute, and two runs with the
same inputs make the same calls in the same order (the FoundationDB idea of deterministic
simulation, at the size of one process).

Nothing in a simulated run may use threads or real I/O: a thread's result would arrive at a
virtual time that depends on the machine's speed. The simulator hands the engine an inline store
executor and recording senders for that reason; :class:`Deadlock` is raised if the loop ever has
nothing scheduled at all (something waits on the outside world).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class Deadlock(RuntimeError):
    """No callback is ready and no timer is scheduled: the run waits on something outside."""


class _JumpSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        events = super().select(0)  # the loop's own self-pipe (call_soon_threadsafe) still works
        if events:
            return events
        if timeout is None:
            raise Deadlock("nothing ready and no timer scheduled")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jump = _JumpSelector()
        super().__init__(self._jump)

    def time(self) -> float:
        return self._jump.now


class InlineExecutor:
    """A ``concurrent.futures`` executor that runs the call at once, on the calling thread: the
    store's single worker thread, made deterministic for the simulator."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        import concurrent.futures

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a thread would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, **_: Any) -> None:
        return None
