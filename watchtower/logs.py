"""Log lines: one per event, ``key=value`` fields in the message (``incident=12 target=pve1``).

- ``text``: ``TIME LEVEL LOGGER: message`` as written;
- ``json``: one object a line, with ``level``, ``logger``, ``msg`` and every ``key=value`` of the
  message parsed out as its own key (numbers as numbers), for Loki/Elastic without a grok pattern.

Under journald (``$JOURNAL_STREAM`` names our stderr) no timestamp is written, journald adds its
own, and each line starts with its syslog priority (``<3>``), so ``journalctl -p err`` works.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

# key=value; the value quoted ('...' from %r, "...") or up to the next blank
_FIELD = re.compile(r"""(?<![\w.=])([a-z_][a-z0-9_]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s]+)""")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def under_journald(env: dict[str, str] | None = None, fd: int = 2) -> bool:
    """True when stderr is the journal stream systemd handed us (``JOURNAL_STREAM=DEV:INODE``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def parse_fields(message: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a log message, values unquoted, numbers as numbers."""
    out: dict[str, Any] = {}
    for key, raw in _FIELD.findall(message):
        value: Any
        if raw[:1] in "'\"" and len(raw) >= 2 and raw[-1] == raw[0]:
            value = raw[1:-1].replace("\\" + raw[0], raw[0])
        else:
            value = raw.rstrip(":,;")
            if _NUMBER.fullmatch(value):
                value = float(value) if "." in value else int(value)
        out.setdefault(key, value)
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, timestamps: bool = True, priority_prefix: bool = False):
        super().__init__()
        self.timestamps = timestamps
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, Any] = {}
        if self.timestamps:
            doc["ts"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z")
        doc.update(level=record.levelname.lower(), logger=record.name, msg=message)
        for key, value in parse_fields(message).items():
            doc[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_text:
            doc["exc"] = record.exc_text
        elif record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        line = json.dumps(doc, ensure_ascii=False, default=str)
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.priority_prefix else line


class TextFormatter(logging.Formatter):
    def __init__(self, timestamps: bool = True, priority_prefix: bool = False):
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(("%(asctime)s " + fmt) if timestamps else fmt, datefmt="%Y-%m-%dT%H:%M:%S%z")
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.priority_prefix:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            line = prefix + line.replace("\n", "\n" + prefix)  # a traceback keeps its priority
        return line


def formatter(log_format: str = "text", journald: bool | None = None) -> logging.Formatter:
    journald = under_journald() if journald is None else journald
    cls = JsonFormatter if log_format == "json" else TextFormatter
    return cls(timestamps=not journald, priority_prefix=journald)


# --------------------------------------------------------------------------- secrets


# Libraries that log request lines (with the URL's path and query) at DEBUG: urllib3 under
# apprise's requests ("POST /hook/TOKEN HTTP/1.1"). Their DEBUG is of no use to an operator.
QUIET_LOGGERS = ("urllib3", "requests", "httpx", "httpcore", "aiohttp.client", "charset_normalizer")

_QUERY_VALUE = re.compile(r"(?<=[?&])([A-Za-z0-9_.\-\[\]]{1,64}=)[^&\s\"'#<>]+")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{8,}={0,2}(?![A-Za-z0-9+/=])")
_AUTH_LINE = re.compile(r"(AUTH\s+(?:PLAIN|LOGIN|CRAM-MD5|XOAUTH2)\s+)\S+", re.IGNORECASE)
_BENIGN = frozenset(
    {"http", "https", "yes", "no", "true", "false", "json", "form", "text", "html", "hook", "hooks",
     "api", "webhook", "webhooks", "send", "post", "none", "default", "markdown", "bot", "v1", "v2"}
)  # fmt: skip
MASK = "***"


def scrub_query(text: str) -> str:
    """Every URL query value masked (``?api_key=***``): a query is where many APIs put tokens."""
    return _QUERY_VALUE.sub(lambda m: m.group(1) + MASK, text) if ("?" in text or "&" in text) else text


def mask_encoded(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every base64 run that decodes to something holding one of ``secrets``
    masked (an SMTP server echoing ``AUTH PLAIN`` data in its error reply), and the data of an
    ``AUTH PLAIN|LOGIN ...`` line cut."""
    raw = tuple(s.encode() for s in secrets if len(s) >= 4)
    if raw and _BASE64.search(text):

        def decoded(m: re.Match[str]) -> str:
            token = m.group()
            try:
                data = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
            except (binascii.Error, ValueError):
                return token
            return MASK if any(r in data for r in raw) else token

        text = _BASE64.sub(decoded, text)
    return _AUTH_LINE.sub(lambda m: m.group(1) + MASK, text)


def secret_forms(value: str) -> set[str]:
    """The spellings of a configured secret that may show up in a text: as written, URL-encoded
    and decoded; for a URL also its user, password, path segments (webhook tokens, chat ids) and
    query values. A host name is not a secret (and masking it would mask every line about it)."""
    pieces = {value}
    at, userinfo = "", ""
    if "://" in value:
        parts = urlsplit(value)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if at:
            pieces.update({userinfo, *userinfo.split(":", 1)})
        if "." not in hostport and not hostport.startswith("["):
            # Not a host name: apprise puts tokens there (discord://ID/TOKEN, tgram://BOT:TOKEN/).
            pieces.update({hostport, *hostport.split(":", 1)})
        pieces.update(s for s in parts.path.split("/") if s)
        for pair in parts.query.split("&"):
            _, _, v = pair.partition("=")
            if not re.fullmatch(r"[^@\s]+@[^@\s]+", unquote(v)):  # a mail address is no secret
                pieces.add(v)
        if parts.fragment:
            pieces.add(parts.fragment)
    out: set[str] = set()
    for piece in pieces:
        strong = piece == value or (at and piece == userinfo.partition(":")[2])
        for form in (piece, unquote(piece), quote(unquote(piece), safe="")):
            if len(form) < 4 or form.lower() in _BENIGN or (form.isdigit() and len(form) < 6):
                continue
            if not strong and not _looks_random(form):
                continue  # "ping", "jsonrpc", "webhooks": words in a URL's path are not its secret
            out.add(form)
    return out


def _looks_random(piece: str) -> bool:
    """A token, key or id rather than a word: long, or mixing digits or capitals into letters."""
    return len(piece) >= 16 or (len(piece) >= 6 and (any(c.isdigit() for c in piece) or not piece.islower()))


class SecretScrubber(logging.Filter):
    """On the root handler: every record leaves with the config's secrets masked (in any spelling
    from :func:`secret_forms`, and base64-encoded inside a text, as an SMTP server echoing an
    ``AUTH PLAIN`` would show them), URL query values masked, and ``AUTH PLAIN <data>`` cut."""

    def __init__(self) -> None:
        super().__init__()
        self._pattern: re.Pattern[str] | None = None
        self._forms: set[str] = set()

    def set_secrets(self, values: Iterable[str]) -> None:
        """The secrets to mask; a reload adds the new ones (lines about the old may still come)."""
        forms = self._forms | {f for v in values if v for f in secret_forms(v)}
        self._forms = forms
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) if ordered else None

    def scrub(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return scrub_query(mask_encoded(text, self._forms))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


SCRUBBER = SecretScrubber()
