"""The daemon end to end with a push backup: a backup that has not reported is a ``backup`` warning
mailed to the warnings channel (never to on-call), the job's own token clears it, and an outage of
the service then pages on-call with what a restore loses now. Real mail (aiosmtpd) and Signal
(an HTTP receiver answering like signal-cli-rest-api) sinks."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sinks import HttpSink, SmtpSink, mailto_url, signal_url
from support import Service, free_port

from watchtower.config import load_config
from watchtower.daemon import run_daemon

API_TOKEN = "api-token-for-the-page-0123"
PUSH_TOKEN = "push-token-erp-nightly-4567"


@pytest.fixture
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, signal_gw = SmtpSink().start(), HttpSink().start()
    try:
        yield smtp, signal_gw
    finally:
        smtp.stop()
        signal_gw.stop()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    s = Service()
    await s.up()
    yield s
    if s.server is not None:
        s.server.close()


async def test_push_backup_warning_goes_to_the_warnings_channel_and_the_page_says_what_a_restore_loses(
    tmp_path: Path, sinks: tuple[SmtpSink, HttpSink], service: Service
) -> None:
    smtp, signal_gw = sinks
    (tmp_path / "state").mkdir()
    (tmp_path / "api-token").write_text(API_TOKEN)
    (tmp_path / "push-token").write_text(PUSH_TOKEN)
    doc: dict[str, Any] = {
        "site": "loop",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp_path / "state"),
        "api_token_file": "api-token",
        "defaults": {"interval": "1s", "retry_interval": "200ms", "timeout": "500ms"},
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": f"127.0.0.1:{service.port}"}],
                "service": {
                    "name": "ERP",
                    "rto": "4h",
                    "rpo": "1h",
                    "backups": [{"name": "erp-nightly", "push": {"token_file": "push-token"}}],
                },
            }
        },
        "notify": {
            "channels": [
                {"name": "signal-oncall", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
                {"name": "mail-it", "url": mailto_url(smtp.port), "tags": ["tier4"]},
            ],
            "escalation": [{"after": "0s", "notify": ["tier1"]}],
            "all_clear_after": "0s",
            "warnings": {"notify": ["tier4"], "hours": "always"},
        },
    }
    cfg_path = tmp_path / "watchtower.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    base = "http://{}:{}".format(*cfg.listen_host_port)
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(cfg, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with aiohttp.ClientSession() as http:
            # 1. never reported, RPO 1h: one warning, by mail to tier4, nothing to on-call
            (mail,) = await smtp.wait_messages(1, timeout=15)
            assert "WARNING backup" in mail.subject and "ERP" in mail.subject
            assert "erp-nightly has not reported yet" in mail.text
            async with http.get(f"{base}/api/v1/incidents", headers=auth) as r:
                (incident,) = await r.json()
            assert incident["scope"] == "backup" and incident["root"] == "erp-nightly"

            # 2. the push: the API token is not the push token, a wrong token is refused alike
            for headers in (auth, {"Authorization": "Bearer wrong"}, {}):
                async with http.post(f"{base}/api/v1/backups/erp-nightly", headers=headers) as r:
                    assert r.status == 401
                    assert PUSH_TOKEN not in await r.text()
            async with http.post(
                f"{base}/api/v1/backups/nope", headers={"Authorization": f"Bearer {PUSH_TOKEN}"}
            ) as r:
                assert r.status == 401
            async with http.post(
                f"{base}/api/v1/backups/erp-nightly", headers={"Authorization": f"Bearer {PUSH_TOKEN}"}
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["newest"] is not None

            # 3. cleared: the warnings channel hears so, once
            cleared = await smtp.wait_messages(2, timeout=15)
            assert "CLEARED backup erp-nightly" in cleared[1].subject
            async with http.get(f"{base}/api/v1/incidents", headers=auth) as r:
                assert await r.json() == []
            async with http.get(f"{base}/api/v1/readiness", headers=auth) as r:
                readiness = await r.json()
            (erp,) = readiness["services"]
            assert erp["level"] == "red"  # never restore-tested
            assert any(i["name"] == "restore_test" and i["level"] == "red" for i in erp["items"])
            assert any(i["name"] == "backup" and i["level"] == "green" for i in erp["items"])
            async with http.get(f"{base}/metrics") as r:
                metrics = await r.text()
            assert (
                'watchtower_backup_newest_timestamp_seconds{backup="erp-nightly",kind="push",service="ERP"}'
                in metrics
            )
            assert "watchtower_readiness_score " in metrics
            assert PUSH_TOKEN not in metrics and API_TOKEN not in metrics

            # 4. a failed job reports itself: a warning again
            async with http.post(
                f"{base}/api/v1/backups/erp-nightly/fail", headers={"Authorization": f"Bearer {PUSH_TOKEN}"}
            ) as r:
                assert r.status == 200
            third = await smtp.wait_messages(3, timeout=15)
            assert "reported a failure" in third[2].text
            assert signal_gw.requests == [], "a backup warning reached on-call"

            # 5. the outage: on-call is paged and told what a restore loses now
            await service.down()
            (page,) = await signal_gw.wait_requests(1, timeout=20)
            text = page.json["message"]
            assert "Restore points:" in text
            assert "ERP: newest restore point" in text and "restore loses up to" in text
            assert PUSH_TOKEN not in text
        assert len(smtp.messages) == 3, [m.subject for m in smtp.messages]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_push_state_survives_a_restart(tmp_path: Path) -> None:
    from watchtower.backups.watch import BackupWatch
    from watchtower.engine.incidents import IncidentTracker

    (tmp_path / "state").mkdir()
    doc = {
        "site": "loop",
        "state_dir": str(tmp_path / "state"),
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": "127.0.0.1:9"}],
                "service": {"name": "ERP", "rpo": "1h", "backups": [{"push": {"token": PUSH_TOKEN}}]},
            }
        },
    }
    cfg_path = tmp_path / "w.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    first = BackupWatch(cfg, IncidentTracker())
    first.push("erp1-push", True, 1_800_000_000.0)
    again = BackupWatch(cfg, IncidentTracker())
    assert again.status["erp1-push"].newest == 1_800_000_000.0
    assert again.evaluate(1_800_000_000.0 + 60) == []
    assert PUSH_TOKEN not in (tmp_path / "state" / "backup-pushes.json").read_text()


async def test_plan_distribute_sends_a_mail_and_a_signal_attachment_once_per_period_across_restarts(
    tmp_path: Path, sinks: tuple[SmtpSink, HttpSink]
) -> None:
    import base64

    from watchtower.plan import chromium
    from watchtower.plan_distribution import PlanDistributor

    if chromium() is None:
        pytest.skip("the PDF needs chromium (scripts/bootstrap.sh --tests)")
    smtp, signal_gw = sinks
    (tmp_path / "state").mkdir()
    doc: dict[str, Any] = {
        "site": "loop",
        "state_dir": str(tmp_path / "state"),
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": "127.0.0.1:9"}],
                "service": {"name": "ERP", "rto": "4h", "rpo": "1h", "owner": "Anna +49 171 2345678"},
            }
        },
        "notify": {
            "channels": [
                {"name": "signal-oncall", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
                {"name": "mail-oncall", "url": mailto_url(smtp.port), "tags": ["tier1"]},
            ]
        },
        "plan": {"format": "pdf", "distribute": {"every": "30d", "notify": ["tier1"]}},
    }
    cfg_path = tmp_path / "watchtower.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    now = 1_800_000_000.0

    first = PlanDistributor(cfg)
    try:
        assert await first.look(now) == {"signal-oncall": "sent", "mail-oncall": "sent"}
        assert await first.look(now + 3600) == {}  # within the period: nothing
    finally:
        first.close()
    (mail,) = await smtp.wait_messages(1, timeout=10)
    (sig,) = await signal_gw.wait_requests(1, timeout=10)
    assert "Recovery plan" in mail.subject
    assert b"Content-Disposition: attachment" in mail.raw and b"recovery-plan-loop-" in mail.raw
    (attachment,) = sig.json["base64_attachments"]
    pdf = base64.b64decode(attachment.split("base64,")[-1])
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
    assert b"application/pdf" in mail.raw

    # a restart: the same state dir, nothing sent again within the period
    again = PlanDistributor(load_config(cfg_path))
    try:
        assert await again.look(now + 86400) == {}
        assert await again.look(now + 31 * 86400) == {"signal-oncall": "sent", "mail-oncall": "sent"}
    finally:
        again.close()
    await smtp.wait_messages(2, timeout=10)
    await signal_gw.wait_requests(2, timeout=10)
    assert len(smtp.messages) == 2 and len(signal_gw.requests) == 2


@pytest.mark.skipif(
    shutil.which("restic") is None, reason="needs Debian's restic (scripts/bootstrap.sh --tests)"
)
async def test_daemon_reads_a_stale_restic_repository_warns_once_and_a_new_snapshot_clears(
    tmp_path: Path, sinks: tuple[SmtpSink, HttpSink]
) -> None:
    smtp, signal_gw = sinks
    (tmp_path / "state").mkdir()
    (tmp_path / "pw").write_text("restic-password-4711\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ledger.csv").write_text("1,100\n")
    env = {
        **os.environ,
        "RESTIC_PASSWORD_FILE": str(tmp_path / "pw"),
        "RESTIC_CACHE_DIR": str(tmp_path / "c"),
    }
    repo = str(tmp_path / "repo")

    def restic(*args: str) -> None:
        subprocess.run(["restic", "-r", repo, "-q", *args], env=env, check=True, timeout=120)

    restic("init")
    old = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 3 * 3600))
    restic("backup", "--time", old, str(tmp_path / "data"))
    doc: dict[str, Any] = {
        "site": "loop",
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp_path / "state"),
        "targets": {
            "erp1": {
                "role": "service",
                "paths": [{"tcp": "127.0.0.1:9"}],
                "interval": "60s",
                "service": {
                    "name": "ERP",
                    "rpo": "1h",
                    "backups": [{"restic": {"repository": repo, "password_file": "pw"}, "interval": "1s"}],
                },
            }
        },
        "notify": {
            "channels": [
                {"name": "signal-oncall", "url": signal_url(signal_gw.port), "tags": ["tier1"]},
                {"name": "mail-it", "url": mailto_url(smtp.port), "tags": ["tier4"]},
            ],
            "escalation": [{"after": "1h", "notify": ["tier1"]}],
            "warnings": {"notify": ["tier4"], "hours": "always"},
        },
    }
    cfg_path = tmp_path / "watchtower.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    ready = asyncio.Event()
    task = asyncio.create_task(run_daemon(load_config(cfg_path), ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        (mail,) = await smtp.wait_messages(1, timeout=30)
        assert "WARNING backup" in mail.subject and "ERP" in mail.text
        assert "3h" in mail.text and "RPO 1h" in mail.text and "restic-password" not in mail.text
        restic("backup", str(tmp_path / "data"))
        cleared = await smtp.wait_messages(2, timeout=30)
        assert "CLEARED backup erp1-restic" in cleared[1].subject
        await asyncio.sleep(2.5)  # two more reads of the repository: nothing new to say
        assert len(smtp.messages) == 2 and signal_gw.requests == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
