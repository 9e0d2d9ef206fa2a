"""Management peers for bench_scale.py's site mix, started the way the integration tests start them
(the same templates in tests/peers/), on free 127.0.0.1 ports, and stopped by PID:

* net-snmp ``snmpd`` (tests/peers/snmp, as in tests/integration/test_snmp.py),
* OpenIPMI ``ipmi_sim`` instances (tests/peers/ipmi, as in tests/integration/test_ipmi.py),
* ``sushy-emulator`` behind TLS (tests/peers/redfish, as in tests/integration/test_redfish.py).

Each ``start_*`` returns a :class:`Peer` (or raises RuntimeError saying what is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "tests" / "peers"
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

IPMI_USER, IPMI_PASSWORD = "wtadmin", "wtpass1"  # tests/peers/ipmi/lan.conf.in
REDFISH_USER, REDFISH_PASSWORD = "admin", "bench-Pw-1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Peer:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait(proc: subprocess.Popen[bytes], ready: Any, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            raise RuntimeError(f"{what} did not come up: {text}")
        time.sleep(0.05)


def start_snmpd(root: Path) -> Peer:
    from watchtower.probes import snmp

    exe = shutil.which("snmpd") or "/usr/sbin/snmpd"
    if not os.access(exe, os.X_OK):
        raise RuntimeError("snmpd missing (apt-get install snmpd)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port(socket.SOCK_DGRAM)
    values = root / "values.json"
    values.write_text(json.dumps({"1.3.6.1.4.1.99998.1.2.0": ["integer", 1]}))
    conf = (PEERS / "snmp" / "snmpd.conf.in").read_text()
    for key, value in {
        "@ADDRESSES@": f"udp:127.0.0.1:{port}",
        "@PYTHON@": sys.executable,
        "@HELPER@": str(PEERS / "snmp" / "pass_persist.py"),
        "@VALUES@": str(values),
    }.items():
        conf = conf.replace(key, value)
    (root / "snmpd.conf").write_text(conf)
    (root / "persist").mkdir(exist_ok=True)
    log = root / "snmpd.log"
    proc = subprocess.Popen(
        [exe, "-f", "-Lf", str(log), "-C", "-c", str(root / "snmpd.conf")],
        env=dict(os.environ, SNMP_PERSISTENT_DIR=str(root / "persist"), MIBS=""),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def answers() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(snmp.discovery_request(4242), ("127.0.0.1", port))
            try:
                return bool(s.recv(4096))
            except OSError:
                return False

    _wait(proc, answers, "snmpd", log)
    return Peer("snmp", port, proc)


def start_ipmi_sim(root: Path) -> Peer:
    from watchtower.probes.ipmi import is_auth_caps_response

    sim, sdrcomp = shutil.which("ipmi_sim"), shutil.which("sdrcomp")
    if not sim or not sdrcomp or not shutil.which("ipmitool"):
        raise RuntimeError("ipmi_sim/sdrcomp/ipmitool missing (apt-get install openipmi ipmitool)")
    state = root / "state" / "ipmi_sim" / "wtbmc"
    state.mkdir(parents=True)
    subprocess.run([sdrcomp, "-o", str(state / "sdr.20.main"), str(PEERS / "ipmi" / "wtbmc.sdrs")],
                   check=True, capture_output=True, timeout=10)  # fmt: skip
    chassis = root / "chassis_control.sh"
    shutil.copy(PEERS / "ipmi" / "chassis_control.sh", chassis)
    chassis.chmod(0o755)
    (root / "power-0x20").write_text("1\n")
    port, console = free_port(socket.SOCK_DGRAM), free_port()
    conf = (PEERS / "ipmi" / "lan.conf.in").read_text()
    conf = conf.replace("@PORT@", str(port)).replace("@CONSOLE_PORT@", str(console))
    (root / "lan.conf").write_text(conf.replace("@CHASSIS@", str(chassis)))
    log = root / "ipmi_sim.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sim, "-c", str(root / "lan.conf"), "-f", str(PEERS / "ipmi" / "wtbmc.emu"),
             "-s", str(root / "state"), "-n"],
            cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            restore_signals=False,  # keep SIGPIPE ignored (see tests/integration/test_ipmi.py)
        )  # fmt: skip
    request = bytes.fromhex("0600ff07000000000000000000092018c88100388e04b5")  # get channel auth caps

    def answers() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(request, ("127.0.0.1", port))
                return is_auth_caps_response(s.recv(512))
            except OSError:
                return False

    _wait(proc, answers, "ipmi_sim", log)
    return Peer("ipmi", port, proc)


def find_sushy() -> Path | None:
    explicit = os.environ.get("WATCHTOWER_SUSHY_EMULATOR")
    candidates = [explicit] if explicit else [
        shutil.which("sushy-emulator"), "/tmp/sushy-venv/bin/sushy-emulator",
        str(REPO / ".venv-sushy" / "bin" / "sushy-emulator"),
    ]  # fmt: skip
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def start_sushy(root: Path) -> Peer:
    from support import make_cert

    exe = find_sushy()
    if exe is None:
        raise RuntimeError("sushy-emulator missing (see tests/peers/redfish/README.md)")
    root.mkdir(parents=True, exist_ok=True)
    key, cert = make_cert(root, "sushy")
    code = "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())"
    python = exe.parent / "python"
    hashed = subprocess.run([str(python), "-c", code, REDFISH_PASSWORD], capture_output=True, text=True,
                            check=True, timeout=30).stdout.strip()  # fmt: skip
    (root / "htpasswd").write_text(f"{REDFISH_USER}:{hashed}\n")
    port = free_port()
    text = (PEERS / "redfish" / "emulator.conf.in").read_text()
    for name, value in {"PORT": port, "CERT": cert, "KEY": key, "AUTH_FILE": root / "htpasswd",
                        "STATE_DIR": root / "state"}.items():  # fmt: skip
        text = text.replace(f"@{name}@", str(value))
    (root / "emulator.conf").write_text(text)
    log = root / "emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "--config", str(root / "emulator.conf")], stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False

    _wait(proc, answers, "sushy-emulator", log)
    return Peer("redfish", port, proc, {"ca_file": str(cert)})
