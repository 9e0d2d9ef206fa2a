"""``ipmi``: chassis power, new System Event Log records and sensor states from a BMC over IPMI-over-LAN.

Client: ``ipmitool`` subprocesses, not pyghmi in a thread
--------------------------------------------------------
* A subprocess can be killed. A hung or half-dead BMC costs at most the deadline: on expiry the
  process gets SIGKILL and the event loop never waited on anything but pipes. A pyghmi call runs in
  a thread that cannot be cancelled: after a BMC outage a call blocks ~29 s and its ``Command``
  object stays dead, and a second ``Command()`` with str credentials hangs forever (see
  ``notes/lab-snmp-ipmi.md`` section 4.5). An abandoned thread keeps running and holding a pool slot.
* No shared state between probes: every run is a fresh session, so one BMC's stale session can
  never poison the next run or another BMC.
* ``ipmitool`` is a plain Debian package (``apt install ipmitool``). pyghmi is a PyPI dependency
  with the bugs above.
* Cost. Each ipmitool process opens its own RMCP+ session and burns ~28-35 ms of CPU, about
  20 ms of it parsing the 4.7 MB IANA enterprise-numbers file at every start (Debian's build
  always loads it). So a run does all its reads in **one** process and session:
  ``ipmitool exec /dev/stdin`` with ``chassis power status``, ``sel info``, one raw *Get SEL
  Entry* (the last record) and ``sdr elist``. A second process runs only when the SEL has new
  records. Fewer sessions also spare the BMC: BMCs have 4-8 session slots, and some log every login.
  Measured against ``ipmi_sim`` on loopback (2 vCPU VM, medians):

  ================================================  =========  ==============  ===========
  run                                               wall       ipmitool CPU    Python CPU
  ================================================  =========  ==============  ===========
  steady state: power + SEL check + 3 sensors       ~50 ms     ~35 ms          ~3 ms
  power + SEL check, no sensors                     ~45 ms     ~34 ms          ~3 ms
  a run with 1-10 new SEL records (2 processes)     ~85-95 ms  ~65-70 ms       ~6 ms
  one command per process instead (4 processes)     ~170 ms    ~127 ms
  ================================================  =========  ==============  ===========

  At a 30 s interval that is ~1.2 ms CPU per BMC per second: 100 BMCs cost ~12% of one core.

The password is never in argv, which any local user can read in /proc. It goes to ipmitool through
``-E`` (the ``IPMI_PASSWORD`` variable) in a minimal environment; ``/proc/PID/environ`` is readable
only by the owner and root. It never appears in a detail: stderr excerpts are scrubbed.

Invocation: ``ipmitool -I lanplus -C <cipher_suite> -N 1 -R 1 -L <privilege> -E``. Without
``-C``, ipmitool 1.8.19 first asks for the cipher-suite list, and a BMC that does not answer costs
10 s. ``-N 1 -R 1`` makes a dead BMC fail in ~2 s. ``-R 0`` does *not* mean "no retries"; it
behaves like the default 20 s. Privilege defaults to USER, which is enough for every read here
and fits a read-only monitoring account.

What one run does, within ONE deadline (``ctx.timeout``; 150 ms are kept back to kill and reap)
----------------------------------------------------------------------------------------------------
1. One exec session reads power, ``sel info``, the last SEL record and, when due, the sensors
   (``sdr elist``, last because it is the slow part on a real BMC). Chassis on: ``ok``. Off:
   ``ok=False, CONTENT, "chassis power is off"``, with the SEL and sensors still attached,
   because a PSU failure in the SEL is the explanation.
   If the deadline kills ipmitool after it printed the power state (a slow BMC in a long SDR
   walk), that answer still counts, with the note "sensors not read (deadline)". For that,
   ipmitool runs under ``stdbuf -oL``: its stdio block-buffers a pipe, and SIGKILL loses the
   buffer. That was checked by freezing ``ipmi_sim`` mid-batch: without ``stdbuf`` nothing
   arrives, with it the power line does. ``stdbuf`` costs ~1 ms CPU; without coreutils the
   probe runs ipmitool directly.
2. If the last SEL record is not the one seen last time, a second exec session fetches the missing
   records by id with raw *Get SEL Entry* (see "SEL" below).
3. When the session fails, a 1-packet probe tells the cases apart: an unauthenticated *Get Channel
   Authentication Capabilities* (IPMI 1.5 over RMCP). No answer: ``TIMEOUT``. ICMP port
   unreachable: ``REFUSED``. An answer that is not IPMI: ``PROTOCOL``. A proper answer means the
   BMC is up and rejected us, so one ``ipmitool -v`` call names the reason: wrong password, unknown
   user, cipher suite or privilege (``ERROR``). A wrong password fails in ~50 ms in total.

The probe never raises for anything the BMC or ipmitool does. ``bmc`` is attached whenever the BMC
reported power. On a failed session it is ``None`` on purpose: the monitor reads
``bmc is not None`` as "the BMC answered".

SEL: incremental, by record id (``ctx.state["ipmi"]``)
------------------------------------------------------
ipmitool 1.8.19's ``sel list last N`` walks the *whole* SEL (one request per record; measured: 43
packets for ``last 1`` on a 31-entry SEL). Real SELs hold 500-3000 records, so each change would
cost thousands of round trips. This probe therefore reads records itself with raw *Get SEL Entry*
(NetFn 0x0A, cmd 0x43). Each answer is the 16-byte record plus the id of the next one. A record is
decoded here into text and severity. The classification is pure and table-driven
(:func:`classify_sel_event`) and works on the numeric sensor type, event type and offset, not on
ipmitool's English.

* The cursor is the last record seen: its id and its 16 raw bytes. Each run asks for the last
  record (id 0xFFFF). If it is the cursor, nothing is new and nothing more is read.
* Otherwise the records after the cursor are fetched by guessing the ids in one batch: cursor+1 ..
  last. Virtually every BMC numbers them consecutively, and ids wrap from 0xFFFE to 1. The cursor
  record itself is fetched again. Its ``next id`` confirms the chain, and if it is gone or changed,
  the SEL was cleared or overwritten since the last look. In that case all records now in the SEL
  are new (up to a cap). A BMC with gaps in its numbering is followed along the ``next id`` chain
  in up to three batches.
* At most 40 records are fetched per run. Anything beyond that is counted ("N more new SEL records
  not read") and skipped, because the newest records are the ones that explain the present.
* First look (daemon start, empty state): the last 20 records are read and the cursor is set. Only
  their **critical** asserted records younger than 24 h by the BMC's own clock (``sel time get``)
  are reported, as "already in SEL: ...". A fault already in progress (PSU failed an hour ago) is
  visible at once. Last year's PSU swap is not blamed for today's outage, and years of history are
  not replayed as "new".
* Empty SEL: the cursor is cleared. Later records are all new.
* ``sel info`` also reports ``Overflow``. A full SEL may drop new events, so the detail says so.
* The cursor moves only after a successful fetch. A timed-out fetch is retried next run.

Sensors
-------
``sdr elist`` gives name, number, status, entity and reading. Threshold sensors: the status column
``ok`` / ``lnc|unc|nc`` / ``lcr|ucr|cr|lnr|unr|nr`` becomes ok / warning / critical, and ``ns``
(no reading: absent CPU, disabled sensor) becomes unknown. Discrete sensors (PSU status, drive
slots, ...) always show ``ok`` in ipmitool's status column, even with the failure bit set. Their
asserted state texts are graded with the same tables as SEL records, so a "Failure detected"
state is critical.

Sensor numbers also name the sensors in SEL texts. The name map is kept in the state and
refreshed at least hourly.

``sensors_every`` (default 1) limits the SDR walk to every Nth run. On ``ipmi_sim`` it adds only
a few ms to the one session. On a real BMC it is one request per SDR record plus one per sensor,
often the slowest part of a run, and many BMCs have weak CPUs. On runs without a sensor read,
``sensors`` is empty (the monitor keeps the last list) and ``health`` is the last known. A
power-off run always reads sensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from watchtower.config import IpmiSpec
from watchtower.probes import BmcReading, Failure, ProbeContext, ProbeResult, SelEntry, SensorReading

IPMITOOL: Final = "ipmitool"
_KILL_MARGIN: Final = 0.15  # seconds kept back from ctx.timeout to kill and reap a stuck ipmitool
_MIN_TIMEOUT: Final = 0.5
_DIAG_TIMEOUT: Final = 0.8  # the one-packet "who is there" probe after a failed session
_VERBOSE_DIAG_TIMEOUT: Final = 1.5

SEL_FIRST_WINDOW: Final = 20  # records looked at on the first run (only critical ones reported)
SEL_FIRST_MAX_AGE: Final = 86400  # ... and only if younger than this by the BMC's own clock
SEL_MAX_FETCH: Final = 40  # records fetched per run at most
SEL_MAX_ROUNDS: Final = 3  # batches when following a gappy next-id chain
SDR_NAMES_TTL: Final = 3600.0
_SEL_ID_LAST: Final = 0xFFFF  # request id "last record"; also next-id "no more records"
_SEL_ID_SPAN: Final = 0xFFFE  # valid record ids are 0x0001..0xFFFE

CRITICAL, WARNING, INFO = "critical", "warning", "info"
_RANK = {INFO: 0, "ok": 0, "unknown": 0, WARNING: 1, CRITICAL: 2}

# --------------------------------------------------------------------------- event tables
# IPMI 2.0 table 42-3 (sensor types) and 42-2 (event/reading types), with ipmitool's wording so
# texts look like `ipmitool sel elist`. Every offset carries its severity *when asserted*; a
# deassertion is a return to normal (info) unless DEASSERTION_SEVERITY says otherwise.

SENSOR_TYPES: Final[dict[int, str]] = {
    0x01: "Temperature", 0x02: "Voltage", 0x03: "Current", 0x04: "Fan", 0x05: "Physical Security",
    0x06: "Platform Security", 0x07: "Processor", 0x08: "Power Supply", 0x09: "Power Unit",
    0x0A: "Cooling Device", 0x0B: "Other", 0x0C: "Memory", 0x0D: "Drive Slot / Bay",
    0x0E: "POST Memory Resize", 0x0F: "System Firmwares", 0x10: "Event Logging Disabled",
    0x11: "Watchdog1", 0x12: "System Event", 0x13: "Critical Interrupt", 0x14: "Button",
    0x15: "Module / Board", 0x16: "Microcontroller", 0x17: "Add-in Card", 0x18: "Chassis",
    0x19: "Chip Set", 0x1A: "Other FRU", 0x1B: "Cable / Interconnect", 0x1C: "Terminator",
    0x1D: "System Boot Initiated", 0x1E: "Boot Error", 0x1F: "OS Boot", 0x20: "OS Critical Stop",
    0x21: "Slot / Connector", 0x22: "System ACPI Power State", 0x23: "Watchdog2",
    0x24: "Platform Alert", 0x25: "Entity Presence", 0x26: "Monitor ASIC", 0x27: "LAN",
    0x28: "Management Subsys Health", 0x29: "Battery", 0x2A: "Session Audit", 0x2B: "Version Change",
    0x2C: "FRU State",
}  # fmt: skip

_C, _W, _I = CRITICAL, WARNING, INFO

# Event/reading type 0x01: the alarming directions are "upper going high" and "lower going low";
# the other two are the reading moving back across a threshold.
THRESHOLD_EVENTS: Final[tuple[tuple[str, str], ...]] = (
    ("Lower Non-critical going low", _W),
    ("Lower Non-critical going high", _I),
    ("Lower Critical going low", _C),
    ("Lower Critical going high", _I),
    ("Lower Non-recoverable going low", _C),
    ("Lower Non-recoverable going high", _I),
    ("Upper Non-critical going low", _I),
    ("Upper Non-critical going high", _W),
    ("Upper Critical going low", _I),
    ("Upper Critical going high", _C),
    ("Upper Non-recoverable going low", _I),
    ("Upper Non-recoverable going high", _C),
)

# Generic discrete event/reading types 0x02-0x0C, by offset.
GENERIC_EVENTS: Final[dict[int, tuple[tuple[str, str], ...]]] = {
    0x02: (("Transition to Idle", _I), ("Transition to Active", _I), ("Transition to Busy", _I)),
    0x03: (("State Deasserted", _I), ("State Asserted", _I)),
    0x04: (("Predictive Failure Deasserted", _I), ("Predictive Failure Asserted", _W)),
    0x05: (("Limit Not Exceeded", _I), ("Limit Exceeded", _W)),
    0x06: (("Performance Met", _I), ("Performance Lags", _W)),
    0x07: (
        ("Transition to OK", _I),
        ("Transition to Non-critical from OK", _W),
        ("Transition to Critical from less severe", _C),
        ("Transition to Non-recoverable from less severe", _C),
        ("Transition to Non-critical from more severe", _W),
        ("Transition to Critical from Non-recoverable", _C),
        ("Transition to Non-recoverable", _C),
        ("Monitor", _I),
        ("Informational", _I),
    ),
    0x08: (("Device Absent", _I), ("Device Present", _I)),
    0x09: (("Device Disabled", _I), ("Device Enabled", _I)),
    0x0A: (
        ("Transition to Running", _I),
        ("Transition to In Test", _I),
        ("Transition to Power Off", _I),
        ("Transition to On Line", _I),
        ("Transition to Off Line", _W),
        ("Transition to Off Duty", _I),
        ("Transition to Degraded", _W),
        ("Transition to Power Save", _I),
        ("Install Error", _W),
    ),
    0x0B: (
        ("Fully Redundant", _I),
        ("Redundancy Lost", _W),
        ("Redundancy Degraded", _W),
        ("Non-Redundant: Sufficient from Redundant", _W),
        ("Non-Redundant: Sufficient from Insufficient", _W),
        ("Non-Redundant: Insufficient Resources", _C),
        ("Redundancy Degraded from Fully Redundant", _W),
        ("Redundancy Degraded from Non-Redundant", _W),
    ),
    0x0C: (("D0 Power State", _I), ("D1 Power State", _I), ("D2 Power State", _I), ("D3 Power State", _I)),
}

# Sensor-specific events (event/reading type 0x6F), by sensor type and offset.
SENSOR_SPECIFIC_EVENTS: Final[dict[int, tuple[tuple[str, str], ...]]] = {
    0x05: (
        ("General Chassis intrusion", _W), ("Drive Bay intrusion", _W), ("I/O Card area intrusion", _W),
        ("Processor area intrusion", _W), ("System unplugged from LAN", _W), ("Unauthorized dock", _W),
        ("FAN area intrusion", _W),
    ),
    0x06: (
        ("Front Panel Lockout violation attempted", _W), ("Pre-boot password violation - user password", _W),
        ("Pre-boot password violation - setup password", _W),
        ("Pre-boot password violation - network boot password", _W),
        ("Other pre-boot password violation", _W), ("Out-of-band access password violation", _W),
    ),
    0x07: (
        ("IERR", _C), ("Thermal Trip", _C), ("FRB1/BIST failure", _C), ("FRB2/Hang in POST failure", _C),
        ("FRB3/Processor startup/init failure", _C), ("Configuration Error", _W),
        ("SM BIOS Uncorrectable CPU-complex Error", _C), ("Presence detected", _I), ("Disabled", _W),
        ("Terminator presence detected", _I), ("Throttled", _W),
        ("Uncorrectable machine check exception", _C), ("Correctable machine check error", _W),
    ),
    0x08: (
        ("Presence detected", _I), ("Failure detected", _C), ("Predictive failure", _W),
        ("Power Supply AC lost", _C), ("AC lost or out-of-range", _C), ("AC out-of-range, but present", _W),
        ("Config Error", _W), ("Power Supply Inactive", _I),
    ),
    0x09: (
        ("Power off/down", _I), ("Power cycle", _I), ("240VA power down", _C), ("Interlock power down", _C),
        ("AC lost", _C), ("Soft-power control failure", _C), ("Failure detected", _C),
        ("Predictive failure", _W),
    ),
    0x0C: (
        ("Correctable ECC", _W), ("Uncorrectable ECC", _C), ("Parity", _C), ("Memory Scrub Failed", _W),
        ("Memory Device Disabled", _W), ("Correctable ECC logging limit reached", _W),
        ("Presence Detected", _I), ("Configuration Error", _W), ("Spare", _I), ("Throttled", _W),
        ("Critical Overtemperature", _C),
    ),
    0x0D: (
        ("Drive Present", _I), ("Drive Fault", _C), ("Predictive Failure", _W), ("Hot Spare", _I),
        ("Parity Check In Progress", _I), ("In Critical Array", _W), ("In Failed Array", _C),
        ("Rebuild In Progress", _I), ("Rebuild Aborted", _W),
    ),
    0x0F: (("System Firmware Error", _C), ("System Firmware Hang", _C), ("System Firmware Progress", _I)),
    0x10: (
        ("Correctable memory error logging disabled", _W), ("Event logging disabled", _W),
        ("Log area reset/cleared", _I), ("All event logging disabled", _W), ("Log full", _W),
        ("Log almost full", _W),
    ),
    0x11: (
        ("BIOS Reset", _C), ("OS Reset", _C), ("OS Shut Down", _C), ("OS Power Down", _C),
        ("OS Power Cycle", _C), ("OS NMI/Diag Interrupt", _W), ("OS Expired", _C),
        ("OS pre-timeout Interrupt", _W),
    ),
    0x12: (
        ("System Reconfigured", _I), ("OEM System boot event", _I),
        ("Undetermined system hardware failure", _C), ("Entry added to auxiliary log", _I),
        ("PEF Action", _I), ("Timestamp Clock Sync", _I),
    ),
    0x13: (
        ("NMI/Diag Interrupt", _W), ("Bus Timeout", _W), ("I/O Channel check NMI", _C), ("Software NMI", _W),
        ("PCI PERR", _W), ("PCI SERR", _C), ("EISA failsafe timeout", _W), ("Bus Correctable error", _W),
        ("Bus Uncorrectable error", _C), ("Fatal NMI", _C), ("Bus Fatal Error", _C), ("Bus Degraded", _W),
    ),
    0x14: (
        ("Power Button pressed", _I), ("Sleep Button pressed", _I), ("Reset Button pressed", _I),
        ("FRU Latch", _I), ("FRU Service", _I),
    ),
    0x19: (("Soft Power Control Failure", _C), ("Thermal Trip", _C)),
    0x1B: (("Connected", _I), ("Config Error", _W)),
    0x1D: (
        ("Initiated by power up", _I), ("Initiated by hard reset", _I), ("Initiated by warm reset", _I),
        ("User requested PXE boot", _I), ("Automatic boot to diagnostic", _I),
        ("OS initiated hard reset", _I), ("OS initiated warm reset", _I), ("System Restart", _I),
    ),
    0x1E: (
        ("No bootable media", _W), ("Non-bootable disk in drive", _W), ("PXE server not found", _W),
        ("Invalid boot sector", _W), ("Timeout waiting for selection", _W),
    ),
    0x1F: (
        ("A: boot completed", _I), ("C: boot completed", _I), ("PXE boot completed", _I),
        ("Diagnostic boot completed", _I), ("CD-ROM boot completed", _I), ("ROM boot completed", _I),
        ("boot completed - device not specified", _I), ("Installation started", _I),
        ("Installation completed", _I), ("Installation aborted", _W), ("Installation failed", _W),
    ),
    0x20: (
        ("Error during system startup", _C), ("Run-time critical stop", _C), ("OS graceful stop", _I),
        ("OS graceful shutdown", _I), ("PEF initiated soft shutdown", _W), ("Agent not responding", _W),
    ),
    0x21: (
        ("Fault Status", _W), ("Identify Status", _I), ("Device Installed", _I),
        ("Ready for Device Installation", _I), ("Ready for Device Removal", _I), ("Slot Power is Off", _I),
        ("Device Removal Request", _I), ("Interlock", _I), ("Slot is Disabled", _I), ("Spare Device", _I),
    ),
    0x22: (
        ("S0/G0: working", _I), ("S1: sleeping with system hw & processor context maintained", _I),
        ("S2: sleeping, processor context lost", _I),
        ("S3: sleeping, processor & hw context lost, memory retained", _I),
        ("S4: non-volatile sleep/suspend-to-disk", _I), ("S5/G2: soft-off", _I), ("S4/S5: soft-off", _I),
        ("G3: mechanical off", _I), ("Sleeping in S1/S2/S3 state", _I), ("G1: sleeping", _I),
        ("S5: entered by override", _I), ("Legacy ON state", _I), ("Legacy OFF state", _I),
    ),
    0x23: (
        ("Timer expired", _C), ("Hard reset", _C), ("Power down", _C), ("Power cycle", _C),
        ("reserved", _I), ("reserved", _I), ("reserved", _I), ("reserved", _I), ("Timer interrupt", _W),
    ),
    0x24: (
        ("Platform generated page", _I), ("Platform generated LAN alert", _I),
        ("Platform Event Trap generated", _I), ("Platform generated SNMP trap, OEM format", _I),
    ),
    0x25: (("Present", _I), ("Absent", _I), ("Disabled", _I)),
    0x27: (("Heartbeat Lost", _W), ("Heartbeat", _I)),
    0x28: (
        ("Sensor access degraded or unavailable", _W), ("Controller access degraded or unavailable", _W),
        ("Management controller off-line", _W), ("Management controller unavailable", _W),
        ("Sensor failure", _W), ("FRU failure", _W),
    ),
    0x29: (("Low", _W), ("Failed", _W), ("Presence Detected", _I)),
    0x2A: (
        ("Session Activated", _I), ("Session Deactivated", _I), ("Invalid Username or Password", _I),
        ("Invalid password disable", _W),
    ),
    0x2B: (
        ("Hardware change detected", _I), ("Firmware or software change detected", _I),
        ("Hardware incompatibility detected", _W), ("Firmware or software incompatibility detected", _W),
        ("Invalid or unsupported hardware version", _W),
        ("Invalid or unsupported firmware or software version", _W), ("Hardware change success", _I),
        ("Firmware or software change success", _I),
    ),
    0x2C: (
        ("Not Installed", _I), ("Inactive", _I), ("Activation Requested", _I), ("Activation in Progress", _I),
        ("Active", _I), ("Deactivation Requested", _I), ("Deactivation in Progress", _I),
        ("Communication lost", _W),
    ),
}  # fmt: skip

# System Firmware Error (sensor type 0x0F, offset 0): event data 2 names the POST error.
FIRMWARE_ERRORS: Final[tuple[str, ...]] = (
    "Unspecified", "No system memory installed", "No usable system memory",
    "Unrecoverable IDE device failure", "Unrecoverable system-board failure",
    "Unrecoverable diskette failure", "Unrecoverable hard-disk controller failure",
    "Unrecoverable PS/2 or USB keyboard failure", "Removable boot media not found",
    "Unrecoverable video controller failure", "No video device selected", "BIOS corruption detected",
    "CPU voltage mismatch", "CPU speed mismatch failure",
)  # fmt: skip

# Deassertions that are not a return to normal. Key: (sensor type, or None for any, event type, offset).
DEASSERTION_SEVERITY: Final[dict[tuple[int | None, int, int], str]] = {
    (0x08, 0x6F, 0): _W,  # PSU "Presence detected" deasserted: a power supply was pulled or died
    (None, 0x0B, 0): _W,  # "Fully Redundant" deasserted: redundancy is no longer full
}

_THRESHOLD, _SENSOR_SPECIFIC = 0x01, 0x6F


def _lookup(sensor_type: int, event_type: int, offset: int) -> tuple[str, str] | None:
    if event_type == _THRESHOLD:
        table: Sequence[tuple[str, str]] = THRESHOLD_EVENTS
    elif event_type == _SENSOR_SPECIFIC:
        table = SENSOR_SPECIFIC_EVENTS.get(sensor_type, ())
    else:
        table = GENERIC_EVENTS.get(event_type, ())
    return table[offset] if 0 <= offset < len(table) else None


def classify_sel_event(sensor_type: int, event_type: int, offset: int, deasserted: bool = False) -> str:
    """Severity of one SEL event: ``critical`` | ``warning`` | ``info``.

    Pure and table-driven: IPMI sensor type, event/reading type (0x01 threshold, 0x02-0x0C generic,
    0x6F sensor-specific, 0x70-0x7F OEM) and the event offset (event data 1, low nibble). Unknown
    codes and OEM events are ``info``: guessing "critical" for what we cannot read would page
    someone at night for nothing.
    """
    if deasserted:
        for key in ((sensor_type, event_type, offset), (None, event_type, offset)):
            if key in DEASSERTION_SEVERITY:
                return DEASSERTION_SEVERITY[key]
        return INFO
    entry = _lookup(sensor_type, event_type, offset)
    return entry[1] if entry else INFO


def describe_sel_event(sensor_type: int, event_type: int, offset: int, data2: int | None = None) -> str:
    """ipmitool-style wording of one event ("Failure detected", "Upper Critical going high")."""
    entry = _lookup(sensor_type, event_type, offset)
    if entry is None:
        if 0x70 <= event_type <= 0x7F:
            return f"OEM event type 0x{event_type:02x} offset {offset}"
        return f"event type 0x{event_type:02x} offset {offset}"
    text = entry[0]
    firmware_error = (sensor_type, event_type, offset) == (0x0F, _SENSOR_SPECIFIC, 0)
    if firmware_error and data2 is not None and data2 < len(FIRMWARE_ERRORS):
        text = f"{text}: {FIRMWARE_ERRORS[data2]}"
    return text


def _state_severities() -> list[tuple[re.Pattern[str], str]]:
    """Asserted-state text -> severity, for discrete sensors in ``sdr elist`` (where the sensor
    type is not printed). The same text under several sensor types takes its highest severity.
    Longest first, and each match is consumed, so "In Failed Array" is not also read as "Failed"."""
    best: dict[str, str] = {}
    for table in (*SENSOR_SPECIFIC_EVENTS.values(), *GENERIC_EVENTS.values()):
        for text, severity in table:
            if text not in best or _RANK[severity] > _RANK[best[text]]:
                best[text] = severity
    ordered = sorted(best.items(), key=lambda kv: -len(kv[0]))
    return [
        (re.compile(rf"(?<![\w/-]){re.escape(text)}(?![\w/-])", re.IGNORECASE), sev) for text, sev in ordered
    ]


_STATE_SEVERITIES: Final = _state_severities()


def discrete_state_severity(states: str) -> str:
    """Severity of a discrete sensor from ipmitool's asserted-state text, e.g.
    ``"Presence detected, Failure detected"`` -> ``critical``. Unknown text -> ``info``."""
    worst = INFO
    rest = states
    for pattern, severity in _STATE_SEVERITIES:
        rest, hits = pattern.subn("\0", rest)
        if hits and _RANK[severity] > _RANK[worst]:
            worst = severity
    return worst


# --------------------------------------------------------------------------- SEL records


@dataclass(frozen=True, slots=True)
class SelRecord:
    """One SEL record as returned by raw Get SEL Entry (next id + 16 bytes)."""

    record_id: int
    next_id: int
    raw: bytes  # the 16 record bytes; identity of the record for the cursor

    @property
    def record_type(self) -> int:
        return self.raw[2]

    @property
    def is_system_event(self) -> bool:
        return self.record_type == 0x02

    @property
    def timestamp(self) -> int:
        return int.from_bytes(self.raw[3:7], "little")

    @property
    def sensor_type(self) -> int:
        return self.raw[10]

    @property
    def sensor_number(self) -> int:
        return self.raw[11]

    @property
    def deasserted(self) -> bool:
        return bool(self.raw[12] & 0x80)

    @property
    def event_type(self) -> int:
        return self.raw[12] & 0x7F

    @property
    def offset(self) -> int:
        return self.raw[13] & 0x0F

    @property
    def data2(self) -> int:
        return self.raw[14]

    @property
    def severity(self) -> str:
        if not self.is_system_event:
            return INFO  # OEM records: vendor-defined bytes we cannot grade
        return classify_sel_event(self.sensor_type, self.event_type, self.offset, self.deasserted)


def decode_get_sel_entry(data: bytes) -> SelRecord:
    """Decode a Get SEL Entry response body (2 bytes next id + 16 bytes record). ValueError if short."""
    if len(data) != 18:
        raise ValueError(f"Get SEL Entry answer has {len(data)} bytes, expected 18")
    record = bytes(data[2:])
    return SelRecord(
        record_id=int.from_bytes(record[0:2], "little"),
        next_id=int.from_bytes(data[0:2], "little"),
        raw=record,
    )


def format_sel_time(ts: int, record_type: int = 0x02) -> str:
    if record_type >= 0xE0 or ts in (0, 0xFFFFFFFF):
        return ""  # OEM non-timestamped record, or "unspecified"
    if ts <= 0x20000000:
        return f"pre-init +{ts}s"  # seconds since BMC init: the SEL clock was not set yet
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def sel_entry(record: SelRecord, names: dict[int, str]) -> SelEntry:
    """A SelEntry for the API: "Power Supply PSU1 Status: Failure detected"."""
    rid = f"{record.record_id:04x}"
    when = format_sel_time(record.timestamp, record.record_type)
    if not record.is_system_event:
        return SelEntry(
            rid, f"OEM record type 0x{record.record_type:02x}: {record.raw[3:].hex()}", INFO, when
        )
    kind = SENSOR_TYPES.get(record.sensor_type, f"sensor type 0x{record.sensor_type:02x}")
    name = names.get(record.sensor_number) or f"#0x{record.sensor_number:02x}"
    event = describe_sel_event(record.sensor_type, record.event_type, record.offset, record.data2)
    text = f"{kind} {name}: {event}"
    if record.deasserted:
        text += " (deasserted)"
    return SelEntry(rid, text, record.severity, when)


def _next_id(rid: int) -> int:
    return rid + 1 if rid < _SEL_ID_SPAN else 1


def _prev_id(rid: int) -> int:
    return rid - 1 if rid > 1 else _SEL_ID_SPAN


def _distance(a: int, b: int) -> int:
    """How many steps from id a to id b going forward, ids wrapping 0xFFFE -> 1."""
    return (b - a) % _SEL_ID_SPAN


def _window(last: int, size: int) -> list[int]:
    """``size`` consecutive ids ending at ``last`` (oldest first)."""
    ids = [last]
    while len(ids) < size:
        ids.append(_prev_id(ids[-1]))
    return ids[::-1]


@dataclass(frozen=True, slots=True)
class SelCursor:
    record_id: int
    raw_hex: str

    @classmethod
    def of(cls, record: SelRecord) -> SelCursor:
        return cls(record.record_id, record.raw.hex())

    def matches(self, record: SelRecord | None) -> bool:
        return record is not None and record.record_id == self.record_id and record.raw.hex() == self.raw_hex


@dataclass(slots=True)
class SelWalk:
    """Which SEL records are new since the cursor, planned as batches of raw Get SEL Entry ids.

    Pure: :meth:`request` says which ids to fetch next (empty: done), :meth:`feed` takes what came
    back (missing ids simply absent), :attr:`new` / :attr:`skipped` / :attr:`reset` / :attr:`cursor`
    are the outcome. The caller owns I/O and the deadline.
    """

    cursor: SelCursor | None
    initialized: bool  # a first look was done before (False on the very first run)
    last: SelRecord | None  # the newest record now (Get SEL Entry 0xFFFF), None if the SEL is empty
    entries: int | None  # from `sel info`
    bmc_now: int | None = None  # the BMC's SEL clock (`sel time get`), for the first look's age limit
    fetched: dict[int, SelRecord] = field(default_factory=dict)
    new: list[SelRecord] = field(default_factory=list)
    skipped: int = 0  # new records known to exist but not read (cap)
    incomplete: bool = False  # the next-id chain could not be followed to the end
    reset: bool = False  # the SEL was cleared / overwritten since the last look
    first: bool = False  # first look: only critical records are to be reported
    rounds: int = 0
    _pending: list[int] = field(default_factory=list)
    _mode: str = ""
    _chain_from: int = 0

    def __post_init__(self) -> None:
        last, cursor = self.last, self.cursor
        if last is None:
            self.reset = cursor is not None
            self._mode = "done"
            return
        self.fetched[last.record_id] = last
        cap = self._cap(SEL_MAX_FETCH)
        if not self.initialized:
            self.first = True
            self._mode = "window"
            self._pending = _window(last.record_id, self._cap(SEL_FIRST_WINDOW))[:-1]
        elif cursor is None:
            self._mode = "window"  # the SEL was empty at the last look: everything now is new
            self._pending = _window(last.record_id, cap)[:-1]
            self.skipped = max(0, (self.entries or 0) - cap)
        elif cursor.matches(last):
            self._mode = "done"
        else:
            gap = _distance(cursor.record_id, last.record_id)
            if 0 < gap <= SEL_MAX_FETCH:
                self._mode = "chain"
                ids: list[int] = []
                nxt = _next_id(cursor.record_id)
                while nxt != last.record_id:
                    ids.append(nxt)
                    nxt = _next_id(nxt)
                self._pending = [cursor.record_id, *ids]
            else:
                # too many new records (or ids restarted below the cursor): verify the cursor and
                # read the newest ones
                self._mode = "newest"
                self._pending = [cursor.record_id, *_window(last.record_id, cap)[:-1]]

    def _cap(self, limit: int) -> int:
        n = limit if self.entries is None else min(limit, max(self.entries, 1))
        return max(n, 1)

    def request(self) -> list[int]:
        """The ids to fetch next; empty when the walk is complete."""
        if self._mode == "done":
            return []
        if not self._pending:
            self._finish()
            return []
        return list(self._pending)

    def feed(self, records: Iterable[SelRecord]) -> None:
        """Records returned for the last :meth:`request` (ids that failed are just absent)."""
        for r in records:
            self.fetched[r.record_id] = r
        self.rounds += 1
        asked, self._pending = self._pending, []
        if self._mode == "window":
            self._finish()
        elif self._mode in ("chain", "newest"):
            assert self.cursor is not None
            if not self.cursor.matches(self.fetched.get(self.cursor.record_id)):
                # the cursor record is gone or different: cleared / overwritten. All records now in
                # the SEL are new; read the newest ones not fetched yet.
                self.reset = True
                self._mode = "window"
                want = _window(self._last_id, self._cap(SEL_MAX_FETCH))
                self.skipped = max(0, (self.entries or 0) - len(want))
                self._pending = [i for i in want if i not in self.fetched and i not in asked]
                if not self._pending or self.rounds >= SEL_MAX_ROUNDS:
                    self._pending = []
                    self._finish(window=want)
            elif self._mode == "newest":
                gap = _distance(self.cursor.record_id, self._last_id)
                self._finish()
                self.skipped = max(0, gap - len(self.new))
            else:
                self._follow_chain()

    @property
    def _last_id(self) -> int:
        assert self.last is not None
        return self.last.record_id

    def _follow_chain(self) -> None:
        assert self.cursor is not None
        chain: list[SelRecord] = []
        cur = self.fetched[self.cursor.record_id].next_id
        seen = {self.cursor.record_id}
        while cur != _SEL_ID_LAST and cur not in seen and len(chain) < SEL_MAX_FETCH:
            rec = self.fetched.get(cur)
            if rec is None:
                break
            chain.append(rec)
            seen.add(cur)
            if cur == self._last_id:  # stop at the newest record seen in this run's first look
                break
            cur = rec.next_id
        self.new = chain
        if cur == _SEL_ID_LAST or (chain and chain[-1].record_id == self._last_id):
            self._mode = "done"
            return
        if len(chain) >= SEL_MAX_FETCH or self.rounds >= SEL_MAX_ROUNDS or cur in seen:
            # give up on the chain, but do not lose what was read beyond the break (at least the
            # newest record, known from the first look): sequential ids put them in order
            self.incomplete = True
            origin = self.cursor.record_id

            def ahead(r: SelRecord) -> int:
                return _distance(origin, r.record_id)

            reached = ahead(chain[-1]) if chain else 0
            span = _distance(origin, self._last_id)
            beyond = [r for r in self.fetched.values() if reached < ahead(r) <= span]
            self.new = chain + sorted(beyond, key=ahead)
            self._mode = "done"
            return
        # a gap in the numbering: continue the chain from `cur` with the stride seen so far
        prev = chain[-1].record_id if chain else self.cursor.record_id
        stride = max(1, _distance(prev, cur))
        ids: list[int] = []
        nxt = cur
        budget = SEL_MAX_FETCH - len(chain)
        while len(ids) < budget:
            if nxt not in self.fetched:
                ids.append(nxt)
            if _distance(cur, nxt) >= _distance(cur, self._last_id):
                break
            nxt = (nxt - 1 + stride) % _SEL_ID_SPAN + 1
        self._pending = ids or [cur]

    def _finish(self, window: list[int] | None = None) -> None:
        if self._mode == "done":
            return
        if window is None:
            if self.last is None:
                window = []
            elif self.first:
                window = _window(self._last_id, self._cap(SEL_FIRST_WINDOW))
            else:
                window = _window(self._last_id, self._cap(SEL_MAX_FETCH))
        keep = [self.fetched[i] for i in window if i in self.fetched]
        if self.cursor is not None and not self.reset:
            keep = [r for r in keep if r.record_id != self.cursor.record_id]
        self.new = keep
        self._mode = "done"

    @property
    def done(self) -> bool:
        return self._mode == "done"

    @property
    def next_cursor(self) -> SelCursor | None:
        return SelCursor.of(self.last) if self.last is not None else None

    def reported(self) -> list[SelRecord]:
        """What to report: all new records; on the first look only critical ones of the last 24 h.

        Age is judged by the BMC's own clock (BMC clocks are often off by hours or years, so the
        host's clock is no reference). A record with a pre-init or unspecified timestamp, or no BMC
        clock reading at all, cannot be dated and is reported: better a stale fault than a hidden one.
        """
        if not self.first:
            return list(self.new)
        return [r for r in self.new if r.severity == CRITICAL and self._recent(r)]

    def _recent(self, record: SelRecord) -> bool:
        ts = record.timestamp
        if self.bmc_now is None or ts <= 0x20000000 or ts == 0xFFFFFFFF:
            return True
        return self.bmc_now - ts <= SEL_FIRST_MAX_AGE


# --------------------------------------------------------------------------- ipmitool output

_POWER_RE = re.compile(r"^Chassis Power is (on|off)\s*$", re.IGNORECASE)
# `sel time get` with LC_ALL=C and no TZ: "11/22/26 03:06:42 UTC"
_SEL_TIME_RE = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d)(?: UTC)?$")
_HEX_LINE_RE = re.compile(r"^(?:\s*[0-9a-fA-F]{2})+\s*$")
_KV_RE = re.compile(r"^([A-Za-z][A-Za-z ]*?)\s*:\s*(.*)$")
_SDR_NUM_RE = re.compile(r"^([0-9a-fA-F]{1,2})h$")
_READING_RE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:\s+(.*))?$")
_WARN_STATUS = {"nc", "lnc", "unc"}
_CRIT_STATUS = {"cr", "lcr", "ucr", "nr", "lnr", "unr"}
_NO_READING = {"no reading", "disabled", "not readable", "na", "n/a", "unavailable"}


def threshold_state(status: str) -> str:
    """ipmitool's sdr status column -> ok | warning | critical | unknown."""
    s = status.strip().lower()
    if s == "ok":
        return "ok"
    if s in _WARN_STATUS:
        return WARNING
    if s in _CRIT_STATUS:
        return CRITICAL
    return "unknown"  # "ns" (no reading: absent device, disabled sensor), "na", anything new


