"""net-snmp ``pass_persist`` helper for the watchtower tests: serves OIDs from a JSON file.

Usage (snmpd.conf): ``pass_persist .1.3.6.1.4.1.99998 PYTHON pass_persist.py VALUES.json``

VALUES.json maps numeric OIDs to ``[type, value]`` with a net-snmp pass type (``integer``,
``gauge``, ``counter``, ``timeticks``, ``string``, ``objectid``, ``ipaddress``)::

    {"1.3.6.1.4.1.99998.1.2.0": ["integer", 1]}

The file is re-read on every request, so a test flips a value by rewriting it (atomically:
write a temp file, then rename) and the very next SNMP request sees the change. An OID missing
from the file answers NONE, which snmpd turns into noSuchObject/noSuchInstance.
"""

from __future__ import annotations

import json
import sys


def oid_key(oid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in oid.strip().strip(".").split(".") if part)


def load(path: str) -> dict[tuple[int, ...], tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {}
    return {oid_key(oid): (str(kind), str(value)) for oid, (kind, value) in raw.items()}


def main() -> None:
    values_file = sys.argv[1]
    out = sys.stdout
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "PING":
            out.write("PONG\n")
        elif cmd in ("get", "getnext"):
            requested = oid_key(sys.stdin.readline())
            values = load(values_file)
            if cmd == "get":
                hit = requested if requested in values else None
            else:
                hit = min((oid for oid in values if oid > requested), default=None)
            if hit is None:
                out.write("NONE\n")
            else:
                kind, value = values[hit]
                out.write("." + ".".join(map(str, hit)) + f"\n{kind}\n{value}\n")
        elif cmd == "set":
            sys.stdin.readline()
            sys.stdin.readline()
            out.write("not-writable\n")
        elif not cmd:
            break  # snmpd closed our stdin or sent an empty line: it is shutting down
        out.flush()


if __name__ == "__main__":
    main()
