"""An asyncio event loop on virtual time: when nothing is ready to run, time jumps to the next timer.

The engine's timers (the scheduler's per-path ``call_at``, ``asyncio.sleep``, ``wait_for``
deadlines, the alerting tick) all read ``loop.time()``. Here that is a number this loop owns: a
run of an hour of probing takes as long as the callbacks take to execute, and two runs with the
same inputs make the same calls in the same order (the FoundationDB idea of deterministic
simulation, at the size of one process).

Nothing in a simulated run may use threads or real I/O: a thread's result would arrive at a
virtual time that depends on the machine's speed. Nothing sets a context variable outside a task
either (the engine uses none), so a callback scheduled without an explicit context runs as it is,
not inside a copy of the scheduling context (a task's steps and a future's callbacks still run in
the context asyncio hands in). The simulator hands the engine an inline store
executor and recording senders for that reason; :class:`Deadlock` is raised if the loop ever has
nothing scheduled at all (something waits on the outside world).
"""

from __future__ import annotations

import asyncio
import heapq
import selectors
from asyncio.base_events import (  # type: ignore[attr-defined]
    _MIN_CANCELLED_TIMER_HANDLES_FRACTION,
    _MIN_SCHEDULED_TIMER_HANDLES,
    MAXIMUM_SELECT_TIMEOUT,
)
from typing import Any

from watchtower.engine.scheduler import run_finished

# The fields asyncio's handles have (CPython 3.11): this loop fills them in without the constructor,
# which it uses instead if they ever differ.
_HANDLE_FIELDS_KNOWN = set(asyncio.Handle.__slots__) == {
    "_callback", "_args", "_cancelled", "_loop", "_source_traceback", "_repr", "__weakref__", "_context"
} and set(asyncio.TimerHandle.__slots__) == {"_scheduled", "_when"}  # fmt: skip
_new_handle = object.__new__


