"""Delivery through apprise against in-process peers (tests/sinks.py): real aiosmtpd, and an HTTP
sink answering like signal-cli-rest-api and SMSEagle. Loopback only; waits poll under deadlines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sinks import (
    MAIL_FROM,
    MAIL_TO,
    SIGNAL_FROM,
    SMS_TO,
    SMSEAGLE_TOKEN,
    HttpSink,
    SmtpSink,
    mailto_url,
    signal_url,
    smseagle_url,
)
from support import free_port

from watchtower.config import Channel
from watchtower.notify.sender import (
    ChannelSender,
    DeliveryResult,
    make_senders,
    reason_from_logs,
    scrub,
    secret_parts,
)

TITLE = "[watchtower lab] hv1 DOWN"
BODY = "hv1 (10.213.0.11) failed 3/3 ICMP probes at 12:00:00Z\nsecond line"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def http() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def hung() -> Iterator[HttpSink]:
    with HttpSink(mode="hang") as sink:
        yield sink


def sender(name: str, url: str, timeout: float = 30.0) -> ChannelSender:
    return ChannelSender(Channel(name=name, url=url), timeout=timeout)


async def send_all(*senders: ChannelSender) -> tuple[list[DeliveryResult], float]:
    started = time.monotonic()
    results = await asyncio.gather(*(s.send(TITLE, BODY) for s in senders))
    return list(results), time.monotonic() - started


# --------------------------------------------------------------------------- what arrives


async def test_mail_subject_and_text_body(smtp: SmtpSink) -> None:
    s = sender("mail", mailto_url(smtp.port))
    result = await s.send(TITLE, BODY)
    assert result.ok and result.error is None, result
    [msg] = await smtp.wait_messages(1)
    assert msg.subject == TITLE
    assert msg.text == BODY
    assert msg.mail_from == MAIL_FROM and msg.rcpt_tos == (MAIL_TO,)
    assert MAIL_FROM in msg.sender and MAIL_TO in msg.to
    s.close()


async def test_signal_exact_request_one_post_for_all_recipients(http: HttpSink) -> None:
    recipients = ("+15550000002", "+15550000003")
    s = sender("signal", signal_url(http.port, recipients=recipients))
    assert "batch=yes" in s.display_url
    result = await s.send(TITLE, BODY)
    assert result.ok, result
    [req] = await http.wait_requests(1)
    assert (req.method, req.path) == ("POST", "/v2/send")
    assert req.headers["Content-Type"].startswith("application/json")
    assert req.json["number"] == SIGNAL_FROM
    assert req.json["recipients"] == list(recipients)
    assert req.json["message"] == TITLE + "\r\n" + BODY
    assert len(http.requests) == 1  # batch=yes: one request, not one per recipient
    s.close()


async def test_smseagle_exact_jsonrpc_request(http: HttpSink) -> None:
    s = sender("sms", smseagle_url(http.port))
    sms = "WT lab DOWN hv1 #12 since 12:00Z"
    result = await s.send("", sms)  # SMS channels: no title, the sms text as body
    assert result.ok, result
    [req] = await http.wait_requests(1)
    assert (req.method, req.path) == ("POST", "/jsonrpc/sms")
    assert req.json["method"] == "sms.send_sms"
    params = req.json["params"]
    assert params["to"] == SMS_TO
    assert params["access_token"] == SMSEAGLE_TOKEN
    assert params["message"] == sms
    s.close()


async def test_back_to_back_sends_are_not_throttled(http: HttpSink) -> None:
    s = sender("signal", signal_url(http.port))
    started = time.monotonic()
    first = await s.send(TITLE, "one")
    second = await s.send(TITLE, "two")
    elapsed = time.monotonic() - started
    assert first.ok and second.ok
    assert elapsed < 1.0, f"two sends took {elapsed:.2f}s: apprise's 5.5 s throttle is on"
    reqs = await http.wait_requests(2)
    assert [r.json["message"].split("\r\n")[1] for r in reqs] == ["one", "two"]
    s.close()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kind", ["signal", "smseagle"])
async def test_http_500_is_a_failure_with_the_status(http: HttpSink, kind: str) -> None:
    http.mode = "error500"
    s = sender(kind, signal_url(http.port) if kind == "signal" else smseagle_url(http.port))
    result = await s.send(TITLE, BODY)
    assert not result.ok
    assert result.error is not None and "500" in result.error, result
    assert SMSEAGLE_TOKEN not in result.error and "+1555" not in result.error
    s.close()


@pytest.mark.parametrize("kind", ["mail", "signal", "smseagle"])
async def test_refused_fails_fast(kind: str) -> None:
    port = free_port()
    url_for: dict[str, Callable[[int], str]] = {
        "mail": mailto_url,
        "signal": signal_url,
        "smseagle": smseagle_url,
    }
    url = url_for[kind](port)
    s = sender(kind, url)
    result = await s.send(TITLE, BODY)
    assert not result.ok and result.error == "connection refused", result
    assert result.elapsed < 1.0
    s.close()


async def test_stopped_sink_refuses_and_comes_back_on_the_same_port(smtp: SmtpSink, http: HttpSink) -> None:
    mail, signal = sender("mail", mailto_url(smtp.port)), sender("signal", signal_url(http.port))
    smtp.stop()
    http.stop()
    down, _ = await send_all(mail, signal)
    assert [r.error for r in down] == ["connection refused", "connection refused"]
    smtp.start()
    http.start()
    up, _ = await send_all(mail, signal)
    assert all(r.ok for r in up), up
    await smtp.wait_messages(1)
    await http.wait_requests(1)
    mail.close()
    signal.close()


async def test_invalid_url_fails_every_send_without_raising() -> None:
    s = sender("bad", "nosuchscheme://SECRETVALUE@host/path")
    assert s.problem is not None
    result = await s.send(TITLE, BODY)
    assert not result.ok and "does not accept" in (result.error or "")
    assert "SECRETVALUE" not in (result.error or "") + s.display_url
    s.close()


async def test_closed_sender_fails_without_raising(http: HttpSink) -> None:
    s = sender("signal", signal_url(http.port))
    s.close()
    result = await s.send(TITLE, BODY)
    assert not result.ok and result.error == "sender closed"


# --------------------------------------------------------------------------- isolation


async def test_hung_gateway_does_not_delay_other_channels(
    smtp: SmtpSink, http: HttpSink, hung: HttpSink
) -> None:
    mail, signal = sender("mail", mailto_url(smtp.port)), sender("signal", signal_url(http.port))
    # baseline: the two healthy channels alone
    baseline, baseline_elapsed = await send_all(mail, signal)
    assert all(r.ok for r in baseline), baseline

    # the same two, concurrently with a gateway that accepts and never answers
    stuck = sender("sms", smseagle_url(hung.port), timeout=2.0)
    started = time.monotonic()
    results = await asyncio.gather(
        asyncio.gather(mail.send(TITLE, BODY), signal.send(TITLE, BODY)), stuck.send(TITLE, BODY)
    )
    healthy_elapsed = max(r.elapsed for r in results[0])
    hung_result = results[1]
    total = time.monotonic() - started
    assert all(r.ok for r in results[0]), results
    assert healthy_elapsed < 2.0 and healthy_elapsed < baseline_elapsed + 1.0, (
        f"healthy channels took {healthy_elapsed:.2f}s beside a hung one (alone: {baseline_elapsed:.2f}s)"
    )
    assert not hung_result.ok and hung_result.error is not None
    assert "no answer" in hung_result.error or "timed out" in hung_result.error, hung_result
    assert hung_result.elapsed <= 2.0 + 0.5 and total <= 2.0 + 0.5
    assert SMSEAGLE_TOKEN not in hung_result.error and SMS_TO not in hung_result.error
    await hung.wait_requests(1)
    for s in (mail, signal, stuck):
        s.close()


async def test_thread_hung_past_the_budget_is_replaced(hung: HttpSink) -> None:
    """The URL's own rto=30 keeps apprise blocked past the 2 s budget: the send fails with the
    budget's timeout, and the next send runs on a fresh thread instead of queuing behind it."""
    s = sender("sms", smseagle_url(hung.port) + "?rto=30", timeout=2.0)
    result = await s.send("", "first")
    assert not result.ok and result.error == "timed out after 2s", result
    assert 1.9 <= result.elapsed <= 2.5
    assert s.hung_threads == 1
    hung.mode = "ok"
    again = await s.send("", "second")
    assert again.ok and again.elapsed < 1.0, again
    reqs = await hung.wait_requests(2)
    assert [r.json["params"]["message"] for r in reqs] == ["first", "second"]
    s.close()


