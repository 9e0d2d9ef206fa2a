"""Simulated BMCs for lab hosts: OpenIPMI ``ipmi_sim`` files, its console, and ipmitool helpers.

:class:`watchtower.lab.site.Lab` gives every host with a ``bmc_address`` one ``ipmi_sim`` in the
host's BMC namespace.  This module only knows the simulator: what files it needs (written from the
templates below, so the lab does not depend on the test tree or on package data), how to drive it
from the "hardware" side through its console, and how to ask it something over the network the
way the monitor does.  Stdlib only, like the rest of :mod:`watchtower.lab`.

What the simulator looks like from the mgmt network (see ``tests/peers/ipmi/README.md`` and
``notes/lab-snmp-ipmi.md`` section 4 for how these pieces were worked out):

* RMCP+ (``ipmitool -I lanplus -C 3``) on ``BMC_ADDRESS:623``; IPMI 1.5 with MD5 only, no
  anonymous user and no plain-text passwords;
* :data:`USER`/:data:`PASSWORD` is a USER-privilege account (all a monitor needs, and what
  ``config/demo.yaml`` uses); :data:`ADMIN_USER` is the lab's own ADMINISTRATOR account with a
  random password per ``up()``, used only to set the SEL clock;
* chassis power comes from the file ``power-0x20`` next to ``chassis_control.sh`` (re-read on every
  *Get Chassis Status*), so switching the "server" off is an atomic file write;
* three sensors with SDRs: ``CPU Temp`` (threshold), ``PS1 Status`` (power supply, discrete) and
  ``System Fan 1`` (threshold, RPM);
* a TCP console (``ipmi_sim_cmd(5)``) on 127.0.0.1:9000 *inside the BMC namespace*: unreachable
  from the mgmt network (a real BMC has no such backdoor), reachable by the lab via ``setns``.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from watchtower.lab.netns import in_netns

USER = "monitor"
"""USER-privilege login of every simulated BMC; ``config/demo.yaml`` uses it."""
PASSWORD = "demo-bmc"  # a simulated demo BMC's password is no secret: it is in the demo config too
ADMIN_USER = "wtlab"
IPMI_PORT = 623
CONSOLE_PORT = 9000  # on the BMC namespace's own loopback, so the same number for every BMC
SIM_NAME = "wtbmc"  # ipmi_sim keeps its SEL/SDR state under STATE_DIR/ipmi_sim/SIM_NAME/
MC = "0x20"  # the BMC's IPMB address: names the power file and addresses every console command

# SEL record for "Power Supply PS1 Status: Failure detected": system event record (type 0x02),
# timestamp 0 (the simulator stamps it), generator 0x0020, EvMRev 0x04, sensor type 0x08 (power
# supply), sensor #2, event dir/type 0x6f (asserted, sensor-specific), data1 offset 0x01 (failure
# detected), data2/data3 unspecified.  Classified critical by watchtower.probes.ipmi.
PSU_FAILURE_SEL = f"sel_add {MC} 0x02 0 0 0 0 0x20 0x00 0x04 0x08 0x02 0x6f 0x01 0xff 0xff"
# The PS1 Status sensor's state bit 1 (failure detected), set/cleared without a SEL event of its
# own: the sel_add above is the one record a psufail leaves, so tests can count on it.
PSU_FAILED_BIT = f"sensor_set_bit {MC} 0 2 1 1 0"
PSU_OK_BIT = f"sensor_set_bit {MC} 0 2 1 0 0"

_LAN_CONF = """\
# ipmi_sim BMC of lab host {host} (written by watchtower.lab on every `lab up`)
name "{sim_name}"

set_working_mc {mc}
  startlan 1
    addr {address} {port}
    priv_limit admin
    # IPMI 1.5 logins: MD5 only (no "none"/"straight"); RMCP+ (lanplus) needs the GUID below
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid {guid}
  endlan

  # chassis power get/set: the state is the file power-{mc} beside the script
  chassis_control "{chassis} {mc}"

  #    num enabled name           password          max-priv max-sess allowed-auths
  user 2  true    "{user}"      "{password}"      user     10       md5
  user 3  true    "{admin_user}"  "{admin_password}"  admin    10       md5