class Deadlock(RuntimeError):
    """No callback is ready and no timer is scheduled: the run waits on something outside."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose :meth:`time` is a number it owns, advanced to the next timer when
    no callback is ready.

    :meth:`_run_once` is the standard iteration (``asyncio.base_events``) with the I/O poll left
    out: the same cancelled-timer sweep, the same timer heap (holding each timer's time as a float
    that compares in C), the same order of callbacks, so a run does what it would on the standard
    loop with a clock that jumps. A simulated run has no
    file descriptors to watch (nothing may use real I/O, see the module docstring), and the poll
    was most of an iteration's cost. A callback from another thread (``call_soon_threadsafe``)
    still lands on the ready queue and runs.
    """

    def __init__(self, epoch: float = 0.0) -> None:
        super().__init__(selectors.DefaultSelector())
        self.set_debug(False)  # PYTHONASYNCIODEBUG would time callbacks against a clock that jumps
        self._now = 0.0
        self._epoch = epoch
        self.wall = epoch  # epoch + time(), kept at every jump: the simulated wall clock, read often
        self._hold = False  # a no-op is "ready": the next iteration keeps the clock (see call_soon)
        self._held = asyncio.Handle(run_finished, (), self)

    def time(self) -> float:
        return self._now

    # The standard call_soon / call_at without the debug-mode checks (this loop runs with debug off),
    # their handles filled in directly: a simulated run makes a million of them.
    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:  # type: ignore[override]
        loop: Any = self
        if loop._closed:
            raise RuntimeError("Event loop is closed")
        if callback is run_finished:
            # A no-op whose only effect is to keep the next iteration from advancing the clock:
            # that effect, without a handle (and without the iteration, when it would be empty).
            self._hold = True
            return self._held
        if _HANDLE_FIELDS_KNOWN:
            handle: Any = _new_handle(asyncio.Handle)
            handle._callback, handle._args, handle._cancelled, handle._loop = callback, args, False, self
            handle._source_traceback = handle._repr = None
            handle._context = context  # None: run as it is (see the module docstring)
        else:
            handle = asyncio.Handle(callback, args, self, context)
        loop._ready.append(handle)
        return handle

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:  # type: ignore[override]
        loop: Any = self
        if loop._closed:
            raise RuntimeError("Event loop is closed")
        timer = _Timer(when)
        timer._callback, timer._args, timer._loop = callback, args, self
        timer._cancelled, timer._scheduled = False, True
        timer._context = context
        heapq.heappush(loop._scheduled, timer)
        return timer  # type: ignore[return-value]

    def call_at_soon(self, when: float, callback: Any, *args: Any) -> None:
        """At ``when``, queue ``callback(*args)`` for the next iteration: what a task that sleeps
        until ``when`` and then calls it does (its wakeup is queued by the timer and runs in the
        next iteration). One heap entry stands for the timer; when it is the only thing that
        iteration runs, the next iteration runs the call without a handle (see :meth:`_run_once`)."""
        entry = _Soon(when)
        entry.call = callback
        entry.args = args
        entry.loop = self
        heapq.heappush(self._scheduled, entry)  # type: ignore[attr-defined]

    def _run_once(self) -> None:
        """Iterations of the standard loop, until one sets ``_stopping`` (``run_forever`` calls
        this in a loop and stops when it is set, so running several per call is the same)."""
        loop: Any = self  # the standard loop's private state, read and kept as it keeps it
        ready = loop._ready
        popleft = ready.popleft
        heappop = heapq.heappop
        resolution = loop._clock_resolution
        longest = MAXIMUM_SELECT_TIMEOUT
        soon: _Soon | None = None  # a call_at_soon timer that was its iteration's only callback
        scheduled: list[_Due] = loop._scheduled  # (replaced only by the rebuild below)
        now = self._now  # (moved only by the jump below)
        while True:
            cancelled = loop._timer_cancelled_count
            if cancelled:  # (without cancelled timers in the heap there is nothing to sweep)
                # cancelled / count > fraction, for a count over the minimum (the product is exact)
                if cancelled > len(scheduled) * _MIN_CANCELLED_TIMER_HANDLES_FRACTION and (
                    len(scheduled) > _MIN_SCHEDULED_TIMER_HANDLES
                ):
                    # Too many cancelled timers: rebuild the heap without them (as the standard loop does).
                    kept = []
                    for entry in scheduled:
                        if entry._cancelled:
                            entry._scheduled = False
                        else:
                            kept.append(entry)
                    heapq.heapify(kept)
                    loop._scheduled = scheduled = kept
                    loop._timer_cancelled_count = 0
                else:
                    while scheduled and scheduled[0]._cancelled:
                        loop._timer_cancelled_count -= 1
                        heappop(scheduled)._scheduled = False
            if soon is not None:
                # The iteration after a lone call_at_soon timer: the clock stays, no timer is due
                # (the heap's first was past this instant and the timer added nothing), and its
                # only callback is the one the timer queued. Run it, without a handle.
                call, args, soon = soon.call, soon.args, None
                try:
                    call(*args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.call_exception_handler(
                        {"message": f"Exception in callback {call!r}", "exception": exc}
                    )
                if loop._stopping:
                    return
                continue
            if self._hold:  # as if a no-op were ready: no jump (an iteration with no timer due is skipped)
                self._hold = False
                if not ready and (not scheduled or scheduled[0] >= now + resolution):
                    if loop._stopping:
                        return
                    # Skipped: the next iteration jumps. Its sweep would find nothing (this one's
                    # just ran, and nothing ran since), so it starts here.
                    jump = True
                else:
                    jump = False
            else:
                jump = not ready and not loop._stopping
            if jump:
                if not scheduled:
                    raise Deadlock("nothing ready and no timer scheduled")
                # Jump to the next timer, as the standard loop's poll sleeps
                # min(max(0, when - now), MAXIMUM_SELECT_TIMEOUT) and its clock moves by that much.
                wait = scheduled[0] - now
                if wait > 0:
                    self._now = now = now + (wait if wait < longest else longest)
                    self.wall = self._epoch + now
            end_time = now + resolution
            if scheduled and scheduled[0] < end_time:
                timer = heappop(scheduled)
                timer._scheduled = False
                if (
                    timer.__class__ is _Soon
                    and not ready
                    and not loop._stopping
                    and (not scheduled or scheduled[0] >= end_time)
                ):
                    # This iteration would run only the timer, which queues its call for the next.
                    soon = timer
                    continue
                ready.append(timer)
                while scheduled:
                    if scheduled[0] >= end_time:
                        break
                    timer = heappop(scheduled)
                    timer._scheduled = False
                    ready.append(timer)
            for _ in range(len(ready)):
                handle = popleft()
                if handle._cancelled:
                    continue
                try:  # Handle._run, inlined
                    context = handle._context
                    if context is None:
                        handle._callback(*handle._args)
                    else:
                        context.run(handle._callback, *handle._args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.call_exception_handler(
                        {"message": f"Exception in callback {handle!r}", "exception": exc, "handle": handle}
                    )
            if loop._stopping:
                return


class _Due(float):
    """A timer in the heap, and its own handle: its time, compared as a float (the standard loop
    compares ``TimerHandle`` objects by that time in Python, ~15 calls per timer on a heap this
    size)."""

    __slots__ = ()
    _cancelled: bool
    _scheduled: bool


class _Timer(_Due):
    """A :meth:`VirtualTimeLoop.call_at` timer: what the standard loop's ``TimerHandle`` is to
    those who hold one (``cancel``, ``cancelled``, ``when``), run by :meth:`VirtualTimeLoop._run_once`
    as a handle."""

    __slots__ = ("_args", "_callback", "_cancelled", "_context", "_loop", "_scheduled")
    _callback: Any
    _args: Any
    _context: Any
    _loop: Any
    _scheduled: bool
    _source_traceback = None  # (asyncio's call_later reads it; the loop runs without debug)
    _repr = None

    def cancel(self) -> None:  # TimerHandle.cancel and Handle.cancel, with debug off
        if not self._cancelled:
            self._loop._timer_handle_cancelled(self)  # counted while in the heap (_scheduled)
            self._cancelled = True
            self._callback = None
            self._args = None

    def cancelled(self) -> bool:
        return self._cancelled

    def when(self) -> float:
        return float(self)

    def __bool__(self) -> bool:  # a handle, not a number: true even at virtual time 0
        return True

    def __repr__(self) -> str:
        return f"<timer when={float(self)!r} {self._callback!r}{' cancelled' if self._cancelled else ''}>"


class _Soon(_Due):
    """A :meth:`VirtualTimeLoop.call_at_soon` timer: its own heap entry and its own handle. Run
    as a handle (when its iteration runs other callbacks too), it queues its call."""

    __slots__ = ("_scheduled", "args", "call", "loop")
    call: Any
    args: tuple[Any, ...]
    loop: Any
    _cancelled = False  # never cancelled (nobody holds it)
    _context = None
    _args = ()

    def _callback(self) -> None:
        handle: Any = _new_handle(asyncio.Handle)
        handle._callback, handle._args, handle._cancelled = self.call, self.args, False
        handle._loop = self.loop
        handle._context = handle._source_traceback = handle._repr = None
        self.loop._ready.append(handle)


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
