"""Log lines: key=value fields, JSON lines with the fields parsed out, journald without timestamps."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from watchtower import logs
from watchtower.daemon import setup_logging


def record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("watchtower.monitor", level, __file__, 1, msg, args, None)


def test_fields_are_parsed_out() -> None:
    fields = logs.parse_fields(
        "incident id=12 change=opened: confirmed target=pve1 path='icmp 10.0.10.11' lag=0.25 ok=True"
    )
    assert fields == {
        "id": 12, "change": "opened", "target": "pve1", "path": "icmp 10.0.10.11", "lag": 0.25, "ok": "True",
    }  # fmt: skip
    assert logs.parse_fields("no fields here, a = b") == {}


def test_json_lines() -> None:
    fmt = logs.JsonFormatter(timestamps=True)
    doc = json.loads(fmt.format(record("incident=%d target=%s state=%s", 7, "nas1", "down")))
    assert doc["incident"] == 7 and doc["target"] == "nas1" and doc["state"] == "down"
    assert doc["level"] == "info" and doc["logger"] == "watchtower.monitor" and "ts" in doc
    assert doc["msg"] == "incident=7 target=nas1 state=down"
    # a field named like a reserved key does not overwrite it
    doc = json.loads(fmt.format(record("level=%s msg=%s", "x", "y")))
    assert doc["level"] == "info" and doc["field_level"] == "x" and doc["field_msg"] == "y"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed target=%s", "t", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    doc = json.loads(fmt.format(rec))
    assert "ValueError: boom" in doc["exc"] and doc["target"] == "t"


def test_journald_no_timestamps_and_priority(tmp_path: Path) -> None:
    text = logs.formatter("text", journald=True).format(record("target=%s down", "pve1", level=logging.ERROR))
    assert text == "<3>ERROR watchtower.monitor: target=pve1 down"
    plain = logs.formatter("text", journald=False).format(record("x=1"))
    assert plain[:4].isdigit() and plain.endswith("INFO watchtower.monitor: x=1")
    line = logs.formatter("json", journald=True).format(record("x=1"))
    assert line.startswith("<6>{") and "ts" not in json.loads(line[3:])

    with (tmp_path / "stream").open("w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.under_journald(env, f.fileno())
        assert not logs.under_journald({"JOURNAL_STREAM": "1:2"}, f.fileno())
        assert not logs.under_journald({}, f.fileno())


def test_setup_logging_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        logging.getLogger("watchtower.test").info("incident id=%d target=%s", 3, "dc1")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        doc = json.loads(line)
        assert doc["id"] == 3 and doc["target"] == "dc1"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_scrubber_masks_configured_secrets_in_every_spelling() -> None:
    import base64
    import logging

    from watchtower.logs import SecretScrubber

    scrubber = SecretScrubber()
    scrubber.set_secrets(
        ["json://127.0.0.1:8080/hook/Tok3nValue42", "mailto://mon:Pa%24sw0rd@mx.lab?to=a@b", "k3y"]
    )
    plain = base64.b64encode(b"\0mon\0Pa$sw0rd").decode()
    lines = {
        '"POST /hook/Tok3nValue42 HTTP/1.1" 200': '"POST /hook/*** HTTP/1.1" 200',
        "login Pa$sw0rd failed": "login *** failed",
        "login Pa%24sw0rd failed": "login *** failed",
        f"535 5.7.8 bad credentials {plain}": "535 5.7.8 bad credentials ***",
        f"> AUTH PLAIN {plain}": "> AUTH PLAIN ***",
        "GET http://x.lab/v1?api_key=abc123&x=1 failed": "GET http://x.lab/v1?api_key=***&x=*** failed",
        "target 127.0.0.1 down k3y": "target 127.0.0.1 down k3y",  # too short to mask, host kept
    }
    for raw, clean in lines.items():
        assert scrubber.scrub(raw) == clean, raw
    record = logging.LogRecord(
        "urllib3.connectionpool", logging.DEBUG, __file__, 1, '"%s /hook/%s"', ("POST", "Tok3nValue42"), None
    )
    assert scrubber.filter(record) and record.getMessage() == '"POST /hook/***"'
    scrubber.set_secrets(["second-secret-value"])  # a reload adds; the old ones stay masked
    assert scrubber.scrub("Tok3nValue42 second-secret-value") == "*** ***"
