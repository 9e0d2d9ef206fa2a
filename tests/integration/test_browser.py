"""The status page in a real browser, on the demo site with a dead hypervisor.

Headless Chromium (Debian package ``chromium``) driven over the DevTools protocol with aiohttp's
websocket client (no browser-automation dependency): log in through the form, watch the banner
name the hypervisor, read the restore board, acknowledge from the page, check the API agrees,
keep a screenshot as an artifact (``$WATCHTOWER_ARTIFACTS``, else ``tests/artifacts/``).
Chromium reaches nothing but 127.0.0.1 (its DNS and any proxy go nowhere), is killed by PID at the
end, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import struct
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import free_port

from watchtower.config import load_config
from watchtower.daemon import run_daemon
from watchtower.lab import Lab

pytestmark = pytest.mark.netns

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
TOKEN = "browser-test-token-0123456789"
ACK_BY = "alice (browser)"
DETECT = 30.0  # hypervisor down -> incident with the BMC's power_off, see test_incidents_demo.py
STEP = 15.0  # one page load, one DevTools answer
WHOLE = 150.0  # the whole test


def artifacts_dir() -> Path:
    path = Path(os.environ.get("WATCHTOWER_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a well-formed PNG: signature, chunk CRCs, IHDR first, IDAT, IEND last."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks, size = 8, [], (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks, chunks
    assert size[0] > 0 and size[1] > 0
    return size


class DevTools:
    """One page target over the Chrome DevTools protocol: commands by id, events into a queue."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.put_nowait(data)
        for future in self.pending.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async with asyncio.timeout(STEP):
            answer = await future
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def forget_events(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    async def loaded(self) -> None:
        """The next load event (after a navigate, a form submit and its redirects, a reload)."""
        async with asyncio.timeout(STEP):
            while (await self.events.get())["method"] != "Page.loadEventFired":
                pass

    async def navigate(self, url: str) -> None:
        self.forget_events()
        await self.send("Page.navigate", url=url)
        await self.loaded()

    async def submit(self, expression: str) -> None:
        """Run JavaScript that fills and submits a form (one evaluation: no refresh in between)."""
        self.forget_events()
        await self.evaluate(expression)
        await self.loaded()

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def chromium(session: aiohttp.ClientSession) -> AsyncIterator[DevTools]:
    """A headless Chromium of its own (profile in a temp dir); killed by its PID on the way out."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="wt-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            # reach nothing but loopback: no name resolves, and anything else goes to a dead proxy
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            "--window-size=1280,1000",
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group: zygote and renderers go with it
        )
        devtools: DevTools | None = None
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(f"{base}/json/version") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, f"chromium exited with {proc.returncode}"
                assert time.monotonic() < deadline, "chromium's DevTools endpoint did not come up in 30s"
                await asyncio.sleep(0.2)
            async with session.put(f"{base}/json/new?about:blank") as r:
                assert r.status == 200, await r.text()
                ws_url = (await r.json())["webSocketDebuggerUrl"]
            ws = await session.ws_connect(ws_url, max_msg_size=64 * 1024 * 1024)
            devtools = DevTools(ws)
            await devtools.send("Page.enable")
            await devtools.send("Runtime.enable")
            yield devtools
        finally:
            if devtools is not None:
                await devtools.close()
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(5):
                        await proc.wait()
                except TimeoutError:
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group, by its id
            if proc.returncode is None:
                await proc.wait()


@pytest.fixture
def lab(demo_lab: Lab) -> Lab:
    return demo_lab  # one demo site for the whole run (tests/conftest.py)


async def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = await predicate()
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:  # a page mid-refresh
            value, last = None, exc
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f}s: {what} (last error: {last})")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
async def test_status_page_in_a_browser(lab: Lab, tmp_path: Path) -> None:
    started = time.monotonic()
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    data = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    port = free_port()
    data.update(listen=f"127.0.0.1:{port}", state_dir=str(tmp_path / "state"), api_token_file=str(token_file))
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    config = load_config(cfg_path)
    expected_board = sorted(
        (t.service.restore_order or 0, t.service.name)
        for name, t in config.targets.items()
        if t.service is not None and (t.runs_on == "pve1")
    )
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    daemon = asyncio.create_task(run_daemon(config))
    broken = False
    try:
        async with asyncio.timeout(WHOLE), aiohttp.ClientSession() as session:

            async def api(path: str) -> Any:
                async with session.get(base + path, headers=bearer) as r:
                    assert r.status == 200, (path, r.status)
                    return await r.json()

            async def all_up() -> bool:
                doc = await api("/api/v1/state")
                return doc["vantage"] == "up" and all(t["state"] == "up" for t in doc["targets"].values())

            await until(all_up, 30, "the healthy demo site to be all up")

            async with chromium(session) as page:
                # 1. the page wants a login; the form gives a cookie and leads back to /
                await page.navigate(base + "/")
                assert await page.evaluate("location.pathname") == "/login", await page.evaluate(
                    "location.href"
                )
                await page.submit(
                    f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                    "document.querySelector('form button[type=submit]').click()"
                )
                assert await page.evaluate("location.pathname") == "/"
                assert (
                    await page.evaluate("document.getElementById('banner').textContent") == "all targets up"
                )
                assert await page.evaluate("document.cookie") == ""  # HttpOnly: not for scripts

                # 2. the hypervisor dies; the banner says so in words, with the BMC's word
                await asyncio.to_thread(lab.break_host, "pve1", "poweroff")
                broken = True

                async def banner() -> str | None:
                    await page.navigate(base + "/")
                    text = str(await page.evaluate("document.getElementById('banner').textContent"))
                    words = ("hypervisor pve1 down since", "BMC: power off", "2 VMs affected")
                    return text if all(w in text for w in words) else None  # dc1 and mail1 run on pve1

                text = await until(
                    banner, DETECT, "the banner to name the dead hypervisor and the BMC's word"
                )
                assert "RTO clock Active Directory" in text, text

                # 3. the restore board: what pve1 took down, in the configured order
                rows = await page.evaluate(
                    "[...document.querySelectorAll('tr.restore')].map(r => "
                    "[r.cells[0].textContent.trim(), r.querySelector('strong.service').textContent, "
                    "r.dataset.target, r.cells[3].textContent.trim()])"
                )
                assert [(int(n), s) for n, s, _, _ in rows] == [
                    (i, name) for i, (_, name) in enumerate(expected_board, 1)
                ], rows
                assert [s for _, s, _, _ in rows] == ["Active Directory", "Mail"]
                assert all(rto.startswith("RTO ") and "left" in rto for *_, rto in rows), rows
                contacts = await page.evaluate("document.getElementById('contacts').parentElement.innerText")
                assert "DEMO-PVE1" in contacts and "vendor support" in contacts

                # 4. acknowledge from the page
                action = await page.evaluate("document.querySelector('form.ack').getAttribute('action')")
                incident_id = int(action.split("/")[2])
                await page.submit(
                    f"const f = document.querySelector('form.ack');"
                    f"f.querySelector('input[name=by]').value = {json.dumps(ACK_BY)};"
                    "f.querySelector('button').click()"
                )
                assert await page.evaluate("location.pathname") == "/"
                note = await page.evaluate(f"document.getElementById('incident-{incident_id}').innerText")
                assert f"acknowledged by {ACK_BY}" in note, note
                incident = await api(f"/api/v1/incidents/{incident_id}")
                assert incident["state"] == "acknowledged" and incident["acknowledged_by"] == ACK_BY
                assert incident["root"] == "pve1"

                # 5. the screenshot, on a phone-sized screen (the page is one column there)
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=412,
                    height=915,
                    deviceScaleFactor=1,
                    mobile=True,
                )
                await page.navigate(base + "/")
                shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                png = base64.b64decode(shot["data"])
                path = artifacts_dir() / "status-page-pve1-down.png"
                path.write_bytes(png)
                width, height = check_png(path.read_bytes())
                assert width == 412 and height >= 915, (width, height)
                overflow = await page.evaluate("document.documentElement.scrollWidth")
                assert overflow <= 412, f"the page is {overflow}px wide on a 412px phone"
    finally:
        if broken:
            await asyncio.to_thread(lab.repair, "pve1")
        daemon.cancel()
        await asyncio.gather(daemon, return_exceptions=True)
    print(f"\nbrowser test: {time.monotonic() - started:.1f}s, screenshot {path}")