def _printable(text: str) -> str:
    # SDR id strings can be 6-bit packed garbage (see notes); never pass control bytes onwards
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()


def parse_sdr_line(line: str) -> tuple[int, SensorReading] | None:
    """One ``sdr elist`` line -> (sensor number, reading); None for anything that is not one.

    ``CPU Temp         | 01h | ucr |  7.1 | 90 degrees C``
    ``PSU1 Status      | 02h | ok  | 10.1 | Presence detected, Failure detected``
    """
    parts = [p.strip() for p in line.split("|")]
    if len(parts) != 5:
        return None
    name, num, status, _entity, reading = parts
    m = _SDR_NUM_RE.match(num)
    if not m or not name:
        return None
    number = int(m.group(1), 16)
    name = _printable(name)
    state = threshold_state(status)
    rm = _READING_RE.match(reading)
    if rm:
        return number, SensorReading(name, float(rm.group(1)), _printable(rm.group(2) or ""), state)
    if reading.lower() in _NO_READING:
        return number, SensorReading(name, None, "", "unknown")
    if state == "unknown" or not reading or reading.lower().startswith("0x"):
        # no reading ("ns"), or a raw discrete value without decoded states: the status column only
        return number, SensorReading(name, None, "", state)
    # a discrete sensor: its asserted states carry the news (ipmitool's status column says "ok")
    severity = discrete_state_severity(reading)
    worst = max(state, "ok" if severity == INFO else severity, key=lambda s: _RANK[s])
    return number, SensorReading(name, None, "", worst)


