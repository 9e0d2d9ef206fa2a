"""``pbs``: Proxmox Backup Server, one backup group's snapshots through the REST API.

``GET /api2/json/admin/datastore/{store}/snapshots?backup-type=vm&backup-id=ID[&ns=NS]`` with
``Authorization: PBSAPIToken=USER@REALM!TOKENID:SECRET`` (a token with DatastoreAudit suffices).
The answer is ``{"data": [SnapshotListItem, ...]}``; the shapes, as upstream declares them in
proxmox/proxmox-backup ``pbs-api-types/src/datastore.rs``:

- ``SnapshotListItem`` (kebab-case): ``backup-type``, ``backup-id``, ``backup-time`` (i64, UNIX
  epoch), optional ``verification`` (``SnapshotVerifyState``), ``files``, optional ``size``,
  ``protected`` (bool), optional ``comment``, ``fingerprint``, ``owner``;
- ``SnapshotVerifyState``: ``upid`` and ``state``, a ``VerifyState`` serialized lowercase:
  ``ok`` | ``failed``.

Only snapshots whose verification is ``ok`` count as verified: an unverified one may be fine, a
failed one is known not to be.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from watchtower.backups._run import scrub
from watchtower.config import Backup
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.http import _read_capped, classify_client_error, new_session, ssl_context

MAX_BODY = 8 * 1024 * 1024


def parse(body: bytes, backup_type: str, backup_id: str) -> tuple[list[tuple[float, bool]], str]:
    """(backup-time, verified ok) per snapshot of the group, and a problem text."""
    try:
        data: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [], f"answer is not JSON ({len(body)} bytes)"
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return [], "answer has no `data` array"
    out = []
    for item in items:
        if not isinstance(item, dict):
            return [], "a snapshot in the answer is not an object"
        if item.get("backup-type") != backup_type or str(item.get("backup-id")) != backup_id:
            continue  # the filter is the server's; a server that ignores it must not mislead us
        stamp = item.get("backup-time")
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            return [], "a snapshot has no integer `backup-time`"
        verification = item.get("verification")
        ok = isinstance(verification, dict) and verification.get("state") == "ok"
        out.append((float(stamp), ok))
    return out, ""


async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult:
    spec = backup.pbs
    assert spec is not None
    secret = spec.secret("token_secret")
    assert secret is not None
    secret_text = secret.get_secret_value()
    params = {"backup-type": spec.backup_type, "backup-id": spec.backup_id}
    if spec.namespace:
        params["ns"] = spec.namespace
    url = f"{spec.url.rstrip('/')}/api2/json/admin/datastore/{spec.datastore}/snapshots"
    headers = {"Authorization": f"PBSAPIToken={spec.token_id}:{secret_text}"}
    start = time.perf_counter()
    try:
        async with AsyncExitStack() as stack:
            session = ctx.http_session
            if session is None:
                session = await stack.enter_async_context(new_session())
            async with asyncio.timeout(ctx.timeout):
                response = await stack.enter_async_context(
                    session.get(
                        url,
                        params=params,
                        headers=headers,
                        ssl=ssl_context(spec.ca_file, spec.insecure),
                        allow_redirects=False,
                    )
                )
                body = await _read_capped(response, MAX_BODY + 1)
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        failure, why = classify_client_error(exc)
        return ProbeResult.fail(failure, scrub(why, (secret_text,)))
    latency = time.perf_counter() - start
    if response.status in (401, 403):
        return ProbeResult.fail(
            Failure.STATUS, f"status {response.status}: token refused (needs DatastoreAudit)", latency
        )
    if response.status != 200:
        return ProbeResult.fail(Failure.STATUS, f"status {response.status}, expected 200", latency)
    if len(body) > MAX_BODY:
        return ProbeResult.fail(Failure.PROTOCOL, f"answer larger than {MAX_BODY // 1048576} MB", latency)
    snaps, problem = parse(body, spec.backup_type, spec.backup_id)
    if problem:
        return ProbeResult.fail(Failure.PROTOCOL, problem, latency)
    values: list[tuple[str, float]] = [("count", float(len(snaps)))]
    if snaps:
        values.append(("newest", max(t for t, _ in snaps)))
    verified = [t for t, ok in snaps if ok]
    if verified:
        values.append(("newest_verified", max(verified)))
    detail = f"{len(snaps)} snapshot(s), {len(verified)} verified"
    return ProbeResult(True, latency, None, detail, values=tuple(values))
