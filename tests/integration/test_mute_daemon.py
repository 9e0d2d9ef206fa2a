"""Maintenance with the real daemon (a subprocess) and a real SMTP peer (aiosmtpd): a mute or a
config window records the outage as in maintenance and pages nobody; a failure that outlasts it
pages once at its end; a restart keeps the mute."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sinks import SmtpSink, mailto_url
from support import Service, free_port, wait_for

MUTE = 20.0  # long enough to confirm the outage and restart the daemon inside it, under load


def write_config(tmp: Path, service: int, smtp: int, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "site": "patchnight",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp / "state"),
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {"erp1": {"role": "service", "paths": [{"tcp": f"127.0.0.1:{service}"}]}},
        "notify": {
            "channels": [{"name": "mail-oncall", "url": mailto_url(smtp), "tags": ["tier1"]}],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
            "all_clear_after": "0s",
        },
        **extra,
    }
    path = tmp / "watchtower.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Daemon:
    def __init__(self, cfg: Path, log: Path):
        self.cfg, self.log = cfg, log
        doc = yaml.safe_load(cfg.read_text())
        self.base = f"http://{doc['listen']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watchtower.cli", "run", "-c", str(self.cfg)],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    async def get(self, path: str) -> Any:
        try:
            async with aiohttp.ClientSession() as s, s.get(self.base + path) as r:
                if r.status != 200:
                    return None
                return await (r.json() if "json" in r.content_type else r.text())
        except aiohttp.ClientError:
            return None

    async def state_of(self, target: str) -> str | None:
        doc = await self.get("/api/v1/state")
        return doc["targets"][target]["state"] if doc else None

    async def muted_metric(self, target: str) -> float | None:
        text = await self.get("/metrics")
        for line in (text or "").splitlines():
            if line.startswith(f'watchtower_muted{{target="{target}"}}'):
                return float(line.split()[-1])
        return None

    async def incident(self) -> dict[str, Any] | None:
        found = await self.get("/api/v1/incidents?all=1")
        return found[0] if found else None

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchtower.cli", *argv, "-c", str(self.cfg),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@contextlib.asynccontextmanager
async def daemon(cfg: Path, tmp: Path) -> AsyncIterator[Daemon]:
    d = Daemon(cfg, tmp / "daemon.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def kinds(incident: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in incident["timeline"]]


async def test_mute_records_without_paging_survives_restart_and_pages_at_its_end(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    service = Service()
    await service.up()
    cfg = write_config(tmp_path, service.port, smtp.port)
    async with daemon(cfg, tmp_path) as d:
        await wait_for(lambda: _is(d.state_of("erp1"), "up"), 20, "erp1 up")
        code, out, err = await d.cli("mute", "erp1", "--for", f"{MUTE:g}s", "--reason", "kernel update",
                                     "--by", "alice")  # fmt: skip
        assert code == 0, err
        assert "erp1 muted until" in out
        assert await d.muted_metric("erp1") == 1.0
        code, out, err = await d.cli("status")
        assert code == 0 and "erp1" in out and "(muted until" in out, (out, err)

        await service.down()
        incident = await wait_for(lambda: _with_kind(d.incident(), "maintenance"), 15, "in maintenance")
        assert incident["state"] == "open"
        assert any("mute #1 by alice: kernel update" in e["event"] for e in incident["timeline"])

        # restart inside the mute: the mute comes back from the store
        d.stop()
        d.start()
        await wait_for(lambda: d.get("/api/v1/mutes"), 20, "daemon back")
        mutes = await d.get("/api/v1/mutes")
        assert [(m["target"], m["by"], m["reason"]) for m in mutes["mutes"]] == [
            ("erp1", "alice", "kernel update")
        ]
        mute_end = datetime.fromisoformat(mutes["mutes"][0]["end"]).timestamp()
        assert await d.muted_metric("erp1") == 1.0
        assert smtp.messages == []  # nothing paged while muted

        # still down when the mute ends: one page then
        [page] = await smtp.wait_messages(1, timeout=MUTE + 20)
        arrived = time.time()
        assert arrived >= mute_end - 0.5  # not before the mute ended
        assert "erp1" in page.subject
        incident = await wait_for(lambda: _with_kind(d.incident(), "maintenance_end"), 10, "maintenance end")
        assert kinds(incident).index("maintenance") < kinds(incident).index("maintenance_end")
        assert any(n["kind"] == "page" for n in incident["notifications"])
        assert await d.muted_metric("erp1") == 0.0
        report = await d.get(f"/api/v1/incidents/{incident['id']}/report")
        assert "in maintenance until" in report
        await asyncio.sleep(2)
        assert len(smtp.messages) == 1


async def test_config_window_mutes_at_its_time_and_cli_refuses_endless_mutes(
    tmp_path: Path, smtp: SmtpSink
) -> None:
    service = Service()
    await service.up()
    now = datetime.now(UTC).timestamp()

    def hms(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")

    start, end = now - 5, now + 25
    window = {"every": f"daily {hms(start)}-{hms(end)}", "timezone": "UTC", "reason": "patch night"}
    cfg = write_config(tmp_path, service.port, smtp.port, maintenance=[window])
    async with daemon(cfg, tmp_path) as d:
        await wait_for(lambda: _is(d.state_of("erp1"), "up"), 20, "erp1 up")
        assert await d.muted_metric("erp1") == 1.0
        mutes = await d.get("/api/v1/mutes")
        assert mutes["windows"][0]["active_until"] is not None

        # an endless (or too long) mute, or one of an unknown target, is refused with a reason
        code, _, err = await d.cli("mute", "erp1", "--for", "8d", "--reason", "x", "--by", "bob")
        assert code == 2 and "at most 7d" in err
        code, _, err = await d.cli("mute", "erp9", "--for", "1h", "--reason", "x", "--by", "bob")
        assert code == 2 and "no target named 'erp9'" in err
        code, _, err = await d.cli("mute", "erp1", "--reason", "x", "--by", "bob")
        assert code == 2 and "--for" in err

        await service.down()
        incident = await wait_for(lambda: _with_kind(d.incident(), "maintenance"), 15, "in maintenance")
        assert any("window daily" in e["event"] and "patch night" in e["event"] for e in incident["timeline"])
        assert smtp.messages == []
        [page] = await smtp.wait_messages(1, timeout=end - time.time() + 20)
        assert time.time() >= end - 1
        assert "erp1" in page.subject
        assert await d.muted_metric("erp1") == 0.0

        # a mute and its unmute through the CLI
        code, out, err = await d.cli("mute", "--site", "--for", "1h", "--reason", "swap", "--by", "carol")
        assert code == 0, err
        assert await d.muted_metric("erp1") == 1.0
        code, out, err = await d.cli("unmute", "--site", "--by", "carol")
        assert code == 0 and "ended by carol" in out, err
        assert await d.muted_metric("erp1") == 0.0

        # the status page's form, as a browser posts it
        form = {"target": "erp1", "for": "30m", "reason": "disk swap", "by": "dave"}
        async with aiohttp.ClientSession() as s:
            async with s.post(d.base + "/mutes", data=form, allow_redirects=False) as r:
                assert r.status == 303, await r.text()
            page = await d.get("/")
            assert "disk swap" in page and "by dave" in page
            assert await d.muted_metric("erp1") == 1.0
            mute_id = (await d.get("/api/v1/mutes"))["mutes"][-1]["id"]
            dave = {"by": "dave"}
            async with s.post(f"{d.base}/mutes/{mute_id}/end", data=dave, allow_redirects=False) as r:
                assert r.status == 303, await r.text()
            async with s.post(d.base + "/mutes", data={**form, "for": "8d"}, allow_redirects=False) as r:
                assert r.status == 400 and "at most 7d" in await r.text()
        assert await d.muted_metric("erp1") == 0.0


async def _is(value: Any, expected: str) -> bool:
    return (await value) == expected


async def _with_kind(incident: Any, kind: str) -> dict[str, Any] | None:
    doc = await incident
    return doc if doc is not None and kind in kinds(doc) else None
