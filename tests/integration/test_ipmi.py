"""The ``ipmi`` probe: pure parsers and the SEL classifier, the incremental SEL walk against a fake
SEL, and the real thing against OpenIPMI's ``ipmi_sim`` on a free loopback port (see
``tests/peers/ipmi/README.md``).

Every wait on the simulator is a poll with a deadline; nothing sleeps blindly. Each simulator is
stopped by PID in a ``finally``. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from watchtower.config import IpmiSpec
from watchtower.probes import Failure, ProbeContext, ProbeResult, SensorReading, ipmi
from watchtower.probes.ipmi import (
    CRITICAL,
    INFO,
    WARNING,
    SelCursor,
    SelRecord,
    SelWalk,
    classify_sel_event,
    decode_get_sel_entry,
    describe_sel_event,
    discrete_state_severity,
    is_auth_caps_response,
    parse_exec_output,
    parse_sdr_line,
    sel_entry,
    sel_summary,
    sensors_summary,
    threshold_state,
)

PEERS = Path(__file__).resolve().parents[1] / "peers" / "ipmi"
IPMI_SIM, IPMITOOL, SDRCOMP = (shutil.which(n) for n in ("ipmi_sim", "ipmitool", "sdrcomp"))
needs_ipmitool = pytest.mark.skipif(IPMITOOL is None, reason="ipmitool not installed (apt install ipmitool)")
needs_sim = pytest.mark.skipif(
    None in (IPMI_SIM, IPMITOOL, SDRCOMP),
    reason="needs ipmi_sim + sdrcomp (apt install openipmi) and ipmitool (apt install ipmitool)",
)
PASSWORD = "wtpass1"
TIMEOUT = 5.0  # the ipmi kind's timeout floor in the config

# --------------------------------------------------------------------------- classifier (pure)

_PSU, _TEMP, _FAN, _CPU, _MEM, _WD2 = 0x08, 0x01, 0x04, 0x07, 0x0C, 0x23
_THR, _SPEC = 0x01, 0x6F


@pytest.mark.parametrize(
    ("sensor_type", "event_type", "offset", "deasserted", "expected"),
    [
        (_PSU, _SPEC, 1, False, CRITICAL),  # power supply failure detected
        (_PSU, _SPEC, 3, False, CRITICAL),  # power supply AC lost
        (0x09, _SPEC, 4, False, CRITICAL),  # power unit AC lost
        (_MEM, _SPEC, 1, False, CRITICAL),  # uncorrectable ECC
        (_MEM, _SPEC, 0, False, WARNING),  # correctable ECC
        (_CPU, _SPEC, 0, False, CRITICAL),  # IERR
        (_CPU, _SPEC, 1, False, CRITICAL),  # thermal trip
        (_CPU, _SPEC, 7, False, INFO),  # processor presence detected
        (_TEMP, _THR, 9, False, CRITICAL),  # upper critical going high
        (_TEMP, _THR, 11, False, CRITICAL),  # upper non-recoverable going high
        (_TEMP, _THR, 7, False, WARNING),  # upper non-critical going high
        (0x02, _THR, 2, False, CRITICAL),  # voltage lower critical going low
        (0x02, _THR, 4, False, CRITICAL),  # voltage lower non-recoverable going low
        (_FAN, _THR, 2, False, CRITICAL),  # fan lower critical going low
        (_FAN, _THR, 0, False, WARNING),  # fan lower non-critical going low
        (_FAN, _THR, 3, False, INFO),  # lower critical going high: back above the threshold
        (_TEMP, _THR, 9, True, INFO),  # deasserted: back to normal
        (_WD2, _SPEC, 0, False, CRITICAL),  # watchdog timer expired
        (_WD2, _SPEC, 1, False, CRITICAL),  # watchdog hard reset
        (_WD2, _SPEC, 8, False, WARNING),  # watchdog pre-timeout interrupt
        (0x20, _SPEC, 1, False, CRITICAL),  # OS run-time critical stop (panic / BSOD)
        (0x0D, _SPEC, 1, False, CRITICAL),  # drive fault
        (0x0D, _SPEC, 2, False, WARNING),  # drive predictive failure
        (0x0B, 0x0B, 1, False, WARNING),  # redundancy lost (generic 0x0B)
        (0x0B, 0x0B, 5, False, CRITICAL),  # non-redundant: insufficient resources
        (0x0B, 0x07, 2, False, CRITICAL),  # severity: transition to critical
        (0x10, _SPEC, 2, False, INFO),  # log area reset/cleared
        (0x10, _SPEC, 4, False, WARNING),  # log full
        (_PSU, _SPEC, 0, True, WARNING),  # PSU presence deasserted: a PSU went away
        (0x0B, 0x0B, 0, True, WARNING),  # "fully redundant" deasserted
        (_PSU, 0x70, 1, False, INFO),  # OEM event type
        (0xC0, _SPEC, 1, False, INFO),  # OEM sensor type
        (_PSU, _SPEC, 15, False, INFO),  # offset beyond the table
        (0x14, _SPEC, 0, False, INFO),  # power button pressed
    ],
)
def test_classify_sel_event(
    sensor_type: int, event_type: int, offset: int, deasserted: bool, expected: str
) -> None:
    assert classify_sel_event(sensor_type, event_type, offset, deasserted) == expected


def test_describe_sel_event() -> None:
    assert describe_sel_event(_PSU, _SPEC, 1) == "Failure detected"
    assert describe_sel_event(_TEMP, _THR, 9) == "Upper Critical going high"
    assert describe_sel_event(0x0F, _SPEC, 0, 2) == "System Firmware Error: No usable system memory"
    assert describe_sel_event(0x0F, _SPEC, 0, 0xEE) == "System Firmware Error"
    assert describe_sel_event(_PSU, 0x71, 3) == "OEM event type 0x71 offset 3"
    assert describe_sel_event(0xC5, _SPEC, 3) == "event type 0x6f offset 3"


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ("Presence detected", INFO),
        ("Presence detected, Failure detected", CRITICAL),
        ("Presence detected, Predictive failure", WARNING),  # not "failure" -> critical
        ("Drive Present, In Failed Array", CRITICAL),
        ("Drive Present, In Critical Array", WARNING),
        ("Fully Redundant", INFO),
        ("Redundancy Lost", WARNING),
        ("AC out-of-range, but present", WARNING),
        ("Transition to OK", INFO),
        ("Uncorrectable ECC", CRITICAL),
        ("", INFO),
        ("totally unheard-of state", INFO),
    ],
)
def test_discrete_state_severity(states: str, expected: str) -> None:
    assert discrete_state_severity(states) == expected


@pytest.mark.parametrize(
    ("status", "state"),
    [("ok", "ok"), ("nc", WARNING), ("unc", WARNING), ("lnc", WARNING), ("cr", CRITICAL), ("ucr", CRITICAL),
     ("lcr", CRITICAL), ("nr", CRITICAL), ("unr", CRITICAL), ("lnr", CRITICAL), ("ns", "unknown"),
     ("na", "unknown"), ("??", "unknown")],
)  # fmt: skip
def test_threshold_state(status: str, state: str) -> None:
    assert threshold_state(status) == state


# --------------------------------------------------------------------------- parsers (pure)


_S = SensorReading


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("CPU Temp    | 01h | ucr |  7.1 | 90 degrees C", (1, _S("CPU Temp", 90.0, "degrees C", CRITICAL))),
        ("System Fan 1     | 03h | ok  | 29.1 | 5000 RPM", (3, _S("System Fan 1", 5000.0, "RPM", "ok"))),
        ("12V              | 30h | lnc |  7.1 | 11.40 Volts", (0x30, _S("12V", 11.4, "Volts", WARNING))),
        ("Inlet Temp  | 04h | ok  | 64.1 | -5 degrees C", (4, _S("Inlet Temp", -5.0, "degrees C", "ok"))),
        ("CPU2 Temp        | 0Eh | ns  |  3.2 | No Reading", (0x0E, _S("CPU2 Temp", None, "", "unknown"))),
        ("Fan 6            | 35h | ok  | 29.6 | Disabled", (0x35, _S("Fan 6", None, "", "unknown"))),
        ("PSU1 Status      | 02h | ok  | 10.1 | Presence detected", (2, _S("PSU1 Status", None, "", "ok"))),
        ("PSU1 Status      | 02h | ok  | 10.1 | Presence detected, Failure detected",
         (2, _S("PSU1 Status", None, "", CRITICAL))),
        ("Drive 3          | 63h | ok  |  4.3 | Drive Present, In Critical Array",
         (0x63, _S("Drive 3", None, "", WARNING))),
        ("Watchdog         | 71h | ok  |  7.1 | 0x00", (0x71, _S("Watchdog", None, "", "ok"))),
        ("Intrusion        | 73h | ok  |  7.1 | ", (0x73, _S("Intrusion", None, "", "ok"))),
        ("f\x01F\x7f         | 05h | ok  |  7.1 | 3 RPM", (5, _S("f?F?", 3.0, "RPM", "ok"))),
        ("", None),
        ("CPU Temp | 90 degrees C | cr", None),  # `sdr list` shape, not `sdr elist`
        ("CPU Temp | zzh | ok | 7.1 | 90 degrees C", None),
        (" | 01h | ok | 7.1 | 90 degrees C", None),
        ("a | b | c | d | e | f", None),
        ("Chassis Power is on", None),
    ],
)  # fmt: skip
def test_parse_sdr_line(line: str, expected: tuple[int, SensorReading] | None) -> None:
    assert parse_sdr_line(line) == expected


# real `ipmitool exec` output against ipmi_sim (trailing blanks as ipmitool prints them), plus junk
PHASE1_SAMPLE = "\n".join(
    [
        "Chassis Power is on",
        "SEL Information",
        "Version          : 1.5 (v1.5, v2 compliant)",
        "Entries          : 31",
        "Free Space       : 15504 bytes ",
        "Percent Used     : 3%",
        "Last Add Time    : 11/22/26 02:51:57 UTC",
        "Last Del Time    : 11/22/26 02:51:43 UTC",
        "Overflow         : false",
        "Supported Cmds   : 'Delete' 'Reserve' ",
        "11/22/26 03:06:42 UTC",
        "CPU Temp         | 01h | ucr |  7.1 | 90 degrees C",
        "PSU1 Status      | 02h | ok  | 10.1 | Presence detected, Failure detected",
        "System Fan 1     | 03h | ok  | 29.1 | 5000 RPM",
        "this line is nonsense",
        " ff ff 24 00 02 cd 58 02 6b 20 00 04 01 01 01 57",
        " 5a 55",
        "",
    ]
)


def test_parse_exec_output_all_sections() -> None:
    out = parse_exec_output(PHASE1_SAMPLE)
    assert out.power is True
    assert out.sel_entries == 31 and out.sel_overflow is False
    assert [n for n, _ in out.sdr] == [1, 2, 3] and out.sdr_seen
    assert [r.state for _, r in out.sdr] == [CRITICAL, CRITICAL, "ok"]
    assert out.junk == ["this line is nonsense"]
    assert out.sel_time == int(dt.datetime(2026, 11, 22, 3, 6, 42, tzinfo=dt.UTC).timestamp())
    (record,) = out.records()
    assert (record.record_id, record.next_id) == (0x24, 0xFFFF)
    assert (record.sensor_type, record.sensor_number, record.event_type, record.offset) == (1, 1, 1, 7)
    assert record.severity == WARNING and not record.deasserted
    assert record.timestamp == 0x6B0258CD


def test_parse_exec_output_power_off_and_garbage() -> None:
    assert parse_exec_output("Chassis Power is off\n").power is False
    out = parse_exec_output("Chassis Power is maybe\n\x00\x01garbage\nEntries : 5\n")
    assert out.power is None and out.sel_entries is None and len(out.junk) == 3
    assert parse_exec_output("SEL Information\nEntries : many\nOverflow : true\n").sel_entries is None
    assert parse_exec_output("SEL Information\nOverflow : true\n").sel_overflow is True
    bad = parse_exec_output(" ff ff 24 00\n")  # a truncated raw answer
    with pytest.raises(ValueError, match="multiple of 18"):
        bad.records()
    with pytest.raises(ValueError, match="expected 18"):
        decode_get_sel_entry(b"\x00" * 17)


def test_sel_entry_text_and_oem() -> None:
    psu = _record(7, _PSU, 2, _SPEC, 1)
    entry = sel_entry(psu, {2: "PSU1 Status"})
    assert entry.text == "Power Supply PSU1 Status: Failure detected"
    assert (entry.record_id, entry.severity, entry.timestamp) == ("0007", CRITICAL, "2026-11-22 03:00:07")
    assert sel_entry(psu, {}).text == "Power Supply #0x02: Failure detected"
    back = sel_entry(_record(8, _TEMP, 1, _THR, 9, deasserted=True), {1: "CPU Temp"})
    assert (
        back.text == "Temperature CPU Temp: Upper Critical going high (deasserted)" and back.severity == INFO
    )
    oem = SelRecord(9, 0xFFFF, bytes([9, 0, 0xE0, *range(13)]))
    assert sel_entry(oem, {}).severity == INFO and sel_entry(oem, {}).text.startswith("OEM record type 0xe0")
    assert sel_entry(_record(10, _PSU, 2, _SPEC, 1, ts=400), {}).timestamp == "pre-init +400s"


def test_summaries() -> None:
    ok = SensorReading("A", 1.0, "RPM", "ok")
    hot = SensorReading("CPU Temp", 90.0, "degrees C", CRITICAL)
    fan = SensorReading("Fan", 700.0, "RPM", WARNING)
    gone = SensorReading("CPU2", None, "", "unknown")
    assert sensors_summary([ok, ok, gone]) == "2 sensors ok"
    assert (
        sensors_summary([ok, hot, fan])
        == "3 sensors, 1 critical: CPU Temp 90 degrees C, 1 warning: Fan 700 RPM"
    )
    psu = sel_entry(_record(7, _PSU, 2, _SPEC, 1), {2: "PS1"})
    info = sel_entry(_record(8, 0x14, 9, _SPEC, 0), {})
    assert sel_summary([info, psu]) == "2 new SEL (1 critical: Power Supply PS1: Failure detected)"
    assert sel_summary([info]) == "1 new SEL"


def test_auth_caps_response_recognised() -> None:
    real = bytes.fromhex("0600ff0700000000000000000010811c6320003800019606030000000008")
    assert is_auth_caps_response(real)
    assert not is_auth_caps_response(b"")
    assert not is_auth_caps_response(os.urandom(64).replace(b"\x06", b"\x07", 1))
    assert not is_auth_caps_response(bytes.fromhex("0600ff0600000011be4001001000"))  # an ASF pong


# --------------------------------------------------------------------------- the SEL walk (pure, fake SEL)

_TS = int(dt.datetime(2026, 11, 22, 3, 0, 7, tzinfo=dt.UTC).timestamp())


def _record(
    rid: int, sensor_type: int, number: int, event_type: int, offset: int, *, deasserted: bool = False,
    ts: int = _TS, next_id: int = 0xFFFF, salt: int = 0,
) -> SelRecord:  # fmt: skip
    raw = bytes(
        [rid & 0xFF, rid >> 8, 0x02, *ts.to_bytes(4, "little"), 0x20, 0x00, 0x04, sensor_type, number,
         (0x80 if deasserted else 0) | event_type, offset, 0xFF, salt]
    )  # fmt: skip
    return SelRecord(rid, next_id, raw)


class FakeSel:
    """A SEL as a BMC keeps it: ordered records, each answer carrying the next record's id."""

    def __init__(
        self, ids: list[int], critical: frozenset[int] | set[int] = frozenset(), salt: int = 0
    ) -> None:
        self.ids = list(ids)
        self.critical = critical
        self.salt = salt
        self.requests: list[list[int]] = []

    def record(self, rid: int) -> SelRecord:
        pos = self.ids.index(rid)
        nxt = self.ids[pos + 1] if pos + 1 < len(self.ids) else 0xFFFF
        if rid in self.critical:
            return _record(rid, _PSU, 2, _SPEC, 1, next_id=nxt, salt=self.salt)
        return _record(rid, 0x14, 9, _SPEC, 0, next_id=nxt, salt=self.salt)  # a button press: info

    @property
    def last(self) -> SelRecord | None:
        return self.record(self.ids[-1]) if self.ids else None

    def fetch(self, ids: list[int]) -> list[SelRecord]:
        self.requests.append(ids)
        return [self.record(i) for i in ids if i in self.ids]