# --------------------------------------------------------------------------- secrets


PASSWORD = "Pa55wordSecret"


async def test_secrets_never_in_error_or_display_url(http: HttpSink, smtp: SmtpSink) -> None:
    refused = free_port()
    urls = {
        "sms-refused": smseagle_url(refused),
        "sms-500": smseagle_url(http.port),
        "signal-500": signal_url(http.port),
        # aiosmtpd offers no AUTH without TLS: a login makes apprise fail
        "mail-auth": f"mailto://ops:{PASSWORD}@127.0.0.1:{smtp.port}?from={MAIL_FROM}&to={MAIL_TO}",
        "mail-refused": f"mailto://ops:{PASSWORD}@127.0.0.1:{refused}?from={MAIL_FROM}&to={MAIL_TO}",
    }
    http.mode = "error500"
    senders = make_senders([Channel(name=n, url=u) for n, u in urls.items()], timeout=5.0)
    results = await asyncio.gather(*(s.send(TITLE, BODY) for s in senders.values()))
    for (name, s), r in zip(senders.items(), results, strict=True):
        assert not r.ok and r.error, (name, r)
        shown = r.error + " " + s.display_url
        for secret in (SMSEAGLE_TOKEN, PASSWORD, SMS_TO, SMS_TO[1:], "15550000002", urls[name]):
            assert secret not in shown, (name, secret, shown)
        assert "\n" not in r.error and len(r.error) <= 160
        s.close()