# ipmi_sim_cmd(5) console, on the BMC namespace's loopback only
console 127.0.0.1 {console_port}
"""

# ipmi_sim's chassis_control protocol (upstream lanserv/ipmi_sim_chassiscontrol): `get` prints
# "power:0|1", `set power 0|1` switches.  Same script as tests/peers/ipmi/chassis_control.sh.
_CHASSIS_SCRIPT = """\
#!/bin/sh
# ipmi_sim chassis_control for a watchtower lab BMC:
#   chassis_control.sh <mc> get power|boot ...   -> prints "power:1"
#   chassis_control.sh <mc> set power 0|1 ...    -> writes the state file
# The power state is the file power-<mc> beside this script; the lab writes it on break/repair.
dir=$(dirname "$0")
mc=$1; shift; op=$1; shift
f="$dir/power-$mc"
[ -f "$f" ] || echo 1 > "$f"
case "$op" in
  get)
    for p in "$@"; do
      case "$p" in
        power) echo "power:$(cat "$f")" ;;
        boot)  echo "boot:default" ;;
        *) echo "Invalid parameter: $p"; exit 1 ;;
      esac
    done ;;
  set)
    while [ $# -gt 0 ]; do
      p=$1; v=$2; shift 2
      case "$p" in
        power) echo "$v" > "$f"; echo "$(date +%s) power=$v" >> "$dir/log" ;;
        reset|boot|shutdown) echo "$(date +%s) $p=$v" >> "$dir/log" ;;
        identify) shift; echo "$(date +%s) identify=$v" >> "$dir/log" ;;
        *) echo "Invalid parameter: $p"; exit 1 ;;
      esac
    done ;;
  check) exit 1 ;;
  *) echo "Unknown operation: $op"; exit 1 ;;
esac
exit 0
"""

# Startup commands (ipmi_sim_cmd(5)): the MC, a SEL, three sensors at healthy readings.
_EMU = """\
mc_setbmc {mc}
# mc_add addr devid sdrs devrev fwmaj fwmin devsupport mfg-id product-id [persist_sdr]
mc_add {mc} 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
# SEL with room for 1000 entries; flags 0x0a = supports reserve + get alloc info
sel_enable {mc} 1000 0x0a

# sensor 1: CPU Temp, threshold (UNC 75 / UC 85 / UNR 95), reads 40
sensor_add {mc} 0 1 0x01 0x01
sensor_set_value {mc} 0 1 40 0
sensor_set_threshold {mc} 0 1 settable 111000 95 85 75 0 0 0
sensor_set_event_support {mc} 0 1 enable scanning per-state \\
	000111111000000 000111111000000 000111111000000 000111111000000

# sensor 2: PS1 Status, power supply (type 0x08), sensor-specific discrete (0x6f):
#   bit0 presence detected, bit1 failure detected, bit3 AC lost
sensor_add {mc} 0 2 0x08 0x6f
sensor_set_event_support {mc} 0 2 enable scanning per-state \\
	000000001111111 000000001111111 000000001111111 000000001111111
sensor_set_bit_clr_rest {mc} 0 2 0 1 0

# sensor 3: System Fan 1, threshold (RPM = raw * 50), reads 5000 RPM
sensor_add {mc} 0 3 0x04 0x01
sensor_set_value {mc} 0 3 100 0
sensor_set_threshold {mc} 0 3 settable 000111 0 0 0 10 20 30
sensor_set_event_support {mc} 0 3 enable scanning per-state \\
	000000000111111 000000000111111 000000000111111 000000000111111

mc_enable {mc}
"""

# SDRs compiled with sdrcomp.  ID strings are mixed case on purpose: sdrcomp packs names made only
# of uppercase letters and digits as 6-bit ASCII, which ipmitool prints as garbage.
_SDR_THRESHOLD_COMMON = """\
	sensor_owner_id		0x20
	sensor_owner_lun	0
	channel_number		0
	init_scanning		true
	init_events		true
	init_sensor_type	true
	default_event_gen_on	true
	default_sensor_scan_on	true
	sensor_threshold_access	readable
	sensor_event_msg_ctrl	per_state
	event_reading_type_code	1
	analog_data_format	unsigned
	rate_unit		none
	modifier_unit		none
	percentage		false
	modifier_unit_code	unspecified
	linearization		linear
	tolerance		0
	b			0
	accuracy		1
	accuracy_exp		0
	sensor_direction	input
	r_exp			0
	b_exp			0
	sensor_maximum		255
	sensor_minimum		0
"""
_SDRS = f"""\
sdr type 18
	device_slave_address	0x20
	device_channel_number	0
	chassis			true
	ipmb_event_gen		false
	ipmb_event_recv		true
	fru_inventory		false
	sel			true
	sdr			true
	sensor			true
	entity_id		system_board
	entity_instance		1
	id_string		"wtbmc"