def _walk(sel: FakeSel, cursor: SelCursor | None, initialized: bool = True) -> SelWalk:
    walk = SelWalk(cursor, initialized, sel.last, len(sel.ids))
    for _ in range(10):
        ids = walk.request()
        if not ids:
            break
        walk.feed(sel.fetch(ids))
    assert walk.done
    return walk


def _cursor(sel: FakeSel, rid: int) -> SelCursor:
    return SelCursor.of(sel.record(rid))


def test_walk_first_look_reports_only_recent_critical() -> None:
    sel = FakeSel(list(range(1, 101)), critical={5, 90})
    walk = _walk(sel, None, initialized=False)
    assert walk.first and [r.record_id for r in walk.new] == list(range(81, 101))
    assert [r.record_id for r in walk.reported()] == [90]  # 5 is older than the 20-record window
    assert walk.next_cursor == _cursor(sel, 100)
    assert sel.requests == [list(range(81, 100))]  # one batch; 100 came with the first look


def test_walk_first_look_skips_old_critical_by_the_bmc_clock() -> None:
    day = 86400
    old, recent = _record(1, _PSU, 2, _SPEC, 1, ts=_TS - 2 * day), _record(2, _PSU, 2, _SPEC, 1, ts=_TS - 60)
    preinit = _record(3, _PSU, 2, _SPEC, 1, ts=4242)
    walk = SelWalk(None, False, preinit, 3, bmc_now=_TS)
    walk.feed([old, recent])
    assert [r.record_id for r in walk.reported()] == [2, 3]  # 2 days old: skipped; pre-init: undatable
    walk = SelWalk(None, False, preinit, 3, bmc_now=None)  # no BMC clock: report, do not hide
    walk.feed([old, recent])
    assert [r.record_id for r in walk.reported()] == [1, 2, 3]


