"""``borg``: ``borg list --json [--last 1] [--glob-archives PREFIX*] --bypass-lock REPO``.

``--bypass-lock`` reads a repository the monitor may not write (read-only mount, append-only
server). ``archives[].start`` is the archive's start; borg 1.2 prints it as local time of the
machine that made it, without a zone, so the source's ``timezone`` says which (default UTC). The
repository's ``last_modified`` is never used: a compaction rewrites it without a new archive. The
passphrase reaches borg through ``BORG_PASSCOMMAND`` reading the file (the path, never the value).
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from datetime import datetime
from zoneinfo import ZoneInfo

from watchtower.backups._run import run_tool, scrub, tool_env
from watchtower.config import Backup, BorgSource
from watchtower.probes import Failure, ProbeContext, ProbeResult


def _argv(spec: BorgSource, all_archives: bool) -> list[str]:
    argv = [spec.binary, "list", "--json", "--bypass-lock"]
    if not all_archives:
        argv += ["--last", "1"]
    if spec.prefix:
        argv += ["--glob-archives", f"{spec.prefix}*"]
    return [*argv, spec.repository]


def parse(stdout: bytes, zone: str) -> tuple[list[float], str]:
    try:
        data = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [], f"borg printed no JSON listing ({len(stdout)} bytes)"
    archives = data.get("archives") if isinstance(data, dict) else None
    if not isinstance(archives, list):
        return [], "borg's listing has no `archives` array"
    times = []
    for item in archives:
        start = item.get("start") if isinstance(item, dict) else None
        if not isinstance(start, str):
            return [], "an archive in borg's listing has no `start`"
        try:
            stamp = datetime.fromisoformat(start)
        except ValueError:
            return [], f"archive start {scrub(start, limit=40)!r} is not an ISO time"
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=ZoneInfo(zone))
        times.append(stamp.timestamp())
    return times, ""


async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult:
    spec = backup.borg
    assert spec is not None
    start = time.perf_counter()
    extra = {
        # borg keeps per-repository security state under its base dir; a throwaway one keeps the
        # monitor stateless and lets it read a repository it has not seen before
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        "BORG_EXIT_CODES": "legacy",
    }
    secrets: tuple[str, ...] = ()
    if spec.passphrase_file is not None:
        extra["BORG_PASSCOMMAND"] = f"cat -- {shlex.quote(spec.passphrase_file.path)}"
        secrets = (spec.passphrase_file.value.get_secret_value(),)
    else:
        extra["BORG_PASSPHRASE"] = ""  # an encrypted repository fails at once instead of prompting
    with tempfile.TemporaryDirectory(prefix="watchtower-borg-") as base:
        env = tool_env({**extra, "BORG_BASE_DIR": base})
        run = await run_tool(_argv(spec, backup.min_count is not None), env, ctx.timeout)
    latency = time.perf_counter() - start
    if run.returncode is None:
        failure = Failure.TIMEOUT if "did not finish" in run.problem else Failure.ERROR
        return ProbeResult.fail(failure, run.problem, latency)
    if run.returncode != 0:
        why = scrub(run.stderr, secrets) or f"exit status {run.returncode}"
        return ProbeResult.fail(Failure.ERROR, f"borg failed: {why}", latency)
    times, problem = parse(run.stdout, spec.timezone)
    if problem:
        return ProbeResult.fail(Failure.PROTOCOL, problem, latency)
    values: list[tuple[str, float]] = [("count", float(len(times)))]
    if times:
        values.append(("newest", max(times)))
    detail = f"{len(times)} archive(s)" + ("" if times else ": the repository holds none that match")
    return ProbeResult(True, latency, None, detail, values=tuple(values))
