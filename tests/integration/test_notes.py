"""Notes on a running daemon (in this process, on 127.0.0.1): through the API and `watchtower note`,
`watchtower probe` during the incident recorded as the manual check; they tick the first-hour
checklist and appear on the page (escaped), in the timeline and in the report."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from support import free_port, wait_for

from watchtower.config import load_config
from watchtower.daemon import run_daemon

EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)> | [x](javascript:alert(3))'


async def cli(cfg: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ}
    env.pop("NOTIFY_SOCKET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchtower", *args, "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_notes_from_cli_api_and_probe_tick_the_checklist(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    doc: dict[str, Any] = {
        "site": "notes",
        "listen": listen,
        "state_dir": str(tmp_path / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "300ms", "fail_after": 1},
        "targets": {
            "erp1": {
                "role": "service",
                "service": {"name": "ERP", "rto": "4h"},
                "paths": [{"tcp": {"host": "127.0.0.1", "port": free_port()}}],
            }
        },
    }
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(cfg), ready=ready))
    base = f"http://{listen}"
    try:
        await asyncio.wait_for(ready.wait(), 15)
        async with aiohttp.ClientSession() as s:

            async def incident() -> Any:
                async with s.get(base + "/api/v1/incidents") as r:
                    found = await r.json()
                    return found[0] if found else None

            first = await wait_for(incident, 20, "the incident of erp1")
            iid = first["id"]
            items = {c["item"]: c for c in first["checklist"]}
            assert items["symptom"]["state"] == "done" and items["decision"]["state"] == "due"

            # the API: bad kinds are refused with the allowed list, a hostile text is kept as text
            async with s.post(
                f"{base}/api/v1/incidents/{iid}/notes", json={"kind": "gossip", "text": "x", "by": "a"}
            ) as r:
                assert r.status == 400 and "decision" in (await r.json())["error"]
            async with s.post(
                f"{base}/api/v1/incidents/{iid}/notes",
                json={"kind": "user_report", "text": EVIL, "by": "mallory"},
            ) as r:
                assert r.status == 201
            async with s.post(
                f"{base}/api/v1/incidents/999/notes", json={"kind": "decision", "text": "x", "by": "a"}
            ) as r:
                assert r.status == 404

            code, out, err = await cli(cfg, "note", str(iid), "--kind", "decision", "--by", "alice",
                                       "hardware", "not", "security")  # fmt: skip
            assert code == 0 and f"#{iid} noted (decision) by alice" in out, err
            code, out, err = await cli(cfg, "probe", "erp1")
            assert code == 1 and f"recorded on incident #{iid} as the manual check" in err

            async with s.get(f"{base}/api/v1/incidents/{iid}") as r:
                now = await r.json()
            kinds = [e["kind"] for e in now["timeline"]]
            assert "note:user_report" in kinds and "note:decision" in kinds and "note:manual_check" in kinds
            texts = [e["event"] for e in now["timeline"]]
            assert "decision by alice: hardware not security" in texts
            assert any(t.startswith("manual check by ") and "0 of 1 paths up" in t for t in texts)
            items = {c["item"]: c for c in now["checklist"]}
            assert items["decision"]["state"] == "done" and items["manual_check"]["state"] == "done"

            # the page's note form (same-origin form post) adds one too
            form = {"kind": "vendor_case", "text": "case 4711", "by": "bob"}
            async with s.post(f"{base}/incidents/{iid}/notes", data=form, allow_redirects=False) as r:
                assert r.status == 303
            async with s.get(base + "/") as r:
                page = await r.text()
            assert "case 4711" in page and "hardware not security" in page
            assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "onerror=alert(2)>" not in page
            assert "ERP unavailable since" in page and "(RTO)" in page
            assert f'action="/incidents/{iid}/notes"' in page

            async with s.get(f"{base}/api/v1/incidents/{iid}/report") as r:
                report = await r.text()
            assert "## First hour" in report and "hardware not security" in report
            assert "<script>" not in report and "\\<script\\>" in report
            assert "vendor case by bob: case 4711" in report
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