def test_walk_nothing_new_costs_nothing() -> None:
    sel = FakeSel([1, 2, 3])
    walk = _walk(sel, _cursor(sel, 3))
    assert walk.new == [] and sel.requests == [] and not walk.reset


def test_walk_incremental_sequential() -> None:
    sel = FakeSel(list(range(1, 11)), critical={9})
    cursor = _cursor(sel, 7)
    walk = _walk(sel, cursor)
    assert [r.record_id for r in walk.reported()] == [8, 9, 10]
    assert sel.requests == [[7, 8, 9]]  # the cursor (verified) + the gap; 10 is known already
    assert not walk.reset and not walk.skipped and not walk.incomplete


def test_walk_wraps_after_0xfffe() -> None:
    sel = FakeSel([0xFFFC, 0xFFFD, 0xFFFE, 1, 2])
    walk = _walk(sel, _cursor(sel, 0xFFFD))
    assert [r.record_id for r in walk.new] == [0xFFFE, 1, 2]


def test_walk_clear_with_continuing_ids() -> None:
    """ipmi_sim style: after `sel clear` ids continue (cursor 5 gone, new record 6)."""
    before = FakeSel([1, 2, 3, 4, 5])
    after = FakeSel([6])
    walk = _walk(after, _cursor(before, 5))
    assert walk.reset and [r.record_id for r in walk.new] == [6]


