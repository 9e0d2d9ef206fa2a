"""In-process notification peers for tests and the demo: an SMTP sink and an HTTP sink that answers like
signal-cli-rest-api and SMSEagle (``lab-icmp-apprise.md`` §5), plus apprise URLs pointing at them.

Both run in their own thread with their own event loop, so they serve while the test's loop is
busy (or blocked in ``subprocess.run``) and work from sync and async tests alike. ``start()`` and
``stop()`` are quick, synchronous and bounded; after ``stop()`` the port refuses connections and
``start()`` brings the sink back on the SAME port. Everything listens on 127.0.0.1 only.

    smtp = SmtpSink(); smtp.start()
    http = HttpSink(); http.start()
    url = signal_url(http.port)                  # signal://127.0.0.1:PORT/+15550000001/+15550000002
    ... send ...
    [msg] = await smtp.wait_messages(1)          # SmtpMessage(subject, sender, to, text, ...)
    [req] = await http.wait_requests(1)          # HttpRequest(method, path, query, headers, json)
    http.mode = "error500"                       # or "ok", "hang", "slow" (with http.delay seconds)
    smtp.stop(); http.stop()
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from aiohttp import web

SIGNAL_FROM = "+15550000001"
SIGNAL_TO = ("+15550000002",)
SMS_TO = "+15550000004"
MAIL_FROM = "watchtower@lab.test"
MAIL_TO = "oncall@lab.test"
SMSEAGLE_TOKEN = "SinkTok3nSecret"


def mailto_url(port: int, to: str = MAIL_TO, sender: str = MAIL_FROM) -> str:
    """Plain SMTP (no TLS, no AUTH: aiosmtpd offers neither) to the SmtpSink."""
    return f"mailto://127.0.0.1:{port}?from={sender}&to={to}"


def signal_url(port: int, source: str = SIGNAL_FROM, recipients: tuple[str, ...] = SIGNAL_TO) -> str:
    """signal-cli-rest-api at the HttpSink: ``signal://host:port/FROM/TO[/TO...]``."""
    return f"signal://127.0.0.1:{port}/{source}/" + "/".join(recipients)


def smseagle_url(port: int, token: str = SMSEAGLE_TOKEN, to: str = SMS_TO) -> str:
    """SMSEagle's JSON-RPC API at the HttpSink (the token travels as ``access_token``)."""
    return f"smseagle://{token}@127.0.0.1:{port}/{to}"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing listens on right now (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, every: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy, which is returned; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- SMTP


@dataclass(frozen=True)
class SmtpMessage:
    subject: str
    sender: str  # the From: header
    to: str  # the To: header
    text: str  # the text/plain part, "\n" line ends, stripped
    mail_from: str  # envelope
    rcpt_tos: tuple[str, ...]
    raw: bytes = field(repr=False)


class _SmtpHandler:
    def __init__(self, sink: SmtpSink):
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else ""
        self.sink._record(
            SmtpMessage(
                subject=str(msg.get("Subject", "")),
                sender=str(msg.get("From", "")),
                to=str(msg.get("To", "")),
                text=text.replace("\r\n", "\n").strip(),
                mail_from=str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw,
            )
        )
        return "250 Message accepted for delivery"


class SmtpSink:
    """aiosmtpd ``Controller`` on 127.0.0.1; records every message it accepts."""

    def __init__(self, port: int | None = None, on_message: Callable[[SmtpMessage], None] | None = None):
        self.port = port or free_port()
        self.on_message = on_message  # the demo prints what arrives
        self.messages: list[SmtpMessage] = []
        self._lock = threading.Lock()
        self._controller: Any = None

    def _record(self, message: SmtpMessage) -> None:
        with self._lock:
            self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> Self:
        from aiosmtpd.controller import Controller

        if self._controller is None:
            controller = Controller(_SmtpHandler(self), hostname="127.0.0.1", port=self.port, ready_timeout=5)
            controller.start()
            self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    async def wait_messages(self, count: int, timeout: float = 5.0) -> list[SmtpMessage]:
        """The first ``count`` messages once that many arrived; AssertionError after ``timeout``."""

        async def enough() -> list[SmtpMessage] | None:
            with self._lock:
                return list(self.messages[:count]) if len(self.messages) >= count else None

        result: list[SmtpMessage] = await wait_for(enough, timeout, f"{count} message(s) at the SMTP sink")
        return result

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = field(repr=False)
    json: Any  # the parsed body, None when it is not JSON
    at: float  # time.monotonic() when it arrived


HttpMode = Literal["ok", "error500", "hang", "slow"]


class HttpSink:
    """aiohttp catch-all on 127.0.0.1, recording every request. Answers ``/v2/send`` like
    signal-cli-rest-api (201 ``{"timestamp": ...}``), ``/jsonrpc/sms`` like SMSEagle
    (``{"result": {"message_id": "1", "status": "ok"}}``), anything else with 200.

    ``mode``: ``ok``; ``error500``; ``hang`` (accept and read the request, never answer, until
    ``stop()``); ``slow`` (answer after ``delay`` seconds). Requests are recorded in every mode."""

    def __init__(
        self,
        port: int | None = None,
        mode: HttpMode = "ok",
        delay: float = 3.0,
        on_request: Callable[[HttpRequest], None] | None = None,
    ):
        self.port = port or free_port()
        self.on_request = on_request  # the demo prints what arrives
        self.mode: HttpMode = mode
        self.delay = delay
        self.requests: list[HttpRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        with self._lock:
            self.requests.append(
                HttpRequest(
                    method=request.method,
                    path=request.path,
                    query=dict(request.query),
                    headers=dict(request.headers),
                    body=body,
                    json=doc,
                    at=time.monotonic(),
                )
            )
            recorded = self.requests[-1]
        if self.on_request is not None:
            self.on_request(recorded)
        mode = self.mode
        if mode == "hang":
            assert self._release is not None
            await self._release.wait()
            return web.Response(status=503, text="sink stopped")
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "error500":
            return web.Response(status=500, text="injected failure")
        if request.path == "/v2/send":
            return web.json_response({"timestamp": str(int(time.time() * 1000))}, status=201)
        if request.path == "/jsonrpc/sms":
            return web.json_response({"result": {"message_id": "1", "status": "ok"}})
        return web.Response(text="ok")

    async def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        try:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
            self._runner = runner
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    def start(self) -> Self:
        if self._runner is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"http-sink-{self.port}", daemon=True)
        thread.start()
        ready = threading.Event()
        errors: list[BaseException] = []
        loop.call_soon_threadsafe(lambda: loop.create_task(self._serve(ready, errors)))
        if not ready.wait(5) or errors:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
            raise RuntimeError(f"HTTP sink did not start on 127.0.0.1:{self.port}: {errors}")
        self._loop, self._thread = loop, thread
        return self

    async def _shutdown(self) -> None:
        if self._release is not None:
            self._release.set()  # hung handlers answer now, so cleanup does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self) -> None:
        """Close the listener and every connection; the port refuses until ``start()``."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None
        self._runner = None

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    async def wait_requests(self, count: int, timeout: float = 5.0) -> list[HttpRequest]:
        """The first ``count`` requests once that many arrived; AssertionError after ``timeout``."""

        async def enough() -> list[HttpRequest] | None:
            with self._lock:
                return list(self.requests[:count]) if len(self.requests) >= count else None

        result: list[HttpRequest] = await wait_for(enough, timeout, f"{count} request(s) at the HTTP sink")
        return result

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