@dataclass(slots=True)
class ExecOutput:
    """What one ``ipmitool exec`` run printed, sorted by line shape (the commands are known)."""

    power: bool | None = None
    sel_info: dict[str, str] = field(default_factory=dict)
    sdr: list[tuple[int, SensorReading]] = field(default_factory=list)
    sdr_seen: bool = False
    raw: bytes = b""  # all raw Get SEL Entry answers, concatenated
    sel_time: int | None = None  # `sel time get`, epoch seconds
    junk: list[str] = field(default_factory=list)

    @property
    def sel_entries(self) -> int | None:
        value = self.sel_info.get("entries", "")
        return int(value) if value.isdigit() else None

    @property
    def sel_overflow(self) -> bool:
        return self.sel_info.get("overflow", "").lower() == "true"

    def records(self) -> list[SelRecord]:
        """The raw answers split into records. ValueError if they do not add up."""
        if len(self.raw) % 18:
            raise ValueError(f"raw SEL answers total {len(self.raw)} bytes, not a multiple of 18")
        return [decode_get_sel_entry(self.raw[i : i + 18]) for i in range(0, len(self.raw), 18)]


def parse_exec_output(text: str) -> ExecOutput:
    """Split the stdout of ``ipmitool exec`` into its sections.

    Each command's output has its own shape: ``Chassis Power is on``; ``sel info`` key/value
    lines after ``SEL Information``; ``sdr elist`` lines with 5 ``|``-separated fields; raw answers
    as hex-byte lines. Failed commands print nothing on stdout (ipmitool errors go to stderr), so
    a failure never shifts another section. Lines matching nothing are collected as junk.
    """
    out = ExecOutput()
    in_sel_info = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        m = _POWER_RE.match(stripped)
        if m:
            out.power = m.group(1).lower() == "on"
            in_sel_info = False
            continue
        if stripped == "SEL Information":
            in_sel_info = True
            continue
        tm = _SEL_TIME_RE.match(stripped)
        if tm:
            try:
                when = dt.datetime.strptime(tm.group(1), "%m/%d/%y %H:%M:%S").replace(tzinfo=dt.UTC)
            except ValueError:  # a BMC clock printing month 13 or hour 25: no usable time, not a crash
                out.junk.append(stripped)
            else:
                out.sel_time = int(when.timestamp())
            continue
        if "|" in stripped:
            in_sel_info = False
            parsed = parse_sdr_line(stripped)
            if parsed is None:
                out.junk.append(stripped)
            else:
                out.sdr.append(parsed)
                out.sdr_seen = True
            continue
        if _HEX_LINE_RE.match(stripped):
            in_sel_info = False
            out.raw += bytes.fromhex("".join(stripped.split()))
            continue
        kv = _KV_RE.match(stripped)
        if in_sel_info and kv:
            out.sel_info[kv.group(1).strip().lower()] = kv.group(2).strip()
            continue
        out.junk.append(stripped)
    return out


