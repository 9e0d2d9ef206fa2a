"""``truenas``: a TrueNAS 25.04+ snapshot or replication task's last run, over JSON-RPC 2.0.

One websocket to ``wss://HOST/api/current``: ``auth.login_with_api_key [KEY]`` (result ``true``),
then ``pool.snapshottask.query`` or ``replication.query`` with ``[["id", "=", ID]]``. Each entry
carries ``state``, a dict the middleware builds in truenas/middleware
``src/middlewared/middlewared/plugins/zettarepl.py`` (the observer queue reader):
``{"state": "RUNNING"|"WAITING"|"FINISHED"|"ERROR"|"HOLD", "datetime": <utcnow>, "error": text
(ERROR), "reason": text (HOLD)}``, plus ``last_snapshot`` (``pool/ds@name``) from
``plugins/zettarepl_/state.py``. Datetimes travel as ``{"$date": milliseconds}`` (the
truenas_api_client JSON encoder).

``FINISHED`` at ``datetime`` is the newest restore point. An ``ERROR`` replaces the task's state,
so after one the time of the last good run is not in the answer: the source reports the failure
(``failed_at``) and no restore point, which is a warning until the next good run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp

from watchtower.backups._run import scrub
from watchtower.config import Backup
from watchtower.probes import Failure, ProbeContext, ProbeResult
from watchtower.probes.http import classify_client_error, ssl_context

MAX_MESSAGE = 4 * 1024 * 1024
_ids = itertools.count(1)


class _RpcError(Exception):
    pass


async def _call(ws: aiohttp.ClientWebSocketResponse, method: str, params: list[Any]) -> Any:
    request_id = next(_ids)
    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
    while True:
        message = await ws.receive()
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise _RpcError(f"connection closed during {method} ({message.type.name.lower()})")
        try:
            answer = json.loads(message.data)
        except ValueError:
            raise _RpcError(f"{method}: answer is not JSON") from None
        if not isinstance(answer, dict) or answer.get("id") != request_id:
            continue  # a notification (event subscription) or another call's answer
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise _RpcError(f"{method}: {error.get('message') or 'error'}")
        return answer.get("result")


def _stamp(value: Any) -> float | None:
    if isinstance(value, dict) and isinstance(value.get("$date"), int | float):
        return float(value["$date"]) / 1000.0
    return None


async def probe(backup: Backup, ctx: ProbeContext) -> ProbeResult:
    spec = backup.truenas
    assert spec is not None
    key = spec.secret("api_key")
    assert key is not None
    secret = key.get_secret_value()
    method = "pool.snapshottask.query" if spec.task == "snapshot" else "replication.query"
    start = time.perf_counter()
    try:
        tls = ssl_context(spec.ca_file, spec.insecure)
        async with (
            asyncio.timeout(ctx.timeout),
            aiohttp.ClientSession() as session,
            session.ws_connect(spec.url, ssl=tls, max_msg_size=MAX_MESSAGE, heartbeat=None) as ws,
        ):
            if await _call(ws, "auth.login_with_api_key", [secret]) is not True:
                return ProbeResult.fail(Failure.STATUS, "API key refused (auth.login_with_api_key)")
            rows = await _call(ws, method, [[["id", "=", spec.id]]])
    except TimeoutError:
        return ProbeResult.fail(Failure.TIMEOUT, f"no complete answer within {ctx.timeout:g}s")
    except _RpcError as exc:
        return ProbeResult.fail(Failure.PROTOCOL, scrub(str(exc), (secret,)))
    except (aiohttp.ClientError, OSError) as exc:
        failure, why = classify_client_error(exc)
        return ProbeResult.fail(failure, scrub(why, (secret,)))
    latency = time.perf_counter() - start
    if not isinstance(rows, list):
        return ProbeResult.fail(Failure.PROTOCOL, f"{method}: result is not a list", latency)
    if not rows:
        return ProbeResult.fail(Failure.CONTENT, f"no {spec.task} task with id {spec.id}", latency)
    state = rows[0].get("state") if isinstance(rows[0], dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("state"), str):
        return ProbeResult.fail(Failure.PROTOCOL, f"{spec.task} task {spec.id} has no state", latency)
    when = _stamp(state.get("datetime"))
    values: list[tuple[str, float]] = []
    what = state["state"]
    detail = f"{spec.task} task {spec.id}: {what}"
    if what == "FINISHED" and when is not None:
        values += [("newest", when), ("count", 1.0)]
    elif what == "ERROR" and when is not None:
        values.append(("failed_at", when))
        detail += f": {scrub(str(state.get('error') or ''), (secret,), 160)}"
    elif what == "HOLD":
        detail += f": {scrub(str(state.get('reason') or ''), (secret,), 160)}"
    last = rows[0].get("last_snapshot") or state.get("last_snapshot")
    if isinstance(last, str):
        detail += f" (last snapshot {scrub(last, limit=80)})"
    return ProbeResult(True, latency, None, detail, values=tuple(values))