def test_walk_clear_with_ids_restarting() -> None:
    before = FakeSel(list(range(1, 51)))
    after = FakeSel([1, 2, 3], critical={2})
    walk = _walk(after, _cursor(before, 50))
    assert walk.reset and [r.record_id for r in walk.new] == [1, 2, 3]
    assert walk.next_cursor == _cursor(after, 3)


def test_walk_clear_and_refill_to_the_same_id() -> None:
    before = FakeSel([1, 2, 3, 4], salt=1)
    after = FakeSel([1, 2, 3, 4], salt=2)  # same ids, different records
    walk = _walk(after, _cursor(before, 4))
    assert walk.reset and [r.record_id for r in walk.new] == [1, 2, 3, 4]


def test_walk_clear_then_refill_beyond_the_cursor() -> None:
    before = FakeSel([1, 2, 3, 4, 5], salt=1)
    after = FakeSel(list(range(1, 9)), salt=2)  # restarted at 1 and already past the old cursor 5
    walk = _walk(after, _cursor(before, 5))
    assert walk.reset and [r.record_id for r in walk.new] == list(range(1, 9))


def test_walk_follows_gappy_numbering() -> None:
    sel = FakeSel([10, 20, 30, 40, 50])  # a BMC numbering in steps of 10
    walk = _walk(sel, _cursor(sel, 20))
    assert [r.record_id for r in walk.new] == [30, 40, 50]
    assert not walk.incomplete and len(sel.requests) <= 3


