"""Trap paths in the running daemon: snmptrap linkDown/linkUp move the mapped path, a configured
trap OID holds it down until its clearing trap."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon

SNMPTRAP = shutil.which("snmptrap")
pytestmark = pytest.mark.skipif(SNMPTRAP is None, reason="needs net-snmp's snmptrap (apt-get install snmp)")

LINK_DOWN, LINK_UP = "1.3.6.1.6.3.1.1.5.3", "1.3.6.1.6.3.1.1.5.4"
IF = "1.3.6.1.2.1.2.2.1"
RAID_DEGRADED, RAID_OK = "1.3.6.1.4.1.99998.0.1", "1.3.6.1.4.1.99998.0.2"


async def test_link_traps_move_the_trap_path(tmp_path: Path) -> None:
    port, trap_port = free_port(), free_port(socket.SOCK_DGRAM)
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "traps",
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(tmp_path / "state"),
                "traps": {"listen": f"127.0.0.1:{trap_port}", "communities": ["trapsecret"]},
                "targets": {
                    "sw1": {
                        "role": "network",
                        "paths": [
                            {"icmp": "127.0.0.1"},
                            {"trap": {"source": "127.0.0.1", "interfaces": ["uplink0"], "name": "uplink",
                                      "events": [{"oid": RAID_DEGRADED, "text": "RAID degraded", "down": True,
                                                  "clear_oid": RAID_OK}]}},
                        ],
                    }
                },
            }
        )
    )  # fmt: skip
    task = asyncio.create_task(run_daemon(load_config(cfg)))
    env = dict(os.environ, SNMP_PERSISTENT_DIR=str(tmp_path / "snmp"), SNMPCONFPATH=str(tmp_path), MIBS="")

    async def trap(oid: str, *varbinds: str) -> None:
        assert SNMPTRAP is not None
        proc = await asyncio.create_subprocess_exec(
            SNMPTRAP, "-v2c", "-c", "trapsecret", f"127.0.0.1:{trap_port}", "", oid, *varbinds, env=env
        )
        assert await asyncio.wait_for(proc.wait(), 10) == 0

    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def uplink() -> dict[str, Any] | None:
                try:
                    async with session.get("/api/v1/state") as r:
                        doc = await r.json()
                except aiohttp.ClientError:
                    return None
                return next(p for p in doc["targets"]["sw1"]["paths"] if p["name"] == "uplink")

            first = await wait_for(uplink, 10, "the daemon")
            assert first["state"] == "unknown" and first["detail"] == "no trap received yet"
            # linkDown for another interface: not ours
            await trap(LINK_DOWN, f"{IF}.1.7", "i", "7", f"{IF}.2.7", "s", "eth7")
            await trap(LINK_DOWN, f"{IF}.1.2", "i", "2", f"{IF}.2.2", "s", "uplink0", f"{IF}.8.2", "i", "2")

            async def state_is(state: str) -> bool:
                path = await uplink()
                return path is not None and path["state"] == state

            await wait_for(lambda: state_is("down"), 10, "linkDown to take the uplink path down")
            assert "linkDown ifIndex 2" in (await uplink() or {})["detail"]
            await trap(LINK_UP, f"{IF}.1.2", "i", "2", f"{IF}.2.2", "s", "uplink0")
            await wait_for(lambda: state_is("up"), 10, "linkUp to bring it back")
            await trap(RAID_DEGRADED)
            await wait_for(lambda: state_is("down"), 10, "the RAID trap to hold it down")
            await trap(RAID_OK)
            await wait_for(lambda: state_is("up"), 10, "the clearing trap")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_trap_path_needs_the_receiver(tmp_path: Path) -> None:
    from watchtower.config import ConfigError, parse_config

    data = {"site": "x", "targets": {"sw": {"role": "network", "paths": [{"trap": "10.0.0.2"}]}}}
    with pytest.raises(ConfigError) as exc:
        parse_config(data, tmp_path)
    assert exc.value.problems == ["targets.sw.paths[0]: a trap path needs the `traps:` receiver configured"]