# --------------------------------------------------------------------------- running ipmitool


@dataclass(frozen=True, slots=True)
class _Run:
    rc: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False
    missing: bool = False
    os_error: str = ""


def _argv(spec: IpmiSpec, *, verbose: bool = False) -> list[str]:
    argv = [IPMITOOL, "-I", spec.interface, "-H", spec.host, "-p", str(spec.effective_port)]
    if spec.interface == "lanplus":
        argv += ["-C", str(spec.cipher_suite)]
    argv += ["-U", spec.username, "-E", "-N", "1", "-R", "1", "-L", spec.privilege.upper()]
    if verbose:
        argv.append("-v")
    return argv


def _exec_argv(spec: IpmiSpec) -> list[str]:
    # commands come on stdin, one per line: one process and one BMC session for all of them
    return [*_argv(spec), "exec", "/dev/stdin"]


def _env(password: str) -> dict[str, str]:
    # minimal environment: nothing of the daemon's own environment leaks into ipmitool, and LC_ALL=C
    # keeps the output in the format the parsers expect
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "IPMI_PASSWORD": password}


async def _ipmitool(argv: list[str], password: str, stdin: str | None, deadline: float) -> _Run:
    """Run ipmitool, killed at ``deadline`` (loop time). Never raises except CancelledError.

    On a kill, what ipmitool printed so far is kept (``timed_out=True`` with partial stdout): a
    slow BMC that answered power but not yet its 200 SDRs still told us the power state. That needs
    line-buffered stdout (ipmitool's stdio buffers a pipe in 4 KB blocks, lost on SIGKILL), hence
    ``stdbuf -oL`` (coreutils) when available, and pipes read as the data comes.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    if deadline - start <= 0:
        return _Run(None, "", "", 0.0, timed_out=True)
    env = _env(password)
    exe = shutil.which(argv[0], path=env["PATH"])
    if exe is None:
        return _Run(None, "", "", 0.0, missing=True)
    stdbuf = shutil.which("stdbuf", path=env["PATH"])
    try:
        proc = await asyncio.create_subprocess_exec(
            *([stdbuf, "-oL"] if stdbuf else []),
            exe,
            *argv[1:],
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except FileNotFoundError:
        return _Run(None, "", "", loop.time() - start, missing=True)
    except OSError as exc:
        why = f"{exc.__class__.__name__}: {exc.strerror or exc}"
        return _Run(None, "", "", loop.time() - start, os_error=why)
    out, err = bytearray(), bytearray()

    async def pump(stream: asyncio.StreamReader | None, buf: bytearray) -> None:
        while stream is not None and (chunk := await stream.read(65536)):
            buf += chunk

    pumps = [loop.create_task(pump(proc.stdout, out)), loop.create_task(pump(proc.stderr, err))]
    timed_out = False
    try:
        async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
            if stdin is not None and proc.stdin is not None:
                proc.stdin.write(stdin.encode())
                with contextlib.suppress(ConnectionError):  # ipmitool may exit before reading it all
                    await proc.stdin.drain()
                proc.stdin.close()
            await asyncio.gather(*pumps)
            await proc.wait()
    except TimeoutError:
        timed_out = True
        proc.kill()
        # the pipes reach EOF once the process is gone; bounded anyway, so that a process stuck in
        # the kernel cannot hold the probe past its deadline
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_MARGIN):
                await asyncio.gather(*pumps, return_exceptions=True)
                await proc.wait()
    finally:
        for task in pumps:
            task.cancel()
        if proc.returncode is None:  # cancelled (daemon shutdown, runner's hard timeout): no orphan
            proc.kill()
    return _Run(
        None if timed_out else proc.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        loop.time() - start,
        timed_out=timed_out,
    )


def _raw_get_sel_entry(record_id: int) -> str:
    return f"raw 0x0a 0x43 0x00 0x00 0x{record_id & 0xFF:02x} 0x{record_id >> 8:02x} 0x00 0xff"


# stderr lines that are noise, not a reason (printed on success too)
_NOISE = ("Get HPM.x Capabilities", "Loading IANA PEN Registry", "Running Get VSO Capabilities",
          "Discovered IPMB address", "Invalid completion code received: Invalid command",
          "Invalid completion code received: Insufficient privilege")  # fmt: skip


def _scrub(text: str, password: str, limit: int = 160) -> str:
    """A stderr excerpt fit for a detail: printable, short, and never containing the password."""
    text = _printable(" ".join(text.split()))
    if len(password) >= 4:  # shorter ones would mangle ordinary words; ipmitool never echoes it anyway
        text = text.replace(password, "***")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(stderr: str, password: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return _scrub(lines[0], password) if lines else ""


# --------------------------------------------------------------------------- diagnosis after a failed session

# IPMI 1.5 message over RMCP, no session: Get Channel Authentication Capabilities (NetFn App 0x06,
# cmd 0x38), channel 0x0E ("this one") with the "IPMI v2.0 data" bit, privilege ADMINISTRATOR.
# Every BMC must answer it before any login, so an answer proves "a BMC listens and talks IPMI".
_AUTH_CAPS_REQUEST: Final = bytes.fromhex(
    "0600ff07"  # RMCP: version 6, reserved, seq 0xff (no ack), class IPMI
    "00" "00000000" "00000000" "09"  # IPMI 1.5 session header: auth none, seq 0, session 0, length 9
    "20" "18" "c8" "81" "00" "38" "8e" "04" "b5"  # rsAddr, netFn App, chk, rqAddr, seq, cmd, data, chk
)  # fmt: skip


def is_auth_caps_response(data: bytes) -> bool:
    """True for an RMCP/IPMI 1.5 Get Channel Authentication Capabilities response."""
    if len(data) < 14 + 7 or data[0] != 0x06 or data[3] != 0x07:
        return False
    pos = 4 + 1 + 4 + 4  # auth type, session seq, session id
    if data[4] != 0:
        pos += 16  # auth code present
    if len(data) < pos + 1 + 7:
        return False
    msg = data[pos + 1 : pos + 1 + data[pos]]
    return len(msg) >= 7 and (msg[1] >> 2) == 0x07 and msg[5] == 0x38


class _OnePacket(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[bytes | Exception]) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_result(exc)


async def _who_is_there(host: str, port: int, wait: float) -> tuple[str, bytes | Exception | None]:
    """Send one unauthenticated IPMI request. -> ("ipmi"|"garbage"|"silent"|"refused"|"error", data)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes | Exception] = loop.create_future()
    transport: asyncio.DatagramTransport | None = None
    try:
        async with asyncio.timeout(max(wait, 0.01)):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _OnePacket(answer), remote_addr=(host, port)
            )
            transport.sendto(_AUTH_CAPS_REQUEST)
            got = await answer
    except TimeoutError:
        return "silent", None
    except OSError as exc:
        return ("refused" if isinstance(exc, ConnectionRefusedError) else "error"), exc
    finally:
        if transport is not None:
            transport.close()
    if isinstance(got, ConnectionRefusedError):
        return "refused", got
    if isinstance(got, Exception):
        return "error", got
    return ("ipmi" if is_auth_caps_response(got) else "garbage"), got