def test_walk_caps_a_flood_and_counts_the_rest() -> None:
    sel = FakeSel(list(range(1, 201)))
    walk = _walk(sel, _cursor(sel, 100))
    assert [r.record_id for r in walk.new] == list(range(161, 201))
    assert walk.skipped == 60 and not walk.reset


def test_walk_empty_sel_and_back() -> None:
    before = FakeSel([1, 2])
    walk = _walk(FakeSel([]), _cursor(before, 2))
    assert walk.reset and walk.new == [] and walk.next_cursor is None
    walk = _walk(FakeSel([3], critical={3}), None, initialized=True)  # the SEL was empty last time
    assert [r.record_id for r in walk.reported()] == [3] and not walk.first


def test_walk_survives_records_that_cannot_be_read() -> None:
    sel = FakeSel(list(range(1, 11)))

    class Lossy(FakeSel):
        def fetch(self, ids: list[int]) -> list[SelRecord]:
            return [r for r in super().fetch(ids) if r.record_id != 9]

    lossy = Lossy(sel.ids)
    walk = _walk(lossy, _cursor(sel, 6))
    assert [r.record_id for r in walk.new] == [7, 8, 10] and walk.incomplete


# --------------------------------------------------------------------------- fake peers (no simulator)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Garbage(asyncio.DatagramProtocol):
    """Answers every datagram with random bytes (or nothing when ``silent``)."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        if not self.silent and self.transport is not None:
            self.transport.sendto(os.urandom(48), addr)


class Ticker:
    """A 10 ms ticker: the largest lateness of any tick says whether the event loop was blocked."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.max_lag = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.max_lag = max(self.max_lag, loop.time() - due)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _spec(port: int, **kw: Any) -> IpmiSpec:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "username": "wtadmin", "password": PASSWORD}
    values.update(kw)
    return IpmiSpec(**values)


async def test_ipmitool_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipmi, "IPMITOOL", "/nonexistent/ipmitool")
    result = await ipmi.probe(_spec(_free_port(socket.SOCK_DGRAM)), ProbeContext(timeout=TIMEOUT))
    assert (result.ok, result.failure) == (False, Failure.ERROR)
    assert result.detail == "ipmitool not installed: apt install ipmitool"