endsdr

sdr type 1
{_SDR_THRESHOLD_COMMON}\
	sensor_number		1
	entity_id		system_board
	entity_instance		1
	sensor_type		Temperature
	assert_uncgh		true
	assert_ucgh		true
	assert_unrgh		true
	deassert_uncgh		true
	deassert_ucgh		true
	deassert_unrgh		true
	unr_thrsh_readable	true
	uc_thrsh_readable	true
	unc_thrsh_readable	true
	base_unit		degrees_C
	m			1
	unr_thresh		95
	uc_thresh		85
	unc_thresh		75
	id_string		"CPU Temp"
endsdr

sdr type 2
	sensor_owner_id		0x20
	sensor_owner_lun	0
	channel_number		0
	sensor_number		2
	entity_id		power_supply
	entity_instance		1
	sensor_type		Power_Supply
	init_scanning		true
	init_events		true
	init_sensor_type	true
	default_event_gen_on	true
	default_sensor_scan_on	true
	sensor_event_msg_ctrl	per_state
	event_reading_type_code	0x6f
	assert_event0		true
	assert_event1		true
	assert_event3		true
	deassert_event0		true
	deassert_event1		true
	deassert_event3		true
	event0_state_ret	true
	event1_state_ret	true
	event2_state_ret	true
	event3_state_ret	true
	id_string		"PS1 Status"
endsdr

sdr type 1
{_SDR_THRESHOLD_COMMON}\
	sensor_number		3
	entity_id		fan_cooling_device
	entity_instance		1
	sensor_type		Fan
	assert_lncgl		true
	assert_lcgl		true
	assert_lnrgl		true
	deassert_lncgl		true
	deassert_lcgl		true
	deassert_lnrgl		true
	lnr_thrsh_readable	true
	lc_thrsh_readable	true
	lnc_thrsh_readable	true
	base_unit		RPM
	m			50
	lnr_thresh		10
	lc_thresh		20
	lnc_thresh		30
	id_string		"System Fan 1"
endsdr
"""


class ConsoleError(RuntimeError):
    """The simulator's console rejected a command (its replies to errors start with ``**``)."""


@dataclass(frozen=True)
class BmcFiles:
    """Where one BMC's files live: everything under ``directory`` is rebuilt on every ``up()``."""

    directory: Path

    @property
    def lan_conf(self) -> Path:
        return self.directory / "lan.conf"

    @property
    def emu(self) -> Path:
        return self.directory / "bmc.emu"

    @property
    def sdrs(self) -> Path:
        return self.directory / "bmc.sdrs"

    @property
    def chassis(self) -> Path:
        return self.directory / "chassis_control.sh"

    @property
    def power(self) -> Path:
        return self.directory / f"power-{MC}"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def compiled_sdrs(self) -> Path:
        """Where ipmi_sim looks for its main SDR repository at start."""
        return self.state / "ipmi_sim" / SIM_NAME / f"sdr.{MC[2:]}.main"

    def write(self, host: str, address: str, admin_password: str) -> None:
        """Write config, startup commands, SDR source and power script (power ON); the caller
        compiles :attr:`sdrs` into :attr:`compiled_sdrs` with ``sdrcomp``."""
        self.directory.mkdir(parents=True)
        # lan.conf holds the lab's admin password: readable by root only
        fd = os.open(self.lan_conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                _LAN_CONF.format(
                    host=host,
                    sim_name=SIM_NAME,
                    mc=MC,
                    address=address,
                    port=IPMI_PORT,
                    # RMCP+ wants a GUID; a stable one per host, so restarts look like the same box
                    guid=uuid.uuid5(uuid.NAMESPACE_DNS, f"{host}.bmc.watchtower.lab").hex,
                    chassis=self.chassis,
                    user=USER,
                    password=PASSWORD,
                    admin_user=ADMIN_USER,
                    admin_password=admin_password,
                    console_port=CONSOLE_PORT,
                )
            )
        self.emu.write_text(_EMU.format(mc=MC))
        self.sdrs.write_text(_SDRS)
        self.chassis.write_text(_CHASSIS_SCRIPT)
        self.chassis.chmod(0o755)
        self.compiled_sdrs.parent.mkdir(parents=True)
        self.set_power(True)

    def set_power(self, on: bool) -> None:
        """Switch the simulated chassis.  Written to a temp file and renamed, so the script that
        ipmi_sim runs on every status query never reads a half-written (empty) file."""
        tmp = self.power.with_suffix(".tmp")
        tmp.write_text("1\n" if on else "0\n")
        os.replace(tmp, self.power)

    def power_on(self) -> bool | None:
        """The chassis state the simulator reports, or None when the file is missing."""
        try:
            return self.power.read_text().strip() == "1"
        except OSError:
            return None

    @property
    def psu_marker(self) -> Path:
        return self.directory / "psu-failed"

    @property
    def psu_failed(self) -> bool:
        """Whether a ``psufail`` is in force: remembered in a file because break and repair run in
        different processes (CLI calls) and only a repair after a psufail needs the console."""
        return self.psu_marker.exists()

    def mark_psu_failed(self, failed: bool) -> None:
        if failed:
            self.psu_marker.touch()
        else:
            self.psu_marker.unlink(missing_ok=True)