_AUTH_REASONS: Final[tuple[tuple[str, str], ...]] = (
    ("RAKP 2 HMAC is invalid", "authentication failed: wrong password"),
    ("unauthorized name", "authentication failed: unknown user name"),
    ("Invalid user name", "authentication failed: unknown user name"),
    ("Activate Session command failed", "authentication failed (IPMI 1.5): wrong user name or password"),
    ("invalid authentication algorithm", "the BMC refused cipher suite {cs}"),
    ("invalid integrity algorithm", "the BMC refused cipher suite {cs}"),
    ("invalid confidentiality algorithm", "the BMC refused cipher suite {cs}"),
    ("no matching cipher suite", "the BMC refused cipher suite {cs}"),
    ("privilege", "privilege level {priv} refused for this user"),
    ("insufficient resources for session", "the BMC has no free session slot"),
)


async def _session_failure(spec: IpmiSpec, password: str, run: _Run, deadline: float) -> tuple[Failure, str]:
    """Why the session failed, as (failure, detail), using what is left of the deadline."""
    loop = asyncio.get_running_loop()
    host, port = spec.host, spec.effective_port
    where = f"{host}:{port}"
    if "Address lookup for" in run.stderr:
        return Failure.RESOLVE, f"cannot resolve {host}"
    what, data = await _who_is_there(host, port, min(_DIAG_TIMEOUT, deadline - loop.time()))
    if what == "silent":
        return Failure.TIMEOUT, f"no answer from BMC {where} (UDP) within {run.elapsed:.1f}s"
    if what == "refused":
        return Failure.REFUSED, f"nothing listens on {where} (UDP port unreachable)"
    if what == "error":
        return Failure.ERROR, f"cannot reach BMC {where}: {_scrub(str(data), password)}"
    if what == "garbage":
        assert isinstance(data, bytes)
        return Failure.PROTOCOL, f"{where} answers, but not IPMI ({len(data)} bytes: {data[:8].hex(' ')}…)"
    # a BMC answered in plain IPMI and still no session: ask ipmitool -v for the reason
    verbose = await _ipmitool([*_argv(spec, verbose=True), "chassis", "power", "status"], password, None,
                              min(deadline, loop.time() + _VERBOSE_DIAG_TIMEOUT))  # fmt: skip
    for needle, reason in _AUTH_REASONS:
        if needle.lower() in verbose.stderr.lower():
            return Failure.ERROR, reason.format(cs=spec.cipher_suite, priv=spec.privilege.upper())
    if verbose.rc == 0:  # it worked this time: a flaky BMC or a session slot freed meanwhile
        return Failure.ERROR, f"session setup with BMC {where} failed once, then worked"
    hint = f"interface {spec.interface}" + (
        f", cipher suite {spec.cipher_suite}" if spec.interface == "lanplus" else ""
    )
    return Failure.ERROR, f"BMC {where} answers but refused the session (credentials, privilege or {hint}?)"


