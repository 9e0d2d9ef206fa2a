"""Delivery of one message through one channel, via apprise (``lab-icmp-apprise.md`` §5).

Each :class:`ChannelSender` owns one ``apprise.Apprise`` object holding the channel's one URL and
its own single-thread executor. apprise's sync ``notify()`` runs in that thread with
``async_mode=False`` and no apprise-level timeout, so the plugin runs right there (not in apprise's
shared pools): a gateway that hangs occupies only its own channel's thread, never one another
channel needs.

The URL is tuned before apprise sees it, unless the URL says otherwise:

- ``cto``/``rto`` (connect/read timeouts) so a black-holed gateway fails inside the send budget
  (apprise's defaults: 4 s/4 s for HTTP plugins, 15 s for e-mail, where ``cto`` bounds every SMTP
  read too);
- ``batch=yes`` for Signal: one request with all recipients instead of one per recipient.

And ``request_rate_per_sec = 0`` on the plugin: apprise otherwise sleeps 5.5 s between two
requests of one plugin instance, which would delay the second alert on a channel.

Bounds: ``asyncio.wait_for(timeout)`` around the whole send is the last resort. When it fires
while apprise is still blocked in the thread, the send fails with "timed out after Ns" and the
channel gets a fresh executor (and a fresh apprise object), so later sends are not queued behind
the hung thread; the abandoned thread ends when its socket timeouts fire. After
``MAX_ABANDONED`` such threads are still alive, sends queue behind the hung thread again (and time
out) instead of starting more threads. A hung thread still running at interpreter exit delays exit
until it ends (``concurrent.futures`` joins its workers); with the default ``cto``/``rto`` that is
within ~20 s.

Failure reasons come from apprise's per-attempt logs (``NotifyResult.logs()``, captured at DEBUG
level: the socket exception is only logged there), condensed to one short line and scrubbed of
every part of the channel's URL (user, password, host, token, phone numbers, addresses) and of
anything that looks like a phone number. For that the ``apprise`` logger is set to DEBUG and
stops propagating to the root logger: its records (which quote payloads, recipients and tokens)
then reach only these captures, never the daemon's log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import difflib
import functools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from watchtower.config import Channel
from watchtower.logs import mask_encoded

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0  # cto for HTTP-based plugins
DEFAULT_READ_TIMEOUT = 15.0  # rto for HTTP-based plugins
DEFAULT_MAIL_TIMEOUT = 10.0  # cto for e-mail: smtplib's timeout bounds connect and every read
MAX_ABANDONED = 4  # hung threads per channel left running before sends queue behind them again
MAX_REASON = 160

_MAIL_SCHEMES = {"mailto", "mailtos"}
_SIGNAL_SCHEMES = {"signal", "signals"}
# query values that say nothing about anyone; everything else in a URL is scrubbed from reasons
_BENIGN = {
    "yes", "no", "true", "false", "on", "off", "text", "html", "markdown", "normal", "high", "low",
    "upstream", "truncate", "split", "insecure", "ssl", "starttls", "info", "json", "form", "none",
    "http", "https", "default", "emergency", "silent",
}  # fmt: skip
_PHONE = re.compile(r"\+?\d(?:[\d ()./-]{5,}\d)")
_WS = re.compile(r"\s+")

_logger_ready = False


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    ok: bool
    error: str | None  # short reason; never holds the URL, a token, a password or a number
    elapsed: float


# --------------------------------------------------------------------------- URL handling


def _split_url(url: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(scheme, the part between ``://`` and ``?``, query pairs) of an apprise URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", url, []
    rest, _, query = rest.partition("?")
    return scheme.lower(), rest, parse_qsl(query, keep_blank_values=True)


def tune_url(url: str, timeout: float) -> str:
    """The URL with ``cto``/``rto`` (and Signal's ``batch=yes``) added where it sets none."""
    scheme, _, pairs = _split_url(url)
    keys = {k.lower() for k, _ in pairs}
    budget = max(timeout, 0.5)
    extra: list[str] = []
    if scheme in _MAIL_SCHEMES:
        if "cto" not in keys:
            extra.append(f"cto={_fmt(min(DEFAULT_MAIL_TIMEOUT, budget * 0.8))}")
    else:
        if "cto" not in keys:
            extra.append(f"cto={_fmt(min(DEFAULT_CONNECT_TIMEOUT, budget / 3))}")
        if "rto" not in keys:
            extra.append(f"rto={_fmt(min(DEFAULT_READ_TIMEOUT, budget / 2))}")
    if scheme in _SIGNAL_SCHEMES and "batch" not in keys:
        extra.append("batch=yes")
    if not extra:
        return url
    joiner = "&" if "?" in url else "?"
    if url.endswith(("?", "&")):
        joiner = ""
    return url + joiner + "&".join(extra)


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def secret_parts(url: str) -> list[str]:
    """Every piece of ``url`` a reason must not show, longest first, in raw, decoded and encoded
    spelling: the URL itself, user, password, host, path segments (tokens, phone numbers, chat
    ids) and query values."""
    scheme, rest, pairs = _split_url(url)
    pieces = {url, rest}
    userinfo, at, hostpath = rest.rpartition("@")
    if not at:
        userinfo, hostpath = "", rest
    for part in (userinfo, *userinfo.split(":", 1)):
        pieces.add(part)
    segments = hostpath.split("/")
    host = segments[0]
    pieces.add(host)
    if host.startswith("[") and "]" in host:  # [v6]:port
        pieces.add(host[1 : host.index("]")])
    else:
        pieces.add(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    pieces.update(segments[1:])
    for _, value in pairs:
        pieces.add(value)
        pieces.update(re.split(r"[,;@: ]", value))
    out: set[str] = set()
    for piece in pieces:
        for form in (piece, unquote(piece), quote(unquote(piece), safe=""), unquote(piece).lstrip("+")):
            if len(form) < 3 or form.lower() in _BENIGN or form.lower() == scheme:
                continue
            if form.isdigit() and len(form) < 6:  # a port, a count
                continue
            out.add(form)
    return sorted(out, key=len, reverse=True)


def scrub(text: str, parts: Sequence[str]) -> str:
    """``text`` without any of ``parts`` (case-insensitive), nor base64 that decodes to one of them
    (a server's reply echoing ``AUTH PLAIN`` data), nor phone-number-like runs."""
    text = mask_encoded(text, parts)
    for part in parts:
        text = re.sub(re.escape(part), "***", text, flags=re.IGNORECASE)
    text = _PHONE.sub(lambda m: m.group() if len(re.sub(r"\D", "", m.group())) < 7 else "***", text)
    return text


def _mask_numbers(text: str) -> str:
    """Phone numbers in apprise's privacy URL: all but the last two digits masked."""

    def mask(m: re.Match[str]) -> str:
        digits = m.group()
        return digits if len(digits) < 7 else "*" * (len(digits) - 2) + digits[-2:]

    return re.sub(r"\d{7,}", mask, text)


# --------------------------------------------------------------------------- reasons


_HTTP_STATUS = re.compile(r"error=(\d{3})\b")
_READ_TIMEOUT = re.compile(r"read timeout=([\d.]+)")
_CONNECT_TIMEOUT = re.compile(r"connect timeout=([\d.]+)")
_KNOWN = (
    ("connection refused", "connection refused"),
    ("name or service not known", "DNS lookup failed"),
    ("temporary failure in name resolution", "DNS lookup failed"),
    ("nodename nor servname", "DNS lookup failed"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection reset", "connection reset"),
    ("certificate_verify_failed", "TLS certificate verification failed"),
    ("wrong version number", "TLS handshake failed (not a TLS port?)"),
    ("smtp auth extension not supported", "SMTP server offers no AUTH (needs TLS?)"),
    ("authentication failed", "authentication failed"),
    ("connection unexpectedly closed", "connection closed by the server"),
)


def reason_from_logs(messages: Sequence[tuple[str, str]], elapsed: float) -> str:
    """One short line from apprise's (level, message) log entries of a failed send (unscrubbed)."""
    text = "\n".join(m for _, m in messages)
    low = text.lower()
    status = _HTTP_STATUS.search(text)
    if status:
        return f"HTTP {status.group(1)}"
    if "timed out" in low or "timeout" in low:
        if m := _READ_TIMEOUT.search(low):
            return f"no answer within {_fmt(float(m.group(1)))}s (read timeout)"
        if m := _CONNECT_TIMEOUT.search(low):
            return f"cannot connect within {_fmt(float(m.group(1)))}s (connect timeout)"
        return f"timed out after {elapsed:.0f}s"
    for needle, reason in _KNOWN:
        if needle in low:
            return reason
    warnings = [m for level, m in messages if level in ("WARNING", "ERROR", "CRITICAL")]
    if not warnings:
        return "delivery failed (apprise gave no reason)"
    reason = warnings[0]
    details = [m.split(":", 1)[1] for _, m in messages if m.startswith(("Socket Exception:", "Response"))]
    if details:
        reason += ": " + details[0]
    return reason


def _one_line(text: str) -> str:
    text = _WS.sub(" ", text).strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


# --------------------------------------------------------------------------- sender


def _prepare_apprise_logger() -> None:
    """apprise logs to its own logger at DEBUG, captured per send and not propagated (see above)."""
    global _logger_ready
    if not _logger_ready:
        apprise_log = logging.getLogger("apprise")
        apprise_log.setLevel(logging.DEBUG)
        apprise_log.propagate = False
        _logger_ready = True


class _Said(logging.Handler):
    """apprise's warnings while it parses a URL: why it refuses one (scrubbed before use)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@functools.cache
def known_schemes() -> frozenset[str]:
    """Every URL scheme apprise has a plugin for."""
    import apprise

    out: set[str] = set()
    for schema in apprise.Apprise().details().get("schemas", []):
        for key in ("protocols", "secure_protocols"):
            out.update(p.lower() for p in schema.get(key) or [])
    return frozenset(out)


def channel_problems(channels: Sequence[Channel]) -> list[str]:
    """Channels whose URL apprise refuses, one ``place: problem`` line each; never shows the URL."""
    problems = []
    for i, channel in enumerate(channels):
        sender = ChannelSender(channel)
        try:
            if sender.problem is not None:
                key = "url_file" if channel.url_file is not None else "url"
                problems.append(f"notify.channels[{i}].{key}: channel {channel.name!r}: {sender.problem}")
        finally:
            sender.close()
    return problems


class _Worker:
    """One thread and the apprise object it uses; replaced as a whole when its thread hangs."""

    __slots__ = ("client", "executor", "running_since")

    def __init__(self, name: str, client: Any):
        self.executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"notify-{name}")
        self.client = client
        self.running_since: float | None = None


class ChannelSender:
    """Sends through one channel; ``send`` never raises. See the module docstring."""

    def __init__(self, channel: Channel, timeout: float = 30.0):
        import apprise  # lazy: 0.13 s and 28 MB, only when channels exist

        _prepare_apprise_logger()
        self._apprise = apprise
        self.name = channel.name
        self.timeout = float(timeout)
        secret = channel.secret("url")
        raw = secret.get_secret_value().strip() if secret is not None else ""
        self._url = tune_url(raw, self.timeout)
        self._secrets = sorted(set(secret_parts(raw)) | set(secret_parts(self._url)), key=len, reverse=True)
        self._abandoned: list[cf.Future[None]] = []
        self._closed = False
        self.problem: str | None = None  # why apprise will not take the URL, when it won't
        said = _Said()
        apprise_log = logging.getLogger("apprise")
        apprise_log.addHandler(said)
        try:
            client = self._build()
        finally:
            apprise_log.removeHandler(said)
        self._worker = _Worker(self.name, client)
        if client is None:
            scheme = _split_url(raw)[0]
            shown = scheme if re.fullmatch(r"[a-z0-9+.-]{1,20}", scheme) else "?"
            told = [m.rstrip(".") for m in said.messages if "://" not in m]  # not its masked copy of the URL
            why = _one_line(scrub("; ".join(told[:2]), self._secrets))[:MAX_REASON]
            if shown not in known_schemes():
                close = difflib.get_close_matches(shown, sorted(known_schemes()), n=1)
                why = f"apprise knows no {shown}:// service" + (
                    f"; did you mean {close[0]}://?" if close else ""
                )
            self.problem = f"apprise does not accept this URL (scheme {shown}://{': ' + why if why else ''})"
            self.display_url = f"{shown}://(invalid)"
        else:
            self.display_url = _mask_numbers(next(iter(client)).url(privacy=True))

    def _build(self) -> Any:
        """A fresh apprise object with the one URL (plugin inline, throttle off), or None."""
        ap = self._apprise
        client = ap.Apprise(asset=ap.AppriseAsset(async_mode=False, service_timeout=0))
        if not client.add(self._url) or len(client) != 1:
            return None
        for plugin in client:
            plugin.request_rate_per_sec = 0
        return client

    # -- in the channel's thread

    def _deliver(
        self, worker: _Worker, title: str, body: str, attach: str | None = None
    ) -> tuple[bool, str | None]:
        worker.running_since = started = time.monotonic()
        try:
            result = worker.client.notify(
                body=body,
                title=title,
                body_format=self._apprise.NotifyFormat.TEXT,
                log_level=logging.DEBUG,
                attach=attach,  # a file path (the plan); plugins without attachments send the text
            )
            if result:
                return True, None
            messages = [(e.level, e.message) for service in result for e in service.logs()]
            if not messages:
                messages = [(e.level, e.message) for e in result.logs()]
            return False, reason_from_logs(messages, time.monotonic() - started)
        except Exception as exc:  # a plugin or apprise bug must not escape as a crash
            return False, f"apprise raised {exc.__class__.__name__}: {exc}"
        finally:
            worker.running_since = None

    # -- on the event loop

    async def send(self, title: str, body: str, attach: str | None = None) -> DeliveryResult:
        """Deliver one message; never raises (a cancelled caller still gets CancelledError).
        ``attach``: a file to attach, where the plugin supports attachments."""
        started = time.monotonic()
        try:
            ok, reason = await self._send(title, body, attach)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ok, reason = False, f"internal error {exc.__class__.__name__}: {exc}"
        elapsed = time.monotonic() - started
        error = None if ok else _one_line(scrub(reason or "delivery failed", self._secrets))
        return DeliveryResult(ok, error, elapsed)

    async def _send(self, title: str, body: str, attach: str | None = None) -> tuple[bool, str | None]:
        if self._closed:
            return False, "sender closed"
        worker = self._worker
        if worker.client is None:
            return False, self.problem
        future = worker.executor.submit(self._deliver, worker, title, body, attach)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            future.cancel()  # when still queued behind a hung send, it never runs
            self._replace_if_hung(worker)
            return False, f"timed out after {_fmt(self.timeout)}s"

    def _replace_if_hung(self, worker: _Worker) -> None:
        """A thread blocked in apprise for most of the budget is left to finish alone: the channel
        gets a new thread and apprise object (unless MAX_ABANDONED are still hung)."""
        since = worker.running_since
        if worker is not self._worker or since is None or time.monotonic() - since < self.timeout * 0.9:
            return
        self._abandoned = [f for f in self._abandoned if not f.done()]
        if len(self._abandoned) >= MAX_ABANDONED:
            return
        # done once the hung thread gets to it, i.e. once the hung send is over
        self._abandoned.append(worker.executor.submit(_nothing))
        worker.executor.shutdown(wait=False)
        log.warning("channel=%s send hung past %.0fs; continuing on a new thread", self.name, self.timeout)
        self._worker = _Worker(self.name, self._build())

    @property
    def takes_attachments(self) -> bool:
        """apprise's plugin for this URL can send attachments (mail, Signal, ...)."""
        client = self._worker.client
        return client is not None and all(getattr(p, "attachment_support", False) for p in client)

    @property
    def hung_threads(self) -> int:
        """Threads abandoned to a hung send that are still running."""
        return sum(1 for f in self._abandoned if not f.done())

    def close(self) -> None:
        """Stop accepting sends; queued ones are cancelled, a hung thread is not waited for."""
        self._closed = True
        self._worker.executor.shutdown(wait=False, cancel_futures=True)


def _nothing() -> None:
    return None


def make_senders(channels: Sequence[Channel], timeout: float = 30.0) -> dict[str, ChannelSender]:
    """One sender per channel, by name. An URL apprise refuses still gets a sender, whose sends
    fail with ``problem`` as the reason."""
    return {c.name: ChannelSender(c, timeout) for c in channels}