@needs_ipmitool
async def test_garbage_answers_are_a_protocol_failure() -> None:
    loop = asyncio.get_running_loop()
    garbage = _Garbage()
    transport, _ = await loop.create_datagram_endpoint(lambda: garbage, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        start = time.monotonic()
        result = await ipmi.probe(_spec(port), ProbeContext(timeout=TIMEOUT))
        elapsed = time.monotonic() - start
    finally:
        transport.close()
    assert garbage.received > 0
    assert (result.ok, result.failure, result.bmc) == (False, Failure.PROTOCOL, None)
    assert "answers, but not IPMI" in result.detail, result.detail
    assert elapsed < TIMEOUT + 0.5


@needs_ipmitool
async def test_hung_bmc_is_killed_at_the_deadline_without_blocking_the_loop() -> None:
    """A BMC that swallows packets, with a timeout shorter than ipmitool's own retries: the
    subprocess is killed at the deadline, and the loop kept ticking meanwhile."""
    loop = asyncio.get_running_loop()
    silent = _Garbage(silent=True)
    transport, _ = await loop.create_datagram_endpoint(lambda: silent, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        async with Ticker() as ticker:
            start = time.monotonic()
            result = await ipmi.probe(_spec(port), ProbeContext(timeout=1.0))
            elapsed = time.monotonic() - start
    finally:
        transport.close()
    assert (result.ok, result.failure) == (False, Failure.TIMEOUT), result.detail
    assert "ipmitool killed" in result.detail
    assert 0.7 < elapsed < 1.0 + 0.3
    assert ticker.ticks > 30 and ticker.max_lag < 0.1, ticker.max_lag


async def test_slow_bmc_power_answer_survives_the_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BMC that answers power, then stalls in its SDR walk past the deadline: the process is
    killed, and the power answer it already printed still counts (ok, with a note)."""
    fake = tmp_path / "ipmitool"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Chassis Power is on'\n"
        "echo 'SEL Information'\n"
        "echo 'Entries          : 0'\n"
        "echo 'CPU Temp         | 01h | ok  |  7.1 | 40 degrees C'\n"
        "exec /bin/sleep 30\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(ipmi, "IPMITOOL", str(fake))
    start = time.monotonic()
    result = await ipmi.probe(_spec(_free_port(socket.SOCK_DGRAM)), ProbeContext(timeout=1.0))
    elapsed = time.monotonic() - start
    assert result.ok and result.bmc is not None and result.bmc.power_on is True, result.detail
    assert result.detail == "chassis on, sensors not read (deadline)"
    assert result.bmc.sensors == ()  # a walk cut short is not presented as the sensor list
    assert elapsed < 1.0 + 0.3


# --------------------------------------------------------------------------- the simulator


@dataclass
class Sim:
    """One ipmi_sim instance on free loopback ports, state under ``root``."""

    root: Path
    port: int
    console_port: int
    proc: subprocess.Popen[bytes]

    def spec(self, **kw: Any) -> IpmiSpec:
        return _spec(self.port, **kw)

    def power(self, on: bool) -> None:
        """Switch the simulated server from the BMC side (what chassis_control.sh reads)."""
        (self.root / "power-0x20").write_text("1\n" if on else "0\n")

    def console(self, *commands: str) -> str:
        """Run commands on the simulator console; returns what it printed. Waits for each prompt."""
        out = b""
        with socket.create_connection(("127.0.0.1", self.console_port), timeout=5) as conn:
            out += _read_until_prompt(conn)
            for command in commands:
                conn.sendall(command.encode() + b"\n")
                out += _read_until_prompt(conn)
        return out.decode("latin-1")

    def ipmitool(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port)]
        argv += ["-U", "wtadmin", "-E", "-N", "1", "-R", "1", *args]
        env = {**os.environ, "IPMI_PASSWORD": PASSWORD}
        return subprocess.run(argv, capture_output=True, text=True, timeout=15, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _read_until_prompt(conn: socket.socket, deadline_s: float = 5.0) -> bytes:
    deadline = time.monotonic() + deadline_s
    buf = b""
    while not buf.endswith(b"> "):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no console prompt, got {buf!r}")
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _bmc_answers(port: int) -> bool:
    request = bytes.fromhex("0600ff07000000000000000000092018c88100388e04b5")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(request, ("127.0.0.1", port))
            return is_auth_caps_response(s.recv(512))
        except OSError:
            return False


def _console_up(port: int) -> bool:
    # read the greeting before closing: ipmi_sim writes it to the socket, and a client that is
    # already gone means EPIPE for the simulator
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            _read_until_prompt(conn, 1.0)
            return True
    except OSError:
        return False


def _start_sim(root: Path) -> Sim:
    state = root / "state" / "ipmi_sim" / "wtbmc"
    state.mkdir(parents=True)
    subprocess.run([SDRCOMP or "sdrcomp", "-o", str(state / "sdr.20.main"), str(PEERS / "wtbmc.sdrs")],
                   check=True, capture_output=True, timeout=10)  # fmt: skip
    chassis = root / "chassis_control.sh"
    shutil.copy(PEERS / "chassis_control.sh", chassis)
    chassis.chmod(0o755)
    (root / "power-0x20").write_text("1\n")
    problems: list[str] = []
    for _attempt in range(3):  # a free port can be taken between probing and binding: retry
        port, console = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
        conf = (PEERS / "lan.conf.in").read_text()
        conf = conf.replace("@PORT@", str(port)).replace("@CONSOLE_PORT@", str(console))
        (root / "lan.conf").write_text(conf.replace("@CHASSIS@", str(chassis)))
        sim_log = (root / "ipmi_sim.log").open("ab")
        proc = subprocess.Popen(
            [IPMI_SIM or "ipmi_sim", "-c", str(root / "lan.conf"), "-f", str(PEERS / "wtbmc.emu"),
             "-s", str(root / "state"), "-n"],
            cwd=root, stdin=subprocess.DEVNULL, stdout=sim_log, stderr=sim_log,
            # keep SIGPIPE ignored (as in Python): ipmi_sim does not ignore it itself, and a console
            # client that disconnects early would otherwise kill the simulator (exit -13)
            restore_signals=False,
        )  # fmt: skip
        sim_log.close()
        sim = Sim(root, port, console, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _bmc_answers(port) and _console_up(console):
                break
        if proc.poll() is None and _bmc_answers(port):
            # the SEL clock starts at host uptime after every start; make timestamps real
            assert sim.ipmitool("sel", "time", "set", "now").returncode == 0
            return sim
        sim.stop()
        problems.append(f"ports {port}/{console}: exit code {proc.returncode}")
    log = (root / "ipmi_sim.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"ipmi_sim did not start ({'; '.join(problems)}): {log}")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    if None in (IPMI_SIM, IPMITOOL, SDRCOMP):
        pytest.skip("needs ipmi_sim + sdrcomp (apt install openipmi) and ipmitool (apt install ipmitool)")
    started = _start_sim(tmp_path)
    try:
        yield started
    finally:
        started.stop()


PSU_FAILURE = "sel_add 0x20 0x02 0 0 0 0 0x20 0x00 0x04 0x08 0x02 0x6f 0x01 0xff 0xff"
CORRECTABLE_ECC = "sel_add 0x20 0x02 0 0 0 0 0x20 0x00 0x04 0x0c 0x07 0x6f 0x00 0xff 0xff"
BUTTON_PRESSED = "sel_add 0x20 0x02 0 0 0 0 0x20 0x00 0x04 0x14 0x09 0x6f 0x00 0xff 0xff"
TEMP_CRITICAL = "sensor_set_value 0x20 0 1 90 1"  # CPU Temp 90 > UC 85 (and > UNC 75)


async def _probe(sim: Sim, ctx: ProbeContext, **kw: Any) -> ProbeResult:
    result = await ipmi.probe(sim.spec(**kw), ctx)
    assert isinstance(result, ProbeResult)
    assert PASSWORD not in result.detail
    return result


@needs_sim
async def test_power_on_is_ok_with_sensors(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    result = await _probe(sim, ctx)
    assert result.ok and result.failure is None, result.detail
    assert result.detail.startswith("chassis on") and "3 sensors ok" in result.detail, result.detail
    assert result.latency is not None and result.latency < 1.0
    assert result.bmc is not None and result.bmc.power_on is True and result.bmc.health == "OK"
    by_name = {s.name: s for s in result.bmc.sensors}
    assert by_name["CPU Temp"] == SensorReading("CPU Temp", 40.0, "degrees C", "ok")
    assert by_name["System Fan 1"] == SensorReading("System Fan 1", 5000.0, "RPM", "ok")
    assert by_name["PSU1 Status"].state == "ok"
    # the SEL's only record at start ("PSU presence detected") is info: nothing on the first look
    assert result.bmc.new_events == ()


@needs_sim
async def test_power_off_from_the_bmc_side(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    assert (await _probe(sim, ctx)).ok
    sim.power(False)
    result = await _probe(sim, ctx)
    assert (result.ok, result.failure) == (False, Failure.CONTENT)
    assert result.detail.startswith("chassis power is off"), result.detail
    assert result.bmc is not None and result.bmc.power_on is False and result.bmc.sensors
    sim.power(True)
    assert (await _probe(sim, ctx)).ok


@needs_sim
async def test_power_off_explained_by_a_psu_failure(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    await _probe(sim, ctx)
    sim.console(PSU_FAILURE)
    sim.power(False)
    result = await _probe(sim, ctx)
    assert (result.ok, result.failure) == (False, Failure.CONTENT)
    assert result.detail.startswith(
        "chassis power is off, 1 new SEL (1 critical: Power Supply PSU1 Status"
    ), result.detail
    assert result.bmc is not None and [e.severity for e in result.bmc.new_events] == [CRITICAL]


@needs_sim
async def test_critical_sel_entry_reported_once(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    assert (await _probe(sim, ctx)).bmc.new_events == ()  # type: ignore[union-attr]
    assert "Added record" in sim.console(PSU_FAILURE)
    result = await _probe(sim, ctx)
    assert result.ok and result.bmc is not None
    (entry,) = result.bmc.new_events
    assert entry.severity == CRITICAL
    assert entry.text == "Power Supply PSU1 Status: Failure detected"
    assert entry.timestamp.startswith(time.strftime("%Y-", time.gmtime()))
    assert "1 new SEL (1 critical: Power Supply PSU1 Status: Failure detected)" in result.detail
    again = await _probe(sim, ctx)
    assert again.bmc is not None and again.bmc.new_events == () and "SEL" not in again.detail


@needs_sim
async def test_warning_and_info_entries_classified(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    await _probe(sim, ctx)
    sim.console(CORRECTABLE_ECC, BUTTON_PRESSED)
    result = await _probe(sim, ctx)
    assert result.bmc is not None
    got = [(e.text, e.severity) for e in result.bmc.new_events]
    assert got == [("Memory #0x07: Correctable ECC", WARNING), ("Button #0x09: Power Button pressed", INFO)]
    assert "2 new SEL (1 warning: Memory #0x07: Correctable ECC)" in result.detail


@needs_sim
async def test_first_look_shows_an_existing_fault_only(sim: Sim) -> None:
    sim.console(BUTTON_PRESSED, PSU_FAILURE, BUTTON_PRESSED)
    result = await _probe(sim, ProbeContext(timeout=TIMEOUT))
    assert result.bmc is not None
    assert [e.text for e in result.bmc.new_events] == ["Power Supply PSU1 Status: Failure detected"]
    assert "already in SEL: 1 critical: Power Supply PSU1 Status: Failure detected" in result.detail


@needs_sim
async def test_sel_clear_resets_the_cursor(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    await _probe(sim, ctx)
    sim.console(PSU_FAILURE)
    assert len((await _probe(sim, ctx)).bmc.new_events) == 1  # type: ignore[union-attr]
    assert sim.ipmitool("sel", "clear").returncode == 0
    deadline = time.monotonic() + 5  # "please allow a few seconds to erase"
    while "Entries          : 0" not in sim.ipmitool("sel", "info").stdout:
        assert time.monotonic() < deadline, "SEL not cleared"
    cleared = await _probe(sim, ctx)
    assert cleared.ok and cleared.bmc is not None and cleared.bmc.new_events == ()
    assert "SEL cleared" in cleared.detail
    sim.console(CORRECTABLE_ECC)
    after = await _probe(sim, ctx)
    assert after.bmc is not None and [e.severity for e in after.bmc.new_events] == [WARNING]
    assert (await _probe(sim, ctx)).bmc.new_events == ()  # type: ignore[union-attr]


@needs_sim
async def test_sensor_over_critical_threshold(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    await _probe(sim, ctx)
    sim.console(TEMP_CRITICAL, "sensor_set_value 0x20 0 3 15 1", "sensor_set_bit 0x20 0 2 1 1 1")
    result = await _probe(sim, ctx)
    assert result.ok and result.bmc is not None
    by_name = {s.name: s for s in result.bmc.sensors}
    assert by_name["CPU Temp"] == SensorReading("CPU Temp", 90.0, "degrees C", CRITICAL)
    assert by_name["System Fan 1"] == SensorReading("System Fan 1", 750.0, "RPM", CRITICAL)
    assert by_name["PSU1 Status"].state == CRITICAL  # discrete: ipmitool's column still says "ok"
    assert result.bmc.health == "Critical"
    assert "3 sensors, 3 critical: CPU Temp 90 degrees C +2 more" in result.detail
    # the simulator logged the crossings: graded from the record's codes, not from text
    texts = {(e.text, e.severity) for e in result.bmc.new_events}
    assert ("Temperature CPU Temp: Upper Critical going high", CRITICAL) in texts
    assert ("Temperature CPU Temp: Upper Non-critical going high", WARNING) in texts
    assert ("Fan System Fan 1: Lower Critical going low", CRITICAL) in texts


@needs_sim
async def test_sensors_every_nth_run(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    runs = [await _probe(sim, ctx, sensors_every=3) for _ in range(4)]
    assert [len(r.bmc.sensors) for r in runs if r.bmc] == [3, 0, 0, 3]
    assert all(r.ok and r.bmc and r.bmc.health == "OK" for r in runs)
    sim.power(False)  # a power-off run reads sensors even when not due
    off = await _probe(sim, ctx, sensors_every=3)
    assert off.bmc is not None and len(off.bmc.sensors) == 3


@needs_sim
async def test_ipmi_15_lan_interface(sim: Sim) -> None:
    result = await _probe(sim, ProbeContext(timeout=TIMEOUT), interface="lan")
    assert result.ok, result.detail


@needs_sim
async def test_password_travels_in_the_environment_not_argv(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[tuple[str, ...], dict[str, str]]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*argv: str, **kw: Any) -> asyncio.subprocess.Process:
        seen.append((argv, kw["env"]))
        return await real(*argv, **kw)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    assert (await _probe(sim, ProbeContext(timeout=TIMEOUT))).ok
    assert seen
    for argv, env in seen:
        assert not any(PASSWORD in arg for arg in argv)
        assert env["IPMI_PASSWORD"] == PASSWORD and "-E" in argv
        assert set(env) == {"PATH", "LC_ALL", "IPMI_PASSWORD"}


@needs_sim
async def test_wrong_password_is_a_fast_clear_error(sim: Sim) -> None:
    wrong = "not-the-pass-42"
    start = time.monotonic()
    result = await ipmi.probe(sim.spec(password=wrong), ProbeContext(timeout=TIMEOUT))
    elapsed = time.monotonic() - start
    assert (result.ok, result.failure, result.bmc) == (False, Failure.ERROR, None)
    assert result.detail == "authentication failed: wrong password"
    assert wrong not in result.detail and PASSWORD not in result.detail
    assert elapsed < 1.5, elapsed
    unknown = await ipmi.probe(sim.spec(username="nobody"), ProbeContext(timeout=TIMEOUT))
    assert (unknown.failure, unknown.detail) == (Failure.ERROR, "authentication failed: unknown user name")


@needs_sim
async def test_unsupported_cipher_suite_is_named(sim: Sim) -> None:
    result = await ipmi.probe(sim.spec(cipher_suite=17), ProbeContext(timeout=TIMEOUT))
    assert (result.failure, result.detail) == (Failure.ERROR, "the BMC refused cipher suite 17")


@needs_sim
async def test_bmc_killed_fails_within_timeout_without_blocking_the_loop(sim: Sim) -> None:
    ctx = ProbeContext(timeout=TIMEOUT)
    assert (await _probe(sim, ctx)).ok
    sim.stop()
    async with Ticker() as ticker:
        start = time.monotonic()
        result = await _probe(sim, ctx)
        elapsed = time.monotonic() - start
    assert not result.ok and result.bmc is None
    assert result.failure in (Failure.TIMEOUT, Failure.REFUSED, Failure.UNREACHABLE), result.detail
    assert elapsed < TIMEOUT + 0.5, elapsed
    assert ticker.ticks > 50 and ticker.max_lag < 0.1, ticker.max_lag