# --------------------------------------------------------------------------- memory between runs


@dataclass(slots=True)
class IpmiMemory:
    """What the probe keeps in ``ctx.state["ipmi"]`` between runs of one path."""

    runs: int = 0
    sel_initialized: bool = False
    sel_cursor: SelCursor | None = None
    names: dict[int, str] = field(default_factory=dict)  # sensor number -> SDR name
    names_at: float | None = None  # time.monotonic() of the last SDR read
    health: str | None = None  # from the last sensor read


def _memory(ctx: ProbeContext) -> IpmiMemory:
    mem = ctx.state.get("ipmi")
    if not isinstance(mem, IpmiMemory):
        mem = ctx.state["ipmi"] = IpmiMemory()
    return mem


# --------------------------------------------------------------------------- the probe


def _health(sensors: Sequence[SensorReading]) -> str:
    worst = max((_RANK.get(s.state, 0) for s in sensors), default=0)
    return ("OK", "Warning", "Critical")[worst]


def _sensor_text(s: SensorReading) -> str:
    if s.value is None:
        return s.name
    value = f"{s.value:g}"
    return f"{s.name} {value} {s.unit}".rstrip()


def sensors_summary(sensors: Sequence[SensorReading]) -> str:
    """ "3 sensors ok" | "3 sensors, 1 critical: CPU Temp 90 degrees C" (unknown ones not counted)."""
    known = [s for s in sensors if s.state != "unknown"]
    crit = [s for s in known if s.state == CRITICAL]
    warn = [s for s in known if s.state == WARNING]
    if not crit and not warn:
        return f"{len(known)} sensors ok"
    parts = []
    for label, group in (("critical", crit), ("warning", warn)):
        if group:
            more = f" +{len(group) - 1} more" if len(group) > 1 else ""
            parts.append(f"{len(group)} {label}: {_sensor_text(group[0])}{more}")
    return f"{len(known)} sensors, " + ", ".join(parts)