def test_scrub_removes_every_part_of_the_url() -> None:
    url = "smseagles://T0kenABCDEF@gw.example.net:8443/+15550000004/%2B15550000005?key=QueryS3cret&batch=no"
    parts = secret_parts(url)
    text = (
        f"Failed {url} T0kenABCDEF gw.example.net +15550000004 %2B15550000005 15550000005 "
        "QueryS3cret error=500, batch no"
    )
    cleaned = scrub(text, parts)
    for secret in (
        "T0kenABCDEF",
        "gw.example.net",
        "5550000004",
        "5550000005",
        "QueryS3cret",
        "smseagles://",
    ):
        assert secret not in cleaned, (secret, cleaned)
    assert "error=500" in cleaned and "batch no" in cleaned
    assert scrub("call +49 170 1234567 now", []) == "call *** now"


def test_reason_condenses_apprise_logs() -> None:
    refused = [
        ("WARNING", "A Connection error occured"),
        ("DEBUG", "Socket Exception: [Errno 111] Connection refused"),
    ]
    assert reason_from_logs(refused, 0.01) == "connection refused"
    assert (
        reason_from_logs([("WARNING", "Failed to send: Internal server error., error=500.")], 0.0)
        == "HTTP 500"
    )
    read = [
        (
            "DEBUG",
            "Socket Exception: HTTPConnectionPool(host='x', port=1): Read timed out. (read timeout=15.0)",
        )
    ]
    assert reason_from_logs(read, 15.0) == "no answer within 15s (read timeout)"
    assert reason_from_logs([("DEBUG", "Socket Exception: timed out")], 10.2) == "timed out after 10s"
    assert reason_from_logs([], 0.0) == "delivery failed (apprise gave no reason)"


# --------------------------------------------------------------------------- the CLI


def write_config(tmp_path: Path, smtp: SmtpSink, http: HttpSink) -> Path:
    (tmp_path / "sms-url").write_text(smseagle_url(http.port) + "\n")
    cfg = tmp_path / "wt.yaml"
    cfg.write_text(
        f"""site: lab
state_dir: {tmp_path / "state"}
targets:
  sw1: {{role: network, paths: [{{tcp: "127.0.0.1:1"}}]}}
notify:
  channels:
    - {{name: mail-oncall, url: "{mailto_url(smtp.port)}"}}
    - {{name: signal-oncall, url: "{signal_url(http.port)}"}}
    - {{name: sms-oncall, url_file: sms-url}}
"""
    )
    return cfg


