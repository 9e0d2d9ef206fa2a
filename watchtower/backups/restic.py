"""``restic``: ``restic snapshots --json [--latest 1] --no-lock --no-cache``.

``--no-lock``: a read-only repository (the safe way to let a monitor read it) cannot take the
shared lock, and restic would retry writing ``locks/`` until the deadline. ``--no-cache``: the
monitor has no home to cache in (systemd ``DynamicUser``). The password reaches restic as
``RESTIC_PASSWORD_FILE`` (the path, never the value). Each element of the answer is one snapshot
with ``time`` (RFC 3339 with nanoseconds and a zone), ``id``, ``hostname``, ``paths``, ``tags``;
``--latest 1`` keeps the newest per host and paths, so the newest is the maximum over all.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

from watchtower.backups._run import run_tool, scrub, tool_env
from watchtower.config import Backup, ResticSource
from watchtower.probes import Failure, ProbeContext, ProbeResult


def _argv(spec: ResticSource, all_snapshots: bool) -> list[str]:
    argv = [spec.binary, "-r", spec.repository, "snapshots", "--json", "--no-lock", "--no-cache", "-q"]
    if not all_snapshots:
        argv += ["--latest", "1"]
    if spec.host:
        argv += ["--host", spec.host]
    if spec.tag:
        argv += ["--tag", spec.tag]
    return argv


def parse(stdout: bytes) -> tuple[list[float], str]:
    """Snapshot times (UNIX) and a problem text ('' when the listing made sense)."""
    try:
        data = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [], f"restic printed no JSON listing ({len(stdout)} bytes)"
    if not isinstance(data, list):
        return [], "restic's listing is not a JSON array of snapshots"
    times = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("time"), str):
            return [], "a snapshot in restic's listing has no `time`"
        try:
            stamp = datetime.fromisoformat(item["time"])
        except ValueError:
            return [], f"snapshot time {scrub(item['time'], limit=40)!r} is not RFC 3339"
        if stamp.tzinfo is None:
            return [], "snapshot time without a zone"
        times.append(stamp.timestamp())
    return times, ""


async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult:
    spec = backup.restic
    assert spec is not None
    start = time.perf_counter()
    env = tool_env({"RESTIC_PASSWORD_FILE": spec.password_file.path})
    run = await run_tool(_argv(spec, backup.min_count is not None), env, ctx.timeout)
    latency = time.perf_counter() - start
    secret = (spec.password_file.value.get_secret_value(),)
    if run.returncode is None:
        failure = Failure.TIMEOUT if "did not finish" in run.problem else Failure.ERROR
        return ProbeResult.fail(failure, run.problem, latency)
    if run.returncode != 0:
        why = scrub(run.stderr, secret) or f"exit status {run.returncode}"
        return ProbeResult.fail(Failure.ERROR, f"restic failed: {why}", latency)
    times, problem = parse(run.stdout)
    if problem:
        return ProbeResult.fail(Failure.PROTOCOL, problem, latency)
    complaint = scrub(run.stderr, secret)
    if complaint:
        # restic skips snapshots it cannot load (corrupt, wrong key) with a message on stderr and
        # exit 0: "no snapshot" would hide a damaged repository behind "holds none"
        return ProbeResult.fail(Failure.CONTENT, f"restic listed with errors: {complaint}", latency)
    values: list[tuple[str, float]] = [("count", float(len(times)))]
    if times:
        values.append(("newest", max(times)))
    detail = f"{len(times)} snapshot(s)" + ("" if times else ": the repository holds none that match")
    return ProbeResult(True, latency, None, detail, values=tuple(values))
