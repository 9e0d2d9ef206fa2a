"""``pve``: Proxmox VE, a guest's backups, its failed backup jobs, and whether a job covers it.

Three reads with ``Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`` (PVEAuditor suffices),
each answered as ``{"data": ...}``. The shapes, as upstream declares them:

- ``GET /api2/json/nodes/{node}/storage/{storage}/content?content=backup&vmid=N``
  (proxmox/pve-storage ``src/PVE/API2/Storage/Content.pm``, method ``index``): an array of
  ``volid`` (string), ``vmid`` (integer), ``format``, ``size``, ``ctime`` (integer, seconds since
  the epoch, optional), ``notes``, ``encrypted``, ``verification`` (``{state, upid}``, PBS storages
  only), ``protected``;
- ``GET /api2/json/nodes/{node}/tasks?typefilter=vzdump&errors=1&vmid=N``: the node's failed
  vzdump tasks (``upid``, ``type``, ``id``, ``starttime``, ``endtime``, ``status``);
- ``GET /api2/json/cluster/backup-info/not-backed-up`` (proxmox/pve-manager
  ``PVE/API2/BackupInfo.pm``, ``get_guests_not_in_backup``): ``[{vmid, name, type: qemu|lxc}]``,
  the guests no backup job includes.
"""

from __future__ import annotations

import time
from typing import Any

from watchtower.backups._http import get_json
from watchtower.config import Backup
from watchtower.probes import Failure, ProbeContext, ProbeResult

REFUSED = "needs PVEAuditor on / and Datastore.Audit on the storage"


def _content(data: Any, vmid: int) -> tuple[list[tuple[float, bool]], str]:
    if not isinstance(data, list):
        return [], "content listing is not an array"
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("volid"), str):
            return [], "a volume in the content listing has no `volid`"
        if item.get("vmid") is not None and item.get("vmid") != vmid:
            continue
        ctime = item.get("ctime")
        if not isinstance(ctime, int) or isinstance(ctime, bool):
            continue  # a backup without ctime cannot be dated; it does not count as fresh
        verification = item.get("verification")
        ok = isinstance(verification, dict) and verification.get("state") == "ok"
        out.append((float(ctime), ok))
    return out, ""


def _failed(data: Any, vmid: int) -> float | None:
    if not isinstance(data, list):
        return None
    times = [
        float(t["starttime"])
        for t in data
        if isinstance(t, dict)
        and t.get("type") == "vzdump"
        and str(t.get("id", "")) in ("", str(vmid))
        and isinstance(t.get("starttime"), int)
        and t.get("status") not in (None, "OK")
    ]
    return max(times, default=None)


async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult:
    spec = backup.pve
    assert spec is not None
    secret = spec.secret("token_secret")
    assert secret is not None
    text = secret.get_secret_value()
    base = f"{spec.url.rstrip('/')}/api2/json"
    headers = {"Authorization": f"PVEAPIToken={spec.token_id}={text}"}
    tls = (spec.ca_file, spec.insecure)
    start = time.perf_counter()
    content = await get_json(
        ctx,
        f"{base}/nodes/{spec.node}/storage/{spec.storage}/content",
        {"content": "backup", "vmid": str(spec.vmid)},
        headers,
        tls,
        text,
        REFUSED,
    )
    if isinstance(content, ProbeResult):
        return content
    snaps, problem = _content(content, spec.vmid)
    if problem:
        return ProbeResult.fail(Failure.PROTOCOL, problem, time.perf_counter() - start)
    tasks = await get_json(
        ctx,
        f"{base}/nodes/{spec.node}/tasks",
        {"typefilter": "vzdump", "errors": "1", "vmid": str(spec.vmid)},
        headers,
        tls,
        text,
        REFUSED,
    )
    uncovered = await get_json(
        ctx, f"{base}/cluster/backup-info/not-backed-up", {}, headers, tls, text, REFUSED
    )
    values: list[tuple[str, float]] = [("count", float(len(snaps)))]
    if snaps:
        values.append(("newest", max(t for t, _ in snaps)))
    verified = [t for t, ok in snaps if ok]
    if verified:
        values.append(("newest_verified", max(verified)))
    notes = []
    if not isinstance(tasks, ProbeResult):
        failed = _failed(tasks, spec.vmid)
        if failed is not None:
            values.append(("failed_at", failed))
    else:
        notes.append(f"tasks not read: {tasks.detail}")
    if not isinstance(uncovered, ProbeResult) and isinstance(uncovered, list):
        for guest in uncovered:
            if isinstance(guest, dict) and isinstance(guest.get("vmid"), int):
                values.append(("uncovered_vmid", float(guest["vmid"])))
    elif isinstance(uncovered, ProbeResult):
        notes.append(f"coverage not read: {uncovered.detail}")
    detail = f"{len(snaps)} backup(s) of {spec.vmid}, {len(verified)} verified" + "".join(
        f"; {n}" for n in notes
    )
    return ProbeResult(True, time.perf_counter() - start, None, detail, values=tuple(values))