def new_admin_password() -> str:
    """16 characters: the most an IPMI 1.5 password holds, and plenty for a lab-only account."""
    return secrets.token_hex(8)


def console(ns: str, commands: Sequence[str], timeout: float = 5.0) -> list[str]:
    """Run ``commands`` on the console of the ``ipmi_sim`` in namespace ``ns``; returns one reply
    per command.  OSError when the console does not answer in time, ConsoleError when the
    simulator rejects a command."""
    deadline = time.monotonic() + timeout
    with in_netns(ns):  # the connect happens inside: the socket belongs to the BMC namespace
        conn = socket.create_connection(("127.0.0.1", CONSOLE_PORT), timeout=timeout)
    replies: list[str] = []
    with conn:
        _read_prompt(conn, deadline)  # telnet option bytes, then the first prompt
        for command in commands:
            conn.sendall(command.encode() + b"\n")
            reply = _read_prompt(conn, deadline)
            # the console echoes the command, then prints its answer (errors start with "**")
            text = reply.decode("latin-1").replace("\r", "")
            lines = [ln for ln in text.split("\n")[1:] if ln.strip() and ln.strip() != ">"]
            if any(ln.startswith("**") for ln in lines):
                raise ConsoleError(f"ipmi_sim console rejected {command!r}: {' | '.join(lines)}")
            replies.append("\n".join(lines))
    return replies


def _read_prompt(conn: socket.socket, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"> "):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"ipmi_sim console: no prompt (got {buf[-80:]!r})")
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError(f"ipmi_sim console closed the connection (got {buf[-80:]!r})")
        buf += chunk
    return buf


def ipmitool_argv(address: str, *args: str, admin: bool = False) -> list[str]:
    """``ipmitool`` over RMCP+ as the monitor does it (cipher suite 3: without ``-C`` ipmitool
    first asks for the cipher list, which ipmi_sim never answers, and wastes 10 s; ``-N 1 -R 1``
    makes a dead BMC fail in ~2 s).  The password goes in ``IPMI_PASSWORD`` (``-E``), never argv."""
    user, level = (ADMIN_USER, "ADMINISTRATOR") if admin else (USER, "USER")
    return ["ipmitool", "-I", "lanplus", "-C", "3", "-H", address, "-p", str(IPMI_PORT),
            "-U", user, "-L", level, "-E", "-N", "1", "-R", "1", *args]  # fmt: skip


def ipmitool_env(password: str = PASSWORD) -> dict[str, str]:
    """A minimal environment for ipmitool: PATH and the password, nothing else of ours."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "IPMI_PASSWORD": password}


# IPMI 1.5 over RMCP without a session: Get Channel Authentication Capabilities (the same bytes as
# watchtower.probes.ipmi's diagnosis packet).  Every BMC answers it before any login, so it is a
# cheap "is ipmi_sim bound yet?" check that does not pay ipmitool's 2 s timeout on a closed port.
_AUTH_CAPS_REQUEST = bytes.fromhex(
    "0600ff07" "00" "00000000" "00000000" "09" "20" "18" "c8" "81" "00" "38" "8e" "04" "b5"
)  # fmt: skip


def rmcp_answers(address: str, timeout: float = 0.2) -> bool:
    """True when something at ``address:623`` answers an IPMI 1.5 auth-capabilities request."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((address, IPMI_PORT))
            s.send(_AUTH_CAPS_REQUEST)
            data = s.recv(512)
        except OSError:  # timeout, or ICMP port unreachable (not bound yet) on the connected socket
            return False
    return len(data) > 4 and data[0] == 0x06 and data[3] == 0x07