def notify_test(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "watchtower", "notify-test", "-c", str(cfg), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_notify_test_cli_all_delivered(tmp_path: Path, smtp: SmtpSink, http: HttpSink) -> None:
    proc = notify_test(write_config(tmp_path, smtp, http))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["mail-oncall", "ok"],
        ["signal-oncall", "ok"],
        ["sms-oncall", "ok"],
    ], proc.stdout
    assert SMSEAGLE_TOKEN not in proc.stdout + proc.stderr
    # the sinks got a marked test: mail/Signal the long form, SMS the short one without a title
    assert len(smtp.messages) == 1 and "TEST" in smtp.messages[0].subject
    by_path = {r.path: r for r in http.requests}
    assert set(by_path) == {"/v2/send", "/jsonrpc/sms"}
    assert "TEST" in by_path["/v2/send"].json["message"]
    sms = by_path["/jsonrpc/sms"].json["params"]["message"]
    assert "TEST" in sms and not sms.startswith("[watchtower") and len(sms) <= 160


def test_notify_test_cli_one_channel_down(tmp_path: Path, smtp: SmtpSink, http: HttpSink) -> None:
    cfg = write_config(tmp_path, smtp, http)
    smtp.stop()
    proc = notify_test(cfg)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert rows["mail-oncall"].split()[1] == "FAILED" and "connection refused" in rows["mail-oncall"]
    assert rows["signal-oncall"].split()[1] == "ok" and rows["sms-oncall"].split()[1] == "ok"


def test_notify_test_cli_one_named_channel_and_unknown_name(
    tmp_path: Path, smtp: SmtpSink, http: HttpSink
) -> None:
    cfg = write_config(tmp_path, smtp, http)
    proc = notify_test(cfg, "--channel", "signal-oncall")
    assert proc.returncode == 0 and proc.stdout.split()[:2] == ["signal-oncall", "ok"], proc.stdout
    assert len(proc.stdout.splitlines()) == 1 and not smtp.messages
    proc = notify_test(cfg, "--channel", "pager")
    assert proc.returncode == 2
    assert "pager" in proc.stderr and "mail-oncall, signal-oncall, sms-oncall" in proc.stderr


def test_notify_test_cli_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "wt.yaml"
    cfg.write_text("site: lab\nnotify: {channels: [{name: x}]}\n")
    proc = notify_test(cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_apprise_is_imported_only_when_channels_exist() -> None:
    code = (
        "import sys\n"
        "from watchtower.notify.sender import make_senders\n"
        "assert make_senders([]) == {}\n"
        "print('apprise' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


async def test_smtp_reply_echoing_auth_data_is_scrubbed() -> None:
    """A server whose error reply echoes the ``AUTH PLAIN`` data (base64 of user and password)
    must not put the password, in any encoding, into the reason (which reaches the API, the
    report and the "channel failing" warning sent through the other channels). No mail server
    here echoes, so this one is a few lines of asyncio speaking just enough SMTP."""
    import base64

    password = "Zqsmtppw4d8e1f"
    echoed: list[str] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.lab.test ESMTP\r\n")
        while line := (await reader.readline()).decode().strip():
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                writer.write(b"250-mx.lab.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n")
            elif verb == "AUTH":
                data = line.split()[-1]
                echoed.append(data)
                writer.write(f"535 5.7.8 Username and Password not accepted for {data}\r\n".encode())
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"502 5.5.2 not here\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        s = sender(
            "mail", f"mailto://mon:{password}@127.0.0.1:{port}?to=x@lab.test&from=w@lab.test&mode=insecure"
        )
        result = await s.send(TITLE, BODY)
        s.close()
    finally:
        server.close()
        await server.wait_closed()
    assert not result.ok and echoed, result
    plain = base64.b64decode(echoed[0] + "==")
    assert password.encode() in plain  # the server did see (and echo) the credentials
    assert result.error is not None
    assert password not in result.error and echoed[0] not in result.error, result.error
