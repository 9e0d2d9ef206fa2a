"""Log lines: one per event, ``key=value`` fields in the message (``incident=12 target=pve1``).

- ``text``: ``TIME LEVEL LOGGER: message`` as written;
- ``json``: one object a line, with ``level``, ``logger``, ``msg`` and every ``key=value`` of the
  message parsed out as its own key (numbers as numbers), for Loki/Elastic without a grok pattern.

Under journald (``$JOURNAL_STREAM`` names our stderr) no timestamp is written, journald adds its
own, and each line starts with its syslog priority (``<3>``), so ``journalctl -p err`` works.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

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
        if record.exc_info:
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