def sel_summary(entries: Sequence[SelEntry], first_look: bool = False) -> str:
    """ "2 new SEL (1 critical: Power Supply PSU1 Status: Failure detected)"; on the first look
    (only critical records are reported) "already in SEL: 1 critical (...)"."""
    crit = [e for e in entries if e.severity == CRITICAL]
    warn = [e for e in entries if e.severity == WARNING]
    for name, group in (("critical", crit), ("warning", warn)):
        if group:
            more = f" +{len(group) - 1} more" if len(group) > 1 else ""
            what = f"{len(group)} {name}: {group[-1].text}{more}"
            return f"already in SEL: {what}" if first_look else f"{len(entries)} new SEL ({what})"
    return f"{len(entries)} new SEL"


async def probe(spec: IpmiSpec, ctx: ProbeContext) -> ProbeResult:
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + max(ctx.timeout, _MIN_TIMEOUT) - _KILL_MARGIN
    mem = _memory(ctx)
    run_no, mem.runs = mem.runs, mem.runs + 1
    secret = spec.secret("password")
    password = secret.get_secret_value() if secret is not None else ""

    sensors_due = spec.sensors and run_no % spec.sensors_every == 0
    names_stale = mem.names_at is None or time.monotonic() - mem.names_at > SDR_NAMES_TTL
    commands = ["chassis power status"]
    if spec.sel:
        commands.append("sel info")
        if not mem.sel_initialized:
            commands.append("sel time get")  # the first look dates existing records by the BMC's clock
    if spec.sel:
        commands.append(_raw_get_sel_entry(_SEL_ID_LAST))  # the only raw command: all hex output is its
    read_sdr = sensors_due or (spec.sel and names_stale)
    if read_sdr:
        commands.append("sdr elist")  # last: the slowest on a real BMC, and a kill cuts only this

    first = await _ipmitool(_exec_argv(spec), password, "\n".join(commands) + "\n", deadline)
    if first.missing:
        return ProbeResult.fail(Failure.ERROR, "ipmitool not installed: apt install ipmitool")
    if first.os_error:
        return ProbeResult.fail(Failure.ERROR, f"cannot run ipmitool: {first.os_error}")
    out = parse_exec_output(first.stdout)
    if first.timed_out and out.power is None:
        return ProbeResult.fail(
            Failure.TIMEOUT, f"no answer from BMC within {ctx.timeout:g}s (ipmitool killed)"
        )
    if out.power is None:
        if "Unable to establish" in first.stderr or "Address lookup" in first.stderr:
            failure, detail = await _session_failure(spec, password, first, deadline)
            return ProbeResult.fail(failure, detail)
        why = _reason(first.stderr, password)
        if "privilege" in why.lower():
            return ProbeResult.fail(Failure.ERROR, f"BMC refused chassis power status: {why}", first.elapsed)
        if why:
            return ProbeResult.fail(
                Failure.PROTOCOL, f"BMC did not report chassis power: {why}", first.elapsed
            )
        junk = _scrub(" / ".join(out.junk[:3]), password) or "nothing"
        return ProbeResult.fail(Failure.PROTOCOL, f"unreadable ipmitool output: {junk}", first.elapsed)

    latency = first.elapsed
    notes: list[str] = []

    # ---- sensors (and the sensor-number -> name map for SEL texts)
    sensors: tuple[SensorReading, ...] = ()
    if first.timed_out:  # killed after the power answer: whatever came after it is cut short
        read_sdr = False
        out.sdr, out.sdr_seen = [], False
        notes.append("sensors not read (deadline)" if sensors_due else "BMC slow (deadline)")
    if read_sdr:
        if out.sdr_seen:
            mem.names = {num: reading.name for num, reading in out.sdr}
            mem.names_at = time.monotonic()
            if sensors_due:
                sensors = tuple(reading for _, reading in out.sdr)
                mem.health = _health(sensors)
        elif sensors_due:
            notes.append("sensors not read")

    # ---- SEL
    new_events: tuple[SelEntry, ...] = ()
    first_look = False
    if spec.sel:
        new_events, first_look, sel_notes = await _read_sel(spec, password, out, mem, deadline)
        notes[:0] = sel_notes

    # power off: the sensors explain it, so read them now if this run skipped them
    if out.power is False and spec.sensors and not sensors_due:
        got = out
        if not got.sdr_seen and deadline - loop.time() > 0.3:
            extra = await _ipmitool(_exec_argv(spec), password, "sdr elist\n", deadline)
            got = parse_exec_output(extra.stdout)
        if got.sdr_seen:
            sensors = tuple(reading for _, reading in got.sdr)
            mem.health = _health(sensors)

    parts = ["chassis on" if out.power else "chassis power is off"]
    if new_events:
        parts.append(sel_summary(new_events, first_look))
    if spec.sel and out.sel_overflow:
        parts.append("SEL full: new events may be lost")
    if sensors:
        parts.append(sensors_summary(sensors))
    parts.extend(notes)
    detail = ", ".join(parts)
    bmc = BmcReading(power_on=out.power, health=mem.health, new_events=new_events, sensors=sensors)
    if out.power:
        return ProbeResult(True, latency, None, detail, bmc)
    return ProbeResult.fail(Failure.CONTENT, detail, latency, bmc)


async def _read_sel(
    spec: IpmiSpec, password: str, out: ExecOutput, mem: IpmiMemory, deadline: float
) -> tuple[tuple[SelEntry, ...], bool, list[str]]:
    """(entries to report, first look?, notes for the detail). Moves the cursor only on success."""
    loop = asyncio.get_running_loop()
    entries = out.sel_entries
    try:
        records = out.records()
    except ValueError as exc:
        return (), False, [f"SEL not read: {exc}"]
    if len(records) > 1:
        return (), False, ["SEL not read: unexpected raw output"]
    last = records[0] if records else None
    if last is None and entries != 0:
        # Get SEL Entry failed, but the SEL is not known to be empty: keep the cursor, retry next run
        return (), False, ["SEL not read"]
    walk = SelWalk(mem.sel_cursor, mem.sel_initialized, last, entries, out.sel_time)
    while ids := walk.request():
        if deadline - loop.time() < 0.2:
            return (), False, ["SEL not read (deadline)"]
        commands = "\n".join(map(_raw_get_sel_entry, ids)) + "\n"
        got = await _ipmitool(_exec_argv(spec), password, commands, deadline)
        if got.timed_out or got.missing or got.os_error:
            return (), False, ["SEL not read (no answer in time)"]
        try:
            walk.feed(parse_exec_output(got.stdout).records())
        except ValueError as exc:
            return (), False, [f"SEL not read: {exc}"]
    mem.sel_cursor = walk.next_cursor
    mem.sel_initialized = True
    reported = tuple(sel_entry(r, mem.names) for r in walk.reported())
    notes = []
    if walk.reset:
        notes.append("SEL cleared")
    if walk.skipped:
        notes.append(f"{walk.skipped} more new SEL records not read")
    if walk.incomplete:
        notes.append("SEL walk incomplete")
    return reported, walk.first, notes
